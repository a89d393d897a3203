"""Refine stage: flagged samples go to the teacher (a Ray Serve app) from Ray Data workers, shard by shard,
and every valid rewrite is re-judged before it may replace anything.

Per shard, the same steps in the same order whatever the cluster:

1. jobs: one per (flagged sample, axis) in the sample's order: complexity -> ``simplify``, quality ->
   ``improve``, diversity -> ``synthesize`` with the prompts of the sample's two nearest neighbours as
   hints (looked up once for the whole dataset, by one task, into ``_hints/``);
2. requests: per operation, in a fixed operation order, chunks of ``refine.batch_size`` jobs, each with a
   seed derived from the run seed, the round, the shard and the chunk, so a rerun asks exactly the same
   questions (a request never spans two shards, so a shard's work is its own);
3. answers from the LLM-call cache (``runs/<id>/cache/llm``, :mod:`middo_ray.llmcalls`) or through the
   deployment handle, ``refine.max_concurrency`` requests in flight over the ``refine.client_workers``;
4. once every shard's rewrites are in, a second pass re-judges every valid rewrite together with its
   original on the judge app (the round's model M_t by default) and applies ``refine.accept``; the judge
   app is deployed only when there is a rewrite to judge.

Failure policy (DESIGN.md "row errors are data, service death is fatal"): an item the refiner could not
rewrite, a rewrite the judge rejected, and every item of a request that did not answer within
``refine.request_timeout_s`` come back with status "failed" and a reason, and merge keeps the original
sample; a request that raises (dead replica, lost connection, broken contract) stops the stage.

What ``round_<k>/refine/`` holds::

    _hints/part-*.parquet     sample_id and the two hint prompts of each sparse sample
    rewrites/part-*.parquet   every job of the shard with the teacher's answer (committed per shard)
    results/part-*.parquet    the same after the re-judge: sample_id, operation, position (job order),
                              before_instruction/input/output, hints, status, reason, instruction, input,
                              output, attempts, quality_before, quality_after
    stage.json                counts (jobs, ok, failed, requests, cache hits and misses, timeouts, judged,
                              rejected, by operation) and the shard set
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from middo_ray import storage
from middo_ray.config import RefineConfig
from middo_ray.llmcalls import Call, LLMCallCache, app_info, checked_results, run_calls
from middo_ray.rundir import StageContext, StageResult, read_record
from middo_ray.schema import JOB_AXES, OPERATION_OF_AXIS, OPERATIONS, prompt_text
from middo_ray.shardmap import committed_summary, map_shards, nodes_of, run_task
from middo_ray.storage import ShardSet, shard_index
from middo_ray.wire import RefineResult

log = logging.getLogger("middo")

JOB_KEYS = ("sample_id", "operation", "instruction", "input", "output", "hints")
JUDGE_CUTOFF_LEN = 1024
# Request seeds of shard s count their chunks from s * CHUNK_STRIDE: shard 0 asks what a single-shard run asks.
CHUNK_STRIDE = 1 << 20
RESULT_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("operation", pa.string()), ("position", pa.int64()),
    ("before_instruction", pa.string()), ("before_input", pa.string()), ("before_output", pa.string()),
    ("hints", pa.list_(pa.string())), ("status", pa.string()), ("reason", pa.string()), ("instruction", pa.string()),
    ("input", pa.string()), ("output", pa.string()), ("attempts", pa.int64()), ("quality_before", pa.float64()),
    ("quality_after", pa.float64())])


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


# ---------------------------------------------------------------------------------------------
# Jobs and requests.

def build_jobs(rows: list[dict], flags: dict[str, list[bool]], hints: dict[str, list[str]]) -> list[dict]:
    """One refine job per (flagged sample, axis), in the sample's order, then the axes' job order."""
    jobs: list[dict] = []
    for i, row in enumerate(rows):
        for axis in JOB_AXES:
            if not flags[axis][i]:
                continue
            jobs.append({"sample_id": row["sample_id"], "operation": OPERATION_OF_AXIS[axis],
                         "instruction": row["instruction"], "input": row.get("input") or "",
                         "output": row.get("output") or "",
                         "hints": list(hints.get(row["sample_id"], [])) if axis == "diversity" else []})
    return jobs


def _check_jobs(jobs: list[dict]) -> None:
    """Raises ValueError naming the first malformed job (a caller bug, not a row failure)."""
    for pos, job in enumerate(jobs):
        missing = [k for k in ("sample_id", "operation", "instruction") if not job.get(k)]
        if missing:
            raise ValueError(f"refine job #{pos} lacks {missing}; every job needs {list(JOB_KEYS)}")
        if job["operation"] not in OPERATIONS:
            raise ValueError(f"refine job #{pos} ({job['sample_id']}): unknown operation '{job['operation']}'; "
                             f"use one of {list(OPERATIONS)}")


def request_seed(seed: int, operation: str, chunk: int) -> int:
    """A per-request seed that depends only on the run seed, the operation and the chunk number."""
    op = OPERATIONS.index(operation)
    return (int(seed) * 1_000_003 + op * 65_537 + chunk * 7_919) % (2**31 - 1)


def plan_requests(jobs: list[dict], cfg: RefineConfig, seed: int, chunk_base: int = 0) -> list[tuple[list[int], dict]]:
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
                             "top_p": cfg.top_p, "seed": request_seed(seed, op, chunk_base + chunk)},
            }
            plan.append((part, request))
    return plan


# ---------------------------------------------------------------------------------------------
# Rewriting and re-judging a list of jobs (what one shard's workers do; also usable on its own).

def _new_stats() -> dict[str, Any]:
    return {"cache_hits": 0, "cache_misses": 0, "timeouts": 0, "judged": 0, "rejected": 0, "judge_requests": 0,
            "requests": 0}


def rewrite_jobs(jobs: list[dict], handle, cfg: RefineConfig, seed: int, cache: LLMCallCache | None,
                 stats: dict, chunk_base: int = 0, max_in_flight: int | None = None) -> list[dict]:
    """The teacher's answer to every job (RefineResult dicts in job order; a timed-out request fails its items)."""
    _check_jobs(jobs)
    plan = plan_requests(jobs, cfg, seed, chunk_base)
    stats["requests"] += len(plan)
    results: list[dict | None] = [None] * len(jobs)
    if not plan:
        return []
    ident = app_info(handle, "refiner")
    calls = [Call("refine", request, f"refine request ({request['operation']}, {len(positions)} samples, "
                                     f"first id {request['samples'][0]['sample_id']})") for positions, request in plan]
    run_calls(handle, calls, max_in_flight or cfg.max_concurrency, cfg.request_timeout_s, cache, ident, stats)
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
        what = f"re-judge request ({len(part)} rewrites, first id {jobs[part[0]]['sample_id']})"
        calls.append((part, Call("judge", request, what)))
    return calls


def rejudge(jobs: list[dict], results: list[dict], handle, cfg: RefineConfig, seed: int, cache: LLMCallCache | None,
            stats: dict, template: str = "auto", cutoff_len: int = JUDGE_CUTOFF_LEN, chunk_base: int = 0,
            max_in_flight: int | None = None) -> None:
    """Judges every ok rewrite with its original and turns rejected ones into failures (in place)."""
    positions = [i for i, r in enumerate(results) if r["status"] == "ok"]
    if cfg.accept == "none" or not positions:
        return
    ident = app_info(handle, "judge")
    stats["judge_model"], stats["judge_revision"] = ident.get("model"), ident.get("revision")
    calls = _judge_calls(jobs, results, positions, cfg, seed, _judge_mode(cfg, ident), template, cutoff_len,
                         chunk_base)
    stats["judge_requests"] += len(calls)
    run_calls(handle, [c for _, c in calls], max_in_flight or cfg.max_concurrency, cfg.request_timeout_s, cache,
              ident, stats)
    for part, call in calls:
        if call.error:
            for i in part:
                results[i] = _failed(results[i], f"re-judge failed: {call.error}; original kept")
            continue
        got = checked_results(call, [s["sample_id"] for s in call.request["samples"]])
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
    results = rewrite_jobs(jobs, handle, cfg, seed, cache, stats, chunk_base)
    if cfg.accept != "none" and any(r["status"] == "ok" for r in results):
        rejudge(jobs, results, judge() if judge is not None else handle, cfg, seed, cache, stats, judge_template,
                judge_cutoff_len, chunk_base)
    counts = {**outcome_counts(jobs, results, cfg, stats), "seconds": round(time.monotonic() - t0, 3)}
    log.info("refine: %s", counts)
    return RefineOutcome(results=results, counts=counts)


# ---------------------------------------------------------------------------------------------
# Workers of the stage.

def _hints_task(units: list[dict]) -> int:
    """The hints task: the prompts of every sparse sample's neighbours, looked up in one pass over the data.

    Holds only the sparse samples' neighbour ids and, once found, those prompts (a few percent of the
    dataset's prompt text).
    """
    wanted: dict[str, list[tuple[str, list[str]]]] = {}
    needed: set[str] = set()
    for u in units:
        flags = storage.read_table(u["flags"], ["sample_id", "diversity"]).to_pylist()
        nbrs = storage.read_table(u["neighbors"], ["sample_id", "nbr_ids"]).column("nbr_ids").to_pylist()
        rows = [(f["sample_id"], [j for j in (ids or []) if j is not None]) for f, ids in zip(flags, nbrs)
                if f["diversity"]]
        wanted[u["id"]] = rows
        needed.update(j for _, ids in rows for j in ids)
    text: dict[str, str] = {}
    for u in units:
        if needed:
            t = storage.read_table(u["dataset"], ["sample_id", "instruction", "input"]).to_pylist()
            text.update({r["sample_id"]: prompt_text(r) for r in t if r["sample_id"] in needed})
    for u in units:
        rows = wanted[u["id"]]
        storage.write_table(u["hints"], pa.table({
            "sample_id": pa.array([s for s, _ in rows], pa.string()),
            "hints": pa.array([[text[j] for j in ids][:2] for _, ids in rows], pa.list_(pa.string()))}))
    return sum(len(r) for r in wanted.values())


def _result_table(jobs: list[dict], results: list[dict]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in RESULT_SCHEMA}
    for pos, (job, res) in enumerate(zip(jobs, results)):
        cols["sample_id"].append(job["sample_id"])
        cols["operation"].append(job["operation"])
        cols["position"].append(pos)
        for k in ("instruction", "input", "output"):
            cols[f"before_{k}"].append(job.get(k) or "")
            cols[k].append(res.get(k) or "")
        cols["hints"].append(list(job.get("hints") or []))
        cols["status"].append(res["status"])
        cols["reason"].append(res.get("reason") or "")
        cols["attempts"].append(int(res.get("attempts") or 0))
        cols["quality_before"].append(_finite(res.get("quality_before")))
        cols["quality_after"].append(_finite(res.get("quality_after")))
    return pa.table(cols, schema=RESULT_SCHEMA)


def read_results(path: str) -> tuple[list[dict], list[dict]]:
    """(jobs, results) of one results shard, in job order."""
    jobs, results = [], []
    for r in storage.read_table(path).to_pylist():
        jobs.append({"sample_id": r["sample_id"], "operation": r["operation"], "instruction": r["before_instruction"],
                     "input": r["before_input"], "output": r["before_output"], "hints": r["hints"] or []})
        results.append({"sample_id": r["sample_id"], "status": r["status"], "reason": r["reason"],
                        "instruction": r["instruction"], "input": r["input"], "output": r["output"],
                        "attempts": r["attempts"], "quality_before": r["quality_before"],
                        "quality_after": r["quality_after"]})
    return jobs, results


class _Client:
    """What both workers share: the refine config, a handle by app name, the cache, the in-flight share."""

    def __init__(self, app: str | None, refine: dict, seed: int, cache_dir: str | None, max_in_flight: int):
        self.cfg = RefineConfig(**refine)
        self.app, self.seed, self.max_in_flight = app, seed, max_in_flight
        self.cache = LLMCallCache(cache_dir) if (cache_dir is not None and self.cfg.cache) else None
        self._handle = None

    @property
    def handle(self):
        if self._handle is None:
            from ray import serve as ray_serve

            self._handle = ray_serve.get_app_handle(self.app)
        return self._handle


class RewriteShards(_Client):
    """Builds a shard's jobs and asks the teacher; commits the shard's rewrites."""

    def process(self, unit: dict) -> dict:
        rows = storage.read_table(unit["dataset"], ["sample_id", "instruction", "input", "output"]).to_pylist()
        flags = storage.read_table(unit["flags"], ["sample_id", *JOB_AXES])
        if flags.column("sample_id").to_pylist() != [r["sample_id"] for r in rows]:
            raise RuntimeError(f"refine: shard {unit['id']}: flags do not line up with the dataset; rerun select")
        hints = {}
        if unit["hints"] and storage.exists(unit["hints"]):
            h = storage.read_table(unit["hints"]).to_pylist()
            hints = {r["sample_id"]: r["hints"] for r in h}
        jobs = build_jobs(rows, {a: flags.column(a).to_pylist() for a in JOB_AXES}, hints)
        stats = _new_stats()
        results = rewrite_jobs(jobs, self.handle, self.cfg, self.seed, self.cache, stats, unit["chunk_base"],
                               self.max_in_flight) if jobs else []
        summary = {"unit": unit["id"], "rows": len(rows), **outcome_counts(jobs, results, self.cfg, stats)}
        storage.write_table(unit["commit"], _result_table(jobs, results), summary)
        return summary


class JudgeShards(_Client):
    """Re-judges a shard's valid rewrites and applies refine.accept; commits the shard's results."""

    def __init__(self, app: str | None, refine: dict, seed: int, cache_dir: str | None, max_in_flight: int,
                 template: str, cutoff_len: int):
        super().__init__(app, refine, seed, cache_dir, max_in_flight)
        self.template, self.cutoff_len = template, cutoff_len

    def process(self, unit: dict) -> dict:
        jobs, results = read_results(unit["rewrites"])
        stats = _new_stats()
        if self.app is not None:
            rejudge(jobs, results, self.handle, self.cfg, self.seed, self.cache, stats, self.template,
                    self.cutoff_len, unit["chunk_base"], self.max_in_flight)
        summary = {"unit": unit["id"], "rows": unit["rows"], **outcome_counts(jobs, results, self.cfg, stats)}
        storage.write_table(unit["commit"], _result_table(jobs, results), summary)
        return summary


# ---------------------------------------------------------------------------------------------
# The stage.

def _units(ctx: StageContext, dataset: ShardSet, flags: ShardSet, diag) -> list[dict]:
    return [{"id": name, "rows": rows, "chunk_base": shard_index(name) * CHUNK_STRIDE,
             "dataset": dataset.path(name), "flags": flags.path(name), "neighbors": diag.neighbors.path(name),
             "hints": ctx.path("_hints", name), "rewrites": ctx.path("rewrites", name),
             "commit": ctx.path("rewrites", name)} for name, rows in zip(dataset.names, dataset.rows)]


def _client_kwargs(ctx: StageContext, cfg: RefineConfig, app: str | None) -> dict:
    return {"app": app, "refine": cfg.model_dump(), "seed": ctx.seed * 1000 + ctx.round,
            "cache_dir": storage.join(ctx.cache_dir, "llm") if storage.is_local(ctx.cache_dir) else None,
            "max_in_flight": max(1, cfg.max_concurrency // cfg.client_workers)}


def _pool(cfg: RefineConfig, n_units: int) -> dict:
    # The workers only wait on the service: a small CPU share each.
    return {"concurrency": max(1, min(cfg.client_workers, n_units)), "num_cpus": 0.25}


def _judge_phase(ctx: StageContext, cfg: RefineConfig, units: list[dict], rewrites: list[dict], apps,
                 judge_model: str) -> list[dict]:
    judged = [dict(u, commit=ctx.path("results", u["id"])) for u in units]
    pending_ok = sum(r["ok"] for u, r in zip(judged, rewrites) if committed_summary(u) is None)
    app = None
    if cfg.accept != "none" and pending_ok:
        app = apps.judge(judge_model) if cfg.judge == "current" else apps.teacher()
    current = cfg.judge == "current"
    # The current model judges with the diagnosis' template and cutoff: the original's re-judged score is
    # then the quality the diagnosis gave it, and its rewrite is measured with the same rule.
    kwargs = {**_client_kwargs(ctx, cfg, app), "template": ctx.cfg.data.template if current else "auto",
              "cutoff_len": ctx.cfg.data.cutoff_len if current else JUDGE_CUTOFF_LEN}
    try:
        return map_shards(judged, JudgeShards, kwargs, what="refine: re-judge", actors=_pool(cfg, len(units)))
    finally:
        apps.release_judge()


def run(ctx: StageContext, cfg: RefineConfig, inputs: dict) -> StageResult:
    """Refines the flagged samples of ``inputs["dataset"]`` (see the module docstring).

    Inputs: ``dataset`` (ShardSet D_{k-1}), ``flags`` (the select stage's ShardSet), ``diagnosis``
    (DiagnosisOutput, for the neighbours), ``apps`` (ServeApps), ``judge_model`` (M_{k-1}, the model the
    round diagnosed with), and from the select stage's counts ``any_sparse`` (whether a neighbour lookup is
    needed) and ``jobs`` (the flags in all; 0 deploys no teacher).
    """
    t0 = time.time()
    dataset, flags, diag, apps = inputs["dataset"], inputs["flags"], inputs["diagnosis"], inputs["apps"]
    units = _units(ctx, dataset, flags, diag)
    if inputs.get("any_sparse", True) and not storage.exists(ctx.path("_hints", storage.SHARDS_FILE)):
        n = run_task(_hints_task, units, what="refine: hints")
        ShardSet(ctx.path("_hints"), dataset.names, dataset.rows).save()
        log.info("refine: neighbour prompts of %d sparse samples looked up", n)
    pending = [u for u in units if committed_summary(u) is None]
    app = apps.teacher() if inputs.get("jobs", 1) and pending else None
    rewrites = map_shards(units, RewriteShards, _client_kwargs(ctx, cfg, app), what="refine: rewrite",
                          actors=_pool(cfg, len(units)))
    finals = _judge_phase(ctx, cfg, units, rewrites, apps, inputs["judge_model"])
    results = ShardSet.collect(ctx.path("results"), dataset.names)
    results.save()
    info = _info(finals, rewrites, cfg, time.time() - t0)
    info["nodes"] = nodes_of(rewrites, finals)
    info["shards"] = {"results": results.to_json()}
    log.info("refine: %d jobs, %d ok, %d failed (originals kept)", info["jobs"], info["ok"], info["failed"])
    return StageResult(info, results)


def _info(finals: list[dict], rewrites: list[dict], cfg: RefineConfig, seconds: float) -> dict:
    counts = {"jobs": 0, "ok": 0, "failed": 0, "by_operation": {}, "accept": cfg.accept, **_new_stats()}
    for s in finals + rewrites:
        for k in ("cache_hits", "cache_misses", "timeouts", "judged", "rejected", "judge_requests", "requests"):
            counts[k] += int(s.get(k, 0))
        for k in ("judge_model", "judge_revision"):
            if s.get(k) is not None:
                counts[k] = s[k]
    for s in finals:
        for k in ("jobs", "ok", "failed"):
            counts[k] += s[k]
        for op, v in s["by_operation"].items():
            slot = counts["by_operation"].setdefault(op, {"ok": 0, "failed": 0})
            slot["ok"] += v["ok"]
            slot["failed"] += v["failed"]
    counts["seconds"] = round(seconds, 3)
    return {"jobs": counts["jobs"], "ok": counts["ok"], "failed": counts["failed"], "counts": counts,
            "seconds": round(seconds, 2)}


def load(stage_dir: str) -> StageResult:
    info = read_record(stage_dir)
    return StageResult(info, ShardSet.from_json(info["shards"]["results"]))
