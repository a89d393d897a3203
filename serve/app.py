"""The refiner/judge LLM as a Ray Serve application: HTTP (FastAPI) and deployment handles.

Two deployments:

- ``Gateway`` (the ingress): HTTP only. It reads and checks every request (key, Host, body size and
  deadline, schema, limits) and holds the connection while the model works, at no model cost: it
  can hold many slow or waiting clients (``gateway_max_ongoing_requests``). It answers every refusal
  and failure itself, at once, in the JSON error format, so a busy or restarting model replica never
  turns into a stalled connection or a plain-text error.
- ``Refiner``: the engine (the model, loaded once), behind handle methods. Its own queue
  (``max_ongoing_requests`` + ``max_queued_requests``) decides what it takes; beyond it the gateway
  answers 503 with ``Retry-After``.

Routes (relative to the app's route prefix; the OpenAPI schema is at ``/openapi.json``):

- ``POST /v1/refine``: :class:`middo_ray.wire.RefineRequest` -> ``RefineResponse``: simplify,
  improve or synthesize a batch of samples; each item ``ok`` or ``failed`` with a reason.
- ``POST /v1/judge``: ``JudgeRequest`` -> ``JudgeResponse``: 0-10 scores of factuality, clarity and
  completeness for the prompt and the response; mode ``prob`` (token probabilities, transformers
  engine) or ``generate`` (parsed text; unparseable = null).
- ``POST /v1/chat/completions`` and ``GET /v1/models``: OpenAI-compatible, so the official ``openai``
  client (and another copy of this app's external engine) can use the served model.
- ``GET /healthz``: liveness and the served model (no key needed).

The loop calls the Refiner deployment through its handle (``refine``, ``judge``, ``chat``, ``info``,
``sleep``, ``wake``); the gateway's handle offers the same methods.

Serving behaviour:

- Dynamic batching: every generation (refine steps, generate-mode judging, chat completions) goes
  through one ``@serve.batch`` method, which merges the rows of concurrent requests into engine
  batches of up to ``batch_max_rows`` rows. Each row keeps its own seed, so results do not depend on
  what it was batched with.
- Interleaving: a transformers generation that has run ``slice_s`` while other rows wait (or while
  some of its own rows are done) stops; its finished rows are answered and the rest continue in a
  later batch, behind the waiting ones. A long request therefore delays a short one by about one slice.
  (vLLM schedules its sequences continuously itself.)
- Bounded work: per request, at most ``max_samples_per_request`` samples, ``max_new_tokens_limit``
  tokens per item and ``max_request_tokens`` in all (413 above, naming the limit); generation stops at
  ``generation_timeout_s``; a client that disconnects cancels its rows at the next token.
- Auth: with an API key configured (environment variable named by ``api_key_env``), every route but
  ``/healthz`` and ``/openapi.json`` needs ``Authorization: Bearer <key>`` (401 otherwise). A server
  bound beyond loopback refuses to start without a key; without one, only loopback ``Host`` headers
  are answered (403 otherwise). There is no ``/docs`` page (it would load its assets from a CDN).
- Bodies: over ``max_body_bytes`` 413; not complete within ``body_timeout_s`` 408 and the connection
  closed. Schema errors: 422 naming each bad field (strict types, valid Unicode).
- Logs carry counts and ids, never sample text (unless ``log_text``).
- Metrics: see :mod:`serve.metrics`.

Run it alone with ``serve run serve.app:build_app model=tiny`` (every field of :class:`RefinerArgs`
can be given as key=value).
"""

# No `from __future__ import annotations` here: Serve pickles the deployment class by value, and FastAPI
# must resolve the route annotations from real objects, not from strings looked up in a partial copy
# of this module's globals.

import asyncio
import copy
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
import ray
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from middo_ray.wire import (REFINER_DEPLOYMENT, JudgeRequest, JudgeResponse, RefineRequest, RefineResponse,
                            ServeSettings, TeacherUnavailable)
from serve import logic
from serve.engines import GenOut, GenRow, describe, make_engine, row_seed
from serve.logic import Limits, check_limits, run_refine, sample_prompt  # noqa: F401  (run_refine, sample_prompt: public helpers)
from serve.metrics import MetricsMiddleware, ServeMetrics, set_current
from serve.openai_api import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, ModelCard, ModelList, Usage
from serve.security import (AuthMiddleware, BodyLimitMiddleware, ClientError, GuardMiddleware, error_body,
                            is_loopback, key_digest, require_key_off_loopback, set_api_key, set_body_limit,
                            set_body_timeout)

logger = logging.getLogger(__name__)

# Past the generation deadline, how long the replica may still take to hand back what it has
# before the request is abandoned with 504 (engines that cannot stop between tokens).
DEADLINE_GRACE_S = 30.0


class RefinerArgs(ServeSettings):
    """Arguments of :func:`build_app` (``serve run serve.app:build_app key=value ...`` passes strings).

    The engine, scaling, limits and security fields are :class:`middo_ray.wire.ServeSettings`, the same
    fields as the run config's ``refine`` section; the loop maps that section onto these arguments.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2", description="Model: 'smollm2', 'tiny', an HF path/id, or the endpoint's model name.")
    dtype: str = Field("auto", description="'auto', 'float32', 'bfloat16' or 'float16' (transformers and vllm engines).")
    openai_timeout_s: float = Field(300.0, gt=0, description="engine 'openai': timeout of one request.")
    num_cpus: float = Field(1.0, gt=0, description="Logical CPUs reserved per replica (torch uses every core of the "
                                                    "node unless MIDDO_TORCH_THREADS says otherwise).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")


DEFAULT_ARGS: dict[str, Any] = RefinerArgs().model_dump()


def _loc(error: dict) -> list[str]:
    """A validation error's field path, without pydantic's names of union branches and validators
    (``function-after[...]``, ``list[...]``, ``str``): the fields a client sent."""
    return [str(p) for p in error.get("loc", ()) if not (isinstance(p, str) and ("[" in p or p in _BRANCHES))]


_BRANCHES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "null"})


def _describe_errors(errors: list[dict]) -> str:
    """'loc: msg' for up to 8 validation errors, never the submitted values (they may be sample text)."""
    parts = [f"{'.'.join(_loc(e))}: {e.get('msg', 'invalid')}" for e in errors[:8]]
    more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
    return "; ".join(parts) + more


def _validated(model: type[BaseModel], data: dict) -> Any:
    """A handle call's request, validated; errors name fields but do not echo text (it would reach logs)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ClientError(422, f"invalid {model.__name__}: {_describe_errors(exc.errors())}") from None


def _proxy_host() -> str | None:
    """The host Serve's HTTP proxy really binds, when it can be read (defence in depth; private API)."""
    try:
        from ray.serve.context import _get_global_client

        return str(_get_global_client().http_config.host)
    except Exception:  # noqa: BLE001 - best effort: build_app already checked the configured host
        return None


@dataclass
class _Work:
    """One request's deadline and cancellation, shared by all its rows."""

    deadline: float
    cancelled: threading.Event


def _rows_in(chunks: list[list]) -> int:
    return sum(len(c) for c in chunks)


# =============================================================================================
# The model replica.


@serve.deployment(name=REFINER_DEPLOYMENT, max_ongoing_requests=16)
class Refiner:
    """One model replica: the engine, loaded once, behind handle methods (no HTTP of its own).

    Args:
        args: Validated :class:`RefinerArgs` as a dict.
        engine_key: The external endpoint's key (engine 'openai').
        llm: The vLLM deployment's handle (engine 'vllm').
    """

    def __init__(self, args: dict, engine_key: SecretStr | None = None, llm=None) -> None:
        from middo_ray.models import threads_for_actor
        from serve.engines.vllm import vllm_max_model_len

        a = RefinerArgs.model_validate(args)
        self._args = a
        if a.engine == "transformers":
            threads_for_actor(a.num_cpus)
        self._engine = make_engine(
            a.engine, a.model, dtype=a.dtype, openai_base_url=a.openai_base_url,
            openai_api_key=engine_key.get_secret_value() if engine_key else None, openai_prefill=a.openai_prefill,
            openai_max_parallel=a.openai_max_parallel, openai_timeout_s=a.openai_timeout_s,
            openai_retries=a.openai_retries, max_batch=a.batch_max_rows,
            llm_handle=llm,
            max_model_len=vllm_max_model_len(a.model, a.vllm_engine_kwargs) if a.engine == "vllm" else None)
        engine_cap = self._engine.max_new_tokens_limit
        token_limit = min(a.max_new_tokens_limit, engine_cap) if engine_cap else a.max_new_tokens_limit
        self._limits = Limits(max_samples=a.max_samples_per_request, max_new_tokens=token_limit,
                              max_request_tokens=a.max_request_tokens)
        # Generation and probability judging both saturate the replica; one runs at a time.
        self._compute = asyncio.Lock()
        # Pieces of work submitted to the batcher and not yet started: a running generation makes room for them.
        self._waiting: dict[int, int] = {}
        self._finished: dict[str, int] = {}     # rows ended, by finish reason (see stats)
        self._generate_batch.set_max_batch_size(a.batch_max_rows)
        self._generate_batch.set_batch_wait_timeout_s(a.batch_wait_s)
        self._metrics = ServeMetrics()
        set_current(self._metrics)
        self._info = {**describe(self._engine), "logic_version": logic.logic_version(),
                      "limits": {"max_samples_per_request": a.max_samples_per_request,
                                 "max_new_tokens": token_limit, "max_request_tokens": a.max_request_tokens,
                                 "max_body_bytes": a.max_body_bytes, "generation_timeout_s": a.generation_timeout_s},
                      "chat_template": bool(getattr(self._engine, "uses_chat_template", False)),
                      # Where this replica runs, and the GPUs Ray gave it (the vLLM engine's own are its deployment's).
                      "placement": {"node_id": ray.get_runtime_context().get_node_id(),
                                    "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}}
        logger.info("refiner replica ready: engine=%s model=%s", a.engine, self._engine.model_id)

    # ----- engine access (batched, interleaved) ---------------------------------------------

    def _yield_now(self, seconds: float, tokens: int, some_row_done: bool) -> bool:
        """Asked by the transformers engine after every token: make room for waiting work?"""
        return (tokens > 0 and self._args.slice_s > 0 and seconds >= self._args.slice_s
                and (bool(self._waiting) or some_row_done))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.1, batch_size_fn=_rows_in)
    async def _generate_batch(self, chunks: list[list]) -> list[list]:
        """Runs the rows (or generation states) of many concurrent callers as one engine call.

        States (transformers) are advanced in place: finished ones get their output, the others
        continue in a later batch. Rows (other engines) come back as outputs, each caller its part.
        """
        for c in chunks:
            self._waiting.pop(id(c), None)
        flat = [r for c in chunks for r in c]
        self._metrics.batch_rows.observe(len(flat))
        if hasattr(self._engine, "advance"):
            async with self._compute:
                await asyncio.to_thread(self._engine.advance, flat, self._yield_now)
            for state in flat:
                if state.out is not None and not state.counted:
                    state.counted = True
                    self._finished[state.out.finish_reason] = self._finished.get(state.out.finish_reason, 0) + 1
            return chunks
        async with self._compute:
            outs = await asyncio.to_thread(self._engine.generate_rows, flat)
        for o in outs:
            self._finished[o.finish_reason] = self._finished.get(o.finish_reason, 0) + 1
        parts, start = [], 0
        for c in chunks:
            parts.append(outs[start:start + len(c)])
            start += len(c)
        return parts

    async def _give_way(self, longest_s: float = 30.0) -> None:
        """A generation that yielded waits until the work that was waiting then has started, so the next batch
        is that work alone (a short request is not batched with the long one's re-read of its context)."""
        ahead = set(self._waiting)
        until = time.monotonic() + longest_s
        while ahead & set(self._waiting) and time.monotonic() < until:
            await asyncio.sleep(0.005)

    async def _piece(self, piece: list) -> list:
        self._waiting[id(piece)] = len(piece)
        try:
            return await self._generate_batch(piece)
        finally:
            self._waiting.pop(id(piece), None)

    async def _generate(self, rows: list[GenRow], work: _Work | None = None) -> list[GenOut]:
        """Generates any number of rows through the batcher, in pieces of at most batch_max_rows.

        An engine that schedules concurrent requests itself (vLLM: continuous batching) gets the rows
        at once instead: a second batcher in front of it would only add its wait.
        """
        if work is not None:
            for r in rows:
                r.deadline, r.cancelled = work.deadline, work.cancelled
        direct = getattr(self._engine, "agenerate_rows", None)
        size = self._args.batch_max_rows
        try:
            if direct is not None:
                outs = await direct(rows)
                for o in outs:
                    self._finished[o.finish_reason] = self._finished.get(o.finish_reason, 0) + 1
            elif hasattr(self._engine, "advance"):
                states = self._engine.start(rows)
                pending = states
                while pending:
                    await asyncio.gather(*(self._piece(pending[i:i + size]) for i in range(0, len(pending), size)))
                    pending = [s for s in pending if s.out is None]
                    if pending:
                        await self._give_way()
                outs = [s.out for s in states]
            else:
                pieces = await asyncio.gather(*(self._piece(rows[i:i + size]) for i in range(0, len(rows), size)))
                outs = [o for piece in pieces for o in piece]
        except asyncio.CancelledError:
            if work is not None:
                work.cancelled.set()   # the engine stops these rows at their next token
            raise
        self._metrics.count_tokens(sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs))
        return outs

    def _gen(self, work: _Work):
        return lambda rows: self._generate(rows, work)

    async def _run(self, route: str, fn):
        """Runs one request's work under its deadline; client errors stay ClientError (a ValueError)."""
        t0 = time.monotonic()
        timeout = self._args.generation_timeout_s
        work = _Work(deadline=t0 + timeout, cancelled=threading.Event())
        try:
            result = await asyncio.wait_for(fn(work), timeout=timeout + DEADLINE_GRACE_S)
        except asyncio.TimeoutError:
            work.cancelled.set()
            self._metrics.answered(route, "error", time.monotonic() - t0)
            raise ClientError(504, f"the request's work passed its deadline of {timeout:g}s "
                                   f"(generation_timeout_s); send fewer samples or tokens per request") from None
        except asyncio.CancelledError:
            work.cancelled.set()
            raise
        except ClientError:
            self._metrics.answered(route, "error", time.monotonic() - t0)
            raise
        except Exception as exc:
            # Never the request text in the log unless asked: the exception type and route only.
            if self._args.log_text:
                logger.exception("%s failed", route)
            else:
                logger.error("%s failed: %s", route, type(exc).__name__)
            self._metrics.answered(route, "error", time.monotonic() - t0)
            raise
        self._metrics.answered(route, "ok", time.monotonic() - t0)
        return result

    # ----- refine ------------------------------------------------------------------------------

    async def refine(self, request: dict) -> dict:
        """A RefineRequest dict in, a RefineResponse dict out.

        Raises:
            ClientError: (a ValueError) the request does not match RefineRequest (the message names the
                fields) or asks for more tokens than the server allows.
        """
        body = _validated(RefineRequest, request)
        check_limits("refine", body, self._limits, samples=False)

        async def work(w: _Work) -> dict:
            if self._args.log_text:
                logger.debug("refine %s: %s", body.operation, [sample_prompt(s) for s in body.samples])
            resp = await logic.refine(self._gen(w), body, self._engine.model_id, self._engine.supports_prefill)
            ok = sum(r.status == "ok" for r in resp.results)
            self._metrics.count_items("refine", "ok", ok)
            self._metrics.count_items("refine", "failed", len(resp.results) - ok)
            return resp.model_dump()

        return await self._run("handle:refine", work)

    # ----- judge -------------------------------------------------------------------------------

    async def judge(self, request: dict) -> dict:
        """A JudgeRequest dict in, a JudgeResponse dict out (ClientError for unsupported modes)."""
        import numpy as np

        body = _validated(JudgeRequest, request)
        check_limits("judge", body, self._limits, samples=False)
        if body.mode == "prob" and not self._engine.supports_prob_judge:
            raise ClientError(422, f"engine '{self._engine.name}' gives no token probabilities, so it supports only "
                                   f"mode 'generate'; send \"mode\": \"generate\"")
        no_ifd = logic.ifd_unsupported(self._engine) if body.ifd else None
        if no_ifd:
            raise ClientError(422, no_ifd)
        if (body.mode == "prob" or body.ifd) and body.template == "chat" and \
                not getattr(self._engine, "uses_chat_template", False):
            raise ClientError(422, "template 'chat' needs a tokenizer with a chat template, and this model has "
                                   "none; use 'default' or 'auto'")
        rows = [s.model_dump() for s in body.samples]

        async def scored(method: str):
            """The engine's ``method`` (judge_prob or ifd) over the request's rows, as a float array. vLLM
            schedules its scoring requests itself (``a<method>``); otherwise one call in a worker thread: the
            token-budget batching decides the forward batches, so a sample's numbers do not depend on how a
            request was cut (the golden results pin them). A request is bounded by max_samples_per_request x
            cutoff_len; requests take turns at the model."""
            scheduled = getattr(self._engine, "a" + method, None)
            if scheduled is not None:
                out = await scheduled(rows, body.template, body.cutoff_len)
            else:
                async with self._compute:
                    out = await asyncio.to_thread(getattr(self._engine, method), rows, body.template, body.cutoff_len)
            return np.asarray(out, dtype=np.float64)

        async def work(w: _Work) -> dict:
            ifd = await scored("ifd") if body.ifd else None
            if body.mode == "prob":
                scores = await scored("judge_prob")
            else:
                scores = await logic.judge_generate(self._gen(w), body)
            resp = logic.judge_response(body, scores, self._engine.model_id, ifd)
            missing = sum(r.missing for r in resp.results)
            self._metrics.count_items("judge", "scored", 6 * len(resp.results) - missing)
            self._metrics.count_items("judge", "missing", missing)
            return resp.model_dump()

        return await self._run("handle:judge", work)

    # ----- OpenAI-compatible -------------------------------------------------------------------

    async def chat(self, request: dict) -> dict:
        """A chat-completion request dict in, the ChatCompletion dict out."""
        body = _validated(ChatCompletionRequest, request)
        if body.model != self._engine.model_id:
            raise ClientError(404, f"model '{body.model}' is not served here; GET /v1/models lists "
                                   f"'{self._engine.model_id}'")
        check_limits("chat", body, self._limits)
        cap = body.token_cap(min(256, self._limits.max_new_tokens))
        if body.continues() and not self._engine.supports_prefill:
            raise ClientError(422, "this server's engine cannot continue an assistant message; "
                                   "send continue_final_message=false")

        async def work(w: _Work) -> dict:
            seed = logic.fresh_seed() if body.seed is None else body.seed
            messages = body.plain_messages()
            # Choice 0 samples with the seed itself (so a client that seeds each call, like the external
            # engine, gets exactly what this app would generate for that row); further choices derive theirs.
            rows = [GenRow(messages=messages, max_new_tokens=cap, temperature=body.temperature, top_p=body.top_p,
                           seed=seed if i == 0 else row_seed(seed, i), continue_final=body.continues(),
                           stop=body.stops())
                    for i in range(body.n)]
            outs = await self._generate(rows, w)
            refused = next((o.error for o in outs if o.finish_reason == "error"), None)
            if refused is not None:
                raise ClientError(502, f"the endpoint behind this server refused the request: {refused}")
            completion = sum(o.completion_tokens for o in outs)
            prompt = outs[0].prompt_tokens if outs else 0
            return ChatCompletion(
                model=self._engine.model_id,
                choices=[Choice(index=i, message=AssistantMessage(content=o.text),
                                finish_reason="stop" if o.finish_reason == "stop" else "length")
                         for i, o in enumerate(outs)],
                usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                            total_tokens=prompt + completion)).model_dump()

        return await self._run("handle:chat", work)

    # ----- identity and GPU hand-off --------------------------------------------------------------

    async def info(self) -> dict:
        """Engine, model, revision, judge modes, logic version, limits (for cache keys and the gateway)."""
        return copy.deepcopy(self._info)

    async def stats(self) -> dict:
        """Rows this replica ended, by finish reason ('stop', 'length', 'timeout', 'cancelled', 'error'), the
        pieces of work waiting for the model now, and an external engine's calls ('sent', 'ok', 'transient',
        'refused', 'gave_up')."""
        return {"finished": dict(self._finished), "waiting_pieces": len(self._waiting),
                "engine_calls": dict(getattr(self._engine, "calls", {}))}

    async def check_health(self) -> None:
        """Serve's periodic replica check: the engine behind the replica answers (vLLM's deployment)."""
        check = getattr(self._engine, "health", None)
        if check is not None:
            await asyncio.wait_for(check(), timeout=30)

    async def sleep(self, level: int = 1) -> dict:
        """refine.gpu_handoff='sleep': frees the engine's GPU memory until :meth:`wake`.

        Waits for the computation in progress; the replica keeps its Ray resources (the loop sized them to a
        share of the GPU), only the memory is handed over.
        """
        fn = getattr(self._engine, "sleep", None)
        if fn is None:
            raise RuntimeError(f"engine '{self._args.engine}' cannot sleep; use refine.gpu_handoff=release")
        async with self._compute:
            await fn(int(level))
            self._asleep = True
        return {"asleep": True, "level": int(level)}

    async def wake(self) -> dict:
        """The engine's weights (and vLLM's KV cache) back on the GPU."""
        if getattr(self, "_asleep", False):
            async with self._compute:
                await self._engine.wake()
                self._asleep = False
        return {"asleep": False}


# =============================================================================================
# The HTTP gateway.

# No /docs or /redoc: FastAPI's pages load their scripts from a CDN (broken offline, and a third
# party on every page view); the schema itself is at /openapi.json.
api = FastAPI(title="middo-ray refiner", version="1.0", docs_url=None, redoc_url=None, openapi_url=None,
              description="Refines (simplify, improve, synthesize) and judges SFT samples; OpenAI-compatible chat.")
# Serve pickles the deployment class by value when it is decorated: everything it uses from this
# module must be defined above it, and per-process state lives in serve.security / serve.metrics.
# Order of the checks on the way in: metrics (counts every answer), Host and request id (403),
# auth (401), body size and deadline (413, 408).
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(AuthMiddleware)
api.add_middleware(GuardMiddleware)
api.add_middleware(MetricsMiddleware)
# The key is enforced by AuthMiddleware; this dependency only documents the scheme in the OpenAPI schema.
_bearer = HTTPBearer(auto_error=False, description="The app's API key (when one is configured).")
_KEYED = [Depends(_bearer)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The body is not JSON."},
    401: {"description": "Missing or wrong API key."},
    403: {"description": "Keyless server: the Host header is not a loopback name."},
    408: {"description": "The request body did not arrive within the body deadline."},
    413: {"description": "Body, sample count or token request over this server's limits."},
    422: {"description": "The body does not match the schema (each bad field is named)."},
    500: {"description": "The server failed on this request (the error names the exception type)."},
    502: {"description": "engine 'openai': the endpoint behind this server failed or refused (the error names it)."},
    503: {"description": "Overloaded, or the model replica is restarting: retry after the Retry-After seconds."},
    504: {"description": "The request's work passed the server's generation deadline."},
}


@api.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """422 naming every bad field (without echoing the submitted text)."""
    errors = exc.errors()
    message = f"invalid request: {_describe_errors(errors)}. The request schema is at /openapi.json"
    detail = [{"loc": _loc(e), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors]
    return JSONResponse(status_code=422, content={**error_body(422, message), "detail": detail})


@api.exception_handler(ClientError)
async def _client_error(request, exc: ClientError) -> JSONResponse:
    """A refused request (limits, unsupported mode, unknown model): its status and message."""
    return JSONResponse(status_code=exc.status, content=error_body(exc.status, exc.message))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content=error_body(exc.status_code, str(exc.detail)),
                        headers=getattr(exc, "headers", None))


def _set_max(schema: dict, name: str, field: str, key: str, value: Any) -> None:
    """Sets ``key`` (maxItems, maximum, ...) of a model's field in an OpenAPI document, in every variant
    of the model (FastAPI may emit '-Input' and '-Output' copies) and in every branch of an anyOf."""
    for model_name, model in schema.get("components", {}).get("schemas", {}).items():
        if model_name != name and not model_name.startswith(name + "-"):
            continue
        prop = model.get("properties", {}).get(field)
        if prop is None:
            continue
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") in ("integer", "array", "number", "string"):
                branch[key] = value


def _schema_for(info: dict) -> dict:
    """The OpenAPI document of this server: the wire schema narrowed to its limits and engine, so that
    what the schema allows is what the server accepts (except the per-request totals: body bytes and
    max_request_tokens, which JSON Schema cannot express; those answer 413 as documented)."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    limits = info["limits"]
    for model in ("RefineRequest", "JudgeRequest"):
        _set_max(schema, model, "samples", "maxItems", limits["max_samples_per_request"])
    _set_max(schema, "SamplingParams", "max_new_tokens", "maximum", limits["max_new_tokens"])
    for field in ("max_tokens", "max_completion_tokens"):
        _set_max(schema, "ChatCompletionRequest", field, "maximum", limits["max_new_tokens"])
    judge = next((m for n, m in schema["components"]["schemas"].items() if n.split("-")[0] == "JudgeRequest"), None)
    if judge is not None:
        props = judge["properties"]
        if "prob" not in info.get("judge_modes", []):
            props["mode"]["enum"] = ["generate"]
            props["mode"]["default"] = "generate"
        if not info.get("chat_template"):
            props["template"]["enum"] = [t for t in props["template"]["enum"] if t != "chat"]
        if not info.get("ifd") and "ifd" in props:
            props["ifd"]["enum"] = [False]
    chat = next((m for n, m in schema["components"]["schemas"].items()
                 if n.split("-")[0] == "ChatCompletionRequest"), None)
    if chat is not None:
        chat["properties"]["model"]["enum"] = [info["model"]]
        if not info.get("prefill", True):
            chat["properties"]["continue_final_message"]["enum"] = [False]
    return schema


@serve.deployment(name="Gateway", max_ongoing_requests=512)
@serve.ingress(api)
class Gateway:
    """The app's HTTP front: checks, then forwards to the Refiner deployment; every answer is JSON.

    Args:
        refiner: Handle of the Refiner deployment.
        args: Validated :class:`RefinerArgs` as a dict.
        api_key_digest: SHA-256 of the app's API key, or None for no auth (loopback only).
    """

    def __init__(self, refiner, args: dict, api_key_digest: str | None = None) -> None:
        a = RefinerArgs.model_validate(args)
        require_key_off_loopback(_proxy_host() or a.http_host, api_key_digest, a.api_key_env)
        self._args = a
        self._refiner = refiner
        self._info: dict | None = None
        self._schema: dict | None = None
        # Set when a call found the model replica dead: requests are refused at once (503) instead of
        # waiting in Serve's router for its restart, until a probe reaches a replica again.
        self._down: asyncio.Task | None = None
        self._metrics = ServeMetrics()
        set_current(self._metrics)
        set_body_limit(a.max_body_bytes)
        set_body_timeout(a.body_timeout_s)
        set_api_key(api_key_digest, a.api_key_env)

    def _mark_down(self) -> None:
        if self._down is None or self._down.done():
            self._down = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self, every_s: float = 0.5, longest_s: float = 600.0) -> None:
        """Asks the model deployment for its info until a replica answers (then requests pass again)."""
        until = time.monotonic() + longest_s
        while time.monotonic() < until:
            try:
                await asyncio.wait_for(self._refiner.info.remote(), timeout=5)
                return
            except Exception:  # noqa: BLE001 - still restarting
                await asyncio.sleep(every_s)

    async def _model_info(self) -> dict:
        """The Refiner's identity and limits, asked once (the same for every replica of it)."""
        if self._info is None:
            self._info = await self._forward("info", None, http=True)
        return self._info

    async def _limits(self) -> Limits:
        lim = (await self._model_info())["limits"]
        return Limits(max_samples=lim["max_samples_per_request"], max_new_tokens=lim["max_new_tokens"],
                      max_request_tokens=lim["max_request_tokens"])

    async def _forward(self, method: str, payload: Any, http: bool) -> Any:
        """Calls the Refiner; on HTTP every failure becomes the JSON error it should be, at once."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        args = () if payload is None else (payload,)
        retry = self._args.retry_after_s
        if http and self._down is not None and not self._down.done():
            raise HTTPException(503, f"the model replica is restarting; retry after {retry:g}s",
                                headers={"Retry-After": f"{retry:g}"})
        response = None
        try:
            response = getattr(self._refiner, method).remote(*args)
            return await response
        except asyncio.CancelledError:
            if response is not None:
                response.cancel()   # the client went away: so does its work
            raise
        except ClientError:
            raise           # answered by _client_error
        except TeacherUnavailable as exc:
            if not http:
                raise
            raise HTTPException(502, str(exc), headers={"Retry-After": f"{retry:g}"}) from None
        except BackPressureError as exc:
            if not http:
                raise
            queued, limit = (list(exc.args) + [None, None])[:2]
            raise HTTPException(503, f"the model replicas are busy ({queued} requests queued, the limit is {limit}: "
                                     f"max_queued_requests); retry after {retry:g}s",
                                headers={"Retry-After": f"{retry:g}"}) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError) as exc:
            self._mark_down()
            if not http:
                raise
            raise HTTPException(503, f"the model replica stopped while serving this request "
                                     f"({type(exc).__name__}); Serve restarts it: retry after {retry:g}s",
                                headers={"Retry-After": f"{retry:g}"}) from None
        except Exception as exc:
            if not http:
                raise
            logger.error("%s failed in the model replica: %s: %s", method, type(exc).__name__,
                         str(exc)[:300] if self._args.log_text else "")
            raise HTTPException(500, f"internal error ({type(exc).__name__}); see the replica log") from None

    # ----- HTTP routes -------------------------------------------------------------------------

    @api.post("/v1/refine", response_model=RefineResponse, responses=_ERRORS, dependencies=_KEYED)
    async def refine_http(self, body: RefineRequest) -> Any:
        """Simplify, improve or synthesize a batch of samples; every item comes back ok or failed with a reason."""
        check_limits("refine", body, await self._limits())
        return await self._forward("refine", body.model_dump(), http=True)

    @api.post("/v1/judge", response_model=JudgeResponse, responses=_ERRORS, dependencies=_KEYED)
    async def judge_http(self, body: JudgeRequest) -> Any:
        """Score each sample's prompt and response 0-10 on factuality, clarity and completeness (null = no score)."""
        check_limits("judge", body, await self._limits())
        return await self._forward("judge", body.model_dump(), http=True)

    @api.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=_KEYED,
              responses={**_ERRORS, 404: {"description": "The requested model is not served here."}})
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        """OpenAI-compatible chat completion (text only, no streaming)."""
        check_limits("chat", body, await self._limits())
        return await self._forward("chat", body.model_dump(), http=True)

    @api.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401], 503: _ERRORS[503]},
             dependencies=_KEYED)
    async def models(self) -> ModelList:
        """OpenAI-compatible list of the served model."""
        return ModelList(data=[ModelCard(id=(await self._model_info())["model"])])

    @api.get("/healthz", responses={503: {"description": "The model replica is not up (yet)."}})
    async def healthz(self):
        """Liveness of the app and the served model (no key needed). Serve checks the model replicas
        themselves (and restarts a failed one); this answers from the gateway, never queued behind work:
        503 while a replica that died under a request has not been reached again."""
        try:
            if self._down is not None and not self._down.done():
                raise RuntimeError("restarting")
            info = await asyncio.wait_for(self._model_info(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready to serve"
            return JSONResponse(status_code=503, headers={"Retry-After": f"{self._args.retry_after_s:g}"},
                                content={"status": "unhealthy", "reason": f"model replica not reachable: "
                                                                          f"{type(exc).__name__}: {exc}"[:200]})
        return {"status": "ok", "model": info["model"]}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        """The OpenAPI schema, narrowed to this server's limits and engine."""
        if self._schema is None:
            self._schema = _schema_for(await self._model_info())
        root = request.scope.get("root_path", "")
        return JSONResponse({**self._schema, "servers": [{"url": root}]} if root else self._schema)

    # ----- handle methods (the same as the Refiner's) ------------------------------------------

    async def refine(self, request: dict) -> dict:
        return await self._forward("refine", request, http=False)

    async def judge(self, request: dict) -> dict:
        return await self._forward("judge", request, http=False)

    async def chat(self, request: dict) -> dict:
        return await self._forward("chat", request, http=False)

    async def info(self) -> dict:
        return await self._forward("info", None, http=False)

    async def sleep(self, level: int = 1) -> dict:
        return await self._forward("sleep", level, http=False)

    async def wake(self) -> dict:
        return await self._forward("wake", None, http=False)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Builds the refiner application from (string or typed) arguments.

    The API key and the external endpoint's key are read here, from the environment variables
    named by ``api_key_env`` and ``openai_api_key_env``, on the machine that builds the app; only
    the digest of the app's key is sent to the replicas.

    Args:
        args: Keys of :class:`RefinerArgs`; missing keys take :data:`DEFAULT_ARGS`.

    Returns:
        The bound application, for ``serve.run`` or ``serve run serve.app:build_app``.

    Raises:
        pydantic.ValidationError: An unknown key or a bad value, naming the key.
        ValueError: A non-loopback ``http_host`` without an API key, or engine 'openai' without its
            base URL or key; the message names the variable or argument to set.
    """
    import os

    from ray.serve.config import BackpressureConfig

    a = RefinerArgs.model_validate(dict(args or {}))
    key = os.environ.get(a.api_key_env) or None
    digest = key_digest(key) if key else None
    require_key_off_loopback(a.http_host, digest, a.api_key_env)
    engine_key = None
    if a.engine == "openai":
        if not a.openai_base_url:
            raise ValueError("engine 'openai' needs openai_base_url (the endpoint's base URL, e.g. https://host/v1)")
        value = os.environ.get(a.openai_api_key_env)
        if not value:
            raise ValueError(f"engine 'openai' reads its API key from the environment variable {a.openai_api_key_env}, "
                             f"which is not set; export it (any value for an endpoint without auth)")
        engine_key = SecretStr(value)
    if not digest and is_loopback(a.http_host):
        logger.info("refiner app without an API key (loopback only); set %s to require one", a.api_key_env)
    options: dict[str, Any] = {
        "max_ongoing_requests": a.max_ongoing_requests,
        "max_queued_requests": a.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=a.retry_after_s),
        "ray_actor_options": {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
    }
    if a.autoscale:
        scaling: dict[str, Any] = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests}}
    else:
        scaling = {"num_replicas": a.num_replicas}
    options.update(scaling)
    llm = None
    if a.engine == "vllm":
        from serve.engines.vllm import vllm_deployment

        # The model runs in Ray Serve LLM's deployment (its own replicas, CPUs/GPUs and scaling); the
        # Refiner only renders prompts and checks outputs, so it reserves no GPU. vLLM queues what it
        # cannot schedule yet, so the LLM deployment takes every request the Refiner lets through.
        options["ray_actor_options"] = {"num_cpus": min(a.num_cpus, 1.0), "num_gpus": 0}
        llm = vllm_deployment(a.model, a.dtype, a.vllm_engine_kwargs,
                              {**scaling, "max_ongoing_requests": max(1024, a.max_ongoing_requests * 64)},
                              gpus=a.num_gpus, app_tag="middo")
    refiner = Refiner.options(**options).bind(a.model_dump(), engine_key, llm)
    # The gateway only parses and waits: a sliver of a CPU, many connections, one replica per refiner
    # replica (at least one), so the HTTP side scales with the model side.
    gateway_replicas = a.max_replicas if a.autoscale else a.num_replicas
    return Gateway.options(num_replicas=max(1, gateway_replicas), max_ongoing_requests=a.gateway_max_ongoing_requests,
                           ray_actor_options={"num_cpus": 0.05}).bind(refiner, a.model_dump(), digest)
