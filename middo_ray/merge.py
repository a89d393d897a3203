"""Merge stage: D_k from D_{k-1} and the round's refine results, joined by ``sample_id``, with lineage.

Reference semantics (§5):

- hard (complexity) and low-quality samples are replaced by their rewrite (simplified / improved
  prompt + fresh answer); a sample flagged on both axes gets both rewrites, as in the reference;
- sparse (diversity) samples stay and each seeds one new sample;
- a rewrite that failed keeps the original, and the reason is recorded;
- a new sample identical to one already present is dropped (recorded), so ids stay unique.

Order is deterministic: survivors keep their order, replacements take their parent's place, and
synthesized samples follow their parent, so shard i of D_k is made from shard i of D_{k-1} alone (and
a surviving sample keeps its shard, which the next diagnosis' pre-loss reuse relies on). Only the
duplicate check looks across shards: one task streams the ids of D_{k-1} and the new samples in order
(about 100 bytes per sample) and names the new samples to drop. What ``round_<k>/merge/`` holds::

    dataset/part-*.parquet   D_k (canonical rows with lineage: parent_id, origin, round, trigger)
    events/part-*.parquet    one per refine job: sample_id, operation, status, reason, child_id
    stage.json               counts (in, out, replaced, added, kept after a failure, duplicates, by origin)
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa

from middo_ray import storage
from middo_ray.io.write import rows_table
from middo_ray.judge import JUDGE_COLUMNS
from middo_ray.refine import read_results
from middo_ray.rundir import StageContext, StageResult, read_record
from middo_ray.schema import AXIS_OF_OPERATION, REPLACING_AXES, make_row, sample_id
from middo_ray.shardmap import map_shards, nodes_of, run_task
from middo_ray.storage import ShardSet

log = logging.getLogger("middo")

TRIGGER_KEYS = {"complexity": ("loss_pre", "loss_cur"), "quality": ("quality",) + JUDGE_COLUMNS,
                "diversity": ("knn_sim",)}
EVENT_SCHEMA = pa.schema([("sample_id", pa.string()), ("operation", pa.string()), ("status", pa.string()),
                          ("reason", pa.string()), ("child_id", pa.string())])


def _f(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return round(x, 6) if np.isfinite(x) else None


def trigger_of(axis: str, signals: dict, thresholds: dict) -> dict:
    """The scores (and thresholds) that made a sample flagged on ``axis``."""
    out = {k: _f(signals.get(k)) for k in TRIGGER_KEYS[axis]}
    out["thresholds"] = thresholds.get(axis, {})
    return out


def child_of(job: dict, res: dict, round_k: int, signals: dict, thresholds: dict) -> dict:
    """The new sample an ok rewrite makes, with its lineage."""
    axis = AXIS_OF_OPERATION[job["operation"]]
    return make_row(instruction=res["instruction"], input=res.get("input", ""), output=res["output"],
                    parent_id=job["sample_id"], origin=axis, round=round_k,
                    trigger=trigger_of(axis, signals, thresholds))


def merge_shard(rows: list[dict], jobs: list[dict], results: list[dict], round_k: int, signals: dict[str, dict],
                thresholds: dict, dropped: set[int]) -> tuple[list[dict], list[dict], dict]:
    """One shard of D_k from its shard of D_{k-1}, the refine jobs and their results (aligned with ``jobs``).

    Args:
        rows: The shard's rows of D_{k-1}, in order.
        jobs / results: The shard's refine jobs and results, in job order.
        round_k: The round number (the children's ``round``).
        signals: ``sample_id`` -> the diagnosis' scores of that sample (for the children's triggers).
        thresholds: The select stage's thresholds.
        dropped: Positions (in job order) of ok results whose sample already exists (the duplicate check).

    Returns:
        (new rows, one event per job with its outcome, counts).
    """
    if len(jobs) != len(results):
        raise ValueError(f"merge got {len(results)} refine results for {len(jobs)} jobs")
    index = {r["sample_id"]: i for i, r in enumerate(rows)}
    children: dict[int, list[dict]] = {}
    replaced: set[int] = set()
    events: list[dict] = []
    counts = {"in": len(rows), "replaced": 0, "added": 0, "kept_after_failure": 0, "duplicates_dropped": 0,
              "by_origin": {"complexity": 0, "quality": 0, "diversity": 0}}
    for pos, (job, res) in enumerate(zip(jobs, results)):
        if job["sample_id"] not in index:
            raise RuntimeError(f"merge: refine result for '{job['sample_id']}' has no sample in its shard; "
                               "rerun refine")
        i, axis = index[job["sample_id"]], AXIS_OF_OPERATION[job["operation"]]
        event = {"sample_id": job["sample_id"], "operation": job["operation"], "status": res.get("status"),
                 "reason": res.get("reason", ""), "child_id": None}
        events.append(event)
        if res.get("status") != "ok":
            continue
        child = child_of(job, res, round_k, signals[job["sample_id"]], thresholds)
        if pos in dropped:
            event.update(status="duplicate", reason="identical to a sample already in the dataset")
            counts["duplicates_dropped"] += 1
            continue
        event["child_id"] = child["sample_id"]
        children.setdefault(i, []).append(child)
        counts["by_origin"][axis] += 1
        if axis in REPLACING_AXES:
            replaced.add(i)
        else:
            counts["added"] += 1
    rewrite = {index[j["sample_id"]] for j in jobs if AXIS_OF_OPERATION[j["operation"]] in REPLACING_AXES}
    counts["kept_after_failure"] = len(rewrite - replaced)
    counts["replaced"] = len(replaced)
    out: list[dict] = []
    for i, row in enumerate(rows):
        if i not in replaced:
            out.append(row)
        out.extend(children.get(i, []))
    counts["out"] = len(out)
    return out, events, counts


def _duplicates_task(dataset_paths: list[str], result_paths: list[str], out: str) -> int:
    """The duplicate check: which new samples already exist in D_{k-1} or earlier in the round's job order.

    Writes ``(shard, position)`` of each such result to ``out``; returns how many.
    """
    seen: set[str] = set()
    for p in dataset_paths:
        seen.update(storage.read_table(p, ["sample_id"]).column("sample_id").to_pylist())
    drops = []
    for shard, p in enumerate(result_paths):
        t = storage.read_table(p, ["status", "instruction", "input", "output"]).to_pylist()
        for pos, r in enumerate(t):
            if r["status"] != "ok":
                continue
            sid = sample_id(r["instruction"], r["input"] or "", r["output"])
            if sid in seen:
                drops.append({"shard": shard, "position": pos})
            else:
                seen.add(sid)
    storage.write_table(out, pa.Table.from_pylist(drops, schema=pa.schema([("shard", pa.int64()),
                                                                           ("position", pa.int64())])))
    return len(drops)


class MergeShard:
    """Writes one shard of D_k and its events."""

    def __init__(self, round_k: int, thresholds: dict, drops: str | None):
        self.round_k, self.thresholds, self.drops = round_k, thresholds, drops

    def process(self, unit: dict) -> dict:
        rows = storage.read_table(unit["dataset"]).to_pylist()
        jobs, results = read_results(unit["results"])
        sig = storage.read_table(unit["signals"]).to_pylist()
        nb = storage.read_table(unit["neighbors"], ["sample_id", "knn_sim"]).to_pylist()
        signals = {s["sample_id"]: {**s, "knn_sim": n["knn_sim"]} for s, n in zip(sig, nb)}
        dropped: set[int] = set()
        if self.drops:
            t = storage.read_table(self.drops, filters=[("shard", "==", unit["index"])])
            dropped = set(t.column("position").to_pylist())
        out, events, counts = merge_shard(rows, jobs, results, self.round_k, signals, self.thresholds, dropped)
        storage.write_table(unit["events"], pa.Table.from_pylist(events, schema=EVENT_SCHEMA))
        ids = "".join(r["sample_id"] for r in out)
        summary = {"unit": unit["id"], "rows": len(rows), **counts, "hash": hashlib.sha256(ids.encode()).hexdigest()}
        storage.write_table(unit["commit"], rows_table(out), summary)
        return summary


def run(ctx: StageContext, cfg, inputs: dict) -> StageResult:
    """D_k from ``inputs["dataset"]`` (D_{k-1}), ``inputs["results"]`` (refine), ``inputs["diagnosis"]`` and
    ``inputs["thresholds"]`` (the select stage's)."""
    dataset, results, diag = inputs["dataset"], inputs["results"], inputs["diagnosis"]
    drops = ctx.path("_duplicates.parquet")
    if not storage.exists(drops):
        n = run_task(_duplicates_task, dataset.paths(), results.paths(), drops, what="merge: duplicates")
        log.info("merge: %d new samples duplicate existing ones", n)
    units = [{"id": name, "index": i, "rows": rows, "dataset": dataset.path(name), "results": results.path(name),
              "signals": diag.signals.path(name), "neighbors": diag.neighbors.path(name),
              "events": ctx.path("events", name), "commit": ctx.path("dataset", name)}
             for i, (name, rows) in enumerate(zip(dataset.names, dataset.rows))]
    summaries = map_shards(units, MergeShard, {"round_k": ctx.round, "thresholds": inputs["thresholds"],
                                               "drops": drops}, what="merge")
    out = ShardSet(ctx.path("dataset"), dataset.names, tuple(s["out"] for s in summaries)).save()
    counts = {k: sum(s[k] for s in summaries) for k in ("in", "out", "replaced", "added", "kept_after_failure",
                                                         "duplicates_dropped")}
    counts["by_origin"] = {a: sum(s["by_origin"][a] for s in summaries) for a in ("complexity", "quality", "diversity")}
    counts["hash"] = hashlib.sha256("".join(s["hash"] for s in summaries).encode()).hexdigest()[:16]
    counts["nodes"] = nodes_of(summaries)
    counts["shards"] = {"dataset": out.to_json()}
    log.debug("merge: %d -> %d samples (%d replaced, %d added, %d kept after a failed rewrite)", counts["in"],
             counts["out"], counts["replaced"], counts["added"], counts["kept_after_failure"])
    return StageResult(counts, out)


def load(stage_dir: str) -> StageResult:
    info = read_record(stage_dir)
    return StageResult(info, ShardSet.from_json(info["shards"]["dataset"]))
