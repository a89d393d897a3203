"""Shard-by-shard stage work on Ray Data: each unit of work reads its inputs and commits its own outputs.

A stage describes its work as *units*, one per shard (or per group of rows it can redo on its own). A unit
is a small JSON-able dict: the paths it reads, the path it commits (``"commit"``), and its row count. The
runner hands the units that are not committed yet to a Ray Data ``map_batches`` over a pool of workers
(actors holding the heavy state, such as a model, or plain tasks), one unit per call. The worker reads the
unit's shards itself, does the work, writes its outputs with :func:`middo_ray.storage.write_table` (atomic)
and returns a summary (counts, partial sums), which it also commits in its output's Parquet metadata.

So the driver sends paths and receives one small dict per unit: no row passes through it. A stage killed
part-way resumes with only its uncommitted units, and a unit lost with its node is retried by Ray Data on
another worker (actor pools restart lost actors and retry their tasks); a unit is committed once, whole.

Why not ``read_parquet(...).map_batches(...).write_parquet(...)`` end to end: Ray Data forms blocks and
output files by its own sizing, so rows of one input shard can land in several output files, and a
killed run cannot tell which input shards are finished. Keeping the shard as the unit of commit gives
exact resume, stable file names and the same output for the same input whatever the cluster's size.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import numpy as np

from middo_ray import storage
from middo_ray.console import follow_units

log = logging.getLogger("middo")


class _ActorRunner:
    """Ray Data actor: builds the worker once, then runs one unit per call."""

    def __init__(self, worker_cls: type, worker_kwargs: dict):
        self.worker = worker_cls(**worker_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _run_batch(self.worker, batch)


def _task_runner(batch: dict[str, np.ndarray], worker_cls: type, worker_kwargs: dict) -> dict[str, np.ndarray]:
    """Ray Data task: a light worker built per call."""
    return _run_batch(worker_cls(**worker_kwargs), batch)


def _run_batch(worker, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import ray

    node = ray.get_runtime_context().get_node_id()
    out = []
    for raw in batch["unit"]:
        unit = json.loads(raw)
        t0 = time.time()
        summary = dict(worker.process(unit) or {})
        summary.setdefault("unit", unit["id"])
        summary["node"] = node
        summary["seconds"] = round(time.time() - t0, 3)
        out.append(json.dumps(summary, default=storage.json_default))
    return {"summary": np.asarray(out, dtype=object)}


def nodes_of(*summary_lists: list[dict]) -> list[str]:
    """The ids of the nodes that did the units of these summaries (for the stage record)."""
    return sorted({s["node"] for summaries in summary_lists for s in summaries if s.get("node")})


def committed_summary(unit: dict) -> dict | None:
    """The summary of a committed unit (read from its commit file), or None when it is not committed."""
    commit = unit["commit"]
    if not storage.exists(commit):
        return None
    if commit.endswith(".parquet"):
        summary = storage.table_summary(commit)
        return summary if summary is not None else {"unit": unit["id"]}
    return storage.read_json(commit)


def map_shards(units: list[dict], worker_cls: type, worker_kwargs: dict | None = None, *, what: str,
               actors: dict | None = None, task_cpus: float = 0.25,
               on_summary: Callable[[dict], None] | None = None) -> list[dict]:
    """Runs ``worker_cls(**worker_kwargs).process(unit)`` for every unit not committed yet.

    Args:
        units: Dicts with ``id`` (unique), ``commit`` (the path whose existence marks the unit done) and
            ``rows`` (for progress), plus whatever the worker reads.
        worker_cls: A class with ``process(unit) -> summary``; importable by module path on every node.
        worker_kwargs: Its constructor arguments (plain values).
        what: Name for progress lines ("diagnose", ...).
        actors: Actor-pool options for workers with heavy state: ``concurrency`` (the pool's size, capped at
            the pending units, or a (min, max) pair; it becomes Ray Data's ``ActorPoolStrategy``) and
            map_batches' remote args (``num_cpus``, ``num_gpus``, ``scheduling_strategy``, ...); None runs each
            unit as a light task of ``task_cpus`` CPUs.
        on_summary: Called with each new summary as it arrives.

    Returns:
        One summary per unit, in the order of ``units`` (committed ones read back from their commits).
    """
    import ray

    worker_kwargs = worker_kwargs or {}
    summaries: dict[str, dict] = {}
    pending = []
    for unit in units:
        done = committed_summary(unit)
        if done is None:
            pending.append(unit)
        else:
            summaries[unit["id"]] = done
    if summaries:
        log.info("%s: %d of %d shards already committed (resumed)", what, len(summaries), len(units))
    if pending:
        # "_progress": the key under which a worker may report rows done within its unit (console.report_unit).
        ds = ray.data.from_items([{"unit": json.dumps({**u, "_progress": what})} for u in pending],
                                 override_num_blocks=len(pending))
        # A unit is a whole shard: it may run far longer than Ray Data's no-progress timeout (30 min) without
        # any block moving, and that guard would abort the whole stage. Progress within a unit goes to the
        # console instead (console.report_unit); a unit lost with its worker is retried by Ray Data.
        ds.context.execution_no_progress_timeout_s = -1
        if actors is not None:
            actors = dict(actors)
            size = actors.pop("concurrency", 1)
            if isinstance(size, int):                         # no actor (and model load) without a unit
                actors["compute"] = ray.data.ActorPoolStrategy(size=max(1, min(size, len(pending))))
            else:                                             # (min, max): an autoscaling pool
                actors["compute"] = ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])
            ds = ds.map_batches(_ActorRunner, fn_constructor_kwargs={"worker_cls": worker_cls,
                                                                    "worker_kwargs": worker_kwargs},
                                batch_size=1, batch_format="numpy", **actors)
        else:
            ds = ds.map_batches(_task_runner, fn_kwargs={"worker_cls": worker_cls, "worker_kwargs": worker_kwargs},
                                batch_size=1, batch_format="numpy", num_cpus=task_cpus)
        progress = _Progress(what, pending)
        with follow_units(what, progress.display, lambda: progress.done_rows) as within:
            for row in ds.iter_rows():
                summary = json.loads(row["summary"])
                summaries[summary["unit"]] = summary
                within.unit_done(summary["unit"])
                progress.update(summary)
                if on_summary is not None:
                    on_summary(summary)
        progress.finish()
    missing = [u["id"] for u in units if u["id"] not in summaries]
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} shards came back without a result (e.g. {missing[:3]}); "
                           "this is a bug")
    return [summaries[u["id"]] for u in units]


class _Progress:
    """The stage's progress display (:class:`middo_ray.console.Progress`): shards and rows done, rate, time left."""

    def __init__(self, what: str, pending: list[dict]):
        from middo_ray.console import Progress

        self.what, self.t0 = what, time.time()
        self.units, self.rows = len(pending), sum(int(u.get("rows", 0)) for u in pending)
        self.done_units = self.done_rows = 0
        by_rows = self.rows > 0
        self.display = Progress(what, self.rows if by_rows else self.units, "rows" if by_rows else "shards")

    def update(self, summary: dict) -> None:
        self.done_units += 1
        self.done_rows += int(summary.get("rows", 0))
        by_rows = self.rows > 0
        self.display.update(self.done_rows if by_rows else self.done_units,
                            f"{self.done_units}/{self.units} shards" if by_rows and self.units > 1 else "")

    def finish(self) -> None:
        self.display.finish()
        log.debug("%s: %d shards, %d rows in %.1fs", self.what, self.done_units, self.done_rows,
                  time.time() - self.t0)


def node_pool(num_actors: int | None, cpus_per_actor: float, gpus_per_actor: float = 1.0) -> dict[str, Any]:
    """The one pool-sizing rule for actors that hold a model.

    GPUs in the cluster: one actor per GPU (``gpus_per_actor`` each). CPU only: one actor per alive node,
    spread over the nodes, each computing with all of its node's cores (``models.threads_for_actor``)
    while reserving only ``cpus_per_actor`` logical CPUs: a whole-CPU actor pool beside Ray Data's own
    tasks stalls on 2-CPU machines. ``num_actors`` overrides the count.
    """
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus > 0:
        return {"concurrency": num_actors or max(1, int(gpus / max(gpus_per_actor, 1e-9))),
                "num_gpus": gpus_per_actor}
    nodes = [nd for nd in ray.nodes() if nd.get("Alive") and nd.get("Resources", {}).get("CPU", 0) > 0]
    n = num_actors or max(1, len(nodes))
    opts: dict[str, Any] = {"concurrency": n, "num_cpus": cpus_per_actor}
    if n > 1:
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def run_task(fn: Callable, *args: Any, what: str, num_cpus: float = 0.25, memory: int | None = None,
             **kwargs: Any) -> Any:
    """Runs ``fn(*args, **kwargs)`` as one Ray task on a worker and returns its result.

    For the steps of a stage that must see every shard at once but only a column or two of each (the
    duplicate check, the held-out cut, the kNN index): they stream the shards themselves in a worker, so
    the driver still holds nothing per row. ``memory`` (bytes) is reserved when given, so the task lands on
    a node that has it. An exception of ``fn`` is raised here as itself (not wrapped in Ray's own error).
    """
    import ray

    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": 3}
    if memory:
        opts["memory"] = int(memory)
    remote = ray.remote(**opts)(fn)
    try:
        return ray.get(remote.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if cause is not None:
            raise cause from None
        raise RuntimeError(f"{what} failed on a worker: {exc}") from exc
