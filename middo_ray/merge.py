"""Refine-job building and the merge stage: next round's dataset by id, with lineage.

Reference semantics (§5), joined by ``sample_id`` instead of position:

- hard (complexity) and low-quality samples are replaced by their rewrite (simplified / improved
  prompt + fresh answer); a sample flagged on both axes gets both rewrites, as in the reference;
- sparse (diversity) samples stay and each seeds one new sample;
- a rewrite that failed keeps the original, and the reason is recorded;
- a new sample identical to one already present is dropped (recorded), so ids stay unique.

Order is deterministic: survivors keep their order, replacements take their parent's place, and
synthesized samples follow their parent.
"""

from __future__ import annotations

import numpy as np

from middo_ray.schema import make_row, prompt_text

OPERATION_OF_AXIS = {"complexity": "simplify", "quality": "improve", "diversity": "synthesize"}
AXIS_OF_OPERATION = {v: k for k, v in OPERATION_OF_AXIS.items()}


def _f(x) -> float | None:
    x = float(x)
    return round(x, 6) if np.isfinite(x) else None


def trigger_of(axis: str, i: int, cols: dict[str, np.ndarray], thresholds: dict) -> dict:
    """The scores (and thresholds) that made sample ``i`` flagged on ``axis``."""
    if axis == "complexity":
        keys = ("loss_pre", "loss_cur")
    elif axis == "quality":
        keys = ("quality",) + tuple(k for k in cols if k.startswith("q_"))
    else:
        keys = ("knn_sim",)
    out = {k: _f(cols[k][i]) for k in keys}
    out["thresholds"] = thresholds.get(axis, {})
    return out


def build_jobs(rows: list[dict], flags: dict[str, np.ndarray], nbr_idx: np.ndarray) -> list[dict]:
    """One refine job per (flagged sample, axis), in a stable order."""
    jobs: list[dict] = []
    for i, row in enumerate(rows):
        for axis in ("complexity", "quality", "diversity"):
            if not flags[axis][i]:
                continue
            job = {"sample_id": row["sample_id"], "operation": OPERATION_OF_AXIS[axis],
                   "instruction": row["instruction"], "input": row.get("input") or "",
                   "output": row.get("output") or "", "hints": [], "index": i}
            if axis == "diversity":
                job["hints"] = [prompt_text(rows[j]) for j in nbr_idx[i] if j >= 0][:2]
            jobs.append(job)
    return jobs


def merge_round(rows: list[dict], jobs: list[dict], results: list[dict], round_k: int,
                cols: dict[str, np.ndarray], thresholds: dict) -> tuple[list[dict], list[dict], dict]:
    """Builds D_{k} from D_{k-1}, the refine jobs and their results (aligned with ``jobs``).

    Returns:
        (new rows, one event per job with its outcome, counts).
    """
    if len(jobs) != len(results):
        raise ValueError(f"merge got {len(results)} refine results for {len(jobs)} jobs")
    children: dict[int, list[dict]] = {}
    replaced: set[int] = set()
    events: list[dict] = []
    seen = {r["sample_id"] for r in rows}
    counts = {"in": len(rows), "replaced": 0, "added": 0, "kept_after_failure": 0, "duplicates_dropped": 0,
              "by_origin": {"complexity": 0, "quality": 0, "diversity": 0}}
    for job, res in zip(jobs, results):
        i, axis = job["index"], AXIS_OF_OPERATION[job["operation"]]
        event = {"sample_id": job["sample_id"], "operation": job["operation"], "status": res.get("status"),
                 "reason": res.get("reason", ""), "child_id": None}
        if res.get("status") != "ok":
            events.append(event)
            continue
        child = make_row(instruction=res["instruction"], input=res.get("input", ""), output=res["output"],
                         parent_id=job["sample_id"], origin=axis, round=round_k,
                         trigger=trigger_of(axis, i, cols, thresholds))
        if child["sample_id"] in seen:
            event.update(status="duplicate", reason="identical to a sample already in the dataset")
            counts["duplicates_dropped"] += 1
            events.append(event)
            continue
        seen.add(child["sample_id"])
        event["child_id"] = child["sample_id"]
        children.setdefault(i, []).append(child)
        counts["by_origin"][axis] += 1
        if axis in ("complexity", "quality"):
            replaced.add(i)
        else:
            counts["added"] += 1
        events.append(event)
    flagged_for_rewrite = {j["index"] for j in jobs if j["operation"] in ("simplify", "improve")}
    counts["kept_after_failure"] = len(flagged_for_rewrite - replaced)
    counts["replaced"] = len(replaced)
    out: list[dict] = []
    for i, row in enumerate(rows):
        if i not in replaced:
            out.append(row)
        out.extend(children.get(i, []))
    counts["out"] = len(out)
    return out, events, counts
