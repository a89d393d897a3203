"""The known-answer benchmark, reduced (benchmarks/efficacy.py with the tiny model, 40 Alpaca rows, one seed and
three arms): the real loop on local Ray with refine.engine=openai pointed at the known-answer teacher on
loopback. Guards the accounting, not the figures: every injected defect is still in D_1, replaced by its
original, or replaced by a wrong rewrite that the gate let in, and the rewrite counts add up."""

from __future__ import annotations

import json
import socket

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_round_of_every_arm_accounts_for_every_defect(ray_local, tiny_model, shared_data, tmp_path):
    """Middo's selection, random selection of as many samples, and the oracle (exactly the defective samples),
    each through the real loop's round 1 after a shared round 0 and diagnosis:

    - per arm, defects = remaining + restored + replaced by a wrong rewrite, and rewrites sent = failed at the
      teacher + accepted + rejected by the gate (account() raises otherwise; checked again here);
    - the oracle sends exactly one rewrite per defect and random chooses as many samples as Middo;
    - no meta-text rewrite reaches D_1 (refine.accept_meta_check is on by default);
    - the shared stages ran once: the later arms resumed round 0 and the diagnosis from the first."""
    from middo_ray.audit.efficacy import run_seed, summarize, format_table

    res = run_seed(shared_data / "sft" / "alpaca_5000.json", tmp_path, seed=0, n_train=40, n_heldout=10,
                   fraction=0.25, wrong_share=0.3, arms=("middo", "random", "oracle"), model="tiny",
                   port=_free_port(), mc_path=None, train={"learning_rate": 1e-3, "batch_size": 16, "max_steps": 2},
                   extra={"refine": {"max_new_tokens": 64}, "eval": {"mc_path": None}}, embed=False, ifd=True)
    n_def = res["rows"]["defects"]
    assert n_def == 10
    for arm, a in res["arms"].items():
        assert a["remaining"] + a["restored"] + a["replaced_wrong"] == n_def, (arm, a)
        assert a["sent"] == a["teacher_failed"] + a["accepted"] + a["rejected"], (arm, a)
        assert a["accepted"] >= a["accepted_wrong"] + a["accepted_correct"], (arm, a)
        assert a["restored"] <= a["accepted_correct"] and a["replaced_wrong"] <= a["accepted_wrong"], (arm, a)
        assert a["metrics"]["heldout_loss"] is not None
    oracle = res["arms"]["oracle"]
    assert oracle["selected"] == n_def and oracle["sent"] == n_def and oracle["clean_damaged"] == 0
    assert oracle["defects_selected"] == n_def and res["arms"]["random"]["defects_selected"] <= n_def
    assert oracle["sent_correct"] > 0
    assert res["arms"]["random"]["selected"] == res["arms"]["middo"]["selected"]
    gate = res["gate"]["variants"]["configured"]
    assert gate["wrong_let_through"]["meta"] == 0
    # The rewrites' IFD under M_0 (the tiny model): one value per judged rewrite, and the variants that use it.
    judged = res["gate"]["correct"] + sum(res["gate"]["wrong"].values())
    assert sum(v["n"] for v in res["gate"]["ifd"].values() if v) == judged
    assert "judge+meta+ifd<=1" in res["gate"]["variants"]
    for arm in ("random", "oracle"):
        run = tmp_path / "runs" / f"s0-{arm}"
        assert json.loads((run / "round_0" / "manifest.json").read_text())["resumed"] == ["data", "train", "eval"]
        assert json.loads((run / "round_1" / "manifest.json").read_text())["resumed"] == ["diagnose"]
    summary = summarize([res])
    text = format_table(summary)
    assert "oracle" in text and "judge+meta" in text
    # One seed can show no clear lead on the data or the model: the verdict says so rather than guessing.
    assert summary["verdict"]["data"] is False and summary["verdict"]["model"] is False
    assert "verdict:" in text and "not shown" in text
