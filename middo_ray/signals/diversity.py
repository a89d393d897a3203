"""Pure math of the diversity axis: embeddings in, kNN similarity scores out.

Two searches share one contract (cosine similarity, a row is never its own neighbour, invalid rows
are never neighbours):

* **exact**: query blocks against base blocks with a running top-k, so memory is
  ``query_block x base_block`` floats whatever N is (the reference builds an N x N matrix).
  Cost is O(N^2 D): fine up to ~10^5 rows, about 10^15 FLOP at 1M x 576.
* **faiss**: an inverted-file (IVF) search on unit vectors. FAISS trains spherical k-means
  centroids on a seeded subsample and assigns every row to its ``nprobe`` nearest lists; each
  list is then multiplied once with all the rows that probe it (the queries are the indexed rows
  themselves, so this list-by-list scan is BLAS-bound, where a query-by-query IVF scan is
  memory-bound). A seeded sample of rows is checked against exact search and ``nprobe`` doubles
  until recall@k reaches the target (0.95). Returned similarities are exact cosines of the
  neighbours found; only which neighbours are found is approximate.

``knn_search`` picks one (``method='auto'``: exact up to ``exact_max_n`` rows, FAISS above) and
returns a ``KnnResult``. See docs/knn.md for the rule and measured numbers.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

METHODS = ("auto", "exact", "faiss")
FAISS_OPTIONS = ("nlist", "nprobe", "train_size", "niter", "threads", "scan", "target_recall", "recall_sample")
SCANS = ("lists", "index")

_QUERY_BLOCK = 2048          # query rows per matrix product in the exact search
_PRODUCT_FLOATS = 1 << 25    # cap on one query_block x base_block product (128 MiB of float32)
_FAISS_CHUNK = 65536         # rows normalised / coarse-assigned per step
_SPLIT_RATIO = 2.0           # k-means lists above this multiple of the mean size are split


@dataclass
class KnnResult:
    """Neighbours of every row and the diversity score derived from them."""

    avg_sim: np.ndarray   # (N,) float64: mean similarity to the k neighbours; NaN if fewer than k valid others
    nbr_idx: np.ndarray   # (N, k) int64: neighbour rows, most similar first (ties: lower index first); -1 where missing
    nbr_sim: np.ndarray   # (N, k) float32: their cosine similarities; NaN where missing
    info: dict = field(default_factory=dict)  # method, index parameters, seconds, ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero or non-finite rows become NaN rows (excluded from search)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    ok = np.isfinite(norms) & (norms > 0)
    out = np.full_like(x, np.nan)
    np.divide(x, norms, out=out, where=ok)
    return out


def _unit_rows(x: np.ndarray, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length float32 copies of ``x[rows]`` with invalid rows zeroed, and their validity mask."""
    u = l2_normalize(x[rows])
    ok = np.isfinite(u).all(axis=1)
    u[~ok] = 0.0
    return u, ok


def _valid_rows(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Rows with a finite, non-zero norm (the same rule as ``l2_normalize``), computed in chunks."""
    out = np.empty(x.shape[0], dtype=bool)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = _unit_rows(x, slice(s, s + chunk))[1]
    return out


def _check(embeddings, k: int) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array of shape (N, D); got shape {x.shape}. "
                         "Stack one vector per row (a single vector is x[None, :]).")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"embeddings must be real numbers; got dtype {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (neighbours per row); got {k!r}")
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _merge_topk(sim_a, idx_a, sim_b, idx_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of two candidate sets per row: higher similarity first, then lower index."""
    sim = np.concatenate([sim_a, sim_b], axis=1)
    idx = np.concatenate([idx_a, idx_b], axis=1)
    key = np.where(idx < 0, np.iinfo(np.int64).max, idx)  # empty slots last
    order = np.lexsort((key, -sim), axis=1)[:, :k]
    return np.take_along_axis(sim, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _block_topk(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns per row of a similarity block (overwritten), best first, lower column on ties."""
    b, m = s.shape
    kk = min(k, m)
    rows = np.arange(b)
    if kk <= 8:
        # k small (the diversity axis uses 2): k argmax passes touch the block k times and allocate
        # nothing of its size, where argpartition would allocate a b x m int64 array.
        idx = np.empty((b, kk), dtype=np.int64)
        sim = np.empty((b, kk), dtype=np.float32)
        for j in range(kk):
            a = s.argmax(axis=1)
            idx[:, j] = a
            sim[:, j] = s[rows, a]
            s[rows, a] = -np.inf
    else:
        part = np.argpartition(s, m - kk, axis=1)[:, m - kk:]
        psim = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -psim), axis=1)
        idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
        sim = np.take_along_axis(psim, order, axis=1)
    idx[~np.isfinite(sim)] = -1
    return sim, idx


def _exact_topk(x: np.ndarray, valid: np.ndarray, queries: np.ndarray, k: int,
                query_block: int = _QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of rows ``queries`` against every valid row of ``x`` (self excluded by index).

    Base rows are normalised block by block, so no normalised copy of ``x`` is kept; memory is
    ``query_block x base_block`` floats plus O(len(queries) x k).
    """
    n = x.shape[0]
    nq = len(queries)
    out_sim = np.full((nq, k), -np.inf, dtype=np.float32)
    out_idx = np.full((nq, k), -1, dtype=np.int64)
    if nq == 0 or n == 0:
        return out_sim, out_idx
    qb = max(1, min(query_block, nq))
    bb = max(256, min(n, _PRODUCT_FLOATS // qb))
    for qs in range(0, nq, qb):
        qrows = queries[qs:qs + qb]
        q, q_ok = _unit_rows(x, qrows)
        best_sim = np.full((len(qrows), k), -np.inf, dtype=np.float32)
        best_idx = np.full((len(qrows), k), -1, dtype=np.int64)
        for bs in range(0, n, bb):
            be = min(bs + bb, n)
            base, _ = _unit_rows(x, slice(bs, be))
            s = q @ base.T
            bad = ~valid[bs:be]
            if bad.any():
                s[:, bad] = -np.inf
            mine = np.flatnonzero((qrows >= bs) & (qrows < be))
            s[mine, qrows[mine] - bs] = -np.inf        # never your own neighbour (by index, not value)
            sim, idx = _block_topk(s, k)
            idx[idx >= 0] += bs
            best_sim, best_idx = _merge_topk(best_sim, best_idx, sim, idx, k)
        best_sim[~q_ok], best_idx[~q_ok] = -np.inf, -1   # an invalid row has no neighbours
        out_sim[qs:qs + len(qrows)] = best_sim
        out_idx[qs:qs + len(qrows)] = best_idx
    return out_sim, out_idx


def exact_neighbors(embeddings: np.ndarray, rows: np.ndarray | None = None, k: int = 2,
                    query_block: int = _QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of the given rows (default: all) against the whole set.

    Used as the ground truth for recall and to finish rows an approximate search left short.

    Returns:
        nbr_idx (len(rows), k) int64 (-1 where missing) and nbr_sim (len(rows), k) float32 (NaN
        where missing), most similar first, ties broken by lower index.
    """
    x = _check(embeddings, k)
    valid = _valid_rows(x)
    rows = np.arange(x.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    sim, idx = _exact_topk(x, valid, rows, k, query_block)
    sim[idx < 0] = np.nan
    return idx, sim


def knn_similarity(embeddings: np.ndarray, k: int = 2, block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact cosine kNN of every row against all others.

    Args:
        embeddings: (N, D) vectors; rows with NaN/zero norm get NaN scores and are never neighbours.
        k: neighbours per row (the reference uses 2).
        block: query rows per matrix product (memory is ``block x base_block`` floats, never N x N).

    Returns:
        avg_sim (N,): mean similarity to the k neighbours (NaN if fewer than k valid others);
        nbr_idx (N, k): neighbour indices, most similar first, ties by lower index (-1 where missing);
        nbr_sim (N, k): their similarities.
    """
    r = knn_search(embeddings, k=k, method="exact", block=block)
    return r.avg_sim, r.nbr_idx, r.nbr_sim


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def _faiss_threads(n: int):
    """FAISS's OpenMP thread count set for the block and restored after (it is process-global)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def faiss_params(n_valid: int, **opts) -> dict:
    """IVF parameters for ``n_valid`` searchable rows; explicit ``opts`` override the defaults.

    Defaults (why; numbers from benchmarks/knn_bench.py and docs/knn.md):
        nlist = 2 * sqrt(N), capped at N / 39 (the points per centroid FAISS asks for). The cost is
            N x nlist (coarse pass) plus N x nprobe x N / nlist (scan); they balance at
            nlist = sqrt(N x nprobe) = 2 sqrt(N) for nprobe 4, and k-means on 40 x nlist points is
            then 4x cheaper than with the common 4 sqrt(N). Oversized lists are split afterwards.
        nprobe = 4 to start: recall@2 ~0.98 on LM-like clustered 576-d data up to 300k rows.
        target_recall = 0.95, recall_sample = 500: before the full scan, exact neighbours of a seeded
            sample of rows are computed and nprobe grows (4, 6, 9, 14, ... up to nlist) until the IVF
            search, simulated on the sample rows only, reaches the target plus one binomial standard
            error (~0.007). Hard (unclustered) data then costs more time instead of silently losing
            recall; the full scan still runs once. 0 turns the check off (nprobe is used as given).
        train_size = min(N, 40 * nlist): spherical k-means on a seeded subsample; niter = 10.
        threads = the usable cores (FAISS's OpenMP setting, restored afterwards).
        scan = 'lists' (list-by-list matrix products) or 'index' (FAISS IndexIVFFlat.search).
    """
    opts = dict(opts)
    unknown = sorted(set(opts) - set(FAISS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown FAISS option(s) {unknown}; allowed: {list(FAISS_OPTIONS)}")
    scan = opts.pop("scan", None) or "lists"
    if scan not in SCANS:
        raise ValueError(f"unknown FAISS scan {scan!r}; use one of {list(SCANS)}")
    target = opts.pop("target_recall", None)
    target = 0.95 if target is None else target
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= 1:
        raise ValueError(f"FAISS option target_recall must be a number in [0, 1] (0 = no check); got {target!r}")
    for key, v in opts.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"FAISS option {key} must be an integer >= 1; got {v!r}")
    n_valid = max(1, n_valid)
    nlist = int(opts.get("nlist") or max(1, min(round(2 * math.sqrt(n_valid)), n_valid // 39)))
    nlist = min(nlist, n_valid)
    nprobe = min(int(opts.get("nprobe") or 4), nlist)
    train_size = min(int(opts.get("train_size") or 40 * nlist), n_valid)
    if train_size < nlist:
        raise ValueError(f"FAISS train_size={train_size} is below nlist={nlist}; k-means needs at least one "
                         "point per centroid: raise train_size or lower nlist")
    return {"nlist": nlist, "nprobe": nprobe, "train_size": train_size, "niter": int(opts.get("niter") or 10),
            "threads": int(opts.get("threads") or _default_threads()), "scan": scan,
            "target_recall": float(target), "recall_sample": int(opts.get("recall_sample") or 500)}


def _kmeans(x: np.ndarray, n_centroids: int, niter: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (FAISS), seeded; on unit vectors, like the data."""
    import faiss

    km = faiss.Kmeans(x.shape[1], n_centroids, niter=niter, seed=int(seed), spherical=True,
                      max_points_per_centroid=max(1, -(-len(x) // n_centroids)),  # sampled already
                      min_points_per_centroid=1)                                    # small N is deliberate
    km.train(np.ascontiguousarray(x))
    return km.centroids


def _train_ivf(xn: np.ndarray, seed: int, params: dict):
    """IVF-Flat inner-product index (not filled) with balanced-ish lists, and its quantizer.

    Spherical k-means on a seeded subsample of ``train_size`` rows gives ``nlist`` centroids. The
    cost of the scan is the sum over lists of (list size x queries probing it), and dense regions
    of real embeddings give k-means lists many times the mean size (5x the ideal cost on the
    benchmark data). So each list holding more than ``_SPLIT_RATIO`` x the mean share of the sample
    is split by a second k-means on its sample rows into parts of about the mean size.
    """
    import faiss

    nv, d = xn.shape
    nlist = params["nlist"]
    rng = np.random.default_rng(seed)
    sample = xn[np.sort(rng.choice(nv, size=params["train_size"], replace=False))]
    centroids = _kmeans(sample, nlist, params["niter"], seed)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    label = quantizer.search(sample, 1)[1][:, 0]
    size = np.bincount(label, minlength=nlist)
    mean = len(sample) / nlist
    keep = [centroids[size <= _SPLIT_RATIO * mean]]
    for lst in np.flatnonzero(size > _SPLIT_RATIO * mean):
        parts = int(round(size[lst] / mean))
        keep.append(_kmeans(sample[label == lst], parts, params["niter"], seed + 1 + int(lst)))
    centroids = np.concatenate(keep)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, d, len(centroids), faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(params["nprobe"], len(centroids))
    return index, quantizer


def _scan_lists(xn: np.ndarray, assign: np.ndarray, nlist: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """IVF search of every row against the rows of the ``nprobe`` lists it probes, list by list.

    ``assign[i]`` holds the lists row i probes, its own list first. Since the queries are the
    indexed rows themselves, the work is regrouped by list: each list's rows are multiplied, in one
    matrix product, with all the queries that probe it. Same pairs as a per-query IVF scan, but
    each list is read once per block of queries, so it is compute-bound (BLAS) instead of
    memory-bound (FAISS's query-by-query scan re-reads nprobe lists per query).

    Returns:
        (nv, k) similarities and row positions, best first; -inf / -1 where fewer were found.
    """
    nv, nprobe = assign.shape
    own = assign[:, 0]
    members, m_lim = _lists_of(own, nlist)
    pos = np.empty(nv, dtype=np.int64)               # each row's position inside its own list
    pos[members] = np.arange(nv) - m_lim[own[members]]
    flat = assign.ravel()
    pairs = np.argsort(flat, kind="stable")          # (query, probe slot) pairs grouped by list
    p_lim = np.searchsorted(flat[pairs], np.arange(nlist + 1))
    del flat
    # Candidates per (query, probe slot): merged once at the end instead of after every list.
    c_sim = np.full((nv * nprobe, k), -np.inf, dtype=np.float32)
    c_idx = np.full((nv * nprobe, k), -1, dtype=np.int64)
    for lst in range(nlist):
        rows = members[m_lim[lst]:m_lim[lst + 1]]
        slots = pairs[p_lim[lst]:p_lim[lst + 1]]
        if len(rows) == 0 or len(slots) == 0:
            continue
        base_t = np.ascontiguousarray(xn[rows].T)
        qb = max(64, _PRODUCT_FLOATS // len(rows))   # bounds one product at ~2^25 floats
        for qs in range(0, len(slots), qb):
            sl = slots[qs:qs + qb]
            q = sl // nprobe
            s = xn[q] @ base_t
            mine = np.flatnonzero(sl % nprobe == 0)  # slot 0 = own list: the row itself is here
            s[mine, pos[q[mine]]] = -np.inf          # never your own neighbour (by index, not value)
            sim, idx = _block_topk(s, k)
            c_sim[sl, : sim.shape[1]] = sim
            c_idx[sl, : idx.shape[1]] = np.where(idx >= 0, rows[np.maximum(idx, 0)], -1)
    c_sim = c_sim.reshape(nv, nprobe * k)
    c_idx = c_idx.reshape(nv, nprobe * k)
    best_sim = np.empty((nv, k), dtype=np.float32)
    best_idx = np.empty((nv, k), dtype=np.int64)
    for s0 in range(0, nv, _FAISS_CHUNK):
        sl = slice(s0, s0 + _FAISS_CHUNK)
        best_sim[sl], best_idx[sl] = _merge_topk(c_sim[sl], c_idx[sl], c_sim[sl, :0], c_idx[sl, :0], k)
    return best_sim, best_idx


def _coarse(quantizer, xn: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` nearest lists of every row, nearest first (the first is the row's own list)."""
    out = np.empty((xn.shape[0], width), dtype=np.int64)
    for s in range(0, xn.shape[0], _FAISS_CHUNK):
        out[s:s + _FAISS_CHUNK] = quantizer.search(xn[s:s + _FAISS_CHUNK], width)[1]
    return out


def _lists_of(own: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by list: list l holds ``order[lim[l]:lim[l + 1]]`` (ascending row order)."""
    order = np.argsort(own, kind="stable")
    return order, np.searchsorted(own[order], np.arange(nlist + 1))


def _sample_recall(xn: np.ndarray, assign: np.ndarray, nlist: int, nprobe: int, sample: np.ndarray,
                   true_pos: np.ndarray, k: int) -> float:
    """Recall@k that an IVF search with ``nprobe`` reaches on the ``sample`` rows (only they are searched)."""
    order, lim = _lists_of(assign[:, 0], nlist)
    found = np.full((len(sample), k), -1, dtype=np.int64)
    for j, row in enumerate(sample):
        cand = np.sort(np.concatenate([order[lim[p]:lim[p + 1]] for p in assign[row, :nprobe]]))
        sim = (xn[cand] @ xn[row])[None, :]
        sim[0, cand == row] = -np.inf                # never your own neighbour
        _, top = _block_topk(sim, k)                 # ties: lower index, as in the full scan
        found[j, : top.shape[1]] = np.where(top[0] >= 0, cand[np.maximum(top[0], 0)], -1)
    return recall_at_k(found, true_pos)


def _faiss_topk(x: np.ndarray, valid: np.ndarray, k: int, seed: int, params: dict
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Approximate top-k of every valid row with a FAISS IVF index over unit rows.

    Steps: unit-normalise; train the lists (``_train_ivf``); one coarse pass gives each row its
    nearest lists. With ``target_recall`` > 0, exact neighbours of a seeded sample of rows are
    computed and the smallest nprobe in 4, 6, 9, 14, ... (x1.5) whose recall on that sample
    reaches the target plus one binomial standard error is chosen, simulating the IVF search on
    the sample rows only, so the full scan runs once. Then ``_scan_lists`` (or FAISS's own
    ``IndexIVFFlat.search`` with scan='index') searches every row.
    """
    n, d = x.shape
    vpos = np.flatnonzero(valid)                     # position among valid rows -> row of x
    nv = len(vpos)
    t = time.perf_counter()
    xn = np.empty((nv, d), dtype=np.float32)         # unit rows: queries and database at once
    for s in range(0, nv, _FAISS_CHUNK):
        xn[s:s + _FAISS_CHUNK] = _unit_rows(x, vpos[s:s + _FAISS_CHUNK])[0]
    index, quantizer = _train_ivf(xn, seed, params)
    nlist = int(quantizer.ntotal)                    # after splitting oversized k-means lists
    t_train = time.perf_counter() - t

    target, nprobe = params["target_recall"], min(params["nprobe"], nlist)
    t = time.perf_counter()
    width = min(nlist, nprobe if target == 0 else max(16, 4 * nprobe))
    assign = _coarse(quantizer, xn, width)           # coarse cost is N x nlist whatever the width
    t_assign = time.perf_counter() - t

    t = time.perf_counter()
    tried: list[dict] = []
    sample = np.zeros(0, dtype=np.int64)
    margin = 0.0
    if target > 0:
        rng = np.random.default_rng([seed, 1])
        sample = np.sort(rng.choice(nv, size=min(params["recall_sample"], nv), replace=False))
        true_sim, true_idx = _exact_topk(x, valid, vpos[sample], k)
        true_pos = np.where(true_idx >= 0, np.searchsorted(vpos, true_idx), -1)
        margin = math.sqrt(target * (1 - target) / max(1, true_pos.size))
        while True:
            if nprobe > width:                       # the probes needed go past the coarse pass
                width = min(nlist, max(nprobe, 4 * width))
                t1 = time.perf_counter()
                assign = _coarse(quantizer, xn, width)
                t_assign += time.perf_counter() - t1
            est = _sample_recall(xn, assign, nlist, nprobe, sample, true_pos, k)
            tried.append({"nprobe": nprobe, "recall_estimate": round(est, 4)})
            if est >= min(1.0, target + margin) or nprobe >= nlist:
                break
            nprobe = min(nlist, max(nprobe + 1, math.ceil(1.5 * nprobe)))
    t_check = time.perf_counter() - t

    t = time.perf_counter()
    if params["scan"] == "lists":
        D, I = _scan_lists(xn, np.ascontiguousarray(assign[:, :nprobe]), nlist, k)
    else:
        import faiss

        own = np.ascontiguousarray(assign[:, 0])
        index.add_core(nv, faiss.swig_ptr(xn), None, faiss.swig_ptr(own))   # ids = positions 0..nv-1
        index.nprobe = nprobe
        D, I = _index_search(index, xn, k)
    t_search = time.perf_counter() - t
    del xn, assign, index

    sims = np.full((n, k), -np.inf, dtype=np.float32)
    idx = np.full((n, k), -1, dtype=np.int64)
    sims[vpos] = D
    idx[vpos] = np.where(I >= 0, vpos[np.maximum(I, 0)], -1)
    recall_estimate = None
    if len(sample):
        recall_estimate = round(recall_at_k(idx[vpos[sample]], true_idx), 4)
        sims[vpos[sample]], idx[vpos[sample]] = true_sim, true_idx   # exact answers at hand: use them
    # Probed lists can hold fewer than k others (tiny or isolated clusters): finish those rows exactly.
    short = vpos[(idx[vpos] < 0).any(axis=1)]
    if len(short):
        sims[short], idx[short] = _exact_topk(x, valid, short, k)
    info = {"index": f"IVF{nlist},Flat,IP", **params, "nlist_kmeans": params["nlist"], "nlist": nlist,
            "nprobe": nprobe, "seed": int(seed), "recall_estimate": recall_estimate,
            "recall_margin": round(margin, 4), "tries": tried, "exact_fallback_rows": int(len(short)),
            "seconds_train": round(t_train, 3), "seconds_assign": round(t_assign, 3),
            "seconds_check": round(t_check, 3), "seconds_search": round(t_search, 3)}
    return sims, idx, info


def _index_search(index, xn: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's own query-by-query IVF search of every indexed row, self dropped by index."""
    nv = xn.shape[0]
    D = np.empty((nv, k), dtype=np.float32)
    I = np.empty((nv, k), dtype=np.int64)
    for s in range(0, nv, _FAISS_CHUNK):
        q = xn[s:s + _FAISS_CHUNK]
        Ds, Is = index.search(q, k + 1)              # k + 1: the row itself is usually among them
        Is[Is == np.arange(s, s + len(q))[:, None]] = -1
        Ds = np.where(Is < 0, -np.inf, Ds).astype(np.float32)
        D[s:s + len(q)], I[s:s + len(q)] = _merge_topk(Ds, Is, Ds[:, :0], Is[:, :0], k)
    return D, I


def knn_search(embeddings: np.ndarray, k: int = 2, method: str = "auto", exact_max_n: int = 50_000,
               seed: int = 0, block: int = _QUERY_BLOCK, **faiss_opts) -> KnnResult:
    """Cosine k-nearest neighbours of every row, exact or with FAISS, and their mean similarity.

    Semantics (both methods): rows are L2-normalised; a row is never its own neighbour (excluded by
    index, so exact duplicates are each other's neighbours at similarity 1); rows with a zero or
    non-finite norm get NaN and are never neighbours; with fewer than k valid other rows every
    score is NaN.

    Args:
        embeddings: (N, D) array, any real dtype (computed in float32).
        k: neighbours per row (the diversity axis uses 2).
        method: 'exact', 'faiss', or 'auto' (exact when N <= exact_max_n, FAISS above).
        exact_max_n: the largest N that 'auto' searches exactly.
        seed: seeds the k-means subsample and initialisation and the recall-check sample; FAISS
            results are deterministic for a given seed, input and thread count.
        block: query rows per matrix product in the exact search.
        **faiss_opts: nlist, nprobe, train_size, niter, threads, scan, target_recall,
            recall_sample (see ``faiss_params``); unknown names are an error.

    Peak memory, beyond the caller's array (and a float32 copy of it if it is not float32); never
    an N x N matrix:
        exact: one query x base product of at most 2^25 floats (128 MiB) plus O(N k).
        faiss: a unit-norm copy, N x D x 4 bytes (2.2 GiB at 1M x 576); coarse assignments and
            candidates, about N x (8 width + nprobe (16 + 12 k)) bytes with width = max(16, 4 nprobe)
            (~0.5 GiB at 1M, nprobe 9); the k-means sample, train_size x D x 4 bytes; one 128 MiB
            product. scan='index' adds FAISS's own copy of the vectors (another N x D x 4 bytes).
        Measured peak RSS at 1M x 576: 5.4 GiB including the 2.1 GiB input (docs/knn.md).

    Returns:
        KnnResult; ``info`` has the method used, its parameters and the wall seconds.
    """
    t0 = time.perf_counter()
    x = _check(embeddings, k)
    if method not in METHODS:
        raise ValueError(f"unknown kNN method {method!r}; use one of {list(METHODS)}")
    if isinstance(exact_max_n, bool) or not isinstance(exact_max_n, (int, np.integer)) or exact_max_n < 1:
        raise ValueError(f"exact_max_n must be an integer >= 1; got {exact_max_n!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be an integer >= 1 (query rows per product); got {block!r}")
    n = x.shape[0]
    chosen = method if method != "auto" else ("exact" if n <= exact_max_n else "faiss")
    if chosen == "exact" and faiss_opts:
        faiss_params(max(n, 1), **faiss_opts)        # still reject typos, even when unused
    valid = _valid_rows(x)
    nv = int(valid.sum())
    info: dict = {"method": chosen, "n": n, "n_valid": nv, "k": k}
    if chosen == "exact":
        info["block"] = int(block)
    avg = np.full(n, np.nan)
    sims = np.full((n, k), np.nan, dtype=np.float32)
    idx = np.full((n, k), -1, dtype=np.int64)
    if nv > k:                                       # every valid row has >= k valid others
        vrows = np.flatnonzero(valid)
        if chosen == "exact":
            s, i = _exact_topk(x, valid, vrows, k, block)
            sims[vrows], idx[vrows] = s, i
        else:
            params = faiss_params(nv, **faiss_opts)
            with _faiss_threads(params["threads"]):
                s, i, finfo = _faiss_topk(x, valid, k, seed, params)
            sims[vrows], idx[vrows] = s[vrows], i[vrows]
            info.update(finfo)
        sims[idx < 0] = np.nan
        avg[vrows] = sims[vrows].astype(np.float64).mean(axis=1)   # NaN if any neighbour is missing
    elif chosen == "faiss":
        info.update(faiss_params(max(nv, 1), **faiss_opts))
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return KnnResult(avg, idx, sims, info)


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Fraction of the exact neighbours that the approximate search also returned.

    Both (N, k) with -1 for missing; rows are compared as sets, so order does not matter. Exact
    neighbours marked -1 are not counted. Returns NaN when there is no exact neighbour at all.
    Note: among exactly tied neighbours the two searches may pick different rows; that counts as a miss.
    """
    a = np.asarray(approx_idx)
    e = np.asarray(exact_idx)
    if a.ndim != 2 or a.shape != e.shape:
        raise ValueError(f"approx_idx and exact_idx must be (N, k) arrays of the same shape; "
                         f"got {a.shape} and {e.shape}")
    hit = ((a[:, :, None] == e[:, None, :]) & (e[:, None, :] >= 0)).any(axis=1)  # (N, k) per exact nbr
    total = int((e >= 0).sum())
    return float("nan") if total == 0 else float(hit.sum()) / total
