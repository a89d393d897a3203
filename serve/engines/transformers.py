"""The transformers engine: a Hugging Face causal LM in the replica (CPU or GPU).

It also gives token probabilities, so it supports the probability-weighted judge.

Determinism: every row carries its own sampling parameters and seed, and the transformers engine
samples each row from its own random generator, so a row's text does not depend on which other
rows share its forward batch (up to float rounding of differently shaped batches). This is what lets
the Serve app batch unrelated requests together and still promise "same seed, same output".
"""

from __future__ import annotations

from typing import Any

from serve.engines.base import (_SEED_MOD, DEFAULT_MAX_BATCH, GenOut, GenRow, _judge_rows, _LocalModel,
                                cut_at_stop, row_seed)


class _RowSampler:
    """Logits processor that samples every row from its own generator, with its own parameters.

    ``generate`` runs greedy; this processor replaces each sampling row's scores by a one-hot of the
    token it drew, so greedy picks exactly that token. Each row consumes one uniform draw per step
    from its own ``torch.Generator``, so its tokens depend only on its seed and its own logits.
    Rows that reached their own ``max_new_tokens`` are forced to EOS.
    """

    def __init__(self, rows: list[GenRow], prompt_width: int, eos_id: int | None):
        import torch

        self.prompt_width = prompt_width
        self.eos_id = eos_id
        self.temps = torch.tensor([max(0.0, float(r.temperature)) for r in rows], dtype=torch.float32)
        self.top_p = torch.tensor([float(r.top_p) for r in rows], dtype=torch.float32)
        self.max_new = torch.tensor([int(r.max_new_tokens) for r in rows])
        self.gens = [torch.Generator().manual_seed(int(r.seed) % _SEED_MOD) for r in rows]
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

    def _encode(self, texts: list[str], max_new_tokens: int) -> dict[str, Any]:
        """Tokenizes a chunk with left padding, keeping the end of over-long prompts.

        When prompt plus generation would exceed the model's positions, the start of the prompt is
        cut: the end holds the generation prompt (and, in our prompts, the text to rewrite), without
        which the model cannot answer at all.
        """
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
        # The chat template already wrote BOS and role tokens; adding specials again would double them.
        kwargs["add_special_tokens"] = not self._use_template
        if self._max_len:
            budget = self._max_len - max_new_tokens
            if budget < 8:
                raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a model "
                                 f"with {self._max_len} positions; lower max_new_tokens")
            self._tok.truncation_side = "left"
            kwargs.update(truncation=True, max_length=budget)
        enc = self._tok(texts, **kwargs)
        return {k: v.to(self._device) for k, v in enc.items()}

    def generate_rows(self, rows: list[GenRow]) -> list[GenOut]:
        """Generates every row, in length-sorted forward batches of at most ``max_batch`` rows.

        Returns:
            One GenOut per row, in input order; special tokens stripped, prefills not repeated.
        """
        import torch
        from transformers import GenerationConfig

        if not rows:
            return []
        self._use_threads()
        # An empty chat would give no token to start from; the BOS (or EOS) text stands in for it.
        filler = self._tok.bos_token or self._tok.eos_token or " "
        texts = [self.render(r.messages, r.continue_final) or filler for r in rows]
        # Length-sorted chunks waste less compute on padding; results are put back in input order.
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        outputs: list[GenOut | None] = [None] * len(rows)
        pad = self._tok.pad_token_id
        for start in range(0, len(order), self._max_batch):
            idx = order[start:start + self._max_batch]
            chunk = [rows[i] for i in idx]
            max_new = max(int(r.max_new_tokens) for r in chunk)
            enc = self._encode([texts[i] for i in idx], max_new)
            width = enc["input_ids"].shape[1]
            sampler = _RowSampler(chunk, width, self._eos_ids[0] if self._eos_ids else None)
            gen_cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=self._eos_ids or None,
                                       pad_token_id=pad, bos_token_id=self._tok.bos_token_id)
            with torch.inference_mode():
                out = self._model.generate(**enc, generation_config=gen_cfg, logits_processor=[sampler])
            # With left padding every row's prompt ends at the same column, so new tokens start there.
            new_tokens = out[:, width:].tolist()
            prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
            for j, i in enumerate(idx):
                outputs[i] = self._finish(new_tokens[j], rows[i], int(prompt_lens[j]))
        return outputs  # type: ignore[return-value]

    def _finish(self, tokens: list[int], row: GenRow, prompt_tokens: int) -> GenOut:
        """Cuts a row's new tokens at its EOS and its own cap, decodes, applies stop strings."""
        n = 0
        hit_eos = False
        for t in tokens[: int(row.max_new_tokens)]:
            if t in self._eos_ids:
                hit_eos = True
                break
            n += 1
        text = self._tok.decode(tokens[:n], skip_special_tokens=True)
        text, stopped = cut_at_stop(text, row.stop)
        reason = "stop" if (hit_eos or stopped or n < int(row.max_new_tokens)) else "length"
        return GenOut(text=text.strip(), prompt_tokens=prompt_tokens, completion_tokens=n, finish_reason=reason)

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

        self._use_threads()
        template, cutoff_len = self._judge_setup(template, cutoff_len)
        return judge_scores(self._model, self._tok, _judge_rows(rows), template, cutoff_len, self._judge_batch_tokens)
