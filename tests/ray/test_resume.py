"""A stage killed part-way resumes from its committed shards: real driver processes, SIGKILLed mid-stage.

The driver (tests/ray/resume_job.py) runs on a local Ray of its own; the test kills its whole session
(driver, GCS, raylet, workers) at once, as a lost machine would. Each rerun of the same command must
leave the shards the killed run committed untouched, redo only the others, and, in refine, send no
request whose answer the killed run had cached.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

JOB = Path(__file__).resolve().parent / "resume_job.py"
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir: Path, upto: str, port: int, log: Path) -> subprocess.Popen:
    """The driver, its output in ``log`` (a file: a pipe nobody reads would fill up and stall it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(JOB), str(run_dir), upto, str(port)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _session(sid: int) -> list[int]:
    """The pids of the live processes in session ``sid`` (Ray's workers lead process groups of their own, so
    killing the driver's group would leave them running, and writing, for a moment after the kill)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILLs every process of the driver's session (driver, GCS, raylet, workers) and waits until none is
    left, so nothing of the killed run writes after this returns."""
    deadline = time.time() + timeout
    while (pids := _session(proc.pid)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.poll()
        time.sleep(0.2)
    proc.wait(timeout=timeout)
    assert not _session(proc.pid), f"processes of the killed run still alive: {_session(proc.pid)}"


def _kill_when(proc: subprocess.Popen, log: Path, shard_dir: Path, n: int, timeout: float = 600) -> list[Path]:
    """SIGKILLs the driver's whole session once ``n`` shards are committed in ``shard_dir``; returns them."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = sorted(shard_dir.glob("part-*.parquet"))
        if len(done) >= n:
            _kill_session(proc)
            return done
        time.sleep(0.1)
    raise AssertionError(f"the driver ended (rc {proc.returncode}) before {n} shards were committed in "
                         f"{shard_dir}:\n{log.read_text()[-3000:]}")


def _finish(proc: subprocess.Popen, log: Path) -> str:
    proc.wait(timeout=900)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def _stamps(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def _ids(paths) -> list[str]:
    return [s for p in paths for s in pq.read_table(p, columns=["sample_id"]).column(0).to_pylist()]


def _cache_calls(cache: Path, method: str) -> set[str]:
    return {p.stem for p in cache.rglob("*.json") if json.loads(p.read_text())["about"].get("method") == method}


def _summaries(paths) -> list[dict]:
    return [json.loads(pq.ParquetFile(p).schema_arrow.metadata[b"middo"]) for p in paths]


def test_diagnosis_and_refine_killed_part_way_resume_from_their_committed_shards(tmp_path):
    """Three runs of the same command on one run directory, the first two SIGKILLed.

    1. killed after 3 of diagnosis' 15 shards;
    2. resumes diagnosis: the 3 committed files stay as they were (same inode and mtime), the rerun scores
       only the others and every row is in the signals exactly once, in dataset order; then killed after 2
       shards of refine's rewrites;
    3. finishes refine: the 2 committed rewrite shards stay as they were, and every request the killed run
       got an answer to comes from the LLM-call cache: the rerun calls the teacher only for requests it had
       not answered (its calls equal the new cache entries), and the stage completes.
    """
    import re

    port = _free_port()
    r1 = tmp_path / "r" / "round_1"
    signals, rewrites, cache = r1 / "diagnose" / "signals", r1 / "refine" / "rewrites", tmp_path / "r" / "cache" / "llm"
    logs = [tmp_path / f"run{i}.log" for i in (1, 2, 3)]

    committed = _kill_when(_start(tmp_path, "refine", port, logs[0]), logs[0], signals, 3)
    before = _stamps(committed)
    assert not (signals.parent / "_SUCCESS").exists()

    committed_rw = _kill_when(_start(tmp_path, "refine", port, logs[1]), logs[1], rewrites, 2)
    out = logs[1].read_text()
    found = re.search(r"diagnose: (\d+) of (\d+) shards already committed \(resumed\)", out)
    assert found and int(found.group(1)) >= len(committed) and int(found.group(1)) < int(found.group(2)), out[-3000:]
    assert _stamps(committed) == before
    assert (signals.parent / "_SUCCESS").is_file()
    train = tmp_path / "r" / "round_0" / "data" / "train"
    assert _ids(sorted(signals.glob("part-*.parquet"))) == _ids(sorted(train.glob("part-*.parquet")))

    before_rw = _stamps(committed_rw)
    answered = _cache_calls(cache, "refine")
    out = _finish(_start(tmp_path, "refine", port, logs[2]), logs[2])
    # The driver's last JSON line (Ray's own log lines, forwarded asynchronously, may come after it).
    counts = json.loads(next(line for line in reversed(out.strip().splitlines()) if line.startswith("{")))
    assert _stamps(committed_rw) == before_rw
    redone = [p for p in sorted(rewrites.glob("part-*.parquet")) if p not in before_rw]
    assert redone, "every shard was committed before the kill; kill earlier"
    calls_now = sum(s["cache_misses"] for s in _summaries(redone))
    assert calls_now == len(_cache_calls(cache, "refine") - answered)
    assert sum(s["cache_hits"] for s in _summaries(redone)) >= len(answered) - sum(
        s["cache_misses"] for s in _summaries(committed_rw))
    assert counts["jobs"] > 0 and counts["requests"] >= calls_now
    assert (r1 / "refine" / "_SUCCESS").is_file()
