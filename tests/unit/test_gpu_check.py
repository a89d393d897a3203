"""The GPU check script runs every part end to end on CPU, with only torch and transformers importable.

``benchmarks/gpu_check.py`` is meant to be copied to a GPU machine that has torch and transformers and
nothing else of this project's stack, and run once in a few minutes of rented time: a part that breaks
there is a lost run. This test runs its ``--smoke`` mode (the same code paths: diagnosis pass bf16 vs fp32,
shared-prefix judge vs full prompts, a training step, the same step under FSDP2 on a one-rank gloo group)
in a subprocess where Ray, pyarrow, pydantic, vLLM, peft and accelerate cannot be imported, and checks the
JSON it writes.

Why the FSDP part must succeed too: the project trains with FSDP2 on CPU over gloo (``train.strategy=fsdp``,
``tests/ray/test_train.py``), so on this torch it runs; the only accepted exception is a torch build
without ``torch.distributed`` at all, which the script records as ``unavailable``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# What a bare GPU machine lacks: made unimportable (None in sys.modules) before the script starts.
BLOCKED = ("ray", "pyarrow", "pydantic", "vllm", "peft", "accelerate", "pandas", "faiss")
LAUNCH = (
    "import runpy, sys\n"
    "for name in {blocked!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv = [{script!r}] + sys.argv[1:]\n"
    "runpy.run_path({script!r}, run_name='__main__')\n"
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    code = LAUNCH.format(blocked=BLOCKED, script=str(SCRIPT))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, f"gpu_check --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    result["_test_seconds"] = seconds
    result["_stdout"] = proc.stdout
    return result


def test_every_part_runs_without_ray_or_pyarrow(smoke):
    """All four parts ran (FSDP: unless torch has no distributed package) and no blocked module was needed."""
    parts = smoke["parts"]
    assert set(parts) == {"diagnosis", "judge", "train", "train_fsdp"}
    for name in ("diagnosis", "judge", "train"):
        assert parts[name]["status"] == "ok", (name, parts[name].get("error"), parts[name].get("traceback"))
    fsdp = parts["train_fsdp"]
    if fsdp["status"] == "unavailable":
        import torch.distributed as dist

        assert not dist.is_available(), f"FSDP recorded unavailable on a torch with distributed: {fsdp['error']}"
    else:
        assert fsdp["status"] == "ok", (fsdp.get("error"), fsdp.get("traceback"))
        assert fsdp["backend"] == "gloo" and fsdp["fsdp_units"] >= 1
    assert smoke["modules_loaded"] == []
    # pyarrow blocked: the trainer's modules were loaded without the Ray stage's package __init__.
    assert parts["train"]["train_modules"].startswith("modules without the package __init__")
    assert smoke["smoke"] is True and smoke["device"]["type"] == "cpu"


def test_diagnosis_losses_agree(smoke):
    """bf16 (or fp32 where bf16 cannot run) per-sample losses match fp32 and rank the rows the same."""
    d = smoke["parts"]["diagnosis"]
    loss = d["loss"]
    assert loss["compared"] == loss["rows"] == d["rows"] > 0 and loss["missing_mismatch"] == 0
    assert d["same_response_token_counts"]
    assert loss["max_rel"] < 0.01 and loss["max_abs"] < 0.05
    assert loss["spearman"] > 0.95
    assert d["embedding"]["min_cosine"] > 0.999
    assert d["low"]["tokens_per_s"] > 0 and d["fp32"]["tokens_per_s"] > 0


def test_judge_shared_prefix_equals_full_prompts(smoke):
    """The KV-cache judge gives the full-prompt scores: to float noise in fp32, closely in bf16."""
    j = smoke["parts"]["judge"]
    assert j["scores_fp32"]["missing_mismatch"] == 0 and j["scores_low"]["missing_mismatch"] == 0
    # A score is missing where the judge gives the digits < 1e-4 of its mass; the comparison must compare.
    assert j["scores_fp32"]["compared"] == j["scores_fp32"]["scores"] > 0
    assert j["scores_fp32"]["max_abs"] < 1e-4          # a 0-10 score
    assert j["scores_low"]["max_abs"] < 0.05
    assert j["shared"]["judgements_per_s"] > 0 and j["full"]["judgements_per_s"] > 0
    assert j["shared"]["decoder_tokens"] < j["full"]["decoder_tokens"]


def test_training_steps_and_no_mfu_on_cpu(smoke):
    """Training runs timed steps with finite losses; FSDP on one rank matches the plain step; MFU is null."""
    for name in ("train", "train_fsdp"):
        t = smoke["parts"][name]
        if t["status"] == "unavailable":
            continue
        assert t["tokens_per_s"] > 0 and t["timed_steps"] >= 1 and t["losses_finite"]
        assert all(math.isfinite(x) for x in t["losses"])
        assert t["mfu"] is None and t["peak_memory_bytes"] is None
    fsdp = smoke["parts"]["train_fsdp"]
    if fsdp["status"] == "ok":
        assert fsdp["max_loss_diff_vs_plain"] < 1e-3
    assert smoke["parts"]["diagnosis"]["low"]["mfu"] is None and smoke["peak_tflops"] is None
    assert [g["pass"] for g in smoke["goals"]] == [None, None, None]
    assert set(smoke["memory"]) >= {"diagnosis", "judge", "train", "train_fsdp"}
    assert "goal diagnosis MFU" in smoke["_stdout"]
