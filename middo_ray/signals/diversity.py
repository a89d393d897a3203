"""Pure math of the diversity axis: embeddings in, kNN similarity scores out.

Exact k-nearest-neighbour search by cosine similarity in blocks of queries, so memory stays at
``block x N`` floats instead of the reference's N x N matrix.
"""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero or non-finite rows become NaN rows (excluded from search)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    ok = np.isfinite(norms) & (norms > 0)
    out = np.full_like(x, np.nan)
    np.divide(x, norms, out=out, where=ok)
    return out


def knn_similarity(embeddings: np.ndarray, k: int = 2, block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact cosine kNN of every row against all others.

    Args:
        embeddings: (N, D) vectors; rows with NaN/zero norm get NaN scores and are never neighbours.
        k: neighbours per row (the reference uses 2).
        block: query rows per matrix product (bounds memory to block x N).

    Returns:
        avg_sim (N,): mean similarity to the k neighbours (NaN if fewer than k valid others);
        nbr_idx (N, k): neighbour indices, most similar first (-1 where missing);
        nbr_sim (N, k): their similarities.
    """
    e = l2_normalize(embeddings)
    n = e.shape[0]
    valid = np.isfinite(e).all(axis=1)
    avg = np.full(n, np.nan)
    idx = np.full((n, k), -1, dtype=np.int64)
    sim = np.full((n, k), np.nan, dtype=np.float32)
    if n == 0 or valid.sum() <= k:
        return avg, idx, sim
    base = np.where(valid[:, None], e, 0.0).astype(np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        s = base[start:stop] @ base.T                       # (b, N)
        s[:, ~valid] = -np.inf
        s[np.arange(stop - start), np.arange(start, stop)] = -np.inf   # never your own neighbour
        top = np.argpartition(-s, k, axis=1)[:, :k]
        top_sim = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_sim, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        top_sim = np.take_along_axis(top_sim, order, axis=1)
        rows = valid[start:stop]
        idx[start:stop][rows] = top[rows]
        sim[start:stop][rows] = top_sim[rows]
        avg[start:stop][rows] = top_sim[rows].mean(axis=1)
    return avg, idx, sim
