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
``refine.request_timeout_s`` or whose teacher could not answer (its endpoint down or refusing, after the
engine's retries) come back with status "failed" and a reason, and merge keeps the original sample.
``refine.max_consecutive_failures`` such teacher failures in a row stop the stage with the endpoint's error
(the shards not finished stay uncommitted, the answers received are cached: the rerun continues); a
request that raises anything else (dead replica, broken contract) stops the stage.

The package: :mod:`~middo_ray.refine.jobs` (jobs and the requests they become), :mod:`~middo_ray.refine.teacher`
(rewriting and re-judging a list of jobs through the deployment handles) and, here, the stage: the per-shard
workers, the hints task, the results' format.

What ``round_<k>/refine/`` holds::

    _hints/part-*.parquet     sample_id and the two hint prompts of each sparse sample
    rewrites/part-*.parquet   every job of the shard with the teacher's answer (committed per shard)
    results/part-*.parquet    the same after the re-judge: sample_id, operation, position (job order),
                              before_instruction/input/output, hints, status, reason, instruction, input,
                              output, attempts, quality_before, quality_after, ifd_after (the
                              rewrite's IFD under the judge, refine.accept_max_ifd only)
    stage.json                counts (jobs, ok, failed, requests, cache hits and misses, timeouts, judged,
                              rejected, by operation) and the shard set
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from middo_ray import storage
from middo_ray.config import RefineConfig
from middo_ray.llmcalls import Breaker, LLMCallCache, TeacherStopped
from middo_ray.refine.jobs import CHUNK_STRIDE, JOB_KEYS, build_jobs, plan_requests, request_seed
from middo_ray.refine.teacher import (GATE_COUNTS, JUDGE_CUTOFF_LEN, RefineOutcome, _finite, _new_stats,
                                      accept_rewrite, apply_text_gate, gate_check, outcome_counts, refine_jobs,
                                      rejudge, rewrite_jobs)
from middo_ray.rundir import StageContext, StageResult, read_record
from middo_ray.schema import JOB_AXES, prompt_text
from middo_ray.shardmap import committed_summary, map_shards, nodes_of, run_task
from middo_ray.storage import ShardSet, shard_index

log = logging.getLogger("middo")

RESULT_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("operation", pa.string()), ("position", pa.int64()),
    ("before_instruction", pa.string()), ("before_input", pa.string()), ("before_output", pa.string()),
    ("hints", pa.list_(pa.string())), ("status", pa.string()), ("reason", pa.string()), ("instruction", pa.string()),
    ("input", pa.string()), ("output", pa.string()), ("attempts", pa.int64()), ("quality_before", pa.float64()),
    ("quality_after", pa.float64()), ("ifd_after", pa.float64())])


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
        cols["ifd_after"].append(_finite(res.get("ifd_after")))
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
                        "quality_after": r["quality_after"], "ifd_after": r.get("ifd_after")})
    return jobs, results


class _Client:
    """What both workers share: the refine config, a handle by app name, the cache, the in-flight share."""

    def __init__(self, app: str | None, refine: dict, seed: int, cache_dir: str | None, max_in_flight: int):
        self.cfg = RefineConfig(**refine)
        self.app, self.seed, self.max_in_flight = app, seed, max_in_flight
        self.cache = LLMCallCache(cache_dir) if (cache_dir is not None and self.cfg.cache) else None
        # Requests in a row the teacher could not answer, counted across this worker's shards.
        self.breaker = Breaker(self.cfg.max_consecutive_failures)
        self._handle = None

    @property
    def handle(self):
        if self._handle is None:
            from ray import serve as ray_serve

            from middo_ray.wire import REFINER_DEPLOYMENT

            # The model deployment itself: the app's HTTP gateway would only add a hop.
            self._handle = ray_serve.get_deployment_handle(REFINER_DEPLOYMENT, self.app)
        return self._handle


def _stopped(unit: dict, message: str) -> dict:
    """The summary of a unit left uncommitted because the teacher stopped the stage (see :func:`_raise_stop`)."""
    return {"unit": unit["id"], "rows": 0, "stopped": message}


def _raise_stop(*summary_lists: list[dict]) -> None:
    """Raises TeacherStopped in the driver when a worker stopped on the teacher (its units stay uncommitted, so
    the rerun redoes them; raised here rather than in the worker, where Ray would wrap it beyond recognition)."""
    for summaries in summary_lists:
        for s in summaries:
            if s.get("stopped"):
                raise TeacherStopped(s["stopped"])


class RewriteShards(_Client):
    """Builds a shard's jobs and asks the teacher; commits the shard's rewrites."""

    def process(self, unit: dict) -> dict:
        if self.breaker.stopped:                      # the teacher stopped this worker: no more calls
            return _stopped(unit, self.breaker.stopped)
        try:
            return self._process(unit)
        except TeacherStopped as exc:
            return _stopped(unit, str(exc))

    def _process(self, unit: dict) -> dict:
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
                               self.max_in_flight, self.breaker) if jobs else []
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
        if self.breaker.stopped:
            return _stopped(unit, self.breaker.stopped)
        try:
            return self._process(unit)
        except TeacherStopped as exc:
            return _stopped(unit, str(exc))

    def _process(self, unit: dict) -> dict:
        jobs, results = read_results(unit["rewrites"])
        stats = _new_stats()
        if self.app is not None:
            rejudge(jobs, results, self.handle, self.cfg, self.seed, self.cache, stats, self.template,
                    self.cutoff_len, unit["chunk_base"], self.max_in_flight, self.breaker)
        else:                                          # no judge (refine.accept='none'): the text checks only
            apply_text_gate(jobs, results, self.cfg, stats)
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
    _raise_stop(rewrites)
    finals = _judge_phase(ctx, cfg, units, rewrites, apps, inputs["judge_model"])
    _raise_stop(finals)
    results = ShardSet.collect(ctx.path("results"), dataset.names)
    results.save()
    info = _info(finals, rewrites, cfg, time.time() - t0)
    info["nodes"] = nodes_of(rewrites, finals)
    info["shards"] = {"results": results.to_json()}
    log.debug("refine: %d jobs, %d ok, %d failed (originals kept)", info["jobs"], info["ok"], info["failed"])
    return StageResult(info, results)


def _info(finals: list[dict], rewrites: list[dict], cfg: RefineConfig, seconds: float) -> dict:
    counts = {"jobs": 0, "ok": 0, "failed": 0, "by_operation": {}, "accept": cfg.accept, **_new_stats()}
    for s in finals + rewrites:
        for k in ("cache_hits", "cache_misses", "timeouts", "teacher_errors", "judged", "rejected", "judge_requests",
                  "requests", *GATE_COUNTS):
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


__all__ = ["CHUNK_STRIDE", "GATE_COUNTS", "JOB_KEYS", "JUDGE_CUTOFF_LEN", "JudgeShards", "RESULT_SCHEMA",
           "RefineOutcome", "RewriteShards", "accept_rewrite", "apply_text_gate", "build_jobs", "gate_check", "load",
           "plan_requests", "read_results", "refine_jobs", "rejudge", "request_seed", "rewrite_jobs", "run"]
