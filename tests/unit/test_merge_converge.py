"""Merge by id with lineage, refine-job building, and the stop rules."""

import numpy as np
import pytest

from middo_ray.config import ConvergeConfig
from middo_ray.converge import best_round, should_stop
from middo_ray.merge import build_jobs, merge_round
from middo_ray.schema import make_row

pytestmark = pytest.mark.unit


def _rows(n):
    return [make_row(f"question {i}", f"answer {i}") for i in range(n)]


def _cols(n):
    return {"loss_pre": np.arange(n, dtype=float), "loss_cur": np.arange(n, dtype=float),
            "knn_sim": np.ones(n), "quality": np.full(n, 5.0), "q_prompt_clarity": np.full(n, 5.0)}


def test_jobs_and_merge_follow_the_reference_semantics():
    """Hard/low-quality rewrites replace their parent; sparse parents stay and gain a child;
    a failed rewrite keeps the original; lineage points at the parent."""
    rows = _rows(5)
    flags = {"complexity": np.array([1, 0, 0, 0, 1], bool), "quality": np.array([0, 1, 0, 0, 1], bool),
             "diversity": np.array([0, 0, 1, 0, 0], bool)}
    nbr = np.array([[1, 2]] * 5)
    jobs = build_jobs(rows, flags, nbr)
    assert [j["operation"] for j in jobs] == ["simplify", "improve", "synthesize", "simplify", "improve"]
    assert jobs[2]["hints"] == ["question 1", "question 2"]
    results = [
        {"status": "ok", "instruction": "easy 0", "input": "", "output": "a0"},
        {"status": "failed", "reason": "marker missing"},
        {"status": "ok", "instruction": "new 2", "input": "", "output": "a2"},
        {"status": "ok", "instruction": "easy 4", "input": "", "output": "a4"},
        {"status": "ok", "instruction": "better 4", "input": "", "output": "b4"},
    ]
    out, events, counts = merge_round(rows, jobs, results, 1, _cols(5), {"complexity": {"loss_pre": 1.0}})
    texts = [r["instruction"] for r in out]
    assert texts == ["easy 0", "question 1", "question 2", "new 2", "question 3", "easy 4", "better 4"]
    assert counts["replaced"] == 2 and counts["added"] == 1 and counts["kept_after_failure"] == 1
    child = out[0]
    assert child["parent_id"] == rows[0]["sample_id"] and child["origin"] == "complexity" and child["round"] == 1
    assert '"loss_pre": 0.0' in child["trigger"]
    assert events[1]["status"] == "failed" and events[1]["reason"] == "marker missing"
    assert len({r["sample_id"] for r in out}) == len(out)


def test_merge_drops_duplicate_children():
    """A rewrite identical to an existing sample is dropped, so ids stay unique."""
    rows = _rows(2)
    flags = {"complexity": np.zeros(2, bool), "quality": np.zeros(2, bool), "diversity": np.array([1, 0], bool)}
    jobs = build_jobs(rows, flags, np.array([[1, 1], [0, 0]]))
    out, events, counts = merge_round(rows, jobs, [{"status": "ok", "instruction": "question 1",
                                                     "input": "", "output": "answer 1"}], 1, _cols(2), {})
    assert len(out) == 2 and counts["duplicates_dropped"] == 1 and events[0]["status"] == "duplicate"


def test_merge_rejects_misaligned_results():
    with pytest.raises(ValueError, match="refine results"):
        merge_round(_rows(1), [{"index": 0, "operation": "simplify", "sample_id": "x"}], [], 1, _cols(1), {})


def test_stop_rules():
    """max rounds, plateau (lower-is-better loss) and flagged fraction each stop with a reason."""
    cfg = ConvergeConfig(max_rounds=3, patience=1, min_delta=0.01)
    assert should_stop([{"heldout_loss": 2.0}, {"heldout_loss": 1.5}], cfg, "heldout_loss", 1, 0.3) == (False, "")
    stop, why = should_stop([{"heldout_loss": 2.0}, {"heldout_loss": 1.995}], cfg, "heldout_loss", 1, 0.3)
    assert stop and "plateau" in why
    stop, why = should_stop([{"mc_accuracy": 0.2}, {"mc_accuracy": 0.3}, {"mc_accuracy": 0.4}, {"mc_accuracy": 0.5}],
                            cfg, "mc_accuracy", 3, 0.3)
    assert stop and "max_rounds" in why
    cfg2 = ConvergeConfig(min_flagged_fraction=0.05)
    stop, why = should_stop([{"heldout_loss": 2.0}], cfg2, "heldout_loss", 1, 0.01)
    assert stop and "flagged fraction" in why
    assert best_round([{"heldout_loss": 2.0}, {"heldout_loss": 1.0}, {"heldout_loss": 1.5}], "heldout_loss") == 1
