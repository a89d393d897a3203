"""Refine stage: send flagged samples to the refiner Serve app and collect one result per job.

The Serve application lives in the top-level ``serve`` package, which this library must not import
(``serve`` depends on ``middo_ray``, never the reverse). It is therefore loaded by its import path
string, exactly as ``serve run serve.app:build_app`` would.

Failure policy (DESIGN.md "row errors are data, service death is fatal"): an item the refiner could
not rewrite comes back with status "failed" and a reason, and the caller keeps the original sample;
a request that raises (dead replica, lost connection, broken contract) stops the stage with a
RuntimeError naming the request.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from middo_ray.config import MiddoConfig, RefineConfig
from middo_ray.schema import RefineResult

logger = logging.getLogger(__name__)

APP_IMPORT_PATH = "serve.app:build_app"
JOB_KEYS = ("sample_id", "operation", "instruction", "input", "output", "hints")
OPERATIONS = ("simplify", "improve", "synthesize")
HEALTH_TIMEOUT_S = 600.0


@dataclass
class RefineOutcome:
    """What the refine stage produced.

    Attributes:
        results: One RefineResult dict per job, in job order (``sample_id`` and ``status`` always set).
        counts: ``{"jobs", "ok", "failed", "requests", "seconds", "by_operation": {op: {"ok", "failed"}}}``.
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
    """Arguments of ``serve.app:build_app`` derived from the run config."""
    r = cfg.refine
    return {
        "model": r.model or cfg.model.base,
        "dtype": cfg.model.dtype,
        "num_replicas": r.num_replicas,
        "num_cpus": r.cpus_per_replica,
        "num_gpus": r.gpus_per_replica,
    }


def refiner_url(cfg: MiddoConfig) -> str:
    """Base HTTP URL of the refiner app (a wildcard bind host is reached through loopback)."""
    r = cfg.refine
    host = "127.0.0.1" if r.http_host in ("0.0.0.0", "::", "") else r.http_host
    prefix = r.route_prefix.rstrip("/")
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
    options, Serve keeps its existing ones (and logs a warning).

    Args:
        cfg: The run config (``refine`` section plus ``model.base``/``model.dtype``).
        health_timeout_s: How long to wait for ``/healthz`` after the deployment is up.

    Returns:
        The DeploymentHandle of the app's ingress (call ``handle.refine.remote(request_dict)``).

    Raises:
        RuntimeError: The app cannot be imported or does not become healthy in time.
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


def stop_refiner(cfg: MiddoConfig) -> None:
    """Deletes the refiner app; shuts Serve down only when no other application is left on it.

    On a shared cluster other Serve apps may run next to ours, and they must survive our job.
    """
    from ray import serve as ray_serve

    try:
        ray_serve.delete(cfg.refine.app_name)
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


def _collect(response, positions: list[int], request: dict, jobs: list[dict], results: list) -> None:
    """Waits for one request's answer and places its results; any failure here is fatal."""
    what = f"refine request ({request['operation']}, {len(positions)} samples, first id {request['samples'][0]['sample_id']})"
    try:
        answer = response.result()
    except Exception as exc:
        raise RuntimeError(f"{what} failed in the refiner service: {type(exc).__name__}: {exc}. "
                           f"The service is down or broken; the stage stops (no sample was changed).") from exc
    got = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(got, list) or len(got) != len(positions):
        raise RuntimeError(f"{what}: the refiner answered {len(got) if isinstance(got, list) else got!r} "
                           f"results for {len(positions)} samples; the service breaks its contract")
    for pos, res in zip(positions, got):
        if res.get("sample_id") != jobs[pos]["sample_id"]:
            raise RuntimeError(f"{what}: result for '{res.get('sample_id')}' arrived where "
                               f"'{jobs[pos]['sample_id']}' was expected; the service breaks its contract")
        results[pos] = RefineResult.model_validate(res).model_dump()


def refine_jobs(jobs: list[dict], handle, cfg: RefineConfig, seed: int) -> RefineOutcome:
    """Refines jobs through the deployment handle, keeping cfg.max_concurrency requests in flight.

    Args:
        jobs: Dicts with ``sample_id``, ``operation`` (simplify|improve|synthesize), ``instruction``,
            ``input``, ``output`` and ``hints`` (synthesize: the 2 neighbour prompts).
        handle: DeploymentHandle returned by :func:`start_refiner`.
        cfg: The ``refine`` config section (batch_size, max_concurrency, sampling, retries).
        seed: Run seed; each request's seed is derived from it, so reruns ask the same questions.

    Returns:
        A RefineOutcome with one result per job, in job order, and the counts.

    Raises:
        ValueError: A job is malformed.
        RuntimeError: A request failed in the service (dead replica): service death is fatal.
    """
    t0 = time.monotonic()
    _check_jobs(jobs)
    plan = plan_requests(jobs, cfg, seed)
    results: list[dict | None] = [None] * len(jobs)
    in_flight: deque = deque()
    for positions, request in plan:
        # A sliding window: all of it is in flight at once; when full, wait for the oldest. One
        # replica serves requests in arrival order, so the oldest is also the first to finish.
        if len(in_flight) >= cfg.max_concurrency:
            _collect(*in_flight.popleft(), jobs, results)
        in_flight.append((handle.refine.remote(request), positions, request))
    while in_flight:
        _collect(*in_flight.popleft(), jobs, results)

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
    }
    logger.info("refine: %s", counts)
    return RefineOutcome(results=results, counts=counts)  # type: ignore[arg-type]
