"""kNN diversity search: exact blocked search, the FAISS path, the auto rule, and bad input."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from middo_ray.signals.exact import exact_neighbors, recall_at_k
from middo_ray.signals.knn import KnnResult, knn_search, knn_similarity

pytestmark = pytest.mark.unit


def dense_truth(x: np.ndarray) -> np.ndarray:
    """The reference's N x N cosine matrix in float64, diagonal and invalid rows/columns at -inf."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    u = np.zeros_like(x)
    u[ok] = x[ok] / norms[ok, None]
    s = u @ u.T
    s[~ok, :] = -np.inf
    s[:, ~ok] = -np.inf
    np.fill_diagonal(s, -np.inf)
    return s


def tricky_rows(n: int = 240, d: int = 12, seed: int = 3) -> np.ndarray:
    """Random rows plus exact duplicates, bit-exact ties, and NaN / inf / zero rows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    e1 = np.zeros(d, dtype=np.float32)
    e1[0] = 1.0
    x[[10, 20, 30]] = e1 * 3.0                 # three identical rows (different scale: same direction)
    x[40] = 0.96 * e1
    x[40, 1] = 0.28                            # equally similar (bit-exact) to rows 10, 20 and 30
    x[50] = x[51] = x[7]                       # another duplicate triple
    x[5] = 0.0                                 # zero row
    x[6, 3] = np.nan                           # NaN row
    x[8, 0] = np.inf                           # inf row
    return x


def check_against_dense(x: np.ndarray, avg, idx, sim, k: int, atol: float = 2e-5) -> None:
    s = dense_truth(x)
    valid = np.isfinite(s).any(axis=1)
    top = -np.sort(-s, axis=1)[:, :k]
    assert np.all(np.isnan(avg[~valid])) and np.all(idx[~valid] == -1) and np.all(np.isnan(sim[~valid]))
    for i in np.flatnonzero(valid):
        np.testing.assert_allclose(sim[i], top[i], atol=atol, err_msg=f"row {i}")
        assert i not in idx[i] and len(set(idx[i])) == k, f"row {i}: {idx[i]}"
        assert valid[idx[i]].all(), f"row {i} has an invalid neighbour"
        np.testing.assert_allclose(s[i, idx[i]], sim[i], atol=atol)   # the neighbours have those sims
        np.testing.assert_allclose(avg[i], top[i].mean(), atol=atol)
        ranked = -np.sort(-s[i])
        if ranked[k - 1] - ranked[k] > 1e-4:  # no near-tie at the k-th place: the set is unique
            assert set(idx[i]) == set(np.argsort(-s[i])[:k])


@pytest.mark.parametrize("k", [1, 2, 5, 10])
@pytest.mark.parametrize("block", [1, 7, 64, 100_000])
def test_exact_matches_dense_brute_force(k, block):
    """Blocked exact kNN equals the dense N x N computation for any block size and k (incl. ties/NaN)."""
    x = tricky_rows()
    r = knn_search(x, k=k, method="exact", block=block)
    assert isinstance(r, KnnResult) and r.info["method"] == "exact"
    assert r.avg_sim.dtype == np.float64 and r.nbr_idx.dtype == np.int64 and r.nbr_sim.dtype == np.float32
    assert r.nbr_idx.shape == r.nbr_sim.shape == (len(x), k)
    check_against_dense(x, r.avg_sim, r.nbr_idx, r.nbr_sim, k)
    avg, idx, sim = knn_similarity(x, k=k, block=block)     # the old entry point gives the same
    np.testing.assert_array_equal(idx, r.nbr_idx)
    np.testing.assert_array_equal(avg, r.avg_sim)


def test_duplicates_are_neighbours_and_ties_go_to_lower_index():
    """Self is excluded by index, not by value: duplicates find each other; ties pick lower indices."""
    x = tricky_rows()
    r = knn_search(x, k=2, method="exact", block=16)
    assert r.nbr_idx[10].tolist() == [20, 30] and r.nbr_idx[20].tolist() == [10, 30]
    assert r.nbr_idx[30].tolist() == [10, 20]
    np.testing.assert_allclose(r.nbr_sim[[10, 20, 30]], 1.0, atol=1e-6)
    assert r.nbr_idx[40].tolist() == [10, 20]             # bit-exact tie among 10, 20, 30
    assert r.nbr_sim[40, 0] == r.nbr_sim[40, 1]
    assert sorted(r.nbr_idx[50].tolist()) == [7, 51]


def test_too_few_valid_rows_and_empty_input():
    """Fewer than k valid others -> NaN everywhere; empty input gives empty outputs."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, 1.0], [0.0, 0.0]], dtype=np.float32)
    for method in ("exact", "faiss"):
        r = knn_search(x, k=2, method=method)
        assert np.isnan(r.avg_sim).all() and (r.nbr_idx == -1).all() and np.isnan(r.nbr_sim).all()
        r = knn_search(x, k=1, method=method)
        assert r.nbr_idx[:2].tolist() == [[1], [0]] and np.isnan(r.avg_sim[2:]).all()
    r = knn_search(np.zeros((0, 8)), k=2)
    assert r.avg_sim.shape == (0,) and r.nbr_idx.shape == (0, 2)


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Mixture of anisotropic Gaussian clusters around a shared mean (like LM embeddings)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(4, n // 100)
    centres = rng.normal(size=(n_clusters, d)) * 2.0 + 6.0 * rng.normal(size=d)
    label = rng.integers(0, n_clusters, size=n)
    x = np.empty((n, d), dtype=np.float32)
    for c in range(n_clusters):
        rows = np.flatnonzero(label == c)
        basis = rng.normal(size=(4, d))
        x[rows] = centres[c] + (rng.normal(size=(len(rows), 4)) * [1.0, 0.7, 0.5, 0.3]) @ basis \
            + 0.1 * rng.normal(size=(len(rows), d))
    return x


def test_faiss_recall_and_scores_close_to_exact():
    """Forced FAISS on ~4k clustered vectors: recall@2 >= 0.95 and avg_sim within 0.01 of exact."""
    x = clustered(4000, 64, seed=0)
    x[[3, 4]] = x[2]                            # duplicates
    x[9] = np.nan
    x[11] = 0.0
    exact = knn_search(x, k=2, method="exact")
    approx = knn_search(x, k=2, method="faiss", seed=0)
    assert approx.info["method"] == "faiss" and approx.info["nlist"] >= 2
    valid = np.isfinite(exact.avg_sim)
    raw = knn_search(x, k=2, method="faiss", seed=0, target_recall=0)   # the IVF scan alone, no check
    assert recall_at_k(raw.nbr_idx[valid], exact.nbr_idx[valid]) >= 0.95
    assert recall_at_k(approx.nbr_idx[valid], exact.nbr_idx[valid]) >= 0.95
    assert np.nanmean(np.abs(approx.avg_sim - exact.avg_sim)) < 0.01
    assert (approx.avg_sim[valid] <= exact.avg_sim[valid] + 1e-5).all()   # never better than exact
    assert np.array_equal(np.isnan(approx.avg_sim), np.isnan(exact.avg_sim))
    rows = np.arange(len(x))[:, None]
    assert not (approx.nbr_idx == rows).any()                            # never its own neighbour
    assert not np.isin(approx.nbr_idx, [9, 11]).any()                    # invalid rows are never neighbours
    assert set(approx.nbr_idx[2].tolist()) == {3, 4}
    # Returned similarities are exact cosines of the returned neighbours.
    u = np.zeros_like(x)
    u[valid] = x[valid] / np.linalg.norm(x[valid], axis=1, keepdims=True)
    got = np.einsum("nd,nkd->nk", u[valid], u[approx.nbr_idx[valid]])
    np.testing.assert_allclose(approx.nbr_sim[valid], got, atol=1e-5)


@pytest.mark.parametrize("scan", ["lists", "index"])
def test_faiss_probing_every_list_is_exact(scan):
    """With nprobe = nlist both FAISS scans see every row, so they must return the exact answer."""
    x = clustered(1500, 32, seed=1)
    exact = knn_search(x, k=3, method="exact")
    r = knn_search(x, k=3, method="faiss", nlist=8, nprobe=8, scan=scan, target_recall=0)
    np.testing.assert_allclose(r.nbr_sim, exact.nbr_sim, atol=1e-5)
    assert recall_at_k(r.nbr_idx, exact.nbr_idx) >= 0.999
    if scan == "lists":                        # same tie rule as exact: identical neighbours
        np.testing.assert_array_equal(r.nbr_idx, exact.nbr_idx)


def test_faiss_recall_check_raises_nprobe_on_hard_data():
    """Unclustered data defeats a small nprobe; the recall check doubles it until the target is met."""
    x = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    exact = knn_search(x, k=2, method="exact")
    off = knn_search(x, k=2, method="faiss", nprobe=1, target_recall=0)
    on = knn_search(x, k=2, method="faiss", nprobe=1, target_recall=0.95)
    assert off.info["tries"] == [] and off.info["recall_estimate"] is None and off.info["nprobe"] == 1
    assert recall_at_k(off.nbr_idx, exact.nbr_idx) < 0.9
    probes = [t["nprobe"] for t in on.info["tries"]]
    assert probes == sorted(probes) and len(probes) >= 2 and on.info["nprobe"] == probes[-1]
    assert on.info["tries"][-1]["recall_estimate"] >= 0.95 + on.info["recall_margin"]
    assert all(t["recall_estimate"] < 0.95 + on.info["recall_margin"] for t in on.info["tries"][:-1])
    # The estimate simulated on the sample rows is what the full scan then got on them.
    assert abs(on.info["recall_estimate"] - on.info["tries"][-1]["recall_estimate"]) <= 0.002
    assert recall_at_k(on.nbr_idx, exact.nbr_idx) >= 0.93     # the estimate is from a 500-row sample


def test_faiss_is_deterministic_and_restores_threads():
    """Same seed -> same neighbours; FAISS's process-wide thread count is put back afterwards."""
    x = clustered(2500, 48, seed=2)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        a = knn_search(x, k=2, method="faiss", seed=7, threads=2)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)
    b = knn_search(x, k=2, method="faiss", seed=7, threads=2)
    np.testing.assert_array_equal(a.nbr_idx, b.nbr_idx)
    np.testing.assert_array_equal(a.nbr_sim, b.nbr_sim)
    assert a.info["threads"] == 2 and a.info["seed"] == 7


def test_auto_picks_exact_up_to_threshold_and_faiss_above():
    """'auto' is exact while N <= exact_max_n and FAISS above it."""
    x = clustered(400, 16, seed=3)
    assert knn_search(x, method="auto", exact_max_n=400).info["method"] == "exact"
    r = knn_search(x, method="auto", exact_max_n=399)
    assert r.info["method"] == "faiss" and "nlist" in r.info and r.info["seconds"] >= 0


def test_exact_neighbors_of_a_subset_match_full_search():
    """The ground-truth helper (blocked over the base) equals the full exact search on its rows."""
    x = tricky_rows()
    full = knn_search(x, k=3, method="exact")
    rows = np.array([0, 10, 40, 6, 199])
    idx, sim = exact_neighbors(x, rows, k=3, query_block=2)
    np.testing.assert_array_equal(idx, full.nbr_idx[rows])
    np.testing.assert_allclose(sim, full.nbr_sim[rows], atol=1e-6)


def test_recall_at_k():
    """Set overlap per row, order-free; missing exact neighbours (-1) are not counted."""
    exact = np.array([[1, 2], [0, 2], [-1, -1]])
    assert recall_at_k(np.array([[2, 1], [0, 3], [5, 6]]), exact) == pytest.approx(3 / 4)
    assert recall_at_k(exact, exact) == 1.0
    assert np.isnan(recall_at_k(np.full((2, 2), -1), np.full((2, 2), -1)))
    with pytest.raises(ValueError, match="same shape"):
        recall_at_k(np.zeros((3, 2)), np.zeros((3, 3)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 1.5}, "k must be an integer >= 1"),
        ({"k": True}, "k must be an integer >= 1"),
        ({"method": "fiass"}, r"unknown kNN method 'fiass'; use one of \['auto', 'exact', 'faiss'\]"),
        ({"exact_max_n": 0}, "exact_max_n must be an integer >= 1"),
        ({"block": 0}, "block must be an integer >= 1"),
        ({"nprob": 4}, r"unknown FAISS option\(s\) \['nprob'\]"),
        ({"method": "faiss", "nprobe": 0}, "nprobe must be an integer >= 1"),
        ({"method": "faiss", "scan": "gpu"}, "unknown FAISS scan 'gpu'"),
        ({"method": "faiss", "target_recall": 1.5}, r"target_recall must be a number in \[0, 1\]"),
        ({"method": "faiss", "nlist": 50, "train_size": 10}, "train_size=10 is below nlist=50"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    """Each bad argument raises a ValueError that names it and the fix."""
    x = clustered(300, 8, seed=4)
    with pytest.raises(ValueError, match=match):
        knn_search(x, **kwargs)


@pytest.mark.parametrize("bad", [np.ones(8), np.ones((2, 3, 4)), np.array([["a", "b"]])])
def test_bad_shapes_and_dtypes(bad):
    """1-D / 3-D input and non-numeric input are rejected with the expected shape in the message."""
    with pytest.raises(ValueError, match=r"2-D array of shape \(N, D\)|real numbers"):
        knn_search(bad)
