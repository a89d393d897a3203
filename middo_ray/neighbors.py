"""The diagnosis' kNN step on the cluster: each sample's k nearest neighbours, from the embedding shards.

The driver never holds the vectors. Three ways, by ``diagnose.knn_method`` and the size of the job
(the memory model and measured figures are in docs/knn.md):

- ``exact``, one task: the task reads every embedding shard into one (N, D) float32 matrix and runs the
  blocked exact search (:mod:`middo_ray.signals.exact`); it needs N x D x 4 bytes plus 128 MiB;
- ``faiss``, one task: the same matrix, a unit-norm copy and a FAISS IVF index (:mod:`middo_ray.signals.ivf`);
  it needs about 2 x N x D x 4 bytes plus the lists;
- ``sharded``, exact over many tasks: the embedding shards are cut into groups, and each group's task holds
  only its own vectors while it streams every shard past them (:func:`~middo_ray.signals.exact.streamed_topk`),
  so no process holds the whole matrix and the tasks spread over the nodes. The cost is the exact
  search's O(N^2 D), which a GPU cluster pays in minutes at 10M x 4096 and a CPU cluster does not.

``auto``: exact up to ``diagnose.knn_exact_max_n`` rows, FAISS above; when the one task would not fit in
``diagnose.knn_task_memory_gb`` (default: 80% of the largest node's memory), the sharded exact search.
Each way writes neighbour shards aligned with the embedding shards: ``sample_id``, ``knn_sim`` (the mean
similarity to the k neighbours), ``nbr_ids`` and ``nbr_sims`` (most similar first).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from middo_ray import storage
from middo_ray.shardmap import run_task
from middo_ray.signals.exact import streamed_topk
from middo_ray.signals.knn import knn_search
from middo_ray.storage import ShardSet

log = logging.getLogger("middo")

_OVERHEAD = 256 << 20          # products, top-k buffers and the interpreter, per task


def _nulls(x: np.ndarray) -> pa.Array:
    x = np.asarray(x, dtype=np.float64)
    return pa.array(np.where(np.isfinite(x), x, np.nan), type=pa.float64(), from_pandas=True)


def read_embeddings(paths: list[str]) -> tuple[np.ndarray, pa.Array]:
    """The (N, D) float32 matrix (filled in place, one shard at a time) and the ids of embedding shards."""
    sizes = [storage.num_rows(p) for p in paths]
    width = next((int(storage.read_schema(p).field("embedding").type.list_size) for p, n in zip(paths, sizes) if n), 0)
    x = np.empty((sum(sizes), width), dtype=np.float32)
    ids, at = [], 0
    for p, n in zip(paths, sizes):
        t = storage.read_table(p)
        if n:
            x[at:at + n] = t.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(n, width)
        ids.append(t.column("sample_id").combine_chunks())
        at += n
    return x, (pa.concat_arrays(ids) if ids else pa.array([], pa.string()))


def neighbor_table(all_ids: pa.Array, ids: pa.Array, avg: np.ndarray, idx: np.ndarray, sim: np.ndarray) -> pa.Table:
    """One shard's neighbours as Arrow columns, built from the arrays (no per-row Python objects)."""
    n, k = idx.shape
    missing = (idx < 0).ravel()
    flat_ids = pc.take(all_ids, pa.array(np.maximum(idx, 0).ravel())) if len(all_ids) else pa.nulls(n * k, pa.string())
    flat_ids = pc.if_else(pa.array(missing), pa.nulls(n * k, pa.string()), flat_ids)
    flat_sim = pa.array(sim.ravel().astype(np.float32), pa.float32(), mask=missing | ~np.isfinite(sim.ravel()))
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.table({"sample_id": ids, "knn_sim": _nulls(avg), "nbr_ids": pa.ListArray.from_arrays(offsets, flat_ids),
                     "nbr_sims": pa.ListArray.from_arrays(offsets, flat_sim)})


def _mean_of_k(idx: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """Mean similarity to the k neighbours; NaN when fewer than k were found."""
    full = (idx >= 0).all(axis=1)
    out = np.full(len(idx), np.nan)
    out[full] = sim[full].astype(np.float64).mean(axis=1)
    return out


def _one_task(emb_paths: list[str], out_paths: list[str], k: int, method: str, exact_max_n: int, seed: int) -> dict:
    """The one-task search: reads every embedding shard, searches, writes neighbour shards aligned with them."""
    x, all_ids = read_embeddings(emb_paths)
    res = knn_search(x, k=k, method=method, exact_max_n=exact_max_n, seed=seed)
    del x
    at = 0
    for emb_path, out in zip(emb_paths, out_paths):
        n = storage.num_rows(emb_path)
        storage.write_table(out, neighbor_table(all_ids, all_ids.slice(at, n), res.avg_sim[at:at + n],
                                                res.nbr_idx[at:at + n], res.nbr_sim[at:at + n]))
        at += n
    return res.info


def _group_task(emb_paths: list[str], offsets: list[int], group: list[int], out_paths: list[str], k: int) -> dict:
    """One group of the sharded search: its shards' rows against every shard, streamed past them."""
    t0 = time.time()
    q, _ = read_embeddings([emb_paths[i] for i in group])
    rows = np.concatenate([offsets[i] + np.arange(storage.num_rows(emb_paths[i])) for i in group]) if group else \
        np.zeros(0, np.int64)
    ids = []

    def bases():
        for p, start in zip(emb_paths, offsets):
            x, shard_ids = read_embeddings([p])
            ids.append(shard_ids)
            yield start, x

    sim, idx = streamed_topk(q, rows, bases(), k)
    all_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    sim = np.where(idx >= 0, sim, np.nan).astype(np.float32)
    avg, at = _mean_of_k(idx, sim), 0
    for i, out in zip(group, out_paths):
        n = storage.num_rows(emb_paths[i])
        storage.write_table(out, neighbor_table(all_ids, all_ids.slice(offsets[i], n), avg[at:at + n],
                                                idx[at:at + n], sim[at:at + n]))
        at += n
    return {"rows": int(len(rows)), "seconds": round(time.time() - t0, 3)}


def _sharded(embeddings: ShardSet, outs: list[str], width: int, k: int, budget: int, cpus: float) -> dict:
    """The sharded exact search: groups of shards whose vectors fill at most half the budget, one task each."""
    import ray

    per_row = max(1, width) * 4
    groups, cur, rows = [], [], 0
    for i, n in enumerate(embeddings.rows):
        if cur and (rows + n) * per_row > budget // 2:
            groups.append(cur)
            cur, rows = [], 0
        cur.append(i)
        rows += n
    if cur:
        groups.append(cur)
    paths, offsets = embeddings.paths(), embeddings.offsets()
    biggest = max(embeddings.rows) if embeddings.rows else 0
    remote = ray.remote(_group_task)
    refs = [remote.options(num_cpus=cpus, max_retries=3,
                           memory=int(sum(embeddings.rows[i] for i in g) * per_row * 2 + biggest * per_row * 2
                                      + _OVERHEAD)).remote(paths, offsets, g, [outs[i] for i in g], k)
            for g in groups]
    done = ray.get(refs)
    return {"method": "sharded", "n": embeddings.total, "k": k, "groups": len(groups),
            "seconds_groups": [d["seconds"] for d in done]}


def knn_memory(n: int, width: int, method: str) -> int:
    """Bytes the one-task search needs: the vectors, a unit-norm copy for FAISS, products and lists."""
    vectors = n * width * 4
    return int(vectors * (2.5 if method == "faiss" else 1.1) + _OVERHEAD)


def _budget(gb: float | None) -> int:
    """The memory one kNN task may take: ``diagnose.knn_task_memory_gb``, else 80% of the largest node's."""
    import ray

    if gb is not None:
        return int(gb * 2**30)
    nodes = [nd.get("Resources", {}).get("memory", 0) for nd in ray.nodes() if nd.get("Alive")]
    return int(0.8 * max(nodes)) if nodes else 1 << 62


def choose(method: str, n: int, width: int, exact_max_n: int, budget: int) -> str:
    """The search that runs: the configured one, with 'auto' resolved, and the sharded exact search when
    the one task would not fit."""
    chosen = method if method != "auto" else ("exact" if n <= exact_max_n else "faiss")
    if chosen == "sharded":
        return chosen
    if knn_memory(n, width, chosen) > budget:
        if chosen == "faiss" and method == "faiss":
            raise ValueError(f"diagnose.knn_method=faiss needs about {knn_memory(n, width, 'faiss') / 2**30:.1f} GiB "
                             f"in one task for {n} x {width} embeddings, more than the {budget / 2**30:.1f} GiB a task "
                             "may take (diagnose.knn_task_memory_gb); use knn_method=auto or sharded")
        return "sharded"
    return chosen


def run(embeddings: ShardSet, out_dir: str, width: int, k: int, method: str, exact_max_n: int, seed: int,
        cpus: float, task_memory_gb: float | None = None) -> dict:
    """Writes the neighbour shards of ``embeddings`` under ``out_dir``; returns what the search recorded."""
    n = embeddings.total
    outs = [storage.join(out_dir, name) for name in embeddings.names]
    budget = _budget(task_memory_gb)
    chosen = choose(method, n, width, exact_max_n, budget)
    t0 = time.time()
    if chosen == "sharded":
        info = _sharded(embeddings, outs, width, k, budget, cpus)
    else:
        memory = knn_memory(n, width, chosen)
        info = run_task(_one_task, embeddings.paths(), outs, k, chosen, exact_max_n, seed, what="diagnose: kNN",
                        num_cpus=cpus, memory=memory)
        info["memory_reserved"] = memory
    info["seconds_task"] = round(time.time() - t0, 3)
    info["task_memory_budget"] = budget
    return info
