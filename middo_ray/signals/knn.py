"""The diversity axis' search: embeddings in, each row's k nearest neighbours and their mean similarity out.

Two searches share one contract (cosine similarity, a row is never its own neighbour, invalid rows are
never neighbours): exact blocked search (:mod:`middo_ray.signals.exact`) and a FAISS IVF index
(:mod:`middo_ray.signals.ivf`). :func:`knn_search` picks one (``method='auto'``: exact up to
``exact_max_n`` rows, FAISS above) and returns a :class:`KnnResult`. See docs/knn.md for the rule, the
memory model and measured numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from middo_ray.signals.exact import _QUERY_BLOCK, _check, _exact_topk, _valid_rows
from middo_ray.signals.ivf import _faiss_threads, _faiss_topk, faiss_params

METHODS = ("auto", "exact", "faiss")


@dataclass
class KnnResult:
    """Neighbours of every row and the diversity score derived from them."""

    avg_sim: np.ndarray   # (N,) float64: mean similarity to the k neighbours; NaN if fewer than k valid others
    nbr_idx: np.ndarray   # (N, k) int64: neighbour rows, most similar first (ties: lower index first); -1 where missing
    nbr_sim: np.ndarray   # (N, k) float32: their cosine similarities; NaN where missing
    info: dict = field(default_factory=dict)  # method, index parameters, seconds, ...


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
