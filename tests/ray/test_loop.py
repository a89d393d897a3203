"""The loop on local Ray with the tiny model: run directory contract, rejects, and resume."""

import json
import os

import pyarrow.parquet as pq
import pytest

from middo_ray.config import build_config
from middo_ray.demo import demo_path
from middo_ray.loop import run_loop

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _cfg(tmp_path, port):
    return build_config({
        "run": {"run_id": "t", "output_dir": str(tmp_path)},
        "data": {"path": str(demo_path("seed_with_invalid")), "heldout_fraction": 0.2, "cutoff_len": 96},
        "model": {"base": "tiny"},
        "refine": {"max_new_tokens": 8, "max_retries": 0, "http_port": port},
        "train": {"learning_rate": 1e-3},
        "eval": {"mc_limit": 5},
        "converge": {"max_rounds": 1},
    })


def test_loop_writes_the_run_directory_and_resumes(ray_local, tiny_model, tmp_path):
    """One round leaves every stage's marker, a manifest, rejects with reasons and the final dataset;
    a second run with the same run id redoes no stage (markers untouched) and gives the same summary."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = run_loop(_cfg(tmp_path, port))
    run = tmp_path / "t"
    markers = sorted(run.glob("round_*/*/_SUCCESS"))
    assert {m.parent.name for m in markers} == {"data", "train", "eval", "diagnose", "select", "refine", "merge"}
    rejects = [json.loads(line) for line in (run / "round_0" / "data" / "rejects.jsonl").open()]
    assert len(rejects) == 3 and all(r["reason"] and r["line"] for r in rejects)
    info = json.loads((run / "round_0" / "data" / "stage.json").read_text())
    assert info["rows_in"] == info["train"] + info["heldout"] + info["rejected"]
    manifest = json.loads((run / "round_1" / "manifest.json").read_text())
    assert manifest["converge"]["stop"] and "max_rounds" in manifest["converge"]["reason"]
    # refine.judge=current: round 1's rewrites are judged by M_0, the checkpoint round 1 diagnosed with.
    refine_counts = manifest["stages"]["refine"]["counts"]
    assert refine_counts["judged"] >= 1, "the tiny teacher produced no valid rewrite; the judge went untested"
    m0 = json.loads((run / "round_0" / "manifest.json").read_text())["stages"]["train"]["model_dir"]
    assert refine_counts["judge_model"] == m0
    # ... with the diagnosis' template and cutoff: an original's re-judged quality is its diagnosed quality.
    diagnosed = {r["sample_id"]: r["quality"] for r in pq.read_table(run / "round_1" / "diagnose" / "signals").to_pylist()}
    records = pq.read_table(run / "round_1" / "refine" / "results").to_pylist()
    pairs = [(rec["quality_before"], diagnosed[rec["sample_id"]]) for rec in records
             if rec["quality_before"] is not None]
    assert pairs and all(before == pytest.approx(diag, abs=1e-3) for before, diag in pairs)
    lineage = pq.read_table(run / "final" / "lineage.parquet").to_pylist()
    assert len(lineage) == first["sizes"][-1]
    assert (run / "report.html").is_file()

    stamps = {m: m.read_text() for m in markers}
    ran = json.loads((run / "round_1" / "manifest.json").read_text())["timings"]
    second = run_loop(_cfg(tmp_path, port))
    assert {m: m.read_text() for m in markers} == stamps
    assert second["history"] == first["history"] and second["sizes"] == first["sizes"]
    # The resumed round's manifest keeps the seconds of the run that did the work and names the stages it skipped.
    again = json.loads((run / "round_1" / "manifest.json").read_text())
    assert again["timings"] == ran and all(t > 0 for t in ran.values())
    assert set(again["resumed"]) == set(ran)


@pytest.mark.unit
def test_resume_refuses_a_changed_config(tmp_path):
    """Resuming a run directory with a different config is an error naming the changed section."""
    from middo_ray.rundir import Run

    cfg = _cfg(tmp_path, 8000)
    Run(cfg).open()
    Run(cfg).open()
    cfg.select.quality_m = 2.0
    with pytest.raises(ValueError, match="sections: select"):
        Run(cfg).open()


def test_the_loops_ray_is_its_own_even_where_a_cluster_file_names_another(tmp_path):
    """A `ray start` of someone else's, or a crashed one's stale file in Ray's temp dir, would make a bare
    ray.init() join that cluster (and refuse num_cpus). The loop's init_ray starts a Ray of its own."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
        code = ("import ray\nfrom middo_ray.config import build_config\nfrom middo_ray.rundir import init_ray\n"
                "init_ray(build_config({'ray': {'num_cpus': 1}}))\nprint('CPUS', ray.cluster_resources()['CPU'])\n")
        root = Path(__file__).resolve().parents[2]
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, RAY_TMPDIR=str(temp), PYTHONPATH=str(root)))
        assert proc.returncode == 0 and "CPUS 1.0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
