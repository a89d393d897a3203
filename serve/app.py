"""The refiner/judge LLM as a Ray Serve application: HTTP (FastAPI) and deployment handles.

Routes (relative to the app's route prefix; the OpenAPI schema is at ``/openapi.json``):

- ``POST /v1/refine``: :class:`middo_ray.wire.RefineRequest` -> ``RefineResponse``: simplify,
  improve or synthesize a batch of samples; each item ``ok`` or ``failed`` with a reason.
- ``POST /v1/judge``: ``JudgeRequest`` -> ``JudgeResponse``: 0-10 scores of factuality, clarity and
  completeness for the prompt and the response; mode ``prob`` (token probabilities, transformers
  engine) or ``generate`` (parsed text; unparseable = null).
- ``POST /v1/chat/completions`` and ``GET /v1/models``: OpenAI-compatible, so the official ``openai``
  client (and another copy of this app's external engine) can use the served model.
- ``GET /healthz``: liveness and the served model (no key needed).

The loop calls the same logic through the handle: ``handle.refine.remote(dict)``,
``handle.judge.remote(dict)``, ``handle.info.remote()``.

Serving behaviour:

- Dynamic batching: every generation (refine steps, generate-mode judging, chat completions) goes
  through one ``@serve.batch`` method, which merges the rows of concurrent requests into engine
  batches of up to ``batch_max_rows`` rows. Each row keeps its own seed, so results do not depend on
  what it was batched with.
- Auth: with an API key configured (environment variable named by ``api_key_env``), every route but
  ``/healthz``, ``/docs`` and ``/openapi.json`` needs ``Authorization: Bearer <key>`` (401 otherwise).
  A server bound beyond loopback refuses to start without a key.
- Limits: body over ``max_body_bytes``, more than ``max_samples_per_request`` samples, or more than
  ``max_new_tokens_limit`` tokens per item: 413 with a message naming the limit. Schema errors: 422
  naming each bad field. Beyond ``max_ongoing_requests`` per replica plus ``max_queued_requests`` per
  caller, Serve answers 503 with ``Retry-After`` instead of queueing without bound.
- Logs carry counts and ids, never sample text (unless ``log_text``).
- Metrics: see :mod:`serve.metrics`.

Run it alone with ``serve run serve.app:build_app model=tiny`` (every field of :class:`RefinerArgs`
can be given as key=value).
"""

# No `from __future__ import annotations` here: Serve pickles the deployment class by value, and FastAPI
# must resolve the route annotations from real objects, not from strings looked up in a partial copy
# of this module's globals.

import asyncio
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
import ray
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from middo_ray.wire import JudgeRequest, JudgeResponse, RefineRequest, RefineResponse, ServeSettings
from serve import logic
from serve.engines import GenOut, GenRow, describe, make_engine, row_seed
from serve.logic import run_refine, sample_prompt  # noqa: F401  (re-exported: the app's public helpers)
from serve.metrics import MetricsMiddleware, ServeMetrics, set_current
from serve.openai_api import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, ModelCard, ModelList, Usage
from serve.security import (AuthMiddleware, BodyLimitMiddleware, error_body, is_loopback, key_digest,
                            require_key_off_loopback, set_api_key, set_body_limit)

logger = logging.getLogger(__name__)


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

api = FastAPI(title="middo-ray refiner", version="1.0",
              description="Refines (simplify, improve, synthesize) and judges SFT samples; OpenAI-compatible chat.")
# Serve pickles the deployment class by value when it is decorated: everything it uses from this
# module must be defined above it, and per-process state lives in serve.security / serve.metrics.
# Order of the checks on the way in: metrics (counts every answer), auth (401), body size (413).
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(AuthMiddleware)
api.add_middleware(MetricsMiddleware)
# The key is enforced by AuthMiddleware; this dependency only documents the scheme in the OpenAPI schema.
_bearer = HTTPBearer(auto_error=False, description="The app's API key (when one is configured).")
_KEYED = [Depends(_bearer)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong API key."},
    413: {"description": "Body, sample count or token request over this server's limits."},
    422: {"description": "The body does not match the schema (each bad field is named)."},
    503: {"description": "Overloaded: retry after the Retry-After seconds."},
}


def _describe_errors(errors: list[dict]) -> str:
    """'loc: msg' for up to 8 validation errors, never the submitted values (they may be sample text)."""
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:8]]
    more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
    return "; ".join(parts) + more


@api.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """422 naming every bad field (without echoing the submitted text)."""
    errors = exc.errors()
    message = f"invalid request: {_describe_errors(errors)}. The request schema is at /openapi.json"
    detail = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in errors]
    return JSONResponse(status_code=422, content={**error_body(422, message), "detail": detail})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content=error_body(exc.status_code, str(exc.detail)),
                        headers=getattr(exc, "headers", None))


class ClientError(Exception):
    """A request the server will not serve, with the HTTP status to answer (handle callers get ValueError)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _proxy_host() -> str | None:
    """The host Serve's HTTP proxy really binds, when it can be read (defence in depth; private API)."""
    try:
        from ray.serve.context import _get_global_client

        return str(_get_global_client().http_config.host)
    except Exception:  # noqa: BLE001 - best effort: build_app already checked the configured host
        return None


def _validated(model: type[BaseModel], data: dict) -> Any:
    """A handle call's request, validated; errors name fields but do not echo text (it would reach logs)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid {model.__name__}: {_describe_errors(exc.errors())}") from None


def _rows_in(chunks: list[list[GenRow]]) -> int:
    return sum(len(c) for c in chunks)


@serve.deployment(name="Refiner", max_ongoing_requests=16)
@serve.ingress(api)
class Refiner:
    """One replica: the engine, loaded once, behind HTTP routes and handle methods.

    Args:
        args: Validated :class:`RefinerArgs` as a dict.
        api_key_digest: SHA-256 of the app's API key, or None for no auth (loopback only).
        engine_key: The external endpoint's key (engine 'openai').
    """

    def __init__(self, args: dict, api_key_digest: str | None = None, engine_key: SecretStr | None = None,
                 llm=None) -> None:
        from middo_ray.models import threads_for_actor
        from serve.engines.vllm import vllm_max_model_len

        a = RefinerArgs.model_validate(args)
        self._args = a
        require_key_off_loopback(_proxy_host() or a.http_host, api_key_digest, a.api_key_env)
        if a.engine == "transformers":
            threads_for_actor(a.num_cpus)
        self._engine = make_engine(
            a.engine, a.model, dtype=a.dtype, openai_base_url=a.openai_base_url,
            openai_api_key=engine_key.get_secret_value() if engine_key else None, openai_prefill=a.openai_prefill,
            openai_max_parallel=a.openai_max_parallel, openai_timeout_s=a.openai_timeout_s, max_batch=a.batch_max_rows,
            llm_handle=llm,
            max_model_len=vllm_max_model_len(a.model, a.vllm_engine_kwargs) if a.engine == "vllm" else None)
        engine_cap = self._engine.max_new_tokens_limit
        self._token_limit = min(a.max_new_tokens_limit, engine_cap) if engine_cap else a.max_new_tokens_limit
        # Generation and probability judging both saturate the replica; one runs at a time.
        self._compute = asyncio.Lock()
        self._generate_batch.set_max_batch_size(a.batch_max_rows)
        self._generate_batch.set_batch_wait_timeout_s(a.batch_wait_s)
        self._metrics = ServeMetrics()
        set_current(self._metrics)
        set_body_limit(a.max_body_bytes)
        set_api_key(api_key_digest, a.api_key_env)
        self._info = {**describe(self._engine), "logic_version": logic.logic_version(),
                      "limits": {"max_samples_per_request": a.max_samples_per_request,
                                 "max_new_tokens": self._token_limit, "max_body_bytes": a.max_body_bytes},
                      "auth": bool(api_key_digest),
                      # Where this replica runs, and the GPUs Ray gave it (the vLLM engine's own are its deployment's).
                      "placement": {"node_id": ray.get_runtime_context().get_node_id(),
                                    "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}}
        logger.info("refiner replica ready: engine=%s model=%s auth=%s", a.engine, self._engine.model_id,
                    bool(api_key_digest))

    # ----- engine access (batched) -----------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.1, batch_size_fn=_rows_in)
    async def _generate_batch(self, chunks: list[list[GenRow]]) -> list[list[GenOut]]:
        """Runs the rows of many concurrent callers as one engine call, and hands each its part."""
        flat = [r for c in chunks for r in c]
        async with self._compute:
            outs = await asyncio.to_thread(self._engine.generate_rows, flat)
        self._metrics.batch_rows.observe(len(flat))
        self._metrics.count_tokens(sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs))
        parts, start = [], 0
        for c in chunks:
            parts.append(outs[start:start + len(c)])
            start += len(c)
        return parts

    async def _generate(self, rows: list[GenRow]) -> list[GenOut]:
        """Generates any number of rows through the batcher, in pieces of at most batch_max_rows.

        An engine that schedules concurrent requests itself (vLLM: continuous batching) gets the rows
        at once instead: a second batcher in front of it would only add its wait.
        """
        direct = getattr(self._engine, "agenerate_rows", None)
        if direct is not None:
            outs = await direct(rows)
            self._metrics.count_tokens(sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs))
            return outs
        size = self._args.batch_max_rows
        pieces = await asyncio.gather(*(self._generate_batch(rows[i:i + size]) for i in range(0, len(rows), size)))
        return [o for piece in pieces for o in piece]

    # ----- shared checks -----------------------------------------------------------------------

    def _check_samples(self, n: int) -> None:
        if n > self._args.max_samples_per_request:
            raise ClientError(413, f"{n} samples in one request exceed this server's limit of "
                                   f"{self._args.max_samples_per_request} (max_samples_per_request); split the request")

    def _check_tokens(self, n: int, what: str = "sampling.max_new_tokens") -> None:
        if n > self._token_limit:
            raise ClientError(413, f"{what}={n} exceeds this server's limit of {self._token_limit} tokens per item "
                                   f"(max_new_tokens_limit); ask for fewer")

    async def _run(self, route: str, work, http: bool):
        """Runs one request's work: client errors become 4xx (HTTP) or ValueError (handles)."""
        t0 = time.monotonic()
        try:
            result = await work()
        except ClientError as exc:
            if not http:
                self._metrics.answered(route, "error", time.monotonic() - t0)
                raise ValueError(exc.message) from None
            raise HTTPException(exc.status, exc.message) from None
        except HTTPException:
            raise
        except Exception as exc:
            # Never the request text in the log unless asked: the exception type and route only.
            if self._args.log_text:
                logger.exception("%s failed", route)
            else:
                logger.error("%s failed: %s", route, type(exc).__name__)
            if not http:
                self._metrics.answered(route, "error", time.monotonic() - t0)
                raise
            raise HTTPException(500, f"internal error ({type(exc).__name__}); see the replica log") from None
        if not http:
            self._metrics.answered(route, "ok", time.monotonic() - t0)
        return result

    # ----- refine ------------------------------------------------------------------------------

    async def _refine(self, body: RefineRequest, route: str) -> RefineResponse:
        self._check_tokens(body.sampling.max_new_tokens)
        if self._args.log_text:
            logger.debug("%s %s: %s", route, body.operation, [sample_prompt(s) for s in body.samples])
        resp = await logic.refine(self._generate, body, self._engine.model_id, self._engine.supports_prefill)
        ok = sum(r.status == "ok" for r in resp.results)
        self._metrics.count_items(route, "ok", ok)
        self._metrics.count_items(route, "failed", len(resp.results) - ok)
        return resp

    @api.post("/v1/refine", response_model=RefineResponse, responses=_ERRORS, dependencies=_KEYED)
    async def refine_http(self, body: RefineRequest) -> RefineResponse:
        """Simplify, improve or synthesize a batch of samples; every item comes back ok or failed with a reason."""
        async def work():
            self._check_samples(len(body.samples))
            return await self._refine(body, "/v1/refine")

        return await self._run("/v1/refine", work, http=True)

    async def refine(self, request: dict) -> dict:
        """Handle method for the loop: a RefineRequest dict in, a RefineResponse dict out.

        Raises:
            ValueError: The request does not match RefineRequest (a caller bug; the message names the
                fields) or asks for more tokens than the server allows.
        """
        body = _validated(RefineRequest, request)
        return (await self._run("handle:refine", lambda: self._refine(body, "handle:refine"), http=False)).model_dump()

    # ----- judge -------------------------------------------------------------------------------

    async def _judge(self, body: JudgeRequest, route: str) -> JudgeResponse:
        if body.mode == "prob":
            if not self._engine.supports_prob_judge:
                raise ClientError(422, f"engine '{self._engine.name}' gives no token probabilities, so it supports only "
                                       f"mode 'generate'; send \"mode\": \"generate\"")
            if body.template == "chat" and not getattr(self._engine, "uses_chat_template", False):
                raise ClientError(422, "template 'chat' needs a tokenizer with a chat template, and this model has "
                                       "none; use 'default' or 'auto'")
            rows = [s.model_dump() for s in body.samples]
            scheduled = getattr(self._engine, "ajudge_prob", None)
            if scheduled is not None:       # vLLM schedules the scoring requests itself
                scores = await scheduled(rows, body.template, body.cutoff_len)
            else:
                async with self._compute:
                    scores = await asyncio.to_thread(self._engine.judge_prob, rows, body.template,  # type: ignore[attr-defined]
                                                     body.cutoff_len)
        else:
            self._check_tokens(body.sampling.max_new_tokens)
            scores = await logic.judge_generate(self._generate, body)
        resp = logic.judge_response(body, scores, self._engine.model_id)
        missing = sum(r.missing for r in resp.results)
        self._metrics.count_items(route, "scored", 6 * len(resp.results) - missing)
        self._metrics.count_items(route, "missing", missing)
        return resp

    @api.post("/v1/judge", response_model=JudgeResponse, responses=_ERRORS, dependencies=_KEYED)
    async def judge_http(self, body: JudgeRequest) -> JudgeResponse:
        """Score each sample's prompt and response 0-10 on factuality, clarity and completeness (null = no score)."""
        async def work():
            self._check_samples(len(body.samples))
            return await self._judge(body, "/v1/judge")

        return await self._run("/v1/judge", work, http=True)

    async def judge(self, request: dict) -> dict:
        """Handle method: a JudgeRequest dict in, a JudgeResponse dict out (ValueError for unsupported modes)."""
        body = _validated(JudgeRequest, request)
        return (await self._run("handle:judge", lambda: self._judge(body, "handle:judge"), http=False)).model_dump()

    # ----- OpenAI-compatible -------------------------------------------------------------------

    async def _chat(self, body: ChatCompletionRequest) -> ChatCompletion:
        if body.model != self._engine.model_id:
            raise ClientError(404, f"model '{body.model}' is not served here; GET /v1/models lists "
                                   f"'{self._engine.model_id}'")
        cap = body.token_cap(min(256, self._token_limit))
        self._check_tokens(cap, "max_tokens")
        if body.continue_final_message and not self._engine.supports_prefill:
            raise ClientError(422, "this server's engine cannot continue an assistant message; "
                                   "send continue_final_message=false")
        seed = logic.fresh_seed() if body.seed is None else body.seed
        messages = body.plain_messages()
        # Choice 0 samples with the seed itself (so a client that seeds each call, like the external
        # engine, gets exactly what this app would generate for that row); further choices derive theirs.
        rows = [GenRow(messages=messages, max_new_tokens=cap, temperature=body.temperature, top_p=body.top_p,
                       seed=seed if i == 0 else row_seed(seed, i), continue_final=body.continue_final_message,
                       stop=body.stops())
                for i in range(body.n)]
        outs = await self._generate(rows)
        completion = sum(o.completion_tokens for o in outs)
        prompt = outs[0].prompt_tokens if outs else 0
        return ChatCompletion(
            model=self._engine.model_id,
            choices=[Choice(index=i, message=AssistantMessage(content=o.text),
                            finish_reason="length" if o.finish_reason == "length" else "stop")
                     for i, o in enumerate(outs)],
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion))

    @api.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=_KEYED,
              responses={**_ERRORS, 404: {"description": "The requested model is not served here."}})
    async def chat_completions(self, body: ChatCompletionRequest) -> ChatCompletion:
        """OpenAI-compatible chat completion (text only, no streaming)."""
        return await self._run("/v1/chat/completions", lambda: self._chat(body), http=True)

    async def chat(self, request: dict) -> dict:
        """Handle method: a chat-completion request dict in, the ChatCompletion dict out."""
        body = _validated(ChatCompletionRequest, request)
        return (await self._run("handle:chat", lambda: self._chat(body), http=False)).model_dump()

    @api.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]}, dependencies=_KEYED)
    async def models(self) -> ModelList:
        """OpenAI-compatible list of the served model."""
        return ModelList(data=[ModelCard(id=self._engine.model_id)])

    # ----- health and identity -----------------------------------------------------------------

    @api.get("/healthz", responses={503: {"description": "The model engine behind the app is not healthy."}})
    async def healthz(self):
        """Liveness of the app and of its model engine, and the served model (no key needed)."""
        check = getattr(self._engine, "health", None)
        if check is not None:
            try:
                await asyncio.wait_for(check(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready to serve"
                return JSONResponse(status_code=503, content={"status": "unhealthy", "model": self._engine.model_id,
                                                              "reason": f"engine check failed: {type(exc).__name__}"})
        return {"status": "ok", "model": self._engine.model_id}

    async def sleep(self, level: int = 1) -> dict:
        """Handle method (refine.gpu_handoff='sleep'): frees the engine's GPU memory until :meth:`wake`.

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
        """Handle method: the engine's weights (and vLLM's KV cache) back on the GPU."""
        if getattr(self, "_asleep", False):
            async with self._compute:
                await self._engine.wake()
                self._asleep = False
        return {"asleep": False}

    async def info(self) -> dict:
        """Handle method: engine, model, revision, judge modes, logic version, limits (for cache keys)."""
        return dict(self._info)


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
        # ingress only renders prompts and checks outputs, so it reserves no GPU. vLLM queues what it
        # cannot schedule yet, so the LLM deployment takes every request the ingress lets through.
        options["ray_actor_options"] = {"num_cpus": min(a.num_cpus, 1.0), "num_gpus": 0}
        llm = vllm_deployment(a.model, a.dtype, a.vllm_engine_kwargs,
                              {**scaling, "max_ongoing_requests": max(1024, a.max_ongoing_requests * 64)},
                              gpus=a.num_gpus, app_tag="middo")
    return Refiner.options(**options).bind(a.model_dump(), digest, engine_key, llm)
