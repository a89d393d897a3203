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


# ---------------------------------------------------------------------------------------------
# Baseline methods (select.method): random, rank, ids.

def _ids(n):
    return [f"id{i:04d}" for i in range(n)]


def test_random_method_draws_count_samples_fixed_by_seed_and_round():
    """method=random chooses exactly `count` samples; the same seed and round give the same ones, another
    seed others, and the choice does not depend on the dataset's order (it is keyed by sample id)."""
    from middo_ray.select import choose

    cols, ids = _cols(200), _ids(200)
    cfg = SelectConfig(method="random", count=20)
    a, info = choose(cols, ids, cfg, seed=1, round_k=1)
    b, _ = choose(cols, ids, cfg, seed=1, round_k=1)
    c, _ = choose(cols, ids, cfg, seed=2, round_k=1)
    assert a.sum() == 20 and info == {"method": "random", "count": 20, "chosen": 20}
    assert (a == b).all() and not (a == c).all()
    rev, _ = choose({k: v[::-1] for k, v in cols.items()}, ids[::-1], cfg, seed=1, round_k=1)
    assert {i for i, m in zip(ids, a) if m} == {i for i, m in zip(ids[::-1], rev) if m}


def test_rank_method_takes_the_worst_by_one_signal():
    """method=rank flags the `count` worst samples of the ranked signal: highest IFD, lowest judge score,
    lowest kNN similarity, and for complexity the budget mode's ranking (both losses high)."""
    from middo_ray.select import choose

    cols, ids = _cols(100), _ids(100)
    top_ifd, _ = choose(cols, ids, SelectConfig(method="rank", rank_by="ifd", count=5), 0, 1)
    assert set(np.flatnonzero(top_ifd)) == set(np.argsort(-cols["ifd"])[:5])
    low_q, info = choose(cols, ids, SelectConfig(method="rank", rank_by="quality", count=7), 0, 1)
    assert set(np.flatnonzero(low_q)) == set(np.argsort(cols["quality"])[:7]) and info["rank_by"] == "quality"
    sparse, _ = choose(cols, ids, SelectConfig(method="rank", rank_by="diversity", count=3), 0, 1)
    assert set(np.flatnonzero(sparse)) == set(np.argsort(cols["knn_sim"])[:3])
    budget, _, _ = select_flags(cols, SelectConfig(mode="budget", budget_fraction=0.04))
    hard, _ = choose(cols, ids, SelectConfig(method="rank", rank_by="complexity", count=4), 0, 1)
    assert (hard == budget["complexity"]).all()


def test_ids_method_flags_the_listed_ids_and_counts_the_missing(tmp_path):
    """method=ids flags exactly the listed ids present in the data (a JSON list or one per line), and counts
    the ids that are not there; count defaults to budget_fraction x N for random."""
    from middo_ray.select import choose, read_ids

    ids = _ids(10)
    (tmp_path / "a.json").write_text('["id0003", "id0007", "nope"]')
    (tmp_path / "b.txt").write_text("id0003\n\nid0007\n")
    assert read_ids(str(tmp_path / "a.json"))[:2] == read_ids(str(tmp_path / "b.txt"))
    cfg = SelectConfig(method="ids", ids_path=str(tmp_path / "a.json"))
    mask, info = choose(_cols(10), ids, cfg, ids=read_ids(cfg.ids_path))
    assert list(np.flatnonzero(mask)) == [3, 7] and info["ids_missing"] == 1 and info["ids_listed"] == 3
    default, info = choose(_cols(10), ids, SelectConfig(method="random", budget_fraction=0.3))
    assert default.sum() == 3 and info["count"] == 3


def test_method_config_errors_name_the_fix():
    """ids without ids_path, or ids_path with another method, are config errors naming the keys."""
    from middo_ray.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="select.ids_path"):
        build_config({"select": {"method": "ids"}})
    with pytest.raises(ConfigError, match="only read with select.method='ids'"):
        build_config({"select": {"method": "random", "ids_path": "x.json"}})
    assert build_config({}).select.method == "rules"
