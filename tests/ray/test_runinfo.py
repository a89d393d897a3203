"""`middo status`, `middo show` and `middo diff` on a real run directory: a finished 2-round run of the loop,
and copies of it made to look cut off in round 2's refine stage (dead lock pid) or still running (live pid).

The numbers the commands print are checked against what the stages recorded (stage.json, manifests,
Parquet shards, final/summary.json), through the real CLI."""

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from middo_ray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

CUT_STAGES = ("refine", "merge", "train", "eval")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    """``middo <argv>`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _json(capsys, *argv) -> dict:
    rc, out, err = _cli(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def _record(run: Path, k: int, stage: str) -> dict:
    return json.loads((run / f"round_{k}" / stage / "stage.json").read_text())


def _cut_copy(run: Path, dest: Path, pid: int) -> Path:
    """A copy of ``run`` as a run killed in round 2's refine stage leaves it: no final/, round 2's last four
    stages without their markers, and the run's lock file naming ``pid`` (free: no process holds it)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "final")
    for stage in CUT_STAGES:
        (dest / "round_2" / stage / "_SUCCESS").unlink()
    (dest / "_LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                            "started": "2026-01-01T00:00:00+00:00", "run_id": "t"}))
    return dest


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# A process that holds a run directory's lock as a running loop does (rundir.RunLock: an exclusive flock on
# _LOCK, the file naming its holder), until it is killed.
HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"host": sys.argv[2], "pid": int(sys.argv[3]) or os.getpid(), "run_id": "t",
                         "started": "2026-01-01T00:00:00+00:00"}).encode())
print("held", flush=True)
time.sleep(600)
"""


@contextmanager
def _held_lock(run_dir: Path, host: str | None = None, pid: int = 0):
    """The run lock of ``run_dir`` held by a live process of ours, naming ``host`` and ``pid`` (default: its own)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / "_LOCK"), host or socket.gethostname(),
                             str(pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_status_of_a_finished_run_matches_its_records(loop_run, capsys):
    """status: state and stop reason as final/summary.json says, each round's rows, flags and metric as the
    manifests say, and the stop decision recomputed with converge.should_stop equal to the loop's own."""
    run, summary, _ = loop_run
    info = _json(capsys, "status", run)
    assert info["state"] == "finished" and info["position"] is None
    if (run / "_LOCK").exists():                   # the lock file stays, naming this (live) session: not held
        assert info["lock"]["held"] is False
    assert info["final"]["stop_reason"] == summary["stop_reason"]
    rules = info["stop_rules"]
    assert rules["decision"] == {"after_round": summary["rounds"], "stop": True, "reason": summary["stop_reason"]}
    assert rules["max_rounds"] == {"limit": 2, "done": 2, "fired": True}      # loop_run: converge.max_rounds=2
    assert rules["plateau"]["fired"] == ("plateau" in summary["stop_reason"])
    assert rules["plateau"]["best_round"] == summary["best_round"]
    metric = summary["metric"]
    assert [r["round"] for r in info["rounds"]] == [0, 1, 2]
    for r in info["rounds"]:
        k = r["round"]
        assert r["done"] and r["rows_out"] == summary["sizes"][k]
        assert r["metric"] == pytest.approx(summary["history"][k][metric])
        manifest = json.loads((run / f"round_{k}" / "manifest.json").read_text())
        for stage, seconds in manifest["timings"].items():
            assert r["stages"][stage]["seconds"] == pytest.approx(seconds, abs=0.01)
        if k:
            assert r["flags"] == manifest["flags"]
            assert r["flagged_fraction"] == pytest.approx(manifest["selection"]["any"]["fraction"])
            assert r["converge"] == manifest["converge"]
    rejects = (run / "round_0" / "data" / "rejects.jsonl").read_text().splitlines()
    assert info["rounds"][0]["data"]["rejected"] == len(rejects) == _record(run, 0, "data")["rejected"]
    # The text, through the installed entry point's module as a user runs it.
    proc = subprocess.run([sys.executable, "-m", "middo_ray.cli", "status", str(run)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "finished after 2 round(s)" in text and summary["stop_reason"][:60] in text.replace("\n             ", " ")
    r1 = info["rounds"][1]
    assert f"{r1['rows_in']} -> {r1['rows_out']}" in text
    assert "/".join(str(r1["flags"][a]) for a in ("complexity", "diversity", "quality")) in text
    assert f"{summary['history'][1][metric]:.4f}" in text
    assert all(len(line) <= 100 for line in text.splitlines()), "status must fit a 100-column terminal"


def test_diff_counts_match_the_merge_records(loop_run, capsys):
    """diff k-1 k: added, replaced, kept and the new rows by origin equal merge's stage.json; diff 0 2 adds up
    (kept + replaced = rows of D_0, kept + new = rows of D_2) and names rows that exist."""
    run, summary, _ = loop_run
    for k in (1, 2):
        merge = _record(run, k, "merge")
        d = _json(capsys, "diff", run, k - 1, k)
        assert (d["rows_a"], d["rows_b"]) == (merge["in"], merge["out"])
        assert d["added"] == merge["added"]
        assert d["replaced"] == merge["replaced"]
        assert d["kept"] == merge["in"] - merge["replaced"]
        assert d["origin"]["rewrites"]["complexity"] == merge["by_origin"]["complexity"]
        assert d["origin"]["rewrites"]["quality"] == merge["by_origin"]["quality"]
        assert d["origin"]["added"]["diversity"] == merge["by_origin"]["diversity"]
        events = pq.read_table(run / f"round_{k}" / "merge" / "events").to_pylist()
        before = set(pq.read_table(run / f"round_{k - 1}" / ("data/train" if k == 1 else "merge/dataset"),
                                   columns=["sample_id"]).column("sample_id").to_pylist())
        after = set(pq.read_table(run / f"round_{k}" / "merge" / "dataset", columns=["sample_id"])
                    .column("sample_id").to_pylist())
        seeded = {e["sample_id"] for e in events if e["operation"] == "synthesize" and e["child_id"]}
        assert d["kept_detail"]["seeded"] == len(seeded & before & after)      # a seeder may be replaced too
        rc, text, _ = _cli(capsys, "diff", run, k)                             # one round: against the one before
        assert rc == 0 and f"D_{k - 1} -> D_{k}: {merge['in']} -> {merge['out']} rows" in text
    d = _json(capsys, "diff", run, 0, 2)
    assert d["rows_a"] == summary["sizes"][0] and d["rows_b"] == summary["sizes"][2]
    assert d["kept"] + d["replaced"] == d["rows_a"] and d["kept"] + d["new"] == d["rows_b"]
    assert d["new"] == d["rewrites"] + d["added"] and d["unexplained"] == 0
    d2 = {r["sample_id"] for r in pq.read_table(run / "round_2" / "merge" / "dataset").to_pylist()}
    d0 = {r["sample_id"] for r in pq.read_table(run / "round_0" / "data" / "train").to_pylist()}
    assert d["kept"] == len(d0 & d2) and d["replaced"] == len(d0 - d2)
    for ex in d["examples"]["replaced"]:
        assert ex["sample_id"] in d0 - d2 and ex["by"] and set(ex["by"]) <= d2


def test_show_tells_a_flagged_samples_history(loop_run, capsys):
    """show: by a unique prefix, a sample flagged in round 1 with its signals and flags as recorded and the refine
    operation, status and reason of its results; its rewrite's id finds the same line back to the seed."""
    run, _, _ = loop_run
    results = pq.read_table(run / "round_1" / "refine" / "results").to_pylist()
    ok = [r for r in results if r["status"] == "ok" and r["operation"] in ("simplify", "improve")]
    sample = (ok or results)[0]
    sid = sample["sample_id"]
    info = _json(capsys, "show", run, sid[:12])
    assert info["sample_id"] == sid and info["matched"] == "prefix"
    r1 = next(r for r in info["rounds"] if r["round"] == 1)
    mine = next(s for s in r1["samples"] if s["sample_id"] == sid)
    signals = next(r for r in pq.read_table(run / "round_1" / "diagnose" / "signals").to_pylist()
                   if r["sample_id"] == sid)
    flags = next(r for r in pq.read_table(run / "round_1" / "select" / "flags").to_pylist() if r["sample_id"] == sid)
    assert mine["signals"]["loss_cur"] == pytest.approx(signals["loss_cur"])
    assert mine["signals"]["quality"] == pytest.approx(signals["quality"])
    assert {a: mine["flags"][a] for a in ("complexity", "diversity", "quality")} == \
        {a: flags[a] for a in ("complexity", "diversity", "quality")}
    recorded = sorted((r["operation"], r["status"], r["reason"]) for r in results if r["sample_id"] == sid)
    assert sorted((j["operation"], j["status"], j["reason"]) for j in mine["refine"]) == recorded
    assert r1["thresholds"] == _record(run, 1, "select")["thresholds"]
    rc, text, _ = _cli(capsys, "show", run, sid)
    assert rc == 0 and f"{sample['operation']}: {sample['status']}" in text
    assert sample["before_instruction"][:40] in text
    if ok:                                                  # the rewrite replaced it: found by its own id too
        events = pq.read_table(run / "round_1" / "merge" / "events").to_pylist()
        child = next(e["child_id"] for e in events if e["sample_id"] == sid and e["child_id"])
        assert child in info["line"]
        again = _json(capsys, "show", run, child)
        assert again["line"][0] == sid and again["line"][again["line"].index(sid) + 1] == child
        assert next(v for v in again["versions"] if v["sample_id"] == child)["parent_id"] == sid
        assert f"replaced by {child}" in text


def test_wrong_path_round_or_id_is_one_line_and_exit_2(loop_run, tmp_path, capsys):
    """Every wrong argument gets one line on stderr naming the problem, exit code 2 and no traceback."""
    run, _, _ = loop_run
    d0 = pq.read_table(run / "round_0" / "data" / "train", columns=["sample_id"]).column("sample_id").to_pylist()
    first = Counter(s[0] for s in d0).most_common(1)[0][0]     # a one-character prefix many ids share
    cases = [
        (["status", tmp_path / "nope"], "no such run directory"),
        (["status", tmp_path], "is not a run directory"),
        (["status", run / "config.json"], "is a file"),
        (["diff", run, 0, 7], "no round 7"),
        (["show", run, "zzzzzz"], "no sample 'zzzzzz'"),
        (["show", run, first], "give more characters"),
    ]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-m", "middo_ray.cli", *map(str, argv)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == "", (argv, proc.stderr)
    assert "rounds: 0, 1, 2" in subprocess.run([sys.executable, "-m", "middo_ray.cli", "diff", str(run), "0", "7"],
                                               capture_output=True, text=True, timeout=120).stderr


def test_a_cut_off_run_and_a_running_one(loop_run, tmp_path, capsys):
    """A copy killed in round 2's refine (its lock free, naming a dead pid) is interrupted there, with the resume
    hint; diff refuses round 2 naming the finished rounds; show still reads it. While a live process holds the
    lock the run is running (a live pid that does not hold it is not), and another host's is named as such."""
    run, summary, _ = loop_run
    cut = _cut_copy(run, tmp_path / "cut", _dead_pid())
    info = _json(capsys, "status", cut)
    assert info["state"] == "interrupted" and info["lock"]["held"] is False and info["lock"]["alive"] is False
    assert (info["position"]["round"], info["position"]["stage"]) == (2, "refine")
    assert info["stop_rules"]["decision"]["after_round"] == 1
    assert info["stop_rules"]["decision"]["stop"] is False                    # round 1 did not stop the loop
    assert info["stop_rules"]["max_rounds"] == {"limit": 2, "done": 1, "fired": False}
    assert info["rounds"][2]["rows_in"] == summary["sizes"][1] and info["rounds"][2]["rows_out"] is None
    rc, text, _ = _cli(capsys, "status", cut)
    assert rc == 0 and "interrupted: stopped at round 2, refine" in text
    run_id = json.loads((run / "config.json").read_text())["run"]["run_id"]
    assert "lock         free: its last holder was pid" in text and f"run.run_id={run_id}" in text
    rc, _, err = _cli(capsys, "diff", cut, 1, 2)
    assert rc == 2 and "round 2's dataset is not finished" in err and "finished dataset: 0, 1" in err
    assert _json(capsys, "diff", cut, 0, 1)["added"] == _record(run, 1, "merge")["added"]
    results = pq.read_table(cut / "round_2" / "refine" / "results").to_pylist()
    sid = results[0]["sample_id"]
    shown = _json(capsys, "show", cut, sid)
    r2 = next(r for r in shown["rounds"] if r["round"] == 2)
    assert r2["stages"]["refine"] == "partial" and not shown["final"]["finished"]
    assert results[0]["operation"] in {j["operation"] for s in r2["samples"] for j in s["refine"]}

    # Running: a live process holds the lock (and progress.json says how far the stage is).
    live = _cut_copy(run, tmp_path / "live", 0)
    (live / "progress.json").write_text(json.dumps({"round": 2, "stage": "refine", "what": "refine: rewrite",
                                                    "done": 3, "total": 21, "unit": "jobs", "rate": 0.5,
                                                    "eta_s": 36, "updated": datetime.now(timezone.utc).isoformat()}))
    with _held_lock(live) as pid:
        info = _json(capsys, "status", live)
        assert info["state"] == "running" and info["lock"]["held"] is True and info["lock"]["pid"] == pid
        rc, text, _ = _cli(capsys, "status", live)
        assert rc == 0 and "running: round 2, refine" in text and "3/21 jobs" in text
        assert f"held by pid {pid}" in text
    # Its holder gone (killed), the same directory is interrupted, though the file still names the pid.
    assert _json(capsys, "status", live)["state"] == "interrupted"
    # A lock file naming a live process that does not hold the lock (the run ended, its process lives on, as
    # the test session that ran loop_run does) is not a running run.
    idle = _cut_copy(run, tmp_path / "idle", os.getpid())
    assert _json(capsys, "status", idle)["state"] == "interrupted"
    # A run on another host that shares the filesystem: held there, reported as such.
    away = _cut_copy(run, tmp_path / "away", 0)
    with _held_lock(away, host="some-other-host", pid=4242):
        rc, text, _ = _cli(capsys, "status", away)
        assert rc == 0 and "running: round 2, refine" in text and "held by host some-other-host pid 4242" in text
