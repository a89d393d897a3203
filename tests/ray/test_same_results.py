"""The streaming data plane gives the results the driver-side loop gave (pinned in tests/golden).

``tests/golden/*.json`` were written by the loop as it was before the data plane moved to Ray Data
(``tests/golden/pin_legacy.py``): per round the signals, flags, refine results and merged dataset, plus the
data split and the final file. These tests run the same configs through today's loop and compare: signals
within 1e-6, everything else identical. The demo case runs on a simulated multi-node cluster
(tests/cluster/test_cluster.py); the 400 Alpaca rows here, on local Ray.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))

from cases import ALPACA, case_tree  # noqa: E402
from compare import assert_same_as_golden, assert_signals_match  # noqa: E402
from extract import extract  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not ALPACA.is_file(), reason=f"{ALPACA} not found (the public data lives beside the project)")
def test_alpaca400_reproduces_the_pinned_results_and_shards_do_not_change_signals(ray_local, tiny_model, tmp_path):
    """400 Alpaca rows, one round: the same data split, signals (1e-6), flags, refine results, D_1 and final
    file as the pinned driver-side run. Cut into shards of 64 rows, the data split, signals and flags
    stay the same (refine requests are planned per shard, so the rewrites themselves may differ)."""
    from middo_ray import data, diagnose, select
    from middo_ray.config import build_config
    from middo_ray.loop import run_loop
    from middo_ray.rundir import Run

    want = json.loads((GOLDEN / "alpaca400.json").read_text())
    tree = case_tree("alpaca400", tmp_path, _free_port())
    run_loop(build_config(tree))
    assert_same_as_golden(extract(tmp_path / "alpaca400", 1), want)

    m0 = json.loads((tmp_path / "alpaca400" / "round_0" / "train" / "stage.json").read_text())["model_dir"]
    tree["run"]["run_id"] = "sharded"
    tree["data"]["rows_per_shard"] = 64         # the JSON list is parsed whole, then cut into shards
    cfg = build_config(tree)
    run = Run(cfg).open()
    d = run.round(0).run("data", data, cfg.data).output
    assert len(d.train.names) > 4
    diag = run.round(1).run("diagnose", diagnose, cfg.diagnose, {"dataset": d.train, "model": m0}).output
    sel = run.round(1).run("select", select, cfg.select, {"diagnosis": diag}).output
    from extract import _rows  # noqa: E402
    from cases import digest_rows, signal_record  # noqa: E402

    assert digest_rows(_rows(d.train)) == want["data"]["train"]
    signals = [r for name in diag.signals.names for r in diag.table(name).to_pylist()]
    assert_signals_match({r["sample_id"]: signal_record(r) for r in signals}, want["rounds"][0]["signals"], "sharded")
    assert {r["sample_id"]: [r["complexity"], r["diversity"], r["quality"]] for r in _rows(sel)} \
        == want["rounds"][0]["flags"]

    # The budget mode on the shards (scores per shard, cut-offs from a Ray Data sort) flags exactly what the
    # same rules flag on the columns in memory, ties at the cut-off included.
    from middo_ray.select import select_flags

    budget = cfg.select.model_copy(update={"mode": "budget", "budget_fraction": 0.05})
    got = run.round(2).run("select", select, budget, {"diagnosis": diag})
    flags, thresholds, counts = select_flags(diagnose.collect(diag).columns, budget)
    rows = _rows(got.output)
    for axis in ("complexity", "diversity", "quality"):
        assert [r[axis] for r in rows] == flags[axis].tolist(), axis
        assert got.info["thresholds"][axis]["severity_cutoff"] == pytest.approx(thresholds[axis]["severity_cutoff"])
    assert 0 < got.info["counts"]["any"]["flagged"] == counts["any"]["flagged"]
