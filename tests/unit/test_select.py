"""Selection: sigma rules, budget mode (worst first, at most X% per axis) and the IFD option."""

import numpy as np
import pytest

from middo_ray.config import SelectConfig
from middo_ray.select import _table, local_moments, select_flags, severity, worst_first

pytestmark = pytest.mark.unit


def _cols(n=100, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(2.0, 0.5, n)
    return {
        "loss_pre": base + rng.normal(0, 0.05, n),
        "loss_cur": base + rng.normal(0, 0.05, n),
        "knn_sim": rng.normal(0.8, 0.05, n),
        "quality": rng.normal(6.0, 1.0, n),
        "ifd": rng.normal(0.7, 0.2, n),
    }


def test_sigma_mode_matches_the_rules_and_records_thresholds():
    cols = _cols()
    flags, thr, counts = select_flags(cols, SelectConfig())
    mu, sd = cols["knn_sim"].mean(), cols["knn_sim"].std()
    np.testing.assert_array_equal(flags["diversity"], cols["knn_sim"] < mu - sd)
    assert thr["diversity"]["knn_sim"] == pytest.approx(mu - sd)
    q_mu, q_sd = cols["quality"].mean(), cols["quality"].std(ddof=1)
    np.testing.assert_array_equal(flags["quality"], cols["quality"] < q_mu - q_sd)
    hard = (cols["loss_pre"] > cols["loss_pre"].mean() + cols["loss_pre"].std()) & \
           (cols["loss_cur"] > cols["loss_cur"].mean() + cols["loss_cur"].std())
    np.testing.assert_array_equal(flags["complexity"], hard)
    assert counts["mode"] == "sigma" and counts["any"]["flagged"] == int(
        (flags["complexity"] | flags["diversity"] | flags["quality"]).sum())


def test_budget_mode_flags_at_most_the_budget_worst_first():
    cols = _cols(200, seed=1)
    cfg = SelectConfig(mode="budget", budget_fraction=0.05)
    flags, thr, counts = select_flags(cols, cfg)
    sev = severity(_table(cols), local_moments(cols))
    for axis in ("complexity", "diversity", "quality"):
        assert flags[axis].sum() == 10, axis
        # every flagged sample is at least as bad as every unflagged one
        assert sev[axis][flags[axis]].min() >= np.nanmax(sev[axis][~flags[axis]]), axis
        assert thr[axis]["budget"] == 10 and thr[axis]["severity_cutoff"] is not None
    # the lowest-similarity samples are the sparse ones
    np.testing.assert_array_equal(np.sort(np.flatnonzero(flags["diversity"])),
                                  np.sort(np.argsort(cols["knn_sim"])[:10]))
    # complexity ranks by the smaller z-score of the two losses (both must be high)
    zp = (cols["loss_pre"] - cols["loss_pre"].mean()) / cols["loss_pre"].std()
    zc = (cols["loss_cur"] - cols["loss_cur"].mean()) / cols["loss_cur"].std()
    np.testing.assert_array_equal(np.sort(np.flatnonzero(flags["complexity"])),
                                  np.sort(np.argsort(-np.minimum(zp, zc))[:10]))
    assert counts["complexity"]["sigma_rule"] == int(select_flags(cols, SelectConfig())[0]["complexity"].sum())


def test_budget_within_sigma_never_exceeds_the_sigma_rule():
    cols = _cols(200, seed=2)
    sigma, _, _ = select_flags(cols, SelectConfig(quality_m=2.0))
    flags, _, _ = select_flags(cols, SelectConfig(mode="budget", budget_fraction=0.5, budget_within_sigma=True,
                                                  quality_m=2.0))
    assert flags["quality"].sum() == sigma["quality"].sum()
    assert not (flags["quality"] & ~sigma["quality"]).any()


def test_nan_signals_are_never_flagged_in_either_mode():
    cols = _cols(50)
    for k in cols:
        cols[k][:5] = np.nan
    for cfg in (SelectConfig(), SelectConfig(mode="budget", budget_fraction=1.0)):
        flags, _, _ = select_flags(cols, cfg)
        for axis, f in flags.items():
            assert not f[:5].any(), (cfg.mode, axis)
    flags, _, _ = select_flags(cols, SelectConfig(mode="budget", budget_fraction=1.0))
    assert flags["diversity"].sum() == 45


def test_ifd_option_adds_quality_flags():
    cols = _cols(100, seed=3)
    cols["ifd"][[3, 7]] = [1.5, 1.2]
    plain, _, _ = select_flags(cols, SelectConfig())
    with_ifd, thr, counts = select_flags(cols, SelectConfig(quality_use_ifd=True, ifd_max=1.0))
    assert with_ifd["quality"][3] and with_ifd["quality"][7]
    np.testing.assert_array_equal(with_ifd["quality"], plain["quality"] | (cols["ifd"] > 1.0))
    assert thr["quality"]["ifd"] == 1.0 and counts["quality_ifd"]["flagged"] == int((cols["ifd"] > 1.0).sum())


def test_worst_first_ties_and_empty():
    assert worst_first(np.array([np.nan, np.nan]), 1).sum() == 0
    np.testing.assert_array_equal(worst_first(np.array([1.0, 3.0, 3.0, 2.0]), 2), [False, True, True, False])
    np.testing.assert_array_equal(worst_first(np.array([1.0, 1.0, 1.0]), 1), [True, False, False])
