"""Merge by id with lineage, refine-job building, and the stop rules."""

import numpy as np
import pytest

from middo_ray.config import ConvergeConfig
from middo_ray.converge import best_round, should_stop
from middo_ray.merge import _duplicates_task, merge_shard
from middo_ray.refine import build_jobs
from middo_ray.schema import make_row

pytestmark = pytest.mark.unit


def _rows(n):
    return [make_row(f"question {i}", f"answer {i}") for i in range(n)]


def _signals(rows):
    return {r["sample_id"]: {"loss_pre": float(i), "loss_cur": float(i), "knn_sim": 1.0, "quality": 5.0,
                             "q_prompt_clarity": 5.0} for i, r in enumerate(rows)}


def test_jobs_and_merge_follow_the_reference_semantics():
    """Hard/low-quality rewrites replace their parent; sparse parents stay and gain a child;
    a failed rewrite keeps the original; lineage points at the parent."""
    rows = _rows(5)
    flags = {"complexity": np.array([1, 0, 0, 0, 1], bool), "quality": np.array([0, 1, 0, 0, 1], bool),
             "diversity": np.array([0, 0, 1, 0, 0], bool)}
    hints = {rows[2]["sample_id"]: ["question 1", "question 2"]}
    jobs = build_jobs(rows, flags, hints)
    assert [j["operation"] for j in jobs] == ["simplify", "improve", "synthesize", "simplify", "improve"]
    assert jobs[2]["hints"] == ["question 1", "question 2"]
    results = [
        {"status": "ok", "instruction": "easy 0", "input": "", "output": "a0"},
        {"status": "failed", "reason": "marker missing"},
        {"status": "ok", "instruction": "new 2", "input": "", "output": "a2"},
        {"status": "ok", "instruction": "easy 4", "input": "", "output": "a4"},
        {"status": "ok", "instruction": "better 4", "input": "", "output": "b4"},
    ]
    out, events, counts = merge_shard(rows, jobs, results, 1, _signals(rows), {"complexity": {"loss_pre": 1.0}}, set())
    texts = [r["instruction"] for r in out]
    assert texts == ["easy 0", "question 1", "question 2", "new 2", "question 3", "easy 4", "better 4"]
    assert counts["replaced"] == 2 and counts["added"] == 1 and counts["kept_after_failure"] == 1
    child = out[0]
    assert child["parent_id"] == rows[0]["sample_id"] and child["origin"] == "complexity" and child["round"] == 1
    assert '"loss_pre": 0.0' in child["trigger"]
    assert events[1]["status"] == "failed" and events[1]["reason"] == "marker missing"
    assert len({r["sample_id"] for r in out}) == len(out)


def test_merge_drops_duplicate_children(tmp_path):
    """A rewrite identical to an existing sample (of any shard), or to an earlier rewrite, is found by the
    duplicate check and dropped by the merge, so ids stay unique."""
    import pyarrow.parquet as pq

    from middo_ray.io.write import write_shards
    from middo_ray.refine import _result_table

    rows = _rows(3)
    data = write_shards(rows, str(tmp_path / "d"), rows_per_shard=2)            # shards of 2 and 1 rows
    flags = {"complexity": np.zeros(3, bool), "quality": np.zeros(3, bool), "diversity": np.array([1, 0, 1], bool)}
    jobs = build_jobs(rows, flags, {})
    same = {"status": "ok", "instruction": "question 1", "input": "", "output": "answer 1"}   # = row 1
    fresh = {"status": "ok", "instruction": "new", "input": "", "output": "x"}
    tables = [_result_table(jobs[:1], [same]), _result_table(jobs[1:], [fresh])]
    paths = []
    for i, t in enumerate(tables):
        paths.append(str(tmp_path / f"r{i}.parquet"))
        pq.write_table(t, paths[-1])
    assert _duplicates_task(data.paths(), paths, str(tmp_path / "dups.parquet")) == 1
    dropped = pq.read_table(tmp_path / "dups.parquet").to_pylist()
    assert dropped == [{"shard": 0, "position": 0}]
    out, events, counts = merge_shard(rows[:2], jobs[:1], [same], 1, _signals(rows), {}, {0})
    assert len(out) == 2 and counts["duplicates_dropped"] == 1 and events[0]["status"] == "duplicate"
    # The same new sample twice: the second is the duplicate.
    tables = [_result_table(jobs[:1], [fresh]), _result_table(jobs[1:], [fresh])]
    for path, t in zip(paths, tables):
        pq.write_table(t, path)
    assert _duplicates_task(data.paths(), paths, str(tmp_path / "dups.parquet")) == 1
    assert pq.read_table(tmp_path / "dups.parquet").to_pylist() == [{"shard": 1, "position": 0}]


def test_merge_rejects_misaligned_results():
    with pytest.raises(ValueError, match="refine results"):
        merge_shard(_rows(1), [{"operation": "simplify", "sample_id": "x"}], [], 1, {}, {}, set())


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
