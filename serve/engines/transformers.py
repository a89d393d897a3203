"""The transformers engine: a Hugging Face causal LM in the replica (CPU or GPU).

It also gives token probabilities, so it supports the probability-weighted judge.

Determinism: every row carries its own sampling parameters and seed, and the transformers engine
samples each row from its own random generator, so a row's text does not depend on which other
rows share its forward batch (up to float rounding of differently shaped batches). This is what lets
the Serve app batch unrelated requests together and still promise "same seed, same output".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from serve.engines.base import (_SEED_MOD, DEFAULT_MAX_BATCH, GenOut, GenRow, _judge_rows, _LocalModel,
                                cut_at_stop, row_seed)


class _RowSampler:
    """Logits processor that samples every row from its own generator, with its own parameters.

    ``generate`` runs greedy; this processor replaces each sampling row's scores by a one-hot of the
    token it drew, so greedy picks exactly that token. Each row consumes one uniform draw per step
    from its own ``torch.Generator``, so its tokens depend only on its seed and its own logits.
    Rows that reached their own ``max_new_tokens`` are forced to EOS. The generators live in the rows'
    :class:`GenState`, so a row continued in a later call draws on from where it stopped.
    """

    def __init__(self, rows: list[GenRow], remaining: list[int], gens: list, prompt_width: int, eos_id: int | None):
        import torch

        self.prompt_width = prompt_width
        self.eos_id = eos_id
        self.temps = torch.tensor([max(0.0, float(r.temperature)) for r in rows], dtype=torch.float32)
        self.top_p = torch.tensor([float(r.top_p) for r in rows], dtype=torch.float32)
        self.max_new = torch.tensor([int(n) for n in remaining])
        self.gens = gens
        self.sampling = self.temps > 0

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.prompt_width
        # One draw per row per step, whether the row samples or not, keeps every stream aligned.
        u = torch.stack([torch.rand((), generator=g) for g in self.gens]).to(scores.device)
        out = scores.float().clone()
        idx = torch.nonzero(self.sampling.to(scores.device)).flatten()
        if idx.numel():
            logits = out[idx] / self.temps.to(scores.device)[idx, None]
            probs = torch.softmax(logits, dim=-1)
            p_sorted, order = torch.sort(probs, dim=-1, descending=True)
            before = torch.cumsum(p_sorted, dim=-1) - p_sorted
            p_sorted = p_sorted * (before < self.top_p.to(scores.device)[idx, None])
            cdf = torch.cumsum(p_sorted, dim=-1)
            cdf = cdf / cdf[:, -1:]
            pick = torch.searchsorted(cdf, u[idx, None].to(cdf.dtype)).clamp(max=cdf.shape[-1] - 1)
            token = order.gather(1, pick)
            out[idx] = float("-inf")
            out[idx.unsqueeze(1), token] = 0.0
        if self.eos_id is not None:
            done = torch.nonzero((step >= self.max_new).to(scores.device)).flatten()
            if done.numel():
                out[done] = float("-inf")
                out[done, self.eos_id] = 0.0
        return out


@dataclass
class GenState:
    """A row being generated, possibly over several :meth:`TransformersEngine.advance` calls.

    Attributes:
        row: The request row.
        generator: The row's sampling stream (one draw per generated token).
        prompt_ids: Token ids of its rendered prompt (set on first use).
        tokens: Tokens generated so far (EOS excluded).
        out: The finished result, or None while the row is still running.
    """

    row: GenRow
    generator: Any = None
    prompt_ids: list[int] | None = None
    tokens: list[int] = field(default_factory=list)
    text_len: int = 0
    out: GenOut | None = None
    counted: bool = False     # the app has counted its finish reason (Refiner.stats)


class _Stopper:
    """Stopping criterion: ends a row at its deadline or cancellation, or every row when ``yield_now`` says so.

    ``stopped_at[j]`` is how many of this call's tokens row j keeps (None: it ran on to its EOS or cap).
    """

    def __init__(self, rows: list[GenRow], width: int, eos_ids: list[int], yield_now) -> None:
        import torch

        self.rows, self.width, self.yield_now = rows, width, yield_now
        self.eos = torch.tensor(eos_ids or [-1], dtype=torch.long)
        self.t0 = time.monotonic()
        self.stopped_at: list[int | None] = [None] * len(rows)
        self.yielded = False
        self.some_done = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        step = input_ids.shape[1] - self.width
        now = time.monotonic()
        if not self.yielded and self.yield_now is not None:
            # Sticky: a row that ended stays done even when the padding after its EOS is another token.
            self.some_done = self.some_done or bool(torch.isin(input_ids[:, -1].cpu(), self.eos).any())
            self.yielded = bool(self.yield_now(now - self.t0, step, self.some_done))
        for j, r in enumerate(self.rows):
            if self.stopped_at[j] is None and (self.yielded or r.ended(now)):
                self.stopped_at[j] = step
        return torch.tensor([s is not None for s in self.stopped_at], dtype=torch.bool, device=input_ids.device)


class TransformersEngine(_LocalModel):
    """A causal LM and its tokenizer, loaded once, generating for batches of chats.

    Chats go through the tokenizer's chat template when it has one (the teacher is an instruct
    model) and through :func:`plain_render` otherwise (the tiny test model). Batches are left-padded
    so every prompt ends where generation starts.

    Args:
        model: Model spec understood by ``middo_ray.models.resolve_model``: 'smollm2', 'tiny',
            a local checkpoint directory or a Hugging Face id.
        dtype: 'auto' (bfloat16 on GPU, float32 on CPU), 'float32', 'bfloat16' or 'float16'.
        max_batch: Most rows in one forward batch.
        judge_batch_tokens: Token budget per forward batch of the probability-weighted judge.
    """

    name = "transformers"

    def __init__(self, model: str, dtype: str = "auto", max_batch: int = DEFAULT_MAX_BATCH,
                 judge_batch_tokens: int = 4096) -> None:
        from middo_ray.models import load_model

        self._model, tok = load_model(model, dtype=dtype)
        self._init_local(model, tok, int(getattr(self._model.config, "max_position_embeddings", 0) or 0))
        # Left padding: generation appends after the last position, which must be a real token.
        self._tok.padding_side = "left"
        self._max_batch = max(1, int(max_batch))
        self._judge_batch_tokens = int(judge_batch_tokens)
        self._device = next(self._model.parameters()).device
        self._eos_ids = self._stop_ids()
        import torch

        # torch's thread count is per OS thread (OpenMP); the Serve replica computes in worker threads,
        # which would otherwise start with Ray's OMP_NUM_THREADS (often 1). Re-applied in every call.
        self._threads = torch.get_num_threads()

    async def sleep(self, level: int = 1) -> None:
        """Frees the GPU until :meth:`wake` (refine.gpu_handoff='sleep'): the weights move to CPU memory at
        either level (a model this engine serves fits there), and CUDA's cached blocks are returned."""
        import asyncio

        import torch

        await asyncio.to_thread(self._model.to, "cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    async def wake(self) -> None:
        """Moves the weights back to the device they were loaded on."""
        import asyncio

        await asyncio.to_thread(self._model.to, self._device)

    def _use_threads(self) -> None:
        import torch

        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)

    def _stop_ids(self) -> list[int]:
        """EOS ids of the tokenizer and of the model's generation config, without duplicates."""
        ids: list[int] = []
        for source in (self._tok.eos_token_id, getattr(self._model.generation_config, "eos_token_id", None)):
            for value in source if isinstance(source, (list, tuple)) else [source]:
                if value is not None and int(value) not in ids:
                    ids.append(int(value))
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=False)["input_ids"])

    def start(self, rows: list[GenRow]) -> list["GenState"]:
        """One :class:`GenState` per row, to be run by :meth:`advance` (tokenized on first use)."""
        import torch

        return [GenState(row=r, generator=torch.Generator().manual_seed(int(r.seed) % _SEED_MOD)) for r in rows]

    def _prepare(self, state: "GenState") -> None:
        """Renders and tokenizes a row's prompt once, keeping the end of an over-long prompt.

        When prompt plus generation would exceed the model's positions, the start of the prompt is
        cut: the end holds the generation prompt (and, in our prompts, the text to rewrite), without
        which the model cannot answer at all.
        """
        if state.prompt_ids is not None:
            return
        # An empty chat would give no token to start from; the BOS (or EOS) text stands in for it.
        filler = self._tok.bos_token or self._tok.eos_token or " "
        text = self.render(state.row.messages, state.row.continue_final) or filler
        # The chat template already wrote BOS and role tokens; adding specials again would double them.
        kwargs: dict[str, Any] = {"add_special_tokens": not self._use_template}
        if self._max_len:
            budget = self._max_len - int(state.row.max_new_tokens)
            if budget < 8:
                raise ValueError(f"max_new_tokens={state.row.max_new_tokens} leaves no room for the prompt in a model "
                                 f"with {self._max_len} positions; lower max_new_tokens")
            self._tok.truncation_side = "left"
            kwargs.update(truncation=True, max_length=budget)
        state.text_len = len(text)
        state.prompt_ids = list(self._tok(text, **kwargs)["input_ids"])

    def generate_rows(self, rows: list[GenRow]) -> list[GenOut]:
        """Generates every row to its end, in length-sorted forward batches of at most ``max_batch`` rows.

        Returns:
            One GenOut per row, in input order; special tokens stripped, prefills not repeated.
        """
        states = self.start(rows)
        for s in states:
            self._prepare(s)
        # Length-sorted chunks waste less compute on padding; results stay in input order.
        order = sorted(range(len(states)), key=lambda i: (states[i].text_len, i))
        for begin in range(0, len(order), self._max_batch):
            self.advance([states[i] for i in order[begin:begin + self._max_batch]])
        return [s.out for s in states]  # type: ignore[misc]

    def advance(self, states: list["GenState"], yield_now: Callable[[float, int, bool], bool] | None = None) -> None:
        """Runs one forward-batch generation over the unfinished states (at most ``max_batch`` at a time).

        A state is finished (``out`` set) at its EOS, its ``max_new_tokens``, its deadline or its
        cancellation. ``yield_now(seconds, tokens, some_row_done)``, asked after every token, may end the
        call early: the unfinished rows keep their tokens and their random generators, and a later
        ``advance`` continues them from the prompt plus what they have (one re-read of that text).
        This is how the app lets a long generation make room for the requests waiting behind it.
        """
        live = []
        now = time.monotonic()
        for s in states:
            if s.out is not None:
                continue
            self._prepare(s)
            why = s.row.ended(now)
            if why:
                s.out = self._finish(s, why)
            else:
                live.append(s)
        for begin in range(0, len(live), self._max_batch):
            self._advance_chunk(live[begin:begin + self._max_batch], yield_now)

    def _advance_chunk(self, chunk: list["GenState"], yield_now) -> None:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        self._use_threads()
        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else (self._eos_ids or [0])[0]
        seqs = [s.prompt_ids + s.tokens for s in chunk]
        width = max(len(x) for x in seqs)
        # Left padding: every row's text ends where generation starts.
        input_ids = torch.full((len(chunk), width), int(pad), dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, seq in enumerate(seqs):
            input_ids[j, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention[j, width - len(seq):] = 1
        remaining = [int(s.row.max_new_tokens) - len(s.tokens) for s in chunk]
        rows = [s.row for s in chunk]
        sampler = _RowSampler(rows, remaining, [s.generator for s in chunk], width,
                              self._eos_ids[0] if self._eos_ids else None)
        stopper = _Stopper(rows, width, self._eos_ids, yield_now)
        gen_cfg = GenerationConfig(max_new_tokens=max(remaining), do_sample=False, eos_token_id=self._eos_ids or None,
                                   pad_token_id=pad, bos_token_id=self._tok.bos_token_id)
        with torch.inference_mode():
            out = self._model.generate(input_ids=input_ids.to(self._device), attention_mask=attention.to(self._device),
                                       generation_config=gen_cfg, logits_processor=[sampler],
                                       stopping_criteria=StoppingCriteriaList([stopper]))
        new_tokens = out[:, width:].tolist()
        now = time.monotonic()
        for j, s in enumerate(chunk):
            valid = new_tokens[j][:remaining[j]]
            if stopper.stopped_at[j] is not None:
                valid = valid[:stopper.stopped_at[j]]
            hit_eos = False
            for k, t in enumerate(valid):
                if t in self._eos_ids:
                    valid, hit_eos = valid[:k], True
                    break
            s.tokens.extend(valid)
            if hit_eos:
                s.out = self._finish(s, "stop")
            elif len(s.tokens) >= int(s.row.max_new_tokens):
                s.out = self._finish(s, "length")
            elif s.row.ended(now):
                s.out = self._finish(s, s.row.ended(now) or "timeout")
            elif not stopper.yielded:
                # generate ended the row without EOS or cap (e.g. the model's positions ran out).
                s.out = self._finish(s, "length")

    def _finish(self, state: "GenState", reason: str) -> GenOut:
        """Decodes a row's tokens and applies its stop strings."""
        text = self._tok.decode(state.tokens, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, state.row.stop)
        if stopped:
            reason = "stop"
        return GenOut(text=text.strip(), prompt_tokens=len(state.prompt_ids or []), completion_tokens=len(state.tokens),
                      finish_reason=reason)

    def generate(self, prompts: list[str], max_new_tokens: int = 160, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, prefills: list[str] | None = None) -> list[str]:
        """Convenience: one completion per prompt with shared parameters (row i seeded by (seed, i))."""
        rows = [GenRow(messages=[{"role": "user", "content": p}]
                       + ([{"role": "assistant", "content": prefills[i]}] if prefills else []),
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=row_seed(seed, i), continue_final=bool(prefills))
                for i, p in enumerate(prompts)]
        return [o.text for o in self.generate_rows(rows)]

    def judge_prob(self, rows: list[dict], template: str = "auto", cutoff_len: int = 1024):
        """(N, 6) probability-weighted judge scores (NaN = no score), as the diagnosis computes them.

        Args:
            rows: Dicts with instruction, input, output.
            template: 'default', 'chat', or 'auto' (chat when the tokenizer has a chat template).
            cutoff_len: Token cap of one judge prompt.
        """
        from middo_ray.judge import judge_scores

        return self._score(judge_scores, rows, template, cutoff_len)

    supports_ifd = True

    def ifd(self, rows: list[dict], template: str = "auto", cutoff_len: int = 1024):
        """(N,) IFD of each row under the served model (NaN = undefined), encoded as the diagnosis encodes it.

        Args:
            rows: Dicts with instruction, input, output.
            template: 'default', 'chat', or 'auto' (chat when the tokenizer has a chat template).
            cutoff_len: Token cap of one encoded row.
        """
        from middo_ray.scoring import ifd_scores

        return self._score(ifd_scores, rows, template, cutoff_len)

    def _score(self, fn, rows: list[dict], template: str, cutoff_len: int):
        """``fn(model, tokenizer, rows, template, cutoff_len, batch_tokens)`` over wire rows, with the judge's
        template ('auto' resolved), cutoff and token budget."""
        self._use_threads()
        template, cutoff_len = self._judge_setup(template, cutoff_len)
        return fn(self._model, self._tok, _judge_rows(rows), template, cutoff_len, self._judge_batch_tokens)
