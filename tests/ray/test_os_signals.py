"""SIGINT and SIGTERM stop `middo run` cleanly: exit 130 / 143 with one line, Ray and the Serve apps shut down
(no process of the driver's session left), the finished stages kept, and the same command continues to the end.
Real driver processes on a local Ray of their own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray.test_resume import _session

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, port: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "middo_ray.cli", "run", "--config", str(ROOT / "jobs" / "tiny.yaml"),
            "--set", f"run.output_dir={out}", "--set", "run.run_id=sig", "--set", "data.max_samples=40",
            "--set", "converge.max_rounds=1", "--set", "train.max_steps=3", "--set", f"refine.http_port={port}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="")
    with open(log, "w") as f:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _signal_when(proc: subprocess.Popen, started: Path, sig: int, log: Path, timeout: float = 600) -> int:
    """Sends ``sig`` to the driver once ``started`` exists; returns its exit code (it must exit by itself)."""
    deadline = time.time() + timeout
    while not started.exists():
        assert proc.poll() is None, f"the driver ended before {started} appeared:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"{started} did not appear:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the driver did not stop within 180 s of {sig!r}:\n{log.read_text()[-3000:]}") from None


def _left(proc: subprocess.Popen, wait_s: float = 60) -> list[int]:
    """Processes of the driver's session still alive after ``wait_s`` (Ray's own included)."""
    deadline = time.time() + wait_s
    while (pids := _session(proc.pid)) and time.time() < deadline:
        time.sleep(0.5)
    for pid in pids:                                  # do not leave them behind for the next test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def test_sigint_and_sigterm_stop_cleanly_and_the_run_continues(tmp_path):
    port = _free_port()
    run = tmp_path / "sig"
    logs = [tmp_path / f"run{i}.log" for i in range(3)]

    first = _start(tmp_path, port, logs[0])
    code = _signal_when(first, run / "round_0" / "train", signal.SIGINT, logs[0])
    out = logs[0].read_text()
    assert code == 130, out[-3000:]
    assert "stopped by SIGINT" in out and "run the same command again" in out
    assert "Traceback" not in out and "Fatal Python error" not in out, out[-3000:]
    assert not _left(first), "processes of the stopped run were still alive a minute later"
    data_marker = run / "round_0" / "data" / "_SUCCESS"
    assert data_marker.is_file() and not (run / "round_0" / "train" / "_SUCCESS").exists()
    stamp = data_marker.stat().st_mtime_ns

    second = _start(tmp_path, port, logs[1])
    code = _signal_when(second, run / "round_1" / "diagnose", signal.SIGTERM, logs[1])
    out = logs[1].read_text()
    assert code == 143, out[-3000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in out and "Fatal Python error" not in out
    assert not _left(second)
    assert (run / "round_0" / "train" / "_SUCCESS").is_file()
    assert not (run / "round_1" / "diagnose" / "_SUCCESS").exists()

    third = _start(tmp_path, port, logs[2])
    assert third.wait(timeout=900) == 0, logs[2].read_text()[-3000:]
    assert (run / "final" / "summary.json").is_file()
    assert data_marker.stat().st_mtime_ns == stamp             # the finished stages were not redone
    assert not _left(third)
