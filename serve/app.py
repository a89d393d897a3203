"""The refiner as a Ray Serve application: HTTP (FastAPI) and deployment-handle access to one logic.

Routes (relative to the app's route prefix):

- ``POST /v1/refine``: body :class:`middo_ray.schema.RefineRequest`, answer
  :class:`middo_ray.schema.RefineResponse`. A malformed body is answered with 422.
- ``GET /healthz``: ``{"status": "ok", "model": <model spec>}``.

The loop calls the same logic through a handle: ``handle.refine.remote(request_dict)``.

Each sample goes through two generation steps, batched over all samples of the request that are
still pending (one ``generate`` call per step and attempt, never one sample at a time):

1. rewrite: the operation's teacher prompt; the answer must contain the operation's marker
   (strict: text without the marker is rejected, even when it looks like a prompt), and the text
   after it must pass ``validate_rewrite``; synthesized prompts must also not copy a hint;
2. answer: a fresh answer to the new prompt, checked by ``validate_answer``.

A failed step is retried up to ``max_retries`` times with a different seed (when sampling; greedy
decoding would only repeat itself). An item that still fails is returned with status "failed" and a
reason: row failures are data, the caller keeps its original sample. A synthesize item with fewer
than two hints fails the same way (per item, not 422), so one bad row never rejects its batch.

Run it alone with ``serve run serve.app:build_app model=tiny`` (args: model, dtype, num_replicas,
num_cpus, num_gpus, max_ongoing_requests).
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from middo_ray.models import threads_for_actor
from middo_ray.prompts import answer_prompt, parse_marked, rewrite_prompt, validate_answer, validate_rewrite
from middo_ray.schema import RefineRequest, RefineResponse, RefineResult, RefineSample
from serve.engine import TransformersEngine

logger = logging.getLogger(__name__)

# Seeds of successive steps/attempts are spaced by a large odd number so that no two
# (request seed, step, attempt) triples of nearby requests share a seed.
_SEED_STRIDE = 1_000_003
_SEED_MOD = 2**31 - 1


class Generator(Protocol):
    """What the refine logic needs from an engine (TransformersEngine, or a fake in tests)."""

    @property
    def model_id(self) -> str: ...

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, prefills: list[str] | None = None) -> list[str]: ...


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


def _run_step(engine: Generator, items: list[_Item], request: RefineRequest, step: int, name: str,
              build: Callable[[_Item], str], check: Callable[[_Item, str, str], str | None], seed: int,
              prefill: Callable[[_Item], str] | None = None) -> None:
    """Runs one generation step for every live item, batched, with retries on validation failure.

    Args:
        engine: The generator.
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
        heads = [prefill(it) for it in pending] if prefill else None
        outputs = engine.generate([build(it) for it in pending], max_new_tokens=sp.max_new_tokens,
                                  temperature=sp.temperature, top_p=sp.top_p, seed=_step_seed(seed, step, attempt),
                                  **({"prefills": heads} if heads else {}))
        if heads:
            outputs = [h + o for h, o in zip(heads, outputs)]
        still: list[_Item] = []
        for it, text in zip(pending, outputs):
            it.attempts += 1
            why = check(it, text, request.operation)
            if why is not None:
                last[id(it)] = why
                still.append(it)
        pending = still
    for it in pending:
        it.failed = True
        it.reason = f"{name} failed after {tries} attempt{'s' if tries > 1 else ''}: {last[id(it)]}"


def run_refine(engine: Generator, request: RefineRequest) -> RefineResponse:
    """Refines every sample of a request (rewrite, then answer), batched per step.

    Args:
        engine: Anything with ``model_id`` and ``generate`` (see :class:`Generator`).
        request: The validated request.

    Returns:
        One result per sample, in request order; failed items carry a reason and no text.
    """
    seed = request.sampling.seed
    if seed is None:
        # No seed asked for: sample freshly, as an unseeded OpenAI-style call would.
        seed = random.SystemRandom().randrange(_SEED_MOD)
    items = [_Item(sample=s, prompt=sample_prompt(s)) for s in request.samples]
    for it in items:
        try:
            it.teacher_prompt, it.marker = rewrite_prompt(request.operation, it.prompt, it.sample.hints)
        except ValueError as exc:
            it.failed, it.reason = True, f"bad item: {exc}"
    _run_step(engine, items, request, 0, "rewrite", lambda it: it.teacher_prompt, _check_rewrite, seed,
              prefill=(lambda it: it.marker + "\n") if request.prefill_marker else None)
    _run_step(engine, items, request, 1, "answer", lambda it: answer_prompt(request.operation, it.new_prompt),
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
    return RefineResponse(operation=request.operation, model=engine.model_id, results=results)


# ---------------------------------------------------------------------------------------------
# The Serve deployment.

api = FastAPI(title="middo-ray refiner", description="Rewrites, simplifies and synthesizes SFT samples.")


@serve.deployment(name="Refiner", max_ongoing_requests=4)
@serve.ingress(api)
class Refiner:
    """One replica: the engine, loaded once, behind HTTP routes and a handle method.

    Args:
        model: Model spec of the teacher ('smollm2', 'tiny', or an HF path).
        dtype: Compute dtype name for the engine.
        num_cpus: CPUs the replica reserved; torch uses that many threads.
    """

    def __init__(self, model: str, dtype: str = "auto", num_cpus: float = 1.0) -> None:
        threads_for_actor(num_cpus)
        self._engine = TransformersEngine(model, dtype=dtype)
        # Generation saturates the replica's CPUs; running two requests at once only makes both
        # slower and doubles peak memory, so requests queue here and run one at a time.
        self._lock = threading.Lock()
        logger.info("refiner replica ready: model=%s", self._engine.model_id)

    def _refine(self, request: RefineRequest) -> RefineResponse:
        with self._lock:
            return run_refine(self._engine, request)

    # Sync routes: FastAPI runs them in its thread pool, so /healthz answers while a refine runs.
    @api.post("/v1/refine", response_model=RefineResponse)
    def refine_http(self, body: RefineRequest) -> RefineResponse:
        """HTTP route: one refine request."""
        return self._refine(body)

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        """HTTP route: liveness and the served model."""
        return {"status": "ok", "model": self._engine.model_id}

    def refine(self, request: dict) -> dict:
        """Handle method for the loop: a RefineRequest as a dict in, a RefineResponse as a dict out.

        Raises:
            pydantic.ValidationError: The request does not match RefineRequest (a caller bug).
        """
        return self._refine(RefineRequest.model_validate(request)).model_dump()


class RefinerArgs(BaseModel):
    """Arguments of :func:`build_app` (``serve run serve.app:build_app key=value ...`` passes strings)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2", description="Teacher model: 'smollm2', 'tiny', or an HF path/id.")
    dtype: str = Field("auto", description="'auto', 'float32', 'bfloat16' or 'float16'.")
    num_replicas: int = Field(1, ge=1, description="Replicas of the deployment.")
    num_cpus: float = Field(1.0, gt=0, description="Logical CPUs per replica (also its torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    max_ongoing_requests: int = Field(4, ge=1, le=64, description="Requests a replica accepts at once (they queue).")


DEFAULT_ARGS: dict[str, Any] = RefinerArgs().model_dump()


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Builds the refiner application from (string or typed) arguments.

    Args:
        args: Keys of :class:`RefinerArgs`; missing keys take :data:`DEFAULT_ARGS`.

    Returns:
        The bound application, for ``serve.run`` or ``serve run serve.app:build_app``.

    Raises:
        pydantic.ValidationError: An unknown key or a bad value, naming the key.
    """
    a = RefinerArgs.model_validate(dict(args or {}))
    deployment = Refiner.options(
        num_replicas=a.num_replicas,
        max_ongoing_requests=a.max_ongoing_requests,
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
    )
    return deployment.bind(model=a.model, dtype=a.dtype, num_cpus=a.num_cpus)
