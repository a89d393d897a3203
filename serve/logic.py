"""What the app does with an engine: refine, judge, chat. No Serve, no HTTP.

Every function takes an async ``generate(rows) -> outs`` callable, so the deployment can put its
dynamic batcher behind it while tests and benchmarks call an engine directly.

Refine: each sample goes through two generation steps, batched over all samples of the request
that are still pending:

1. rewrite: the operation's teacher prompt; the answer must contain the operation's marker
   (strict: text without the marker is rejected, even when it looks like a prompt), and the text
   after it must pass ``validate_rewrite``; synthesized prompts must also not copy a hint;
2. answer: a fresh answer to the new prompt, checked by ``validate_answer``.

A failed step is retried up to ``max_retries`` times with a different seed (when sampling; greedy
decoding would only repeat itself). An item that still fails is returned with status "failed" and a
reason: row failures are data, the caller keeps its original sample. A synthesize item with fewer
than two hints fails the same way (per item, not 422), so one bad row never rejects its batch.

Judge: six judgements per sample (factuality, clarity, completeness of the prompt and of the
response). Mode 'prob' reads the expected score from the model's next-token distribution
(``middo_ray.judge.judge_scores``); mode 'generate' samples a short answer and parses a leading
number with ``middo_ray.prompts.parse_score``; unparseable answers are missing (None), never 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from middo_ray.prompts import (answer_prompt, judge_prompt, parse_marked, parse_score, rewrite_prompt,
                               validate_answer, validate_rewrite)
from middo_ray.schema import JUDGE_DIMENSIONS
from middo_ray.wire import (DimensionScores, JudgeRequest, JudgeResponse, JudgeResult, RefineRequest, RefineResponse,
                            RefineResult, RefineSample, SamplingParams)
from middo_ray.signals.quality import aggregate_quality
from serve.engines import Engine, GenOut, GenRow, row_seed

Generate = Callable[[list[GenRow]], Awaitable[list[GenOut]]]

# Seeds of successive steps/attempts are spaced by a large odd number so that no two
# (request seed, step, attempt) triples of nearby requests share a seed.
_SEED_STRIDE = 1_000_003
_SEED_MOD = 2**31 - 1
JUDGE_TARGETS = ("prompt", "response")


def fresh_seed() -> int:
    """A random seed for requests that asked for none (as an unseeded OpenAI-style call would)."""
    return random.SystemRandom().randrange(_SEED_MOD)


def logic_version() -> str:
    """Fingerprint of every prompt text the app sends: part of the loop's cache keys."""
    probe = [rewrite_prompt(op, "p", ["h1", "h2"])[0] for op in ("simplify", "improve", "synthesize")]
    probe += [answer_prompt(op, "p") for op in ("simplify", "improve")]
    probe += [judge_prompt({"instruction": "p", "output": "r"}, d, t) for t in JUDGE_TARGETS for d in JUDGE_DIMENSIONS]
    return hashlib.sha256("\x00".join(probe).encode()).hexdigest()[:12]


def direct(engine: Engine) -> Generate:
    """An async generate callable that runs the engine in a worker thread (no batching)."""

    async def gen(rows: list[GenRow]) -> list[GenOut]:
        return await asyncio.to_thread(engine.generate_rows, rows)

    return gen


# ---------------------------------------------------------------------------------------------
# Refine.


@dataclass
class _Item:
    """Working state of one sample while a request is processed."""

    sample: RefineSample
    prompt: str
    teacher_prompt: str = ""
    marker: str = ""
    new_prompt: str = ""
    answer: str = ""
    reason: str = ""
    failed: bool = False
    attempts: int = 0


def sample_prompt(sample: RefineSample) -> str:
    """The sample's prompt as the reference rewrites it: instruction, then input on a new line."""
    return f"{sample.instruction}\n{sample.input}" if sample.input else sample.instruction


def _step_seed(base: int, step: int, attempt: int) -> int:
    return (base + _SEED_STRIDE * (step * 16 + attempt + 1)) % _SEED_MOD


def _check_rewrite(item: _Item, text: str, operation: str) -> str | None:
    """Parses one rewrite output into the item; returns why it is unusable, or None."""
    candidate = parse_marked(text, item.marker)
    why = validate_rewrite(candidate, item.prompt)
    if why is None and operation == "synthesize":
        # A new prompt that copies a neighbour adds no new region of the data: reject it too.
        copied = {" ".join(h.lower().split()) for h in item.sample.hints}
        if " ".join(candidate.lower().split()) in copied:  # type: ignore[union-attr]
            why = "output copies a hint prompt"
    if why is None:
        item.new_prompt = candidate  # type: ignore[assignment]
    return why


def _check_answer(item: _Item, text: str, operation: str) -> str | None:
    """Stores one answer in the item; returns why it is unusable, or None."""
    why = validate_answer(text, item.new_prompt)
    if why is None:
        item.answer = text.strip()
    return why


async def _run_step(gen: Generate, items: list[_Item], request: RefineRequest, step: int, name: str,
                    build: Callable[[_Item], str], check: Callable[[_Item, str, str], str | None], seed: int,
                    prefill: Callable[[_Item], str] | None = None) -> None:
    """Runs one generation step for every live item, batched, with retries on validation failure.

    Args:
        gen: The generator.
        items: All items; those already failed are skipped.
        request: The request (operation, sampling, max_retries).
        step: Step number, only used to derive distinct seeds.
        name: 'rewrite' or 'answer', used in failure reasons.
        build: item -> teacher prompt text of this step.
        check: (item, output, operation) -> reason or None; stores the accepted value in the item.
        seed: The request's base seed.
        prefill: item -> text the answer starts with (given to the model, and put back in front of
            its output before checking).
    """
    sp = request.sampling
    # Greedy decoding gives the same text again, so retrying it only burns time.
    tries = 1 + (request.max_retries if sp.temperature > 0 else 0)
    pending = [it for it in items if not it.failed]
    last: dict[int, str] = {}
    for attempt in range(tries):
        if not pending:
            break
        s = _step_seed(seed, step, attempt)
        rows = []
        for i, it in enumerate(pending):
            msgs = [{"role": "user", "content": build(it)}]
            if prefill:
                msgs.append({"role": "assistant", "content": prefill(it)})
            rows.append(GenRow(messages=msgs, max_new_tokens=sp.max_new_tokens, temperature=sp.temperature,
                               top_p=sp.top_p, seed=row_seed(s, i), continue_final=prefill is not None))
        outs = await gen(rows)
        still: list[_Item] = []
        for it, row, out in zip(pending, rows, outs):
            it.attempts += 1
            if out.finish_reason in ("timeout", "cancelled"):
                # No retry: the request's time is up (or its caller gone), more attempts would only wait.
                it.failed = True
                it.reason = (f"{name} stopped: the request's generation deadline passed (the server's "
                             f"generation_timeout_s); send fewer samples or tokens per request"
                             if out.finish_reason == "timeout" else f"{name} cancelled: the caller went away")
                continue
            if out.finish_reason == "error":
                # The engine's endpoint refused this row (e.g. over its context): asking again gets the same.
                it.failed, it.reason = True, f"{name} failed: {out.error}"
                continue
            text = (row.messages[-1]["content"] + out.text) if prefill else out.text
            why = check(it, text, request.operation)
            if why is not None:
                last[id(it)] = why
                still.append(it)
        pending = still
    for it in pending:
        it.failed = True
        it.reason = f"{name} failed after {tries} attempt{'s' if tries > 1 else ''}: {last[id(it)]}"


async def refine(gen: Generate, request: RefineRequest, model_id: str, prefill_ok: bool = True) -> RefineResponse:
    """Refines every sample of a request (rewrite, then answer), batched per step.

    Args:
        gen: Async generate callable (the deployment's batcher, or :func:`direct`).
        request: The validated request.
        model_id: Reported as the response's ``model``.
        prefill_ok: Whether the engine can continue an assistant prefix; when not, the marker is
            not prefilled whatever the request says.

    Returns:
        One result per sample, in request order; failed items carry a reason and no text.
    """
    seed = request.sampling.seed
    seed = fresh_seed() if seed is None else seed % _SEED_MOD
    items = [_Item(sample=s, prompt=sample_prompt(s)) for s in request.samples]
    for it in items:
        try:
            it.teacher_prompt, it.marker = rewrite_prompt(request.operation, it.prompt, it.sample.hints)
        except ValueError as exc:
            it.failed, it.reason = True, f"bad item: {exc}"
    prefill = (lambda it: it.marker + "\n") if (request.prefill_marker and prefill_ok) else None
    await _run_step(gen, items, request, 0, "rewrite", lambda it: it.teacher_prompt, _check_rewrite, seed,
                    prefill=prefill)
    await _run_step(gen, items, request, 1, "answer", lambda it: answer_prompt(request.operation, it.new_prompt),
                    _check_answer, seed)
    results = []
    for it in items:
        if it.failed:
            results.append(RefineResult(sample_id=it.sample.sample_id, status="failed", reason=it.reason,
                                        attempts=it.attempts))
        else:
            # New samples have no separate input: the rewrite is one self-contained prompt (as in the reference).
            results.append(RefineResult(sample_id=it.sample.sample_id, status="ok", instruction=it.new_prompt,
                                        input="", output=it.answer, attempts=it.attempts))
    return RefineResponse(operation=request.operation, model=model_id, results=results)


def run_refine(engine: Engine, request: RefineRequest) -> RefineResponse:
    """Synchronous refine straight on an engine (tests, benchmarks, scripts)."""
    return asyncio.run(refine(direct(engine), request, engine.model_id, engine.supports_prefill))


# ---------------------------------------------------------------------------------------------
# Judge.


def _none_if_nan(x: float) -> float | None:
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def judge_results(request: JudgeRequest, scores: np.ndarray, ifd: np.ndarray | None = None) -> list[JudgeResult]:
    """Wire results from an (N, 6) score matrix (prompt dims, then response dims; NaN = missing) and, for a
    request with ``ifd``, the (N,) IFD of each sample."""
    _, overall = aggregate_quality(scores[:, :3], scores[:, 3:])
    out = []
    for i, (s, row, q) in enumerate(zip(request.samples, scores, overall)):
        out.append(JudgeResult(
            sample_id=s.sample_id,
            prompt=DimensionScores(**{d: _none_if_nan(row[j]) for j, d in enumerate(JUDGE_DIMENSIONS)}),
            response=DimensionScores(**{d: _none_if_nan(row[3 + j]) for j, d in enumerate(JUDGE_DIMENSIONS)}),
            quality=_none_if_nan(q), missing=int(np.isnan(row).sum()),
            ifd=None if ifd is None else _none_if_nan(ifd[i])))
    return out


async def judge_generate(gen: Generate, request: JudgeRequest) -> np.ndarray:
    """(N, 6) scores by generating a short answer per judgement and parsing its leading number."""
    sp: SamplingParams = request.sampling
    seed = fresh_seed() if sp.seed is None else sp.seed % _SEED_MOD
    rows = []
    for s in request.samples:
        sample = {"instruction": s.instruction, "input": s.input, "output": s.output}
        for target in JUDGE_TARGETS:
            for d in JUDGE_DIMENSIONS:
                rows.append(GenRow(messages=[{"role": "user", "content": judge_prompt(sample, d, target)}],
                                   max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                   seed=row_seed(seed, len(rows))))
    outs = await gen(rows)
    values = [parse_score(o.text) for o in outs]
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64).reshape(len(request.samples), 6)


def judge_response(request: JudgeRequest, scores: np.ndarray, model_id: str,
                   ifd: np.ndarray | None = None) -> JudgeResponse:
    return JudgeResponse(mode=request.mode, model=model_id, results=judge_results(request, scores, ifd))


def ifd_unsupported(engine: Engine) -> str | None:
    """Why ``engine`` cannot answer a judge request with ``ifd`` (None: it can)."""
    if getattr(engine, "supports_ifd", False):
        return None
    return (f"engine '{engine.name}' gives no token losses, so it cannot compute IFD; send \"ifd\": false or "
            f"judge with the transformers or vllm engine")


def run_judge(engine: Engine, request: JudgeRequest) -> JudgeResponse:
    """Synchronous judge straight on an engine (tests, benchmarks, scripts)."""
    ifd = None
    if request.ifd:
        why = ifd_unsupported(engine)
        if why:
            raise ValueError(why)
        rows = [s.model_dump() for s in request.samples]
        ifd = np.asarray(engine.ifd(rows, request.template, request.cutoff_len),  # type: ignore[attr-defined]
                         dtype=np.float64)
    if request.mode == "prob":
        if not engine.supports_prob_judge:
            raise ValueError(f"engine '{engine.name}' gives no token probabilities; use mode 'generate'")
        rows = [s.model_dump() for s in request.samples]
        scores = engine.judge_prob(rows, request.template, request.cutoff_len)  # type: ignore[attr-defined]
    else:
        scores = asyncio.run(judge_generate(direct(engine), request))
    return judge_response(request, np.asarray(scores, dtype=np.float64), engine.model_id, ifd)


# ---------------------------------------------------------------------------------------------
# What one request may ask of the server.


@dataclass(frozen=True)
class Limits:
    """A server's limits on one request (from its arguments and its engine)."""

    max_samples: int
    max_new_tokens: int          # per generated item
    max_request_tokens: int      # in all, over every item, step and attempt


def generation_budget(kind: str, body, chat_default: int = 256) -> int:
    """Tokens a request may generate at most: what :attr:`Limits.max_request_tokens` bounds.

    refine: samples x max_new_tokens x 2 steps x attempts; judge 'generate': samples x 6 judgements x
    max_new_tokens x 1; chat: n x max_tokens; judge 'prob' generates nothing.
    """
    if kind == "refine":
        sp = body.sampling
        tries = 1 + (body.max_retries if sp.temperature > 0 else 0)
        return len(body.samples) * sp.max_new_tokens * 2 * tries
    if kind == "judge":
        return 0 if body.mode == "prob" else len(body.samples) * 6 * body.sampling.max_new_tokens
    if kind == "chat":
        return body.n * body.token_cap(chat_default)
    raise ValueError(f"unknown request kind {kind!r}")


def check_limits(kind: str, body, limits: Limits, samples: bool = True) -> None:
    """Refuses (413, naming the limit and the fix) a request over the server's limits.

    Raises:
        serve.security.ClientError: Too many samples (when ``samples``), too many tokens per item, or
            too many tokens in all.
    """
    from serve.security import ClientError

    if samples and kind in ("refine", "judge") and len(body.samples) > limits.max_samples:
        raise ClientError(413, f"{len(body.samples)} samples in one request exceed this server's limit of "
                               f"{limits.max_samples} (max_samples_per_request); split the request")
    chat_default = min(256, limits.max_new_tokens)
    per_item = {"refine": lambda: body.sampling.max_new_tokens,
                "chat": lambda: max(body.token_cap(chat_default), body.max_tokens or 0),
                "judge": lambda: body.sampling.max_new_tokens}[kind]()
    what = "max_tokens" if kind == "chat" else "sampling.max_new_tokens"
    if per_item > limits.max_new_tokens:
        raise ClientError(413, f"{what}={per_item} exceeds this server's limit of {limits.max_new_tokens} tokens per "
                               f"item (max_new_tokens_limit); ask for fewer")
    total = generation_budget(kind, body, chat_default)
    if total > limits.max_request_tokens:
        raise ClientError(413, f"this request may generate {total} tokens in all (samples x tokens x steps x attempts), "
                               f"over this server's limit of {limits.max_request_tokens} per request "
                               f"(max_request_tokens); split it or ask for fewer tokens or retries")
