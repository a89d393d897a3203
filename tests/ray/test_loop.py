"""The loop on local Ray with the tiny model: run directory contract, rejects, resume, metrics, run lock."""

import json
import os

import pyarrow.parquet as pq
import pytest

from middo_ray.loop import run_loop
from middo_ray.rundir import read_lock
from tests.conftest import loop_run_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _cfg(tmp_path, port):
    return loop_run_config(tmp_path, port)


def test_loop_writes_the_run_directory_and_resumes(loop_run):
    """Two rounds leave every stage's marker, manifests, rejects with reasons and the final dataset;
    a second run with the same run id redoes no stage (markers untouched) and gives the same summary."""
    run, first, port = loop_run
    markers = sorted(run.glob("round_*/*/_SUCCESS"))
    assert {m.parent.name for m in markers} == {"data", "train", "eval", "diagnose", "select", "refine", "merge"}
    assert {m.parent.parent.name for m in markers} == {"round_0", "round_1", "round_2"}
    # Every bad row (the demo's 3 and the corpus of tests/corpus) is a reject with its file, line and reason.
    rejects = {r["line"]: r for r in map(json.loads, (run / "round_0" / "data" / "rejects.jsonl").open())}
    corpus = {int(k): v for k, v in json.loads((run.parent / "bad_rows.json").read_text()).items()}
    assert set(rejects) == {3, 5, 7} | set(corpus)
    assert all(fragment in rejects[line]["reason"] for line, fragment in corpus.items())
    assert {r["file"] for r in rejects.values()} == {str(run.parent / "seed.jsonl")}
    info = json.loads((run / "round_0" / "data" / "stage.json").read_text())
    assert info["rows_in"] == info["train"] + info["heldout"] + info["rejected"] == 68 + len(corpus) + 1
    assert not json.loads((run / "round_1" / "manifest.json").read_text())["converge"]["stop"]
    manifest = json.loads((run / "round_2" / "manifest.json").read_text())
    assert manifest["converge"]["stop"] and "max_rounds" in manifest["converge"]["reason"]
    # refine.judge=current: round 1's rewrites are judged by M_0, the checkpoint round 1 diagnosed with.
    r1 = json.loads((run / "round_1" / "manifest.json").read_text())
    refine_counts = r1["stages"]["refine"]["counts"]
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
    # The last stage's progress record says it finished; the run lock is free again.
    progress = json.loads((run / "progress.json").read_text())
    assert (progress["round"], progress["stage"]) == (2, "eval") and progress["state"] == "done"
    lock = read_lock(str(run))
    assert lock is not None and lock["pid"] == os.getpid() and not lock["active"]

    stamps = {m: m.read_text() for m in markers}
    ran = {k: json.loads((run / f"round_{k}" / "manifest.json").read_text())["timings"] for k in (1, 2)}
    second = run_loop(_cfg(run.parent, port))
    assert {m: m.read_text() for m in markers} == stamps
    assert second["history"] == first["history"] and second["sizes"] == first["sizes"]
    # The resumed rounds' manifests keep the seconds of the run that did the work and name the stages skipped.
    for k in (1, 2):
        again = json.loads((run / f"round_{k}" / "manifest.json").read_text())
        assert again["timings"] == ran[k] and all(t > 0 for t in ran[k].values())
        assert set(again["resumed"]) == set(ran[k])


def test_the_loop_exports_its_metrics_through_ray(loop_run):
    """The loop's metrics reach the node's Prometheus endpoint (Ray's metrics agent) with their tags and the
    numbers of the run's records."""
    import time
    import urllib.request

    import ray

    run, summary, _ = loop_run
    port = ray._private.worker._global_node.metrics_export_port
    r2 = json.loads((run / "round_2" / "manifest.json").read_text())
    accepted = sum(json.loads((run / f"round_{k}" / "manifest.json").read_text())["stages"]["refine"]["ok"]
                   for k in (1, 2))
    expected = {("ray_middo_round", ()): 2, ("ray_middo_stage_rows", (("stage", "merge"),)): r2["rows"]["out"],
                ("ray_middo_rewrites_total", (("result", "accepted"),)): accepted,
                **{("ray_middo_flags", (("axis", axis),)): n for axis, n in r2["flags"].items()}}
    wanted = {"ray_middo_stage_seconds", "ray_middo_tokens_total", "ray_middo_rows_total", "ray_middo_metric"}
    series: dict = {}
    deadline = time.time() + 60     # the agent exports every few seconds; a value set just now may lag one export
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        series = _parse_prometheus(text, run_id="t")
        loss = series.get(("ray_middo_metric", (("name", "heldout_loss"),)))
        if wanted <= {name for name, _ in series} and all(series.get(k) == v for k, v in expected.items()) \
                and loss == pytest.approx(summary["history"][-1]["heldout_loss"]):
            break
        time.sleep(2)
    assert wanted <= {name for name, _ in series}, sorted({name for name, _ in series})
    assert {k: series.get(k) for k in expected} == expected
    assert series[("ray_middo_metric", (("name", "heldout_loss"),))] == pytest.approx(
        summary["history"][-1]["heldout_loss"])


def _parse_prometheus(text: str, run_id: str) -> dict:
    """{(name, ((tag, value), ...)): value} of the series whose run_id tag is ``run_id`` (other tags dropped
    but for stage, axis, result, name)."""
    import re

    out = {}
    for line in text.splitlines():
        m = re.match(r'^(\w+)\{(.*)\} ([0-9.eE+-]+)$', line)
        if not m or not m.group(1).startswith("ray_middo_"):
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if tags.get("run_id") != run_id:
            continue
        key = tuple(sorted((k, v) for k, v in tags.items() if k in ("stage", "axis", "result", "name")))
        out[(m.group(1), key)] = float(m.group(3))
    return out


def test_one_run_per_run_directory(tmp_path):
    """A second run in a directory a live process holds is refused, naming the holder; once that process
    is gone (SIGKILL: no clean-up ran) the lock it left is taken over."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from middo_ray.rundir import Run, RunLocked

    root = Path(__file__).resolve().parents[2]
    code = ("import sys, time\nfrom tests.conftest import loop_run_config\nfrom middo_ray.rundir import Run\n"
            "Run(loop_run_config(sys.argv[1], 8000)).open()\nprint('HELD', flush=True)\ntime.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(root)))
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(RunLocked, match=rf"in use by another run \(host .+, pid {holder.pid},"):
            Run(_cfg(tmp_path, 8000)).open()
        assert read_lock(str(tmp_path / "t"))["active"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert not read_lock(str(tmp_path / "t"))["active"]
    run = Run(_cfg(tmp_path, 8000)).open()
    try:
        assert read_lock(str(tmp_path / "t"))["pid"] == os.getpid()
    finally:
        run.close()


@pytest.mark.unit
def test_resume_refuses_a_changed_config(tmp_path):
    """Resuming a run directory with a different config is an error naming the changed setting, its old and new
    value; a setting the saved config lacks (added by a newer version) counts only when it is not at its
    default, and where the run runs (run, ray) and where its services listen (ports, the teacher's address)
    do not count."""
    import json

    from middo_ray.rundir import Run

    cfg = _cfg(tmp_path, 8000)
    run = Run(cfg).open()
    run.close()
    Run(cfg).open().close()
    saved = tmp_path / "t" / "config.json"
    older = json.loads(saved.read_text())
    del older["select"]["budget_fraction"], older["refine"]["max_consecutive_failures"]
    older["train"]["a_setting_since_removed"] = 1
    saved.write_text(json.dumps(older))
    cfg.ray.num_cpus = 1
    cfg.refine.http_port, cfg.refine.openai_base_url = 8123, "http://127.0.0.1:9/v1"
    Run(cfg).open().close()                                  # settings new since, at their defaults; other ports
    saved.write_text(json.dumps(older))
    cfg.select.quality_m = 2.0
    cfg.select.budget_fraction = 0.3
    with pytest.raises(ValueError, match=r"\(select\.quality_m: 1\.0 -> 2\.0; select\.budget_fraction: not set -> "
                                         r"0\.3\); its finished stages would not match"):
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
