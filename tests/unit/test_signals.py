"""Signal math: losses, kNN, judge score expectation and aggregation, thresholds."""

import numpy as np
import pytest

from middo_ray.signals.knn import knn_similarity
from middo_ray.signals.loss import masked_mean, per_sample_mean_nll
from middo_ray.signals.quality import aggregate_quality, expected_score
from middo_ray.signals.thresholds import complexity_flags, diversity_flags, quality_flags, zscore

pytestmark = pytest.mark.unit


def test_masked_mean_empty_is_nan_not_zero():
    """A sample with no response tokens gets NaN (the reference's 0/0), never a number."""
    assert np.isnan(masked_mean(np.array([1.0, 2.0]), np.array([0, 0])))
    out = per_sample_mean_nll(np.array([[1.0, 3.0], [2.0, 2.0]]), np.array([[1, 1], [0, 0]]))
    assert out[0] == pytest.approx(2.0) and np.isnan(out[1])


def test_knn_matches_brute_force_and_blocks():
    """Blocked exact kNN equals a dense N x N computation, whatever the block size."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(57, 8)).astype(np.float32)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dense = xn @ xn.T
    np.fill_diagonal(dense, -np.inf)
    want = np.sort(dense, axis=1)[:, -2:].mean(axis=1)
    for block in (1, 7, 1000):
        avg, idx, sim = knn_similarity(x, k=2, block=block)
        np.testing.assert_allclose(avg, want, rtol=1e-5)
        assert (idx != np.arange(57)[:, None]).all()
        assert (sim[:, 0] >= sim[:, 1]).all()


def test_knn_skips_invalid_rows():
    """NaN or zero embeddings get NaN scores and are never anyone's neighbour."""
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [np.nan, 1], [0, 0]], dtype=np.float32)
    avg, idx, _ = knn_similarity(x, k=2)
    assert np.isnan(avg[3]) and np.isnan(avg[4])
    assert not np.isin(idx[:3], [3, 4]).any()


def test_expected_score_two_step_ten():
    """P('1') splits into 10 (followed by '0') and 1; no score mass means missing, not 0."""
    p = np.zeros((3, 10))
    p[0, 7] = 0.5
    p[1, 1] = 1.0
    # row 2: the judge put no mass on digits
    s = expected_score(p, zero_after_one=np.array([0.0, 0.75, 0.0]))
    assert s[0] == pytest.approx(7.0)
    assert s[1] == pytest.approx(0.75 * 10 + 0.25 * 1)
    assert np.isnan(s[2])


def test_expected_score_single_ten_token():
    p = np.zeros((1, 10))
    p[0, 8] = 0.2
    assert expected_score(p, ten_prob=np.array([0.2]))[0] == pytest.approx(9.0)


def test_aggregate_quality_ignores_missing():
    """Per dimension (prompt+response)/2, overall mean of 3; a missing judgement is left out."""
    ps = np.array([[8, 6, 4], [np.nan, np.nan, np.nan]], dtype=float)
    rs = np.array([[6, np.nan, 2], [np.nan, np.nan, np.nan]], dtype=float)
    per_dim, overall = aggregate_quality(ps, rs)
    np.testing.assert_allclose(per_dim[0], [7, 6, 3])
    assert overall[0] == pytest.approx(16 / 3)
    assert np.isnan(overall[1])


def test_complexity_needs_both_models_and_honours_m():
    """Hard = both losses above mean + m*sigma; a larger m flags fewer."""
    pre = np.array([1, 1, 1, 1, 5, 5.0])
    cur = np.array([1, 1, 1, 1, 5, 1.0])
    f, thr = complexity_flags(pre, cur, 1.0)
    assert f.tolist() == [False] * 4 + [True, False]
    assert thr["loss_pre"] == pytest.approx(pre.mean() + pre.std())
    f3, _ = complexity_flags(pre, cur, 3.0)
    assert not f3.any()


def test_thresholds_guard_nan_and_empty():
    """One NaN does not poison the statistics; empty input flags nothing."""
    q = np.array([5, 5, 5, 5, 1, np.nan])
    f, thr = quality_flags(q, 1.0)
    assert f.tolist() == [False] * 4 + [True, False]
    assert np.isfinite(thr["quality"])
    f, thr = diversity_flags(np.array([]), 1.0)
    assert f.size == 0 and thr["knn_sim"] != thr["knn_sim"]  # NaN threshold


def test_zscore_values_nan_passthrough_zero_std_and_sign():
    """zscore is sign * (x - mean) / std over the finite values: NaN stays NaN and is left out of the
    statistics, a constant (or too short) column gives all NaN, and sign flips the direction."""
    x = np.array([1.0, 2.0, 3.0, np.nan])
    z = zscore(x)                                   # mean 2, population std sqrt(2/3)
    np.testing.assert_allclose(z[:3], [-np.sqrt(1.5), 0.0, np.sqrt(1.5)])
    assert np.isnan(z[3])
    np.testing.assert_allclose(zscore(x, ddof=1)[:3], [-1.0, 0.0, 1.0])   # sample std 1
    np.testing.assert_array_equal(zscore(x, ddof=1, sign=-1.0)[:3], [1.0, -0.0, -1.0])
    assert np.isnan(zscore(x, ddof=1, sign=-1.0)[3])
    assert np.isnan(zscore(np.array([4.0, 4.0, np.nan]))).all()          # zero std
    assert np.isnan(zscore(np.array([7.0]), ddof=1)).all()                # std undefined
    assert zscore(np.array([])).shape == (0,)
