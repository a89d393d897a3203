"""Rewriting and re-judging a list of jobs through the apps' deployment handles: what one shard's workers do,
also usable on its own (:func:`refine_jobs`). Cached, bounded in flight, timed out; a rewrite the judge scores
below its original (``refine.accept``), or that fails the gate's text checks (:mod:`middo_ray.refine.gate`:
meta-text, topic), fails and the original is kept."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from middo_ray.config import RefineConfig
from middo_ray.llmcalls import Breaker, Call, LLMCallCache, app_info, checked_results, run_calls
from middo_ray.refine.gate import gate_reasons
from middo_ray.refine.jobs import _check_jobs, plan_requests
from middo_ray.wire import RefineResult

log = logging.getLogger("middo")

JUDGE_CUTOFF_LEN = 1024


@dataclass
class RefineOutcome:
    """What refining a list of jobs produced.

    Attributes:
        results: One RefineResult dict per job, in job order (``sample_id`` and ``status`` always set).
        counts: ``{"jobs", "ok", "failed", "requests", "seconds", "by_operation": {op: {"ok", "failed"}},
            "cache_hits", "cache_misses", "timeouts", "accept", "judged", "rejected", "judge_requests"}``
            (cache hits/misses count requests, refine and judge together; ``judged``/``rejected`` count items).
    """

    results: list[dict[str, Any]]
    counts: dict[str, Any] = field(default_factory=dict)


def _new_stats() -> dict[str, Any]:
    return {"cache_hits": 0, "cache_misses": 0, "timeouts": 0, "teacher_errors": 0, "judged": 0, "rejected": 0,
            "judge_requests": 0, "requests": 0, **{k: 0 for k in GATE_COUNTS}}


# Rejections by cause (a rewrite may fail several; ``rejected`` counts each rewrite once).
GATE_COUNTS = ("rejected_judge", "rejected_meta", "rejected_topic", "rejected_answer", "rejected_ifd")


def rewrite_jobs(jobs: list[dict], handle, cfg: RefineConfig, seed: int, cache: LLMCallCache | None,
                 stats: dict, chunk_base: int = 0, max_in_flight: int | None = None,
                 breaker: Breaker | None = None) -> list[dict]:
    """The teacher's answer to every job (RefineResult dicts in job order; a request that timed out or found
    the teacher unavailable fails its items)."""
    _check_jobs(jobs)
    plan = plan_requests(jobs, cfg, seed, chunk_base)
    stats["requests"] += len(plan)
    results: list[dict | None] = [None] * len(jobs)
    if not plan:
        return []
    ident = app_info(handle, "refiner")
    calls = [Call("refine", request, f"refine request ({request['operation']}, {len(positions)} samples, "
                                     f"first id {request['samples'][0]['sample_id']})") for positions, request in plan]
    run_calls(handle, calls, max_in_flight or cfg.max_concurrency, cfg.request_timeout_s, cache, ident, stats,
              breaker or Breaker(cfg.max_consecutive_failures))
    for (positions, request), call in zip(plan, calls):
        if call.error:
            for pos in positions:
                results[pos] = RefineResult(sample_id=jobs[pos]["sample_id"], status="failed",
                                            reason=f"{call.error}; original kept").model_dump()
            continue
        got = checked_results(call, [s["sample_id"] for s in request["samples"]])
        for pos, res in zip(positions, got):
            results[pos] = RefineResult.model_validate(res).model_dump()
    return results  # type: ignore[return-value]


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


def gate_check(cfg: RefineConfig, job: dict, result: dict) -> list[str]:
    """Why the gate's text checks (refine.accept_meta_check, accept_min_topic_overlap) reject an ok rewrite."""
    return gate_reasons(job, result, cfg.accept_meta_check, cfg.accept_min_topic_overlap,
                        cfg.accept_topic_operations, cfg.accept_min_answer_relevance)


def ifd_check(cfg: RefineConfig, ifd_after: float | None) -> str | None:
    """Why refine.accept_max_ifd rejects a rewrite whose IFD under the judge is ``ifd_after`` (None: kept; an
    undefined IFD is not held against it)."""
    if cfg.accept_max_ifd is None or ifd_after is None or ifd_after <= cfg.accept_max_ifd:
        return None
    return (f"IFD {ifd_after:.2f} > refine.accept_max_ifd {cfg.accept_max_ifd:g} (the prompt does not make the "
            f"answer easier to predict: an answer to another question)")


def _decide(cfg: RefineConfig, job: dict, results: list[dict], i: int, judge_why: str | None, stats: dict,
            ifd_why: str | None = None) -> None:
    """Applies the gate to the ok result ``results[i]``: the judge's verdict (None = kept or not judged), the
    IFD check's and the text checks; a rejected rewrite becomes a failure naming every cause."""
    text_why = gate_check(cfg, job, results[i]) + ([ifd_why] if ifd_why else [])
    if judge_why is None and not text_why:
        return
    stats["rejected"] += 1
    if judge_why is not None:
        stats["rejected_judge"] += 1
    stats["rejected_meta"] += any("accept_meta_check" in w for w in text_why)
    stats["rejected_topic"] += any("accept_min_topic_overlap" in w for w in text_why)
    stats["rejected_answer"] += any("accept_min_answer_relevance" in w for w in text_why)
    stats["rejected_ifd"] += ifd_why is not None
    causes = "; ".join(([judge_why] if judge_why else []) + text_why)
    head = "rejected by re-judge" if judge_why is not None else "rejected by the accept gate"
    results[i] = _failed(results[i], f"{head}: {causes}; original kept")


def apply_text_gate(jobs: list[dict], results: list[dict], cfg: RefineConfig, stats: dict) -> None:
    """The gate's text checks alone (no judge: refine.accept='none'), in place."""
    for i, res in enumerate(results):
        if res["status"] == "ok":
            _decide(cfg, jobs[i], results, i, None, stats)


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _judge_calls(jobs: list[dict], results: list[dict], positions: list[int], cfg: RefineConfig, seed: int,
                 mode: str, template: str, cutoff_len: int, chunk_base: int) -> list[tuple[list[int], Call]]:
    calls = []
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
                                "seed": (int(seed) * 7_919 + (chunk_base + chunk) * 104_729 + 17) % (2**31 - 1)}}
        if cfg.accept_max_ifd is not None:      # only then: the requests (and cache keys) of other runs are unchanged
            request["ifd"] = True
        what = f"re-judge request ({len(part)} rewrites, first id {jobs[part[0]]['sample_id']})"
        calls.append((part, Call("judge", request, what)))
    return calls


def rejudge(jobs: list[dict], results: list[dict], handle, cfg: RefineConfig, seed: int, cache: LLMCallCache | None,
            stats: dict, template: str = "auto", cutoff_len: int = JUDGE_CUTOFF_LEN, chunk_base: int = 0,
            max_in_flight: int | None = None, breaker: Breaker | None = None) -> None:
    """Judges every ok rewrite with its original and turns rejected ones into failures (in place)."""
    positions = [i for i, r in enumerate(results) if r["status"] == "ok"]
    if cfg.accept == "none":
        apply_text_gate(jobs, results, cfg, stats)
        return
    if not positions:
        return
    ident = app_info(handle, "judge")
    stats["judge_model"], stats["judge_revision"] = ident.get("model"), ident.get("revision")
    if cfg.accept_max_ifd is not None and not ident.get("ifd"):
        raise ValueError(f"refine.accept_max_ifd is set but the judge's engine '{ident.get('engine')}' cannot compute "
                         f"IFD; judge with refine.judge='current' (engine transformers or vllm), or set "
                         f"refine.accept_max_ifd to null")
    calls = _judge_calls(jobs, results, positions, cfg, seed, _judge_mode(cfg, ident), template, cutoff_len,
                         chunk_base)
    stats["judge_requests"] += len(calls)
    run_calls(handle, [c for _, c in calls], max_in_flight or cfg.max_concurrency, cfg.request_timeout_s, cache,
              ident, stats, breaker or Breaker(cfg.max_consecutive_failures))
    for part, call in calls:
        if call.error:
            for i in part:
                results[i] = _failed(results[i], f"re-judge failed: {call.error}; original kept")
            continue
        got = checked_results(call, [s["sample_id"] for s in call.request["samples"]])
        for k, i in enumerate(part):
            before, after = _finite(got[2 * k].get("quality")), _finite(got[2 * k + 1].get("quality"))
            ifd_after = _finite(got[2 * k + 1].get("ifd"))
            stats["judged"] += 1
            # Every ok rewrite is judged, also one the text checks reject: the record then shows what the
            # judge alone would have done (benchmarks/efficacy.py measures each part of the gate from it).
            _decide(cfg, jobs[i], results, i, accept_rewrite(cfg, before, after), stats, ifd_check(cfg, ifd_after))
            results[i]["quality_before"], results[i]["quality_after"] = before, after
            results[i]["ifd_after"] = ifd_after


def _failed(result: dict, reason: str) -> dict:
    """A failed copy of a result (no texts, as the wire contract says), keeping id and attempts."""
    return RefineResult(sample_id=result.get("sample_id"), status="failed", reason=reason,
                        attempts=int(result.get("attempts") or 0),
                        quality_before=result.get("quality_before"),
                        quality_after=result.get("quality_after"), ifd_after=result.get("ifd_after")).model_dump()


def outcome_counts(jobs: list[dict], results: list[dict], cfg: RefineConfig, stats: dict) -> dict:
    by_op: dict[str, dict[str, int]] = {}
    for job, res in zip(jobs, results):
        slot = by_op.setdefault(job["operation"], {"ok": 0, "failed": 0})
        slot[res["status"]] += 1
    return {"jobs": len(jobs), "ok": sum(v["ok"] for v in by_op.values()),
            "failed": sum(v["failed"] for v in by_op.values()), "by_operation": by_op, "accept": cfg.accept, **stats}


def refine_jobs(jobs: list[dict], handle, cfg: RefineConfig, seed: int, cache_dir=None,
                judge: Callable[[], Any] | None = None, judge_template: str = "auto",
                judge_cutoff_len: int = JUDGE_CUTOFF_LEN, chunk_base: int = 0) -> RefineOutcome:
    """Refines jobs through the deployment handle: cached, bounded, timed out, re-judged (in this process).

    Args:
        jobs: Dicts with ``sample_id``, ``operation`` (simplify|improve|synthesize), ``instruction``,
            ``input``, ``output`` and ``hints`` (synthesize: the 2 neighbour prompts).
        handle: DeploymentHandle of the refiner app (:func:`middo_ray.serve_apps.start_refiner`).
        cfg: The ``refine`` config section.
        seed: Seed of the requests; each request's seed is derived from it, so reruns ask the same questions.
        cache_dir: Directory of the LLM-call cache; None or ``cfg.cache = false`` disables caching.
        judge: Returns the handle of the app that re-judges rewrites; called only when there is a rewrite
            to judge. None = the refiner app judges (``refine.judge='teacher'``).
        judge_template / judge_cutoff_len: Prompt template and token cap of the probability judge (the loop
            passes the diagnosis' own, so a rewrite and its original are scored as the diagnosis scored it).
        chunk_base: First chunk number of the request seeds (the refine stage gives each shard its own).

    Returns:
        A RefineOutcome with one result per job, in job order, and the counts.

    Raises:
        ValueError: A job is malformed, or cfg.judge_mode is not supported by the app's engine.
        RuntimeError: A request failed in the service (dead replica): service death is fatal.
    """
    t0 = time.monotonic()
    stats = _new_stats()
    cache = LLMCallCache(cache_dir) if (cache_dir is not None and cfg.cache) else None
    breaker = Breaker(cfg.max_consecutive_failures)
    results = rewrite_jobs(jobs, handle, cfg, seed, cache, stats, chunk_base, breaker=breaker)
    if cfg.accept != "none" and any(r["status"] == "ok" for r in results):
        rejudge(jobs, results, judge() if judge is not None else handle, cfg, seed, cache, stats, judge_template,
                judge_cutoff_len, chunk_base, breaker=breaker)
    else:
        apply_text_gate(jobs, results, cfg, stats)
    counts = {**outcome_counts(jobs, results, cfg, stats), "seconds": round(time.monotonic() - t0, 3)}
    log.info("refine: %s", counts)
    return RefineOutcome(results=results, counts=counts)
