"""`middo status`, `middo show` and `middo diff`: questions to a run directory, finished, running or cut off.

Everything here only reads what the loop wrote (markers, stage records, manifests, Parquet shards, the
run lock and progress file), so it answers for a run that is still going, or was killed, as well as for a
finished one, and never changes the directory:

- ``status``: where the run is (finished / running / interrupted), each round's stages and seconds, rows in
  and out, flags per axis and the watched metric, and how close each stop rule of
  :func:`middo_ray.converge.should_stop` is to firing;
- ``show``: one sample's history across rounds (signals, flags against their thresholds, what refine did,
  what merge made of it) and the text of every version, found by id, unique prefix or a rewrite's id;
- ``diff``: what changed between two rounds' datasets (kept, replaced, new rows by origin and the axis
  that caused them).

A stage is finished when its ``_SUCCESS`` marker exists; a stage directory without one was cut off or is
running, and only its committed shards (``part-*.parquet``) are read. Shard files are found in the run
directory given on the command line, not at the absolute roots the stage records name, so a copied or
moved run directory reads the same. The run lock (``<run>/_LOCK``) and the progress file
(``<run>/progress.json``) are read when present and tolerated when absent or malformed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from middo_ray import storage
from middo_ray.converge import best_round, improvement, lower_is_better, should_stop
from middo_ray.rundir import LOCK as LOCK_FILE
from middo_ray.rundir import MARKER, RECORD, lock_held
from middo_ray.rundir import PROGRESS as PROGRESS_FILE
from middo_ray.schema import AXES, AXIS_OF_OPERATION, ORIGINS, REPLACING_AXES

ROUND0_STAGES = ("data", "train", "eval")
ROUND_STAGES = ("diagnose", "select", "refine", "merge", "train", "eval")
ALL_STAGES = ("data",) + ROUND_STAGES
# The shard directories a stage commits as it goes (what a cut-off stage has partly written), in order.
STAGE_OUTPUTS = {"data": ("train",), "diagnose": ("signals", "neighbors"), "select": ("flags",),
                 "refine": ("rewrites", "results"), "merge": ("dataset",)}
REPLACING = REPLACING_AXES                      # origins whose row replaces its parent (diversity adds one)
OPERATION_AXIS = AXIS_OF_OPERATION
TEXT_FIELDS = ("system", "history", "instruction", "input", "output")   # schema.TEXT_COLUMNS, in reading order
LINEAGE = ["sample_id", "parent_id", "origin", "round"]
SHARD_RE = re.compile(r"^part-\d{5}\.parquet$")
WIDTH = 100
TEXT_LIMIT = 600               # characters of each text field shown by `show` without --full
NEVER = 10 ** 9                # a stop-rule setting that cannot fire (to ask converge about one rule alone)


class RunInfoError(Exception):
    """A question the run directory cannot answer (wrong path, round or id); its message is one line for stderr."""


# ---------------------------------------------------------------------------------------------
# Reading a run directory.

def _read_json(uri: str) -> Any | None:
    """A JSON file's content, or None when it is missing or not JSON (a file being replaced, a foreign file)."""
    try:
        return storage.read_json(uri)
    except (OSError, ValueError):
        return None


def _clean_id(x: Any) -> str | None:
    """A lineage id as a string; None for missing ids (D_0's parent_id is null, or 'None' in old shards)."""
    if x is None:
        return None
    s = str(x)
    return None if s in ("", "None", "null") else s


@dataclass
class StageState:
    """A stage of a round as its directory shows it.

    Attributes:
        name: The stage.
        status: ``done`` (marker written), ``partial`` (directory without marker: running or cut off) or
            ``pending`` (no directory yet).
        seconds: The seconds the stage took (from its marker), when done.
        committed: For a partial stage, shard files committed per output directory (``{"rewrites": 3}``).
    """

    name: str
    status: str
    seconds: float | None = None
    committed: dict[str, int] = field(default_factory=dict)


class RunDir:
    """Read-only view of one run directory (a path or URI): rounds, stages, records and shards."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") or root
        self.config: dict = _read_json(storage.join(self.root, "config.json")) or {}
        self._records: dict[tuple[int, str], dict | None] = {}

    @classmethod
    def open(cls, path: str) -> "RunDir":
        """Checks that ``path`` is a run directory; raises RunInfoError naming what is there instead."""
        root = path if "://" in path else os.path.abspath(path)
        try:
            exists = storage.exists(root)
        except (OSError, ValueError) as exc:
            raise RunInfoError(f"cannot read '{path}': {exc}") from None
        if not exists:
            parent = os.path.dirname(root.rstrip("/")) if "://" not in root else None
            near = _run_dirs_in(parent) if parent and os.path.isdir(parent) else []
            hint = f"; run directories in {parent}: {', '.join(near)}" if near else ""
            raise RunInfoError(f"no such run directory: '{path}'{hint}")
        if "://" not in root and not os.path.isdir(root):
            raise RunInfoError(f"'{path}' is a file, not a run directory (give runs/<run_id>)")
        names = storage.listdir(root)
        if "config.json" not in names and "round_0" not in names:
            near = _run_dirs_in(root)
            hint = (f"; it holds the run directories {', '.join(near)}: give one of them, e.g. "
                    f"{storage.join(path, near[0])}") if near else \
                "; a run directory has config.json and round_<k>/ (runs/<run_id>, made by `middo run`)"
            raise RunInfoError(f"'{path}' is not a run directory (no config.json, no round_0/){hint}")
        return cls(root)

    # -- layout

    @property
    def run_id(self) -> str:
        return (self.config.get("run") or {}).get("run_id") or os.path.basename(self.root)

    @property
    def metric(self) -> str:
        return (self.config.get("eval") or {}).get("metric") or "heldout_loss"

    def rounds(self) -> list[int]:
        """The round numbers that have a directory, ascending."""
        out = []
        for name in storage.listdir(self.root):
            m = re.fullmatch(r"round_(\d+)", name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def stage_dir(self, k: int, stage: str) -> str:
        return storage.join(self.root, f"round_{k}", stage)

    def stage_done(self, k: int, stage: str) -> bool:
        return storage.exists(storage.join(self.stage_dir(k, stage), MARKER))

    def stage_state(self, k: int, stage: str) -> StageState:
        d = self.stage_dir(k, stage)
        if not storage.exists(d):
            return StageState(stage, "pending")
        marker = storage.join(d, MARKER)
        if storage.exists(marker):
            got = _read_json(marker)
            return StageState(stage, "done", got.get("seconds") if isinstance(got, dict) else None)
        committed = {name: len(self.shard_paths(k, stage, name)) for name in STAGE_OUTPUTS.get(stage, ())
                     if storage.exists(storage.join(d, name))}
        return StageState(stage, "partial", committed=committed)

    def record(self, k: int, stage: str) -> dict | None:
        """The stage record (``stage.json``) of a finished stage; None while it is not finished."""
        key = (k, stage)
        if key not in self._records:
            got = _read_json(storage.join(self.stage_dir(k, stage), RECORD)) if self.stage_done(k, stage) else None
            self._records[key] = got if isinstance(got, dict) else None
        return self._records[key]

    def manifest(self, k: int) -> dict | None:
        got = _read_json(storage.join(self.root, f"round_{k}", "manifest.json"))
        return got if isinstance(got, dict) else None

    def summary(self) -> dict | None:
        got = _read_json(storage.join(self.root, "final", "summary.json"))
        return got if isinstance(got, dict) else None

    def shard_paths(self, k: int, stage: str, name: str) -> list[str]:
        """The committed shard files of ``round_k/stage/name`` in dataset order (all of them once it is done)."""
        d = storage.join(self.stage_dir(k, stage), name)
        return [storage.join(d, n) for n in storage.listdir(d) if SHARD_RE.match(n)]

    def dataset(self, k: int, finished_only: bool = True) -> list[str] | None:
        """Shard paths of D_k (round 0: the seed training split; round k: the merge stage's dataset), or None
        when it is not finished (with ``finished_only=False``: the shards committed so far, if any)."""
        stage, name = ("data", "train") if k == 0 else ("merge", "dataset")
        if self.stage_done(k, stage):
            return self.shard_paths(k, stage, name)
        if finished_only:
            return None
        return self.shard_paths(k, stage, name) or None

    def finished_datasets(self) -> list[int]:
        return [k for k in self.rounds() if self.stage_done(k, "data" if k == 0 else "merge")]


def _run_dirs_in(parent: str) -> list[str]:
    """Names of the run directories directly inside ``parent`` (for error hints)."""
    try:
        return [n for n in storage.listdir(parent)
                if storage.exists(storage.join(parent, n, "config.json"))
                or storage.exists(storage.join(parent, n, "round_0"))][:8]
    except (OSError, ValueError):
        return []


def _read(paths: list[str], columns: list[str] | None = None, ids: list[str] | None = None) -> pa.Table:
    """The shards concatenated (only the rows of ``ids`` when given); columns a shard lacks are left out."""
    tables = []
    for p in paths:
        schema = storage.read_schema(p)
        cols = [c for c in columns if c in schema.names] if columns is not None else None
        filters = [("sample_id", "in", list(ids))] if ids is not None else None
        tables.append(storage.read_table(p, cols, filters=filters))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------------------------------------
# Lock and progress (written by the running driver: middo_ray.rundir.RunLock, middo_ray.console).

def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                      # it exists, as another user's process
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _this_host(host: str | None) -> bool:
    return host is None or host in {socket.gethostname(), socket.getfqdn(), os.uname().nodename}


def lock_record(root: str) -> dict | None:
    """The run lock file's record, whether a run holds it now (rundir.lock_held) and whether its pid lives; None
    without a lock file.

    Returns ``{"host", "pid", "started", "run_id", "this_host", "held", "alive"}``: ``held`` is the flock's
    answer (None where the filesystem cannot tell), ``alive`` whether the named pid runs (this host only;
    None for another host's). A lock file that is not JSON comes back as ``{"error": ..., "held": ...}``.
    """
    uri = storage.join(root, LOCK_FILE)
    if not storage.exists(uri):
        return None
    held = lock_held(uri) if "://" not in uri else None
    got = _read_json(uri)
    if not isinstance(got, dict):
        return {"error": f"{LOCK_FILE} is not a JSON object", "held": held, "alive": None}
    try:
        pid = int(got.get("pid"))
    except (TypeError, ValueError):
        pid = None
    host = got.get("host")
    local = _this_host(host)
    alive = (pid_alive(pid) if pid is not None else False) if local else None
    return {"host": host, "pid": pid, "started": got.get("started"), "run_id": got.get("run_id"),
            "this_host": local, "held": held, "alive": alive}


def _lock_active(lock: dict | None) -> bool:
    """Whether the lock says a run is active: its flock is held, or (where flock cannot tell) its named process
    runs on this host or it names another host."""
    if lock is None:
        return False
    if lock.get("held") is not None:
        return bool(lock["held"])
    return "error" not in lock and lock.get("alive") is not False


def read_progress(root: str) -> dict | None:
    """The driver's progress file (``round``, ``stage``, ``done``, ``total``, ``unit``, ``rate``, ``eta_s``,
    ``updated``), or None when there is none or it is not a JSON object."""
    got = _read_json(storage.join(root, PROGRESS_FILE))
    return got if isinstance(got, dict) else None


def _timestamp(x: Any) -> float | None:
    """Seconds since the epoch of an ISO time or a number; None when unreadable."""
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            t = datetime.fromisoformat(x.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    return None


def _ago(x: Any) -> str:
    t = _timestamp(x)
    if t is None:
        return str(x) if x is not None else "?"
    return f"{_dur(max(0.0, time.time() - t))} ago"


def _dur(s: float | None) -> str:
    """Seconds for a person: 4.2, 12m03s, 2h05m."""
    if s is None:
        return "-"
    s = float(s)
    if s < 100:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


# ---------------------------------------------------------------------------------------------
# status

def _converge_config(run: RunDir):
    """The run's ``converge`` section as the loop validated it (defaults where the saved one is unreadable)."""
    from middo_ray.config import ConvergeConfig

    try:
        return ConvergeConfig(**(run.config.get("converge") or {}))
    except (TypeError, ValueError):
        return ConvergeConfig()


def _round_info(run: RunDir, k: int, rows_before: int | None) -> dict:
    """One round's stages, rows, flags, refine and merge counts, metric and stop decision (what is finished)."""
    stages = [run.stage_state(k, s) for s in (ROUND0_STAGES if k == 0 else ROUND_STAGES)]
    info: dict[str, Any] = {"round": k, "stages": {s.name: {"status": s.status, "seconds": s.seconds,
                                                             **({"committed": s.committed} if s.committed else {})}
                                                    for s in stages}}
    shards = len(run.dataset(k - 1) or []) if k >= 1 else None        # the units of a round's shard stages
    for s in stages:
        if s.committed and shards:
            info["stages"][s.name]["shards"] = shards
    info["done"] = all(s.status == "done" for s in stages)
    info["seconds"] = round(sum(s.seconds or 0.0 for s in stages), 2)
    if k == 0:
        data = run.record(0, "data") or {}
        info["rows_in"] = data.get("rows_in")
        info["rows_out"] = data.get("train")
        info["data"] = {key: data.get(key) for key in ("rows_in", "train", "heldout", "unused", "rejected",
                                                         "duplicates")}
    else:
        merge = run.record(k, "merge")
        diag = run.record(k, "diagnose")
        info["rows_in"] = merge["in"] if merge else (diag or {}).get("rows", rows_before)
        info["rows_out"] = merge["out"] if merge else None
        if merge:
            info["merge"] = {key: merge.get(key) for key in ("replaced", "added", "kept_after_failure",
                                                              "duplicates_dropped", "by_origin")}
        sel = run.record(k, "select")
        if sel:
            counts = sel.get("counts") or {}
            info["flags"] = {a: (counts.get(a) or {}).get("flagged") for a in AXES}
            info["flagged"] = (counts.get("any") or {}).get("flagged")
            info["flagged_fraction"] = (counts.get("any") or {}).get("fraction")
            info["select_mode"] = counts.get("mode")
        ref = run.record(k, "refine")
        if ref:
            c = ref.get("counts") or {}
            info["refine"] = {"jobs": ref.get("jobs"), "ok": ref.get("ok"), "failed": ref.get("failed"),
                              "rejected": c.get("rejected"), "by_operation": c.get("by_operation")}
    ev = run.record(k, "eval")
    if ev is not None:
        info["metric"] = ev.get(run.metric)
        info["eval"] = {key: v for key, v in ev.items() if isinstance(v, (int, float)) and not key.endswith("seconds")}
        manifest = run.manifest(k) or {}
        if k >= 1 and isinstance(manifest.get("converge"), dict):
            info["converge"] = manifest["converge"]
    return info


def _position(rounds: list[dict]) -> dict | None:
    """The first stage that is not finished: ``{"round", "stage", "status"}``; None when every stage is."""
    for r in rounds:
        for name, st in r["stages"].items():
            if st["status"] != "done":
                return {"round": r["round"], "stage": name, "status": st["status"],
                        "committed": st.get("committed", {}), "shards": st.get("shards")}
    return None


def _stalled(values: list[float], cfg, metric: str) -> int:
    """Rounds at the end of ``values`` without an improvement, by converge.should_stop's own plateau rule: the
    largest n for which the rule with ``patience=n`` fires (0 when the last round improved)."""
    n = 0
    history = [{metric: v} for v in values]
    while n + 1 < len(values):
        probe = cfg.model_copy(update={"patience": n + 1, "min_flagged_fraction": 0.0})
        fired, _ = should_stop(history, probe, metric, 0, None)
        if not fired:
            break
        n += 1
    return n


def stop_rules(run: RunDir, rounds: list[dict]) -> dict:
    """Each stop rule of :func:`middo_ray.converge.should_stop` with how close it is, over the evaluated rounds.

    Every rule is asked of ``should_stop`` itself, alone (the others set so that they cannot fire), so what is
    shown is what the loop decides; ``decision`` is the call the loop makes after the last evaluated round.
    """
    cfg, metric = _converge_config(run), run.metric
    evaluated = []
    for r in rounds:                                   # round 0, 1, ... while each has its eval
        if r.get("eval") is None:
            break
        evaluated.append(r)
    history = [r["eval"] for r in evaluated]
    done = len(evaluated) - 1                          # refinement rounds done (round 0 is the baseline)
    fraction = evaluated[-1].get("flagged_fraction") if done >= 1 else None
    out: dict[str, Any] = {"metric": metric, "lower_is_better": lower_is_better(metric), "rounds_done": max(done, 0),
                           "evaluated_rounds": [r["round"] for r in evaluated]}
    if done >= 1:
        stop, reason = should_stop(history, cfg, metric, done, fraction)
        out["decision"] = {"after_round": done, "stop": stop, "reason": reason}
    lone = {"max_rounds": NEVER, "patience": NEVER, "min_flagged_fraction": 0.0}
    fired_max = done >= 1 and should_stop(history, cfg.model_copy(update={**lone, "max_rounds": cfg.max_rounds}),
                                          metric, done, None)[0]
    out["max_rounds"] = {"limit": cfg.max_rounds, "done": max(done, 0), "fired": bool(fired_max)}
    values = [h.get(metric) for h in history]
    plateau: dict[str, Any] = {"patience": cfg.patience, "min_delta": cfg.min_delta, "stalled": 0, "fired": False}
    if values and all(v is not None for v in values):
        best = best_round(history, metric)
        plateau.update(stalled=_stalled(values, cfg, metric), best_round=evaluated[best]["round"], best=values[best],
                       last=values[-1])
        plateau["fired"] = done >= 1 and should_stop(
            history, cfg.model_copy(update={**lone, "patience": cfg.patience}), metric, 0, None)[0]
    out["plateau"] = plateau
    flag = {"limit": cfg.min_flagged_fraction, "active": cfg.min_flagged_fraction > 0, "last": fraction,
            "fired": False}
    if done >= 1 and fraction is not None:
        flag["fired"] = should_stop(history, cfg.model_copy(update={**lone, "min_flagged_fraction":
                                                                     cfg.min_flagged_fraction}),
                                    metric, 0, fraction)[0]
    out["min_flagged_fraction"] = flag
    return out


def status_info(run: RunDir) -> dict:
    """Everything ``middo status`` shows, as JSON-able data."""
    rounds, before = [], None
    for k in run.rounds():
        r = _round_info(run, k, before)
        before = r.get("rows_out") if r.get("rows_out") is not None else before
        rounds.append(r)
    lock, progress, summary = lock_record(run.root), read_progress(run.root), run.summary()
    pos = _position(rounds)
    if not rounds:
        pos = {"round": 0, "stage": "data", "status": "pending"}
    elif pos is None:                                  # every stage so far is done: between rounds, or at the end
        last = rounds[-1]
        stop = summary is not None or (last.get("converge") or {}).get("stop")
        pos = ({"round": last["round"], "stage": "final", "status": "done" if summary else "pending"} if stop
               else {"round": last["round"] + 1, "stage": "diagnose", "status": "pending"})
    if _lock_active(lock):
        state = "running"
    elif summary is not None:
        state = "finished"
    else:
        state = "interrupted"
    info: dict[str, Any] = {"run_dir": run.root, "run_id": run.run_id, "state": state, "lock": lock,
                            "progress": progress, "position": None if state == "finished" else pos,
                            "rounds": rounds, "stop_rules": stop_rules(run, rounds)}
    if summary is not None:
        info["final"] = {key: summary.get(key) for key in ("rounds", "stop_reason", "best_round", "metric", "sizes",
                                                           "optimized_dataset", "seconds")}
    if state == "interrupted":
        info["resume"] = (f"rerun the same `middo run` command (run.run_id={run.run_id}) to resume: finished "
                          "stages are skipped and a cut-off stage redoes only its uncommitted shards "
                          f"(the run's full config: {storage.join(run.root, 'config.json')})")
    return info


def _stage_cell(st: dict | None, running: bool, here: bool) -> str:
    if st is None:
        return ""
    if st["status"] == "done":
        return _dur(st["seconds"])
    if st["status"] == "partial":
        return ("running" if running else "cut off") if here else "partial"
    return "."


def _table(header: list[str], rows: list[list[str]], right: set[int] | None = None, indent: int = 0) -> list[str]:
    """A plain-text table: each column as wide as its widest cell, ``right`` the right-aligned columns."""
    right = right if right is not None else set(range(1, len(header)))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append(" " * indent + "  ".join(cells).rstrip())
    return lines


def _wrap(label: str, text: str, width: int = WIDTH, label_width: int = 13) -> list[str]:
    """``label  text`` with the text wrapped under itself."""
    pad = " " * label_width
    lines = textwrap.wrap(text, width - label_width, break_on_hyphens=False) or [""]
    return [f"{label:<{label_width}}{lines[0]}"] + [pad + ln for ln in lines[1:]]


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _state_lines(info: dict) -> list[str]:
    state, pos, lock, prog = info["state"], info.get("position"), info.get("lock"), info.get("progress")
    out = []
    if state == "finished":
        fin = info.get("final") or {}
        out += _wrap("state", f"finished after {fin.get('rounds')} round(s): {fin.get('stop_reason')}")
        best = fin.get("best_round")
        hist = {r["round"]: r.get("metric") for r in info["rounds"]}
        sizes = fin.get("sizes") or []
        out += _wrap("best round", f"{best} ({fin.get('metric')} {_fmt(hist.get(best))}); final dataset: "
                                   f"{sizes[-1] if sizes else '?'} rows ({fin.get('optimized_dataset')})")
    else:
        where = "?"
        if pos is not None:
            where = f"round {pos['round']}, {pos['stage']}"
            if pos.get("committed"):
                of = f" of {pos['shards']}" if pos.get("shards") else ""
                done = [f"{name}/ {n}{of} shard(s) committed" for name, n in pos["committed"].items()]
                where += " (" + ", ".join(done) + ")"
            elif pos["stage"] == "final":
                where += " (the stop rule fired; final/ is not written yet)"
        if state == "running":
            out += _wrap("state", f"running: {where}")
        else:
            out += _wrap("state", f"interrupted: stopped at {where}")
    if prog is not None and state != "finished":
        done, total, unit = prog.get("done"), prog.get("total"), prog.get("unit") or "units"
        head = f"round {prog.get('round')} {prog.get('what') or prog.get('stage')}"
        if prog.get("state") == "done" and done is None:
            parts = [f"{head}: finished" + (f" in {_dur(prog['seconds'])}" if prog.get("seconds") else "")]
        elif done is None:
            parts = [f"{head}: started {_ago(prog.get('started'))}, no unit done yet"]
        else:
            parts = [f"{head}: {done}/{total if total is not None else '?'} {unit}"]
            if prog.get("rate"):
                parts.append(f"{_fmt(prog.get('rate'), 2)} {unit}/s")
            if prog.get("eta_s") is not None:
                parts.append(f"eta {_dur(prog.get('eta_s'))}")
        parts.append(f"updated {_ago(prog.get('updated'))}")
        out += _wrap("progress", ("" if state == "running" else "last written: ") + ", ".join(parts))
    if lock is not None:
        who = f"pid {lock.get('pid')} on " + ("this host" if lock.get("this_host") else f"host {lock.get('host')}")
        taken = f"taken {_ago(lock.get('started'))}"
        if "error" in lock:
            out += _wrap("lock", f"{LOCK_FILE} is unreadable ({lock['error']})"
                                 + ("; it is held" if lock.get("held") else ""))
        elif state == "running" and lock.get("held"):
            where = f"host {lock.get('host')} " if not lock.get("this_host") else ""
            out += _wrap("lock", f"held by {where}pid {lock.get('pid')}" + (f" (this host, {lock.get('host')})" if
                                 lock.get("this_host") else "") + f", {taken}")
        elif state == "running":
            out += _wrap("lock", f"names {who} ({taken}); this filesystem cannot tell whether it is held")
        else:
            out += _wrap("lock", f"free: its last holder was {who} ({taken})")
    elif state == "interrupted":
        out += _wrap("lock", "none: no run is active in this directory")
    if info.get("resume"):
        out += _wrap("resume", info["resume"])
    return out


def _rules_lines(rules: dict) -> list[str]:
    metric = rules["metric"]
    way = "lower is better" if rules["lower_is_better"] else "higher is better"
    mx, pl, fl = rules["max_rounds"], rules["plateau"], rules["min_flagged_fraction"]
    rows = []
    mark = lambda fired, active=True: "fired" if fired else ("not yet" if active else "off")  # noqa: E731
    rows.append((mark(mx["fired"]), "max_rounds", f"{mx['done']} of {mx['limit']} refinement round(s) done"))
    if "best" in pl:
        text = (f"{metric} ({way}): {pl['stalled']} of patience={pl['patience']} round(s) without an improvement "
                f"> min_delta={pl['min_delta']}; best {_fmt(pl['best'])} in round {pl['best_round']}, last "
                f"{_fmt(pl['last'])}")
    else:
        text = f"{metric} ({way}): no evaluated round yet; patience={pl['patience']}"
    rows.append((mark(pl["fired"]), "plateau", text))
    last = f"the last diagnosis flagged {_pct(fl['last'])} of the samples"
    rows.append((mark(fl["fired"], fl["active"]), "min_flagged_fraction",
                 (f"fires below {_pct(fl['limit'])}; " if fl["active"] else f"{fl['limit']} (off); ") + last))
    out = ["stop rules (converge.*, checked after each round's eval)"]
    for state, name, text in rows:
        lines = textwrap.wrap(text, WIDTH - 33, break_on_hyphens=False)
        out.append(f"  {state:<8} {name:<21} {lines[0]}")
        out += [" " * 33 + ln for ln in lines[1:]]
    dec = rules.get("decision")
    if dec is not None:
        verdict = f"stop: {dec['reason']}" if dec["stop"] else "continue"
        out += _wrap(f"  after round {dec['after_round']}:", verdict, label_width=19)
    return out


def format_status(info: dict) -> str:
    """The text of ``middo status``."""
    running = info["state"] == "running"
    pos = info.get("position") or {}
    out = _wrap("run", f"{info['run_id']}  ({info['run_dir']})") + _state_lines(info) + [""]
    rounds = info["rounds"]
    if not rounds:
        return "\n".join(out + ["no round has started yet"]) + "\n"
    out.append("stages (time each took; . = not started)")
    rows = []
    for r in rounds:
        cells = [str(r["round"])]
        for name in ALL_STAGES:
            st = r["stages"].get(name)
            cells.append(_stage_cell(st, running, pos.get("round") == r["round"] and pos.get("stage") == name))
        cells.append(_dur(r["seconds"]))
        rows.append(cells)
    out += _table(["round", *ALL_STAGES, "total"], rows, indent=2)
    out += ["", "data (flags c/d/q: flagged on complexity / diversity / quality; any: on some axis, share of D_k-1;",
            "      refined ok: rewrites taken / refine jobs; replaced, added: by merge)"]
    metric = info["stop_rules"]["metric"]
    rows, prev = [], None
    for r in rounds:
        flags = r.get("flags")
        ref, mrg = r.get("refine"), r.get("merge") or {}
        value = r.get("metric")
        mtext = _fmt(value)
        if value is not None and prev is not None:
            d = improvement(metric, prev, value)
            mtext += f" {value - prev:+.4f} {'better' if d > 0 else 'worse' if d < 0 else 'same'}"
        prev = value if value is not None else prev
        rows.append([str(r["round"]),
                     f"{_fmt(r.get('rows_in')) if r['round'] else '-'} -> {_fmt(r.get('rows_out'))}",
                     "/".join(_fmt(flags[a]) for a in AXES) if flags else "-",
                     f"{r['flagged']} ({_pct(r.get('flagged_fraction'))})" if flags else "-",
                     f"{ref['ok']}/{ref['jobs']}" if ref else "-",
                     _fmt(mrg.get("replaced")), _fmt(mrg.get("added")), mtext])
    out += _table(["round", "rows in -> out", "flags c/d/q", "any", "refined ok", "replaced", "added", metric],
                  rows, right={1, 2, 3, 4, 5, 6}, indent=2)
    d0 = rounds[0].get("data") or {}
    if d0.get("rows_in") is not None:
        out += _wrap("  round 0:", f"{d0['rows_in']} rows read: {d0.get('train')} in D_0, {d0.get('heldout')} held "
                                   f"out, {d0.get('unused')} unused, {d0.get('rejected')} rejected "
                                   "(round_0/data/rejects.jsonl)", label_width=11)
    out += [""] + _rules_lines(info["stop_rules"])
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# show

@dataclass
class _Catalog:
    """Where every sample id of the run appears: lineage of each id and the datasets holding it."""

    meta: dict[str, dict] = field(default_factory=dict)          # id -> parent_id, origin, round
    where: dict[str, list[str]] = field(default_factory=dict)    # id -> ["D_0", "D_1", ...]
    children: dict[str, list[str]] = field(default_factory=dict)
    partial: set[str] = field(default_factory=set)                # datasets with a merge in progress
    other: dict[str, str] = field(default_factory=dict)           # id -> "heldout" / "unused"

    def add(self, label: str, table: pa.Table) -> None:
        """Records the rows of dataset ``label`` (a table of its lineage columns)."""
        for sid, m in _lineage(table).items():
            if sid not in self.meta:
                self.meta[sid] = m
                if m["parent_id"] is not None:
                    self.children.setdefault(m["parent_id"], []).append(sid)
            self.where.setdefault(sid, []).append(label)


def _lineage(table: pa.Table) -> dict[str, dict]:
    """``sample_id`` -> its ``parent_id``, ``origin`` and ``round``, in the table's order."""
    n = table.num_rows
    col = {c: table.column(c).to_pylist() if c in table.column_names else [None] * n for c in LINEAGE}
    return {sid: {"parent_id": _clean_id(p), "origin": o or "seed", "round": r or 0}
            for sid, p, o, r in zip(col["sample_id"], col["parent_id"], col["origin"], col["round"])}


def _catalog(run: RunDir) -> _Catalog:
    cat = _Catalog()
    for k in run.rounds():
        paths = run.dataset(k, finished_only=False)
        if not paths:
            continue
        label = f"D_{k}"
        if not run.stage_done(k, "data" if k == 0 else "merge"):
            cat.partial.add(label)
        cat.add(label, _read(paths, LINEAGE))
    for kind in ("heldout", "unused"):
        for sid in _read(run.shard_paths(0, "data", kind), ["sample_id"]).to_pydict().get("sample_id", []):
            cat.other.setdefault(sid, kind)
    return cat


def resolve_id(cat: _Catalog, query: str, run: RunDir) -> str:
    """The one sample id that is ``query`` or starts with it; RunInfoError when none or several do."""
    q = query.strip()
    if q in cat.meta or q in cat.other:
        return q
    pool = list(cat.meta) + [s for s in cat.other if s not in cat.meta]
    if not q:
        raise RunInfoError("give a sample id (or the first characters of one)")
    arr = pa.array(pool, pa.string())
    hits = arr.filter(pc.starts_with(arr, q)).to_pylist()
    if not pool:
        raise RunInfoError(f"no sample '{q}' in {run.root}: it has no dataset yet (round 0's data stage has not "
                           "written one)")
    if not hits:
        sets = ", ".join(sorted({d for ds in cat.where.values() for d in ds}, key=lambda d: int(d[2:])))
        raise RunInfoError(f"no sample '{q}' in {run.root} (looked in the datasets {sets or 'none'} and the held-out "
                           f"and unused rows); ids are 20 hex characters, e.g. {pool[0] if pool else '?'}")
    if len(hits) > 1:
        shown = ", ".join(hits[:6]) + (f", ... ({len(hits) - 6} more)" if len(hits) > 6 else "")
        raise RunInfoError(f"'{q}' matches {len(hits)} samples: {shown}; give more characters")
    return hits[0]


def _line_of(cat: _Catalog, sid: str) -> tuple[list[str], list[str]]:
    """(the line: ``sid``'s ancestors up to its seed, ``sid`` and every rewrite that replaced it, transitively;
    the samples synthesized from any member of the line)."""
    up, seen = [], {sid}
    cur = cat.meta.get(sid, {}).get("parent_id")
    while cur is not None and cur not in seen:
        up.append(cur)
        seen.add(cur)
        cur = cat.meta.get(cur, {}).get("parent_id")
    line = list(reversed(up)) + [sid]
    queue = [sid]
    while queue:
        nxt = []
        for p in queue:
            for c in cat.children.get(p, []):
                if c not in seen and cat.meta[c]["origin"] in REPLACING:
                    seen.add(c)
                    line.append(c)
                    nxt.append(c)
        queue = nxt
    synth = [c for p in line for c in cat.children.get(p, []) if cat.meta[c]["origin"] not in REPLACING
             and c not in line]
    return line, synth


def _rows_by_id(table: pa.Table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        out.setdefault(row["sample_id"], []).append(row)
    return out


def _texts(run: RunDir, cat: _Catalog, ids: list[str]) -> dict[str, dict]:
    """The text fields (and trigger) of each id, from the first dataset that holds it."""
    out: dict[str, dict] = {}
    for k in run.rounds():
        want = [i for i in ids if i not in out and f"D_{k}" in cat.where.get(i, [])]
        paths = run.dataset(k, finished_only=False)
        if not want or not paths:
            continue
        for row in _read(paths, ["sample_id", *TEXT_FIELDS, "trigger"], want).to_pylist():
            out.setdefault(row["sample_id"], row)
    return out


def _round_history(run: RunDir, k: int, members: list[str]) -> dict | None:
    """What round ``k`` recorded about the line members it diagnosed (those in D_{k-1}); None if none were."""
    ids = members
    st = {s: run.stage_state(k, s).status for s in ("diagnose", "select", "refine", "merge")}
    sig = _rows_by_id(_read(run.shard_paths(k, "diagnose", "signals"), None, ids))
    nbr = _rows_by_id(_read(run.shard_paths(k, "diagnose", "neighbors"), None, ids))
    flags = _rows_by_id(_read(run.shard_paths(k, "select", "flags"), None, ids))
    results_dir = "results" if run.shard_paths(k, "refine", "results") else "rewrites"
    results = _rows_by_id(_read(run.shard_paths(k, "refine", results_dir), None, ids))
    # A rejected rewrite's text is dropped from results; the teacher's answer is still in rewrites/.
    rewrites = _rows_by_id(_read(run.shard_paths(k, "refine", "rewrites"), None, ids)) \
        if results_dir == "results" else results
    events = _rows_by_id(_read(run.shard_paths(k, "merge", "events"), None, ids))
    sel = run.record(k, "select") or {}
    samples = []
    for sid in ids:
        if sid not in sig and sid not in flags and sid not in results and sid not in events:
            continue
        s = (sig.get(sid) or [{}])[0]
        n = (nbr.get(sid) or [{}])[0]
        jobs = []
        for res in results.get(sid, []):
            job = {key: res.get(key) for key in ("operation", "status", "reason", "attempts", "quality_before",
                                                 "quality_after", "instruction", "input", "output")}
            job["judged"] = results_dir == "results"
            teacher = [r for r in rewrites.get(sid, []) if r.get("operation") == res.get("operation")]
            if job["status"] != "ok" and teacher and teacher[0].get("status") == "ok":
                job["rejected_text"] = {key: teacher[0].get(key) for key in ("instruction", "input", "output")}
            ev = [e for e in events.get(sid, []) if e.get("operation") == res.get("operation")]
            if ev:
                job["merge"] = {key: ev[0].get(key) for key in ("status", "reason", "child_id")}
            jobs.append(job)
        samples.append({
            "sample_id": sid,
            "signals": {key: v for key, v in s.items() if key not in ("sample_id",)} or None,
            "neighbors": ({"knn_sim": n.get("knn_sim"), "ids": n.get("nbr_ids"), "sims": n.get("nbr_sims")}
                          if n else None),
            "flags": {key: v for key, v in (flags.get(sid) or [{}])[0].items() if key != "sample_id"} or None,
            "refine": jobs})
    if not samples:
        return None
    return {"round": k, "stages": st, "thresholds": sel.get("thresholds"),
            "select_mode": (sel.get("counts") or {}).get("mode"), "samples": samples}


def show_info(run: RunDir, query: str) -> dict:
    """Everything ``middo show`` shows about one sample, as JSON-able data."""
    cat = _catalog(run)
    sid = resolve_id(cat, query, run)
    info: dict[str, Any] = {"run_dir": run.root, "query": query, "sample_id": sid,
                            "matched": "exact" if sid == query.strip() else "prefix"}
    if sid not in cat.meta:
        kind = cat.other[sid]
        info["outside_loop"] = kind
        row = _read(run.shard_paths(0, "data", kind), ["sample_id", *TEXT_FIELDS], [sid]).to_pylist()
        info["versions"] = [{"sample_id": sid, "origin": "seed", "round": 0, "in": [kind], **(row[0] if row else {})}]
        info["rounds"] = []
        return info
    line, synth = _line_of(cat, sid)
    texts = _texts(run, cat, line + synth)
    summary = run.summary()
    final_pos: dict[str, int] = {}
    final_total = None
    if summary is not None and storage.exists(storage.join(run.root, "final", "lineage.parquet")):
        ids = storage.read_table(storage.join(run.root, "final", "lineage.parquet"), ["sample_id"]) \
            .column("sample_id").to_pylist()
        final_total = len(ids)
        final_pos = {i: n for n, i in enumerate(ids) if i in set(line + synth)}
    versions = []
    for v in line + synth:
        m = cat.meta[v]
        row = texts.get(v, {})
        trig = row.get("trigger")
        try:
            trig = json.loads(trig) if trig else None
        except ValueError:
            pass
        versions.append({"sample_id": v, "origin": m["origin"], "round": m["round"], "parent_id": m["parent_id"],
                         "link": None if m["parent_id"] is None else (
                             "replaces" if m["origin"] in REPLACING else "synthesized from"),
                         "in": cat.where.get(v, []), "line": v in line, "trigger": trig,
                         "final_position": final_pos.get(v),
                         **{f: row.get(f) for f in TEXT_FIELDS}})
    info["line"] = line
    info["synthesized"] = synth
    info["versions"] = versions
    rounds = []
    for k in run.rounds():
        if k == 0:
            continue
        members = [v for v in line if f"D_{k - 1}" in cat.where.get(v, [])]
        hist = _round_history(run, k, members) if members else None
        if hist is not None:
            rounds.append(hist)
    info["rounds"] = rounds
    latest = max(run.finished_datasets(), default=None)
    info["final"] = {"finished": summary is not None, "total": final_total,
                     "present": [v for v in line + synth if v in final_pos],
                     "latest_dataset": latest,
                     "in_latest": [v for v in line + synth if f"D_{latest}" in cat.where.get(v, [])]}
    info["partial_datasets"] = sorted(cat.partial)
    return info


def clean_text(text: str | None) -> str:
    """Text safe for a terminal: control and unprintable characters (except newline and tab) as escapes."""
    if not text:
        return ""
    return "".join(ch if ch in "\n\t" or ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _text_lines(label: str, text: str | None, full: bool, indent: int) -> list[str]:
    t = clean_text(text)
    if not full and len(t) > TEXT_LIMIT:
        t = t[:TEXT_LIMIT] + f" ... ({len(t) - TEXT_LIMIT} more characters; --full shows all)"
    pad = " " * (indent + 13)
    out, first = [], True
    for para in t.split("\n") or [""]:
        wrapped = textwrap.wrap(para, WIDTH - indent - 13, replace_whitespace=False) or [""]
        for ln in wrapped:
            out.append((" " * indent + f"{label:<13}" if first else pad) + ln)
            first = False
    return out


def _compare(name: str, value: float | None, thr: float | None, upper: bool) -> str:
    """``name value > thr`` with the sign the value really has to the threshold (why it was or was not flagged)."""
    if value is None or thr is None:
        return f"{name} {_fmt(value)} (threshold {_fmt(thr)})"
    if upper:
        sign = ">" if value > thr else "<="
    else:
        sign = "<" if value < thr else ">="
    return f"{name} {_fmt(value)} {sign} {_fmt(thr)}"


def _flag_explanation(axis: str, flagged: bool | None, sig: dict, knn: float | None, thr: dict | None,
                      ifd_flag: bool | None = None) -> str:
    """One axis' flag and the rule behind it: the sample's value against the select stage's threshold."""
    t = (thr or {}).get(axis) or {}
    yes = "YES" if flagged else "no " if flagged is not None else "?  "
    if axis == "complexity":
        rule = (_compare("loss_pre", sig.get("loss_pre"), t.get("loss_pre"), True) + " and "
                + _compare("loss_cur", sig.get("loss_cur"), t.get("loss_cur"), True))
    elif axis == "diversity":
        rule = _compare("knn_sim", knn, t.get("knn_sim"), False)
    else:
        rule = _compare("quality", sig.get("quality"), t.get("quality"), False)
        if t.get("ifd") is not None:
            rule += f"; IFD rule: ifd {_fmt(sig.get('ifd'))}, flags > {t.get('ifd')}" + (" (fired)" if ifd_flag else "")
    if t.get("m") is not None:
        rule += f" (threshold: mean {'+' if axis == 'complexity' else '-'} {t.get('m')}*std)"
    if t.get("budget") is not None:
        rule += f"; budget mode: the worst {t.get('budget')} (severity cut-off {_fmt(t.get('severity_cutoff'))})"
    return f"{axis:<11}{yes}  {rule}"


def format_show(info: dict, full: bool = False) -> str:
    """The text of ``middo show``."""
    sid = info["sample_id"]
    out = [f"sample {sid}" + (f"  (the only id starting with '{info['query']}')"
                              if info["matched"] == "prefix" else "")]
    if info.get("outside_loop"):
        what = "held out for evaluation" if info["outside_loop"] == "heldout" else "beyond data.max_samples"
        out.append(f"not in the loop: a {info['outside_loop']} row of round_0/data ({what}); never diagnosed or "
                   "rewritten")
        v = info["versions"][0]
        for f in TEXT_FIELDS:
            if v.get(f):
                out += _text_lines(f, v[f], full, 2)
        return "\n".join(out) + "\n"
    versions = {v["sample_id"]: v for v in info["versions"]}
    chain = []
    for v in info["line"]:
        x = versions[v]
        link = "" if not chain else ("replaced by " if x["link"] == "replaces" else "synthesized ")
        chain.append(f"{link}{v} ({x['origin']}, round {x['round']})")
    out += _wrap("line", " -> ".join(chain))
    seeders: dict[str, list[str]] = {}
    for c in info["synthesized"]:
        seeders.setdefault(versions[c]["parent_id"], []).append(c)
    for parent, kids in seeders.items():
        out += _wrap("synthesized", f"from {parent}: " + ", ".join(f"{c} (round {versions[c]['round']})"
                                                                 for c in kids))
    fin = info["final"]
    if fin["finished"]:
        where = ", ".join(f"{v} row {versions[v]['final_position'] + 1}" for v in fin["present"]) or "no version"
        out += _wrap("final", f"{where} of {fin['total']} in final/ (optimized.*, lineage.parquet; rows from 1)")
    else:
        out += _wrap("latest", f"the run has no final/ yet; in its latest finished dataset D_{fin['latest_dataset']}: "
                               f"{', '.join(fin['in_latest']) or 'none of these'}")
    for r in info["rounds"]:
        k = r["round"]
        out += ["", f"round {k}: diagnosed in D_{k - 1}" + (f" (select mode {r['select_mode']})" if r["select_mode"]
                                                              else "")]
        unfinished = [s for s, st in r["stages"].items() if st != "done"]
        if unfinished:
            out.append("  not finished: " + ", ".join(f"{s} ({r['stages'][s]})" for s in unfinished))
        for s in r["samples"]:
            out.append(f"  {s['sample_id']} ({versions[s['sample_id']]['origin']})")
            sig = s.get("signals") or {}
            if sig:
                losses = "  ".join(f"{c} {_fmt(sig.get(c))}" for c in ("loss_pre", "loss_cur", "loss_empty", "ifd"))
                out += _wrap("    losses", f"{losses}  {_fmt(sig.get('n_response_tokens'))} response tokens"
                                           + ("  (truncated)" if sig.get("truncated") else ""), label_width=14)
                judge = lambda part: "  ".join(f"{d} {_fmt(sig.get(f'q_{part}_{d}'), 2)}"  # noqa: E731
                                               for d in ("factuality", "clarity", "completeness"))
                out += _wrap("    judge", f"quality {_fmt(sig.get('quality'))} = mean of  prompt: {judge('prompt')}  "
                                          f"response: {judge('response')}", label_width=14)
            else:
                out.append("    signals       not scored yet")
            nb = s.get("neighbors")
            knn = nb.get("knn_sim") if nb else None
            if nb:
                pairs = ", ".join(f"{i} ({_fmt(x)})" for i, x in zip(nb.get("ids") or [], nb.get("sims") or []))
                out += _wrap("    kNN", f"knn_sim {_fmt(knn)}; nearest: {pairs or '-'}", label_width=14)
            fl = s.get("flags")
            if fl:
                first = True
                for axis in AXES:
                    text = _flag_explanation(axis, fl.get(axis), sig, knn, r.get("thresholds"), fl.get("quality_ifd"))
                    out += _wrap("    flags" if first else "", text, label_width=14)
                    first = False
            else:
                out.append("    flags         not selected yet")
            for job in s["refine"]:
                q = ""
                if job.get("quality_before") is not None or job.get("quality_after") is not None:
                    q = f", judged quality {_fmt(job.get('quality_before'))} -> {_fmt(job.get('quality_after'))}"
                text = f"{job['operation']}: {job['status']}, {job['attempts']} attempt(s){q}"
                if not job["judged"]:
                    text += " (not re-judged yet)"
                if job.get("reason"):
                    text += f"; {job['reason']}"
                mg = job.get("merge")
                replacing = OPERATION_AXIS.get(job["operation"]) in REPLACING
                if mg and mg.get("child_id"):
                    text += f"; merge: {'replaced by' if replacing else 'added'} {mg['child_id']}"
                elif mg and mg.get("status") == "duplicate":
                    text += "; merge: dropped, identical to a sample already in the dataset"
                elif mg and not (job.get("reason") or "").endswith("original kept"):
                    text += "; merge: original kept" if replacing else "; merge: no new sample"
                if mg and r["stages"].get("merge") != "done":
                    text += " (merge not finished)"
                out += _wrap("    refine", text, label_width=14)
                if job.get("rejected_text"):
                    out.append("      the rewrite that was not taken (from refine/rewrites):")
                    for f in ("instruction", "input", "output"):
                        if job["rejected_text"].get(f):
                            out += _text_lines(f, job["rejected_text"][f], full, 8)
            if fl and not s["refine"]:
                flagged = any(fl.get(a) for a in AXES)
                out.append("    refine        " + ("no result yet" if flagged else "not flagged: kept as it is"))
    out += ["", "versions"]
    for v in info["versions"]:
        head = f"  {v['sample_id']}  {v['origin']}, round {v['round']}"
        if v["parent_id"]:
            head += f", {v['link']} {v['parent_id']}"
        ins = [d + ("(partial)" if d in info.get("partial_datasets", []) else "") for d in v["in"]]
        ins += ["final"] if v.get("final_position") is not None else []
        head += f"  [{' '.join(ins)}]"
        out.append(head)
        trig = v.get("trigger")
        if isinstance(trig, dict):
            vals = ", ".join(f"{key} {_fmt(x)}" for key, x in trig.items() if key != "thresholds")
            out += _text_lines("trigger", vals, True, 4)
        for f in TEXT_FIELDS:
            if v.get(f):
                out += _text_lines(f, v[f], full, 4)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# diff

def _check_round(run: RunDir, k: int) -> None:
    rounds = run.rounds()
    finished = run.finished_datasets()
    have = ", ".join(map(str, finished)) or "none"
    if k not in rounds:
        raise RunInfoError(f"no round {k} in {run.root}; its rounds: {', '.join(map(str, rounds)) or 'none'} "
                           f"(with a finished dataset: {have})")
    if k not in finished:
        stage = "data" if k == 0 else "merge"
        raise RunInfoError(f"round {k}'s dataset is not finished (round_{k}/{stage} has no {MARKER} yet); rounds with "
                           f"a finished dataset: {have}")


def _reason_kind(event: dict) -> str:
    reason = event.get("reason") or ""
    if event.get("status") == "duplicate":
        return "duplicate"
    if reason.startswith("rejected by re-judge"):
        return "rejected by re-judge"
    if reason.startswith("re-judge failed"):
        return "re-judge failed"
    return "rewrite failed"


def diff_info(run: RunDir, a: int, b: int, examples: int = 3) -> dict:
    """What changed from D_a to D_b, as JSON-able data (see :func:`format_diff`)."""
    _check_round(run, a)
    _check_round(run, b)
    if a > b:
        raise RunInfoError(f"the first round must not come after the second (got {a} and {b}): "
                           f"middo diff {run.root} {b} {a}")
    meta: dict[str, dict] = {}
    ids: dict[int, list[str]] = {}
    for k in range(a, b + 1):                          # the rounds between hold the intermediate versions
        lineage = _lineage(_read(run.dataset(k) or [], LINEAGE))
        ids[k] = list(lineage)
        for sid, m in lineage.items():
            meta.setdefault(sid, m)
    events: dict[str, list[dict]] = {}
    for k in range(a + 1, b + 1):
        for e in _read(run.shard_paths(k, "merge", "events")).to_pylist():
            events.setdefault(e["sample_id"], []).append({**e, "round": k})
    ids_a, ids_b = ids[a], ids[b]
    set_a, set_b = set(ids_a), set(ids_b)
    kept = [i for i in ids_b if i in set_a]
    removed = [i for i in ids_a if i not in set_b]
    new = [i for i in ids_b if i not in set_a]
    between = {i for k in ids if a < k < b for i in ids[k]} - set_a - set_b

    def root_in_a(sid: str) -> tuple[str | None, str | None]:
        """(the D_a row this new row replaces, through rewrites; the synthesized row it comes from otherwise)."""
        cur, seen = sid, set()
        while cur is not None and cur not in seen:
            seen.add(cur)
            m = meta.get(cur)
            if m is None:
                return None, None
            if m["origin"] not in REPLACING:
                return None, cur
            if m["parent_id"] in set_a:
                return m["parent_id"], None
            cur = m["parent_id"]
        return None, None

    rewrites, added, unknown = [], [], []
    successors: dict[str, list[str]] = {}
    for n in new:
        parent, synth = root_in_a(n)
        if parent is not None:
            rewrites.append(n)
            successors.setdefault(parent, []).append(n)
        elif synth is not None:
            added.append((n, synth))
        else:
            unknown.append(n)

    children_of: dict[str, list[str]] = {}
    for c, m in meta.items():
        if m["parent_id"] is not None:
            children_of.setdefault(m["parent_id"], []).append(c)

    def first_replacing_axes(sid: str) -> str:
        axes = sorted({meta[c]["origin"] for c in children_of.get(sid, []) if meta[c]["origin"] in REPLACING},
                      key=AXES.index)
        return "+".join(axes) or "unknown"

    replaced_by_axis: dict[str, int] = {}
    for r in removed:
        ax = first_replacing_axes(r)
        replaced_by_axis[ax] = replaced_by_axis.get(ax, 0) + 1
    order = ["+".join(c) for c in (("complexity",), ("quality",), ("complexity", "quality"))] + ["unknown"]
    replaced_by_axis = {ax: replaced_by_axis[ax] for ax in sorted(replaced_by_axis, key=lambda x: (
        order.index(x) if x in order else len(order), x))}
    kept_detail = {"flagged": 0, "rewrite_not_taken": 0, "synthesis_not_taken": 0, "seeded": 0}
    failure_kinds: dict[str, int] = {}
    failed_examples, seeded_examples = [], []
    for sid in kept:
        evs = events.get(sid, [])
        if not evs:
            continue
        kept_detail["flagged"] += 1
        fails = [e for e in evs if e.get("status") != "ok" or not e.get("child_id")]
        for e in fails:
            kind = _reason_kind(e)
            failure_kinds[kind] = failure_kinds.get(kind, 0) + 1
        if any(OPERATION_AXIS.get(e["operation"]) in REPLACING for e in fails):
            kept_detail["rewrite_not_taken"] += 1
        if any(e["operation"] == "synthesize" for e in fails):
            kept_detail["synthesis_not_taken"] += 1
        if fails:
            failed_examples.append({"sample_id": sid, "operation": fails[0]["operation"], "round": fails[0]["round"],
                                    "reason": fails[0].get("reason")})
        if any(e["operation"] == "synthesize" and e.get("child_id") for e in evs):
            kept_detail["seeded"] += 1
            seeded_examples.append(sid)

    def by_origin(xs) -> dict[str, int]:
        out = {o: 0 for o in ORIGINS}
        for x in xs:
            o = meta[x]["origin"]
            out[o] = out.get(o, 0) + 1
        return out

    return {
        "run_dir": run.root, "a": a, "b": b, "rows_a": len(ids_a), "rows_b": len(ids_b),
        "kept": len(kept), "replaced": len(removed), "new": len(new), "rewrites": len(rewrites),
        "added": len(added), "unexplained": len(unknown), "intermediate": len(between),
        "origin": {"a": by_origin(ids_a), "b": by_origin(ids_b), "kept": by_origin(kept),
                   "replaced": by_origin(removed), "new": by_origin(new), "rewrites": by_origin(rewrites),
                   "added": by_origin(n for n, _ in added)},
        "replaced_by_axis": replaced_by_axis,
        "kept_detail": {**kept_detail, "not_taken_by_reason": failure_kinds},
        "examples": {
            "replaced": [{"sample_id": r, "axis": first_replacing_axes(r), "by": successors.get(r, [])}
                         for r in removed[:examples]],
            "added": [{"sample_id": n, "from": meta[s]["parent_id"], "round": meta[n]["round"],
                       "origin": meta[n]["origin"]} for n, s in added[:examples]],
            "kept_not_taken": failed_examples[:examples], "kept_seeded": seeded_examples[:examples]},
    }


def format_diff(info: dict) -> str:
    """The text of ``middo diff``."""
    a, b = info["a"], info["b"]
    da, db = f"D_{a}", f"D_{b}"
    out = [f"{da} -> {db}: {info['rows_a']} -> {info['rows_b']} rows ({info['rows_b'] - info['rows_a']:+d})  "
           f"({info['run_dir']})", ""]
    o = info["origin"]
    rows = []
    for origin in ORIGINS:
        rows.append([origin] + [str(o[c].get(origin, 0)) for c in ("a", "b", "kept", "replaced", "rewrites", "added")])
    rows.append(["total", str(info["rows_a"]), str(info["rows_b"]), str(info["kept"]), str(info["replaced"]),
                 str(info["rewrites"]), str(info["added"])])
    out.append(f"rows by origin (kept: in both; replaced: rows of {da} gone from {db}, each replaced by its rewrite;")
    out.append(f"                rewrites: the rows replacing them; added: new samples synthesized from sparse ones)")
    out += _table(["origin", da, db, "kept", "replaced", "rewrites", "added"], rows, indent=2)
    out.append("")
    ax = info["replaced_by_axis"]
    out += _wrap("replaced", f"{info['replaced']} rows of {da}; by the axis of their rewrite: "
                             + (", ".join(f"{k} {v}" for k, v in ax.items()) or "none"))
    kd = info["kept_detail"]
    reasons = ", ".join(f"{k} {v}" for k, v in kd["not_taken_by_reason"].items())
    out += _wrap("kept", f"{info['kept']} rows: {info['kept'] - kd['flagged']} never flagged, {kd['flagged']} flagged "
                         f"and kept (rewrite not taken {kd['rewrite_not_taken']}, synthesis not taken "
                         f"{kd['synthesis_not_taken']}, seeded a new sample {kd['seeded']})"
                         + (f"; not taken: {reasons}" if reasons else ""))
    out += _wrap("new", f"{info['new']} rows of {db}: {info['rewrites']} rewrites, {info['added']} added")
    if info["intermediate"]:
        out += _wrap("intermediate", f"{info['intermediate']} rows created after {da} and replaced again before {db}")
    if info["unexplained"]:
        out += _wrap("unexplained", f"{info['unexplained']} new rows whose lineage does not reach {da}")
    ex = info["examples"]
    lines = []
    for r in ex["replaced"]:
        lines += _wrap("  replaced", f"{r['sample_id']} -> {', '.join(r['by']) or '?'} ({r['axis']})", label_width=15)
    for n in ex["added"]:
        lines += _wrap("  added", f"{n['sample_id']} ({n['origin']}, round {n['round']}, synthesized from {n['from']})",
                       label_width=15)
    for k in ex["kept_not_taken"]:
        lines += _wrap("  kept", f"{k['sample_id']} (round {k['round']} {k['operation']}: {k['reason']})",
                       label_width=15)
    for s in ex["kept_seeded"]:
        lines += _wrap("  kept, seeded", s, label_width=15)
    if lines:
        out += ["", "examples (middo show <run_dir> <id> for one's history)"] + lines
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# The commands.

def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _emit(obj: dict, as_json: bool, text: str | None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(_finite(obj), indent=2, default=storage.json_default, ensure_ascii=False,
                                    allow_nan=False) + "\n")
    else:
        sys.stdout.write(text or "")
    sys.stdout.flush()


def runinfo_main(args: argparse.Namespace) -> int:
    """Runs ``middo status|show|diff``; returns the exit code (2 with one line on stderr for a wrong path, round
    or id, or a run directory that cannot be read)."""
    cmd = args.command
    try:
        run = RunDir.open(args.run_dir)
        if cmd == "status":
            info = status_info(run)
            _emit(info, args.json, None if args.json else format_status(info))
        elif cmd == "show":
            info = show_info(run, args.sample_id)
            _emit(info, args.json, None if args.json else format_show(info, args.full))
        elif cmd == "diff":
            a, b = (args.round_a, args.round_b) if args.round_b is not None else (args.round_a - 1, args.round_a)
            if a < 0:
                raise RunInfoError(f"round {args.round_a} has no round before it; give two rounds, e.g. "
                                   f"middo diff {args.run_dir} 0 {max(run.finished_datasets(), default=1)}")
            info = diff_info(run, a, b, args.examples)
            _emit(info, args.json, None if args.json else format_diff(info))
        else:
            raise RunInfoError(f"unknown command '{cmd}'")
    except RunInfoError as exc:
        print(f"middo {cmd}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:                      # `middo show ... | head`: the reader left, which is fine
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        print(f"middo {cmd}: cannot read the run directory '{args.run_dir}' ({type(exc).__name__}: {exc}); "
              "is it a middo run directory of this version?", file=sys.stderr)
        return 2
    return 0
