"""The README's cluster path: `ray start --head`, `ray job submit` of the loop, outputs checked."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], env: dict, timeout: int, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture()
def ray_head():
    """A real Ray head started with the CLI (token auth on, as `ray start` does), stopped afterwards."""
    env = dict(os.environ)
    # The job's `python` is looked up on the head's PATH: it must be the environment with the project's
    # dependencies (on a cluster the setup commands install them), here the test's own interpreter.
    # Token auth on, with a token of the test's own (a fresh machine has no ~/.ray/auth_token).
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
               PYTHONPATH=str(ROOT),
               RAY_DATA_DISABLE_PROGRESS_BARS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    gcs, dash = _free_port(), _free_port()
    # Ray's socket paths must stay under 107 bytes, so its temp dir gets a short path of its own.
    temp = tempfile.mkdtemp(prefix="mray", dir="/tmp")
    # The node's agents get free ports too: their defaults (52365, ...) are taken when another Ray instance
    # runs on the machine (a developer's, or this test session's local one), and the head then never gets a
    # job agent ("No available agent to submit job").
    agents = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "runtime-env-agent-port", "metrics-export-port")]
    _run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", *agents,
          "--dashboard-host=127.0.0.1", "--num-cpus=4", "--disable-usage-stats",
          f"--temp-dir={temp}"], env, 180)
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_head(temp: str) -> None:
    """Stops only the processes of this head (their command lines name its temp dir).

    `ray stop --force` would kill every Ray instance on the machine, including a developer's own.
    """
    import psutil

    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp in (arg or "") for arg in proc.info["cmdline"] or []):
                ours.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in ours:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_job_submit_runs_the_loop_and_leaves_outputs(ray_head, tmp_path):
    """`ray job submit --working-dir . -- python jobs/middo_job.py --config jobs/tiny.yaml` finishes
    successfully and leaves per-round manifests, the optimized dataset and its lineage.

    One round (``converge.max_rounds=1``): what is under test is the submission path; two rounds of the
    loop run in the cluster tier (tests/cluster), against the pinned results."""
    env, address = ray_head
    out = tmp_path / "runs"
    runtime_env = {"env_vars": {k: env[k] for k in ("MIDDO_CACHE", "HF_HUB_OFFLINE") if k in env}}
    args = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "jobs/middo_job.py", "--config", "jobs/tiny.yaml",
            "--set", f"run.output_dir={out}", "--set", f"refine.http_port={_free_port()}", "--set", "converge.max_rounds=1"]
    t0 = time.time()
    # Right after `ray start` the head's job agent may not be registered yet; the submission is then
    # refused before any job exists, so asking again is safe.
    for _ in range(10):
        proc = _run(args, env, 1400, check=False)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"job failed after {time.time() - t0:.0f}s:\n{log}"
    assert re.search(r"Job '\S+' succeeded", proc.stdout + proc.stderr), log
    run = out / "tiny"
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert summary["rounds"] == 1 and "max_rounds" in summary["stop_reason"]
    for k in (0, 1):
        manifest = json.loads((run / f"round_{k}" / "manifest.json").read_text())
        assert manifest["round"] == k and manifest["versions"]["ray"]
    m1 = json.loads((run / "round_1" / "manifest.json").read_text())
    assert set(m1["flags"]) == {"complexity", "diversity", "quality"}
    assert m1["rows"]["out"] == m1["stages"]["merge"]["out"]
    lineage = pq.read_table(run / "final" / "lineage.parquet").to_pylist()
    assert len(lineage) == summary["sizes"][-1]
    assert {"sample_id", "parent_id", "origin", "round"} <= set(lineage[0])
    assert (run / "final" / "optimized.jsonl").is_file() or (run / "final" / "optimized.json").is_file()
    # The job's log is the loop's console: a line as each stage ends, none of Ray's progress blocks (before
    # the console was quieted, this one round printed about 600 lines, most of them Ray Data's).
    job_log = proc.stdout
    for k, stages in ((0, ("data", "train", "eval")), (1, ("diagnose", "select", "refine", "merge", "train", "eval"))):
        for stage in stages:
            assert re.search(rf"\[round {k}\] {stage}: done in ", job_log), job_log[-4000:]
    assert "Total Progress" not in job_log and "Running Dataset" not in job_log, job_log[-4000:]
    assert len(job_log.splitlines()) < 200, job_log[-4000:]
