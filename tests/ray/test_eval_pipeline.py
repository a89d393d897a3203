"""The evaluation harness end to end on Ray Data with the tiny model: every benchmark, the loop's eval
stage, the manifest keys and the stop rule reading them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from middo_ray.config import EVAL_BENCHMARK_FILES, build_config
from middo_ray.converge import should_stop

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ROWS = [{"sample_id": "a", "instruction": "Name a primary colour.", "input": "", "output": "Red."},
        {"sample_id": "b", "instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5."}]


def _cfg(tmp_path):
    suites = {name: {"limit": 2, "max_new_tokens": 8} for name in EVAL_BENCHMARK_FILES}
    suites["gsm8k"]["few_shot"] = 1
    return build_config({"model": {"base": "tiny"}, "data": {"cutoff_len": 128},
                         "run": {"output_dir": str(tmp_path), "run_id": "t"},
                         "eval": {"mc_limit": 3, "suites": suites, "metric": "gsm8k", "max_prompt_tokens": 1536,
                                  "rows_per_block": 4, "code_timeout_s": 5}})


def test_suite_on_ray_data_feeds_manifest_and_stop_rule(ray_local, tiny_model, tmp_path):
    """Every benchmark runs on Ray Data actors and gives a score in [0, 1] with its count and seconds;
    the held-out loss (read from Parquet shards by Ray Data) equals the direct token-weighted loss; the
    eval stage writes the flat dict and one prediction per scored item; should_stop reads a suite score
    from the recorded history."""
    from middo_ray import evaluate
    from middo_ray.evalsuite.scoring import heldout_loss
    from middo_ray.io.write import write_shards
    from middo_ray.models import load_model
    from middo_ray.rundir import Run

    cfg = _cfg(tmp_path)
    held = write_shards(ROWS, str(tmp_path / "held"), rows_per_shard=1)
    metrics = Run(cfg).open().round(0).run("eval", evaluate, cfg.eval, {"model": "tiny", "heldout": held}).info
    stage_dir = tmp_path / "t" / "round_0" / "eval"
    assert (stage_dir / "_SUCCESS").is_file() and json.loads((stage_dir / "stage.json").read_text()) == metrics
    for name in EVAL_BENCHMARK_FILES:
        assert metrics[f"{name}_n"] == 2, name
        assert 0.0 <= metrics[name] <= 1.0 and metrics[f"{name}_seconds"] > 0, name
    assert metrics["average"] == pytest.approx(np.mean([metrics[n] for n in EVAL_BENCHMARK_FILES]))
    assert metrics["mc_n"] == 3 and 0.0 <= metrics["mc_accuracy"] <= 1.0
    model, tok = load_model(tiny_model, device="cpu")
    direct, tokens = heldout_loss(model, tok, ROWS, "default", 128)
    assert metrics["heldout_n"] == 2 and metrics["heldout_tokens"] == tokens
    assert metrics["heldout_loss"] == pytest.approx(direct, rel=1e-4)

    preds = [json.loads(line) for line in (stage_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * len(EVAL_BENCHMARK_FILES) + 3
    assert {p["suite"] for p in preds} == set(EVAL_BENCHMARK_FILES) | {"mc"}
    gsm = [p for p in preds if p["suite"] == "gsm8k"]
    assert all(p["shots_used"] == 1 and isinstance(p["output"], str) for p in gsm)
    code = [p for p in preds if p["suite"] in ("humaneval", "mbpp")]
    assert all(p["score"] == 0.0 and p["detail"] for p in code)   # random model: its code fails, with a reason

    # The stop rule reads the suite score from the per-round history the loop records.
    better = {**metrics, "gsm8k": metrics["gsm8k"] + 0.5}
    assert should_stop([metrics, better], cfg.converge.model_copy(update={"max_rounds": 9}), "gsm8k", 1, None) \
        == (False, "")
    stop, why = should_stop([better, metrics], cfg.converge.model_copy(update={"max_rounds": 9}), "gsm8k", 1, None)
    assert stop and "plateau: gsm8k" in why
