"""Refine jobs and the requests they become: one job per (flagged sample, axis), grouped by operation into
requests of ``refine.batch_size`` with seeds that depend only on the run seed, the operation and the chunk."""

from __future__ import annotations

from middo_ray.config import RefineConfig
from middo_ray.schema import JOB_AXES, OPERATION_OF_AXIS, OPERATIONS

JOB_KEYS = ("sample_id", "operation", "instruction", "input", "output", "hints")
# Request seeds of shard s count their chunks from s * CHUNK_STRIDE: shard 0 asks what a single-shard run asks.
CHUNK_STRIDE = 1 << 20


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

