"""Refine stage: send flagged samples to the refiner Serve app and collect one result per job.

The Serve application lives in the top-level ``serve`` package, which this library must not import
(``serve`` depends on ``middo_ray``, never the reverse). It is therefore loaded by its import path
string, exactly as ``serve run serve.app:build_app`` would.

What :func:`refine_jobs` does, in order:

1. plans requests of ``refine.batch_size`` samples per operation, each with a seed derived from the
   run seed, so a rerun asks exactly the same questions;
2. answers each request from the LLM-call cache (``cache_dir``, e.g. ``runs/<id>/cache/llm``; keyed
   by the request content, the engine, model id and revision, and the app's prompt fingerprint) or
   sends it through the deployment handle, keeping ``refine.max_concurrency`` requests in flight;
3. re-judges every valid rewrite together with its original on the same app (``/v1/judge`` logic)
   and applies ``refine.accept``; rejected rewrites keep the original, with the scores and the reason.

Failure policy (DESIGN.md "row errors are data, service death is fatal"): an item the refiner could
not rewrite, a rewrite the judge rejected, and every item of a request that did not answer within
``refine.request_timeout_s`` come back with status "failed" and a reason, and the caller keeps the
original sample; a request that raises (dead replica, lost connection, broken contract) stops the
stage with a RuntimeError naming the request.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from middo_ray.config import MiddoConfig, RefineConfig
from middo_ray.wire import RefineResult, ServeSettings

logger = logging.getLogger(__name__)

APP_IMPORT_PATH = "serve.app:build_app"
JOB_KEYS = ("sample_id", "operation", "instruction", "input", "output", "hints")
OPERATIONS = ("simplify", "improve", "synthesize")
HEALTH_TIMEOUT_S = 600.0
INFO_TIMEOUT_S = 120.0
CACHE_FORMAT = 1          # bump when the cached answer layout changes
JUDGE_CUTOFF_LEN = 1024


@dataclass
class RefineOutcome:
    """What the refine stage produced.

    Attributes:
        results: One RefineResult dict per job, in job order (``sample_id`` and ``status`` always set).
        counts: ``{"jobs", "ok", "failed", "requests", "seconds", "by_operation": {op: {"ok", "failed"}},
            "cache_hits", "cache_misses", "timeouts", "accept", "judged", "rejected", "judge_requests"}``
            (cache hits/misses count requests, refine and judge together; ``judged``/``rejected`` count items).
    """

    results: list[dict[str, Any]]
    counts: dict[str, Any] = field(default_factory=dict)


def _load_builder(path: str = APP_IMPORT_PATH):
    """Imports 'module:attribute' by string, so middo_ray has no import-time dependency on serve/."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeError(f"cannot import the refiner app '{path}': {exc}; run from the project root "
                           f"or install the project (pip install -e .)") from exc
    return getattr(module, attr)


def refiner_args(cfg: MiddoConfig) -> dict[str, Any]:
    """Arguments of ``serve.app:build_app`` derived from the run config (the shared ServeSettings fields
    pass unchanged)."""
    r = cfg.refine
    return {"model": r.model or cfg.model.base, "dtype": cfg.model.dtype, "num_cpus": r.cpus_per_replica,
            "num_gpus": r.gpus_per_replica, **{k: getattr(r, k) for k in ServeSettings.model_fields}}


def judge_args(cfg: MiddoConfig, model: str) -> dict[str, Any]:
    """Arguments of the judge app (``refine.judge='current'``): the refiner's limits and security, the
    round's checkpoint as its model, on ``refine.judge_engine``."""
    r = cfg.refine
    args = refiner_args(cfg)
    args.update(model=model, engine=r.judge_engine, openai_base_url=None,
                vllm_engine_kwargs=dict(r.vllm_engine_kwargs) if r.judge_engine == "vllm" else {},
                num_replicas=r.judge_replicas, autoscale=False, num_cpus=r.judge_cpus_per_replica,
                num_gpus=r.judge_gpus_per_replica)
    return args


def judge_app_name(cfg: MiddoConfig) -> str:
    return f"{cfg.refine.app_name}-judge"


def refiner_url(cfg: MiddoConfig, route_prefix: str | None = None) -> str:
    """Base HTTP URL of the refiner app, or of the app at ``route_prefix`` (a wildcard bind host is
    reached through loopback)."""
    r = cfg.refine
    host = "127.0.0.1" if r.http_host in ("0.0.0.0", "::", "") else r.http_host
    prefix = (r.route_prefix if route_prefix is None else route_prefix).rstrip("/")
    return f"http://{host}:{r.http_port}{prefix}"


def _wait_healthy(url: str, timeout_s: float) -> dict:
    """Polls ``GET {url}/healthz`` until it answers ok; raises RuntimeError after timeout_s."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/healthz", timeout=10.0)
            if resp.status_code == 200 and resp.json().get("status") == "ok":
                return resp.json()
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"refiner app did not become healthy at {url}/healthz within {timeout_s:.0f}s ({last})")


def start_refiner(cfg: MiddoConfig, health_timeout_s: float = HEALTH_TIMEOUT_S):
    """Deploys the refiner Serve app, waits until it answers over HTTP, and returns its handle.

    Ray must already be initialised (the driver's job). Serve's HTTP proxy is started on
    ``refine.http_host:refine.http_port``; if Serve already runs in this cluster with other HTTP
    options, Serve keeps its existing ones (and logs a warning). A non-loopback ``http_host`` needs
    the API key in the environment variable named by ``refine.api_key_env`` (checked before Serve
    starts).

    Args:
        cfg: The run config (``refine`` section plus ``model.base``/``model.dtype``).
        health_timeout_s: How long to wait for ``/healthz`` after the deployment is up.

    Returns:
        The DeploymentHandle of the app's ingress (call ``handle.refine.remote(request_dict)``).

    Raises:
        RuntimeError: The app cannot be imported or does not become healthy in time.
        ValueError: The app's arguments are invalid (e.g. a public host without an API key).
    """
    from ray import serve as ray_serve

    r = cfg.refine
    app = _load_builder()(refiner_args(cfg))
    ray_serve.start(http_options={"host": r.http_host, "port": r.http_port})
    # serve.run returns once every replica's constructor (model load) has finished.
    handle = ray_serve.run(app, name=r.app_name, route_prefix=r.route_prefix)
    info = _wait_healthy(refiner_url(cfg), health_timeout_s)
    logger.info("refiner '%s' healthy at %s (model %s)", r.app_name, refiner_url(cfg), info.get("model"))
    return handle


def start_judge(cfg: MiddoConfig, model: str, health_timeout_s: float = HEALTH_TIMEOUT_S):
    """Deploys (or redeploys) the judge app serving ``model``, the round's checkpoint M_t.

    The judge is a second application of the same Serve app code (its own name and route prefix,
    ``refine.judge_route_prefix``), so it has every route and limit of the refiner. Running it again with
    another checkpoint replaces its replicas (Serve's rolling update): the judge follows the model being
    trained while the refiner app keeps the configured teacher.

    Returns:
        The judge app's DeploymentHandle.
    """
    from ray import serve as ray_serve

    r = cfg.refine
    app = _load_builder()(judge_args(cfg, model))
    ray_serve.start(http_options={"host": r.http_host, "port": r.http_port})
    handle = ray_serve.run(app, name=judge_app_name(cfg), route_prefix=r.judge_route_prefix)
    url = refiner_url(cfg, r.judge_route_prefix)
    info = _wait_healthy(url, health_timeout_s)
    logger.info("judge '%s' healthy at %s (model %s)", judge_app_name(cfg), url, info.get("model"))
    return handle


def stop_refiner(cfg: MiddoConfig) -> None:
    """Deletes the refiner and judge apps; shuts Serve down only when no other application is left.

    On a shared cluster other Serve apps may run next to ours, and they must survive our job.
    """
    from ray import serve as ray_serve

    try:
        running = ray_serve.status().applications
        for name in (cfg.refine.app_name, judge_app_name(cfg)):
            if name in running:
                ray_serve.delete(name)
        others = ray_serve.status().applications
    except Exception as exc:  # Serve already gone: nothing left to delete.
        logger.info("refiner app '%s' not deleted: %s", cfg.refine.app_name, exc)
        return
    if not others:
        ray_serve.shutdown()


def _check_jobs(jobs: list[dict]) -> None:
    """Raises ValueError naming the first malformed job (a caller bug, not a row failure)."""
    for pos, job in enumerate(jobs):
        missing = [k for k in ("sample_id", "operation", "instruction") if not job.get(k)]
        if missing:
            raise ValueError(f"refine job #{pos} lacks {missing}; every job needs {list(JOB_KEYS)}")
        if job["operation"] not in OPERATIONS:
            raise ValueError(f"refine job #{pos} ({job['sample_id']}): unknown operation '{job['operation']}'; "
                             f"use one of {list(OPERATIONS)}")


def _request_seed(seed: int, operation: str, chunk: int) -> int:
    """A per-request seed that depends only on the run seed, the operation and the chunk number."""
    op = OPERATIONS.index(operation)
    return (int(seed) * 1_000_003 + op * 65_537 + chunk * 7_919) % (2**31 - 1)


def plan_requests(jobs: list[dict], cfg: RefineConfig, seed: int) -> list[tuple[list[int], dict]]:
    """Groups jobs by operation (in a fixed operation order) into request dicts of cfg.batch_size.

    Returns:
        ``(job positions, request dict)`` pairs; the positions say where each result goes back.
    """
    plan: list[tuple[list[int], dict]] = []
    for op in OPERATIONS:
        positions = [i for i, j in enumerate(jobs) if j["operation"] == op]
        for chunk, start in enumerate(range(0, len(positions), cfg.batch_size)):
            part = positions[start:start + cfg.batch_size]
            samples = [{"sample_id": jobs[i]["sample_id"], "instruction": jobs[i]["instruction"],
                        "input": jobs[i].get("input") or "", "output": jobs[i].get("output") or "",
                        "hints": list(jobs[i].get("hints") or [])} for i in part]
            request = {
                "operation": op, "samples": samples, "max_retries": cfg.max_retries,
                "prefill_marker": cfg.prefill_marker,
                "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                             "top_p": cfg.top_p, "seed": _request_seed(seed, op, chunk)},
            }
            plan.append((part, request))
    return plan


class LLMCallCache:
    """Content-addressed store of LLM-call answers: one JSON file per key, written atomically.

    Layout: ``<root>/<key[:2]>/<key>.json``. A file that cannot be read (a crash mid-write leaves
    only a temporary file, never a partial one) counts as a miss.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text())["answer"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, answer: dict, about: dict | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"about": about or {}, "answer": answer}, ensure_ascii=False))
        os.replace(tmp, path)


def call_key(method: str, request: dict, ident: dict) -> str:
    """Cache key of one call: the request content (texts, sampling, seed), engine, model id and revision,
    and the app's prompt fingerprint."""
    payload = {"format": CACHE_FORMAT, "method": method, "request": request,
               "engine": ident.get("engine"), "model": ident.get("model"), "revision": ident.get("revision"),
               "logic": ident.get("logic_version"), "prefill": ident.get("prefill")}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class _Call:
    """One request to the app and what became of it."""

    method: str                  # handle method: "refine" or "judge"
    request: dict
    what: str                    # for error messages: no sample text, just shape and first id
    key: str | None = None
    answer: dict | None = None
    error: str | None = None     # set when the call timed out (a row failure, not fatal)


def _run_calls(handle, calls: list[_Call], cfg: RefineConfig, cache: LLMCallCache | None, ident: dict,
               stats: dict[str, int]) -> None:
    """Answers every call from the cache or the handle, with cfg.max_concurrency in flight.

    A sliding window: when full, wait for the oldest (one replica serves requests in arrival order,
    so it is also the first to finish). Each call's timeout runs from the moment it was sent.

    Raises:
        RuntimeError: A call raised in the service (dead replica, lost connection): fatal.
    """
    window: deque = deque()

    def finish(call: _Call, response, sent: float) -> None:
        remaining = cfg.request_timeout_s - (time.monotonic() - sent)
        try:
            answer = response.result(timeout_s=max(0.001, remaining))
        except TimeoutError:
            response.cancel()
            stats["timeouts"] += 1
            call.error = (f"the refiner did not answer within {cfg.request_timeout_s:g}s "
                          f"(refine.request_timeout_s)")
            logger.warning("%s timed out after %.0fs; its items keep their originals", call.what, cfg.request_timeout_s)
            return
        except Exception as exc:
            raise RuntimeError(f"{call.what} failed in the refiner service: {type(exc).__name__}: {exc}. "
                               f"The service is down or broken; the stage stops (no sample was changed).") from exc
        call.answer = answer
        if cache is not None and call.key:
            cache.put(call.key, answer, {"method": call.method, "model": ident.get("model"),
                                         "revision": ident.get("revision")})

    for call in calls:
        if cache is not None:
            call.key = call_key(call.method, call.request, ident)
            hit = cache.get(call.key)
            if hit is not None:
                call.answer = hit
                stats["cache_hits"] += 1
                continue
            stats["cache_misses"] += 1
        if len(window) >= cfg.max_concurrency:
            finish(*window.popleft())
        window.append((call, getattr(handle, call.method).remote(call.request), time.monotonic()))
    while window:
        finish(*window.popleft())


def _checked_results(call: _Call, ids: list[str | None]) -> list[dict]:
    """The answer's results, checked against the ids that were sent (a mismatch is fatal)."""
    got = call.answer.get("results") if isinstance(call.answer, dict) else None
    if not isinstance(got, list) or len(got) != len(ids):
        raise RuntimeError(f"{call.what}: the refiner answered {len(got) if isinstance(got, list) else got!r} "
                           f"results for {len(ids)} samples; the service breaks its contract")
    for want, res in zip(ids, got):
        if res.get("sample_id") != want:
            raise RuntimeError(f"{call.what}: result for '{res.get('sample_id')}' arrived where '{want}' was "
                               f"expected; the service breaks its contract")
    return got


def _judge_mode(cfg: RefineConfig, ident: dict) -> str:
    modes = ident.get("judge_modes") or ["generate"]
    if cfg.judge_mode == "auto":
        return "prob" if "prob" in modes else "generate"
    if cfg.judge_mode not in modes:
        raise ValueError(f"refine.judge_mode='{cfg.judge_mode}' but the refiner's engine '{ident.get('engine')}' "
                         f"supports only {modes}; set refine.judge_mode='auto'")
    return cfg.judge_mode


def accept_rewrite(cfg: RefineConfig, before: float | None, after: float | None) -> str | None:
    """Why a judged rewrite is rejected under ``cfg.accept``, or None when it is kept.

    A rewrite the judge could not score is rejected (the original is the safe choice); an original
    without a score cannot be compared, so under 'not_worse' its rewrite is kept.
    """
    if cfg.accept == "none":
        return None
    if after is None:
        return "the re-judge gave the rewrite no score"
    if cfg.accept == "min_score":
        if after < cfg.accept_min_score:
            return f"judged quality {after:.2f} < refine.accept_min_score {cfg.accept_min_score:g}"
        return None
    if before is not None and after < before - cfg.accept_tolerance:
        tol = f" - tolerance {cfg.accept_tolerance:g}" if cfg.accept_tolerance else ""
        return f"judged quality {after:.2f} < original's {before:.2f}{tol} (refine.accept=not_worse)"
    return None


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _rejudge(jobs: list[dict], results: list[dict], handle, cfg: RefineConfig, seed: int, ident: dict,
             cache: LLMCallCache | None, stats: dict[str, int], template: str, cutoff_len: int) -> None:
    """Judges every ok rewrite with its original and turns rejected ones into failures (in place)."""
    mode = _judge_mode(cfg, ident)
    positions = [i for i, r in enumerate(results) if r["status"] == "ok"]
    calls: list[tuple[list[int], _Call]] = []
    for chunk, start in enumerate(range(0, len(positions), cfg.batch_size)):
        part = positions[start:start + cfg.batch_size]
        samples = []
        for i in part:
            job, res = jobs[i], results[i]
            samples.append({"sample_id": f"{job['sample_id']}:before", "instruction": job["instruction"],
                            "input": job.get("input") or "", "output": job.get("output") or ""})
            samples.append({"sample_id": f"{job['sample_id']}:after", "instruction": res["instruction"],
                            "input": res.get("input") or "", "output": res["output"]})
        request = {"samples": samples, "mode": mode, "template": template, "cutoff_len": cutoff_len,
                   "sampling": {"max_new_tokens": 8, "temperature": 0.1, "top_p": 1.0,
                                "seed": (int(seed) * 7_919 + chunk * 104_729 + 17) % (2**31 - 1)}}
        what = f"re-judge request ({len(part)} rewrites, first id {jobs[part[0]]['sample_id']})"
        calls.append((part, _Call("judge", request, what)))
    stats["judge_requests"] = len(calls)
    _run_calls(handle, [c for _, c in calls], cfg, cache, ident, stats)
    for part, call in calls:
        if call.error:
            for i in part:
                results[i] = _failed(results[i], f"re-judge failed: {call.error}; original kept")
            continue
        got = _checked_results(call, [s["sample_id"] for s in call.request["samples"]])
        for k, i in enumerate(part):
            before, after = _finite(got[2 * k].get("quality")), _finite(got[2 * k + 1].get("quality"))
            stats["judged"] += 1
            why = accept_rewrite(cfg, before, after)
            if why is not None:
                stats["rejected"] += 1
                results[i] = _failed(results[i], f"rejected by re-judge: {why}; original kept")
            results[i]["quality_before"], results[i]["quality_after"] = before, after


def _failed(result: dict, reason: str) -> dict:
    """A failed copy of a result (no texts, as the wire contract says), keeping id and attempts."""
    return RefineResult(sample_id=result.get("sample_id"), status="failed", reason=reason,
                        attempts=int(result.get("attempts") or 0),
                        quality_before=result.get("quality_before"),
                        quality_after=result.get("quality_after")).model_dump()


def _info(handle, what: str) -> dict:
    """The app's identity (engine, model, revision, judge modes); a cheap call, so the request timeout
    (possibly tiny) does not apply to it."""
    try:
        return handle.info.remote().result(timeout_s=INFO_TIMEOUT_S)
    except Exception as exc:
        raise RuntimeError(f"the {what} service does not answer info(): {type(exc).__name__}: {exc}; "
                           f"the stage stops (no sample was changed)") from exc


def refine_jobs(jobs: list[dict], handle, cfg: RefineConfig, seed: int,
                cache_dir: str | Path | None = None, judge: Callable[[], Any] | None = None,
                judge_template: str = "auto", judge_cutoff_len: int = JUDGE_CUTOFF_LEN) -> RefineOutcome:
    """Refines jobs through the deployment handle: cached, bounded, timed out, re-judged.

    Args:
        jobs: Dicts with ``sample_id``, ``operation`` (simplify|improve|synthesize), ``instruction``,
            ``input``, ``output`` and ``hints`` (synthesize: the 2 neighbour prompts).
        handle: DeploymentHandle returned by :func:`start_refiner`.
        cfg: The ``refine`` config section (batch_size, max_concurrency, sampling, retries, timeout,
            acceptance rule, cache switch).
        seed: Run seed; each request's seed is derived from it, so reruns ask the same questions.
        cache_dir: Directory of the LLM-call cache (e.g. ``runs/<id>/cache/llm``); None or
            ``cfg.cache = false`` disables caching.
        judge: Returns the handle of the app that re-judges rewrites (the judge app serving the round's
            checkpoint, :func:`start_judge`); called only when there is a rewrite to judge, so no judge is
            deployed for a round whose rewrites all failed. None = the refiner app judges
            (``refine.judge='teacher'``).
        judge_template: Prompt template of the probability judge ('auto', 'default' or 'chat'); the loop
            passes the diagnosis' own (``data.template``) when the judge is the current model, so a rewrite
            and its original are scored exactly as the diagnosis scored the original.
        judge_cutoff_len: Token cap of one judge prompt (the loop: ``data.cutoff_len``, as the diagnosis).

    Returns:
        A RefineOutcome with one result per job, in job order, and the counts.

    Raises:
        ValueError: A job is malformed, or cfg.judge_mode is not supported by the app's engine.
        RuntimeError: A request failed in the service (dead replica): service death is fatal.
    """
    t0 = time.monotonic()
    _check_jobs(jobs)
    plan = plan_requests(jobs, cfg, seed)
    stats = {"cache_hits": 0, "cache_misses": 0, "timeouts": 0, "judged": 0, "rejected": 0, "judge_requests": 0}
    cache = LLMCallCache(cache_dir) if (cache_dir is not None and cfg.cache) else None
    results: list[dict | None] = [None] * len(jobs)
    if plan:
        ident = _info(handle, "refiner")
        calls = []
        for positions, request in plan:
            what = (f"refine request ({request['operation']}, {len(positions)} samples, "
                    f"first id {request['samples'][0]['sample_id']})")
            calls.append(_Call("refine", request, what))
        _run_calls(handle, calls, cfg, cache, ident, stats)
        for (positions, request), call in zip(plan, calls):
            if call.error:
                for pos in positions:
                    results[pos] = RefineResult(sample_id=jobs[pos]["sample_id"], status="failed",
                                                reason=f"{call.error}; original kept").model_dump()
                continue
            got = _checked_results(call, [s["sample_id"] for s in request["samples"]])
            for pos, res in zip(positions, got):
                results[pos] = RefineResult.model_validate(res).model_dump()
        if cfg.accept != "none" and any(r["status"] == "ok" for r in results):  # type: ignore[index]
            judge_handle = judge() if judge is not None else handle
            judge_ident = _info(judge_handle, "judge") if judge is not None else ident
            stats["judge_model"] = judge_ident.get("model")
            stats["judge_revision"] = judge_ident.get("revision")
            _rejudge(jobs, results, judge_handle, cfg, seed, judge_ident, cache, stats,  # type: ignore[arg-type]
                     judge_template, judge_cutoff_len)

    by_op: dict[str, dict[str, int]] = {}
    for job, res in zip(jobs, results):
        slot = by_op.setdefault(job["operation"], {"ok": 0, "failed": 0})
        slot[res["status"]] += 1  # type: ignore[index]
    counts = {
        "jobs": len(jobs),
        "ok": sum(v["ok"] for v in by_op.values()),
        "failed": sum(v["failed"] for v in by_op.values()),
        "requests": len(plan),
        "seconds": round(time.monotonic() - t0, 3),
        "by_operation": by_op,
        "accept": cfg.accept,
        **stats,
    }
    logger.info("refine: %s", counts)
    return RefineOutcome(results=results, counts=counts)  # type: ignore[arg-type]
