"""Approximate cosine kNN with a FAISS inverted-file (IVF) index, for N beyond exact search.

FAISS trains spherical k-means centroids on a seeded subsample and assigns every row to its ``nprobe``
nearest lists; each list is then multiplied once with all the rows that probe it (the queries are the
indexed rows themselves, so this list-by-list scan is BLAS-bound, where a query-by-query IVF scan is
memory-bound). A seeded sample of rows is checked against exact search and ``nprobe`` grows until
recall@k reaches the target (0.95). Returned similarities are exact cosines of the neighbours found;
only which neighbours are found is approximate. Numbers: docs/knn.md.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

import numpy as np

from middo_ray.signals.exact import (_PRODUCT_FLOATS, _block_topk, _exact_topk, _merge_topk, _unit_rows,
                                     recall_at_k)

FAISS_OPTIONS = ("nlist", "nprobe", "train_size", "niter", "threads", "scan", "target_recall", "recall_sample")
SCANS = ("lists", "index")
_FAISS_CHUNK = 65536         # rows normalised / coarse-assigned per step
_SPLIT_RATIO = 2.0           # k-means lists above this multiple of the mean size are split


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


def _choose_nprobe(x, valid, xn, vpos, assign, quantizer, nlist: int, nprobe: int, width: int, target: float,
                   recall_sample: int, k: int, seed: int):
    """The recall check: the smallest nprobe (4, 6, 9, 14, ... up to nlist) whose IVF search, simulated on a
    seeded sample of rows, reaches ``target`` plus one binomial standard error.

    Returns:
        (nprobe, the coarse assignment (widened when needed), the tries, the sample rows, their exact
        similarities and rows, the margin, the extra coarse-pass seconds).
    """
    tried: list[dict] = []
    sample = np.zeros(0, dtype=np.int64)
    true_sim = true_idx = None
    margin, t_more = 0.0, 0.0
    if target <= 0:
        return nprobe, assign, tried, sample, true_sim, true_idx, margin, t_more
    nv = len(vpos)
    rng = np.random.default_rng([seed, 1])
    sample = np.sort(rng.choice(nv, size=min(recall_sample, nv), replace=False))
    true_sim, true_idx = _exact_topk(x, valid, vpos[sample], k)
    true_pos = np.where(true_idx >= 0, np.searchsorted(vpos, true_idx), -1)
    margin = math.sqrt(target * (1 - target) / max(1, true_pos.size))
    while True:
        if nprobe > width:                       # the probes needed go past the coarse pass
            width = min(nlist, max(nprobe, 4 * width))
            t1 = time.perf_counter()
            assign = _coarse(quantizer, xn, width)
            t_more += time.perf_counter() - t1
        est = _sample_recall(xn, assign, nlist, nprobe, sample, true_pos, k)
        tried.append({"nprobe": nprobe, "recall_estimate": round(est, 4)})
        if est >= min(1.0, target + margin) or nprobe >= nlist:
            break
        nprobe = min(nlist, max(nprobe + 1, math.ceil(1.5 * nprobe)))
    return nprobe, assign, tried, sample, true_sim, true_idx, margin, t_more


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
    nprobe, assign, tried, sample, true_sim, true_idx, margin, t_more = _choose_nprobe(
        x, valid, xn, vpos, assign, quantizer, nlist, nprobe, width, target, params["recall_sample"], k, seed)
    t_assign += t_more
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
