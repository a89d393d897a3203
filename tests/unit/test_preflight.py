"""Errors before work: the config's mistakes and the files and folders it names, all reported together by
`middo run` before Ray starts (real CLI processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from middo_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def _middo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="")
    return subprocess.run([sys.executable, "-m", "middo_ray.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _problems(tmp_path: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"run.output_dir={tmp_path / 'runs'}", *overrides], check_files=True)
    return err.value.problems


@pytest.mark.parametrize("content,fragment", [
    (b"", "is empty (no rows)"),
    (b"\n  \n", "is empty (no rows)"),
    (b'{"prompt": "x", "answer": "y"}\n', "cannot tell the format"),
    (b"not json\n[1, 2]\n", "no row that is a JSON object"),
])
def test_an_unreadable_data_file_is_named_before_work(tmp_path, content, fragment):
    """Guards the data file's checks: empty, unknown layout, nothing readable, each one problem naming data.path."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    problems = _problems(tmp_path, f"data.path={path}")
    assert len(problems) == 1 and problems[0].startswith("data.path: ") and fragment in problems[0], problems


def test_every_problem_is_listed_at_once(tmp_path):
    """Guards that field errors, cross-field rules and missing files come in one error: pydantic alone runs no
    cross-section rule while a field is wrong, and the files would only be read once Ray is up."""
    (tmp_path / "file").write_text("x")
    problems = _problems(tmp_path, f"data.path={tmp_path / 'missing.jsonl'}", "train.batch_size=0",
                         "diagnose.knn_k=3", "diagnose.judge=false", f"run.output_dir={tmp_path / 'file' / 'runs'}",
                         f"eval.mc_path={tmp_path / 'mc.jsonl'}", f"data.heldout_path={tmp_path / 'held.csv'}")
    text = "\n".join(problems)
    for fragment in ("train.batch_size", "diagnose.knn_k must be 2", "diagnose.judge is false",
                     "data.path: data file", "run.output_dir: cannot write", "eval.mc_path:",
                     "data.heldout_path: data file"):
        assert fragment in text, (fragment, text)
    assert len(problems) == 7, text


def test_a_valid_config_with_its_files_passes(tmp_path):
    """Guards against false alarms: the demo data and a fresh output folder pass, and nothing is left behind
    but the output folder itself."""
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'runs'}", "run.run_id=x"], check_files=True)
    assert cfg.data.path == "demo"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == []


def test_middo_run_stops_with_exit_2_before_ray_starts(tmp_path):
    """Guards the CLI: a bad data file and a bad field give exit 2 and one listing on stderr, no traceback,
    and no run directory (nothing started)."""
    (tmp_path / "rows.jsonl").write_bytes(b"")
    got = _middo("run", "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.run_id=r",
                 "--set", "data.path=rows.jsonl", "--set", "refine.batch_size=0", cwd=tmp_path)
    assert got.returncode == 2, got.stderr
    assert "Traceback" not in got.stderr and "ray" not in got.stderr.lower().replace("array", "")
    assert "data.path: data file 'rows.jsonl' is empty" in got.stderr and "refine.batch_size" in got.stderr
    assert not (tmp_path / "runs" / "r").exists()


def test_a_second_run_in_the_same_directory_gets_one_line(tmp_path):
    """Guards the run lock's message through the CLI: a run directory held by another live process is refused
    with exit 2, naming the holder, before Ray starts."""
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time, json\n"
        f"fd = os.open({str(run_dir / '_LOCK')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'host': 'h', 'pid': os.getpid(), 'started': 'now'}).encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got = _middo("run", "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.run_id=r", cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert got.returncode == 2, got.stderr[-2000:]
    assert f"pid {holder.pid}" in got.stderr and "Traceback" not in got.stderr
    assert not (run_dir / "config.json").exists()
    assert json.loads((run_dir / "_LOCK").read_text())["pid"] == holder.pid
