"""Exact cosine k-nearest-neighbour search in blocks: the ground truth of the diversity axis.

Query blocks are multiplied with base blocks under a running top-k, so memory is ``query_block x
base_block`` floats whatever N is (the reference builds an N x N matrix). Cost is O(N^2 D): fine up to
~10^5 rows on a CPU, about 10^15 FLOP at 1M x 576; on GPUs it is FLOP-bound (docs/knn.md). Ties go to the
lower row index; a row is never its own neighbour (by index, not by value); invalid rows (zero or
non-finite norm) are never neighbours.
"""

from __future__ import annotations

import numpy as np

_QUERY_BLOCK = 2048          # query rows per matrix product in the exact search
_PRODUCT_FLOATS = 1 << 25    # cap on one query_block x base_block product (128 MiB of float32)


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


def streamed_topk(queries: np.ndarray, query_rows: np.ndarray, bases, k: int,
                  query_block: int = _QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of some rows against every row of a dataset that arrives block by block.

    For a search that no single process can hold: the caller keeps only its ``queries`` and one base
    block at a time, so memory is the queries, one block and one product, and several such searches over
    disjoint query rows give, together, exactly what :func:`_exact_topk` gives on the whole matrix.

    Args:
        queries: (q, D) vectors of the query rows.
        query_rows: (q,) their positions in the dataset (a row is never its own neighbour).
        bases: Iterable of ``(first_row, (b, D) vectors)`` covering the dataset, in any order.
        k: Neighbours per row.

    Returns:
        (q, k) similarities (-inf where missing) and dataset positions (-1 where missing), best first, ties
        to the lower position.
    """
    qv, q_ok = _unit_rows(np.asarray(queries, dtype=np.float32), slice(None))
    query_rows = np.asarray(query_rows, dtype=np.int64)
    nq = len(query_rows)
    best_sim = np.full((nq, k), -np.inf, dtype=np.float32)
    best_idx = np.full((nq, k), -1, dtype=np.int64)
    qb = max(1, min(query_block, nq or 1))
    for start, block in bases:
        base, b_ok = _unit_rows(np.asarray(block, dtype=np.float32), slice(None))
        end = start + len(base)
        for qs in range(0, nq, qb):
            rows = query_rows[qs:qs + qb]
            s = qv[qs:qs + qb] @ base.T
            s[:, ~b_ok] = -np.inf
            mine = np.flatnonzero((rows >= start) & (rows < end))
            s[mine, rows[mine] - start] = -np.inf       # never your own neighbour (by position)
            sim, idx = _block_topk(s, k)
            idx[idx >= 0] += start
            best_sim[qs:qs + qb], best_idx[qs:qs + qb] = _merge_topk(best_sim[qs:qs + qb], best_idx[qs:qs + qb],
                                                                     sim, idx, k)
    best_sim[~q_ok], best_idx[~q_ok] = -np.inf, -1
    return best_sim, best_idx


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
