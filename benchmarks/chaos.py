"""Benchmark: fault injection into real `middo run` processes. Does the loop survive, and lose nothing?

Every run is a real driver process, ``python -m middo_ray.cli run --config jobs/tiny.yaml`` with overrides,
in a session of its own (``start_new_session=True``: its local Ray, GCS, raylet and workers are in that
session, so it can be killed whole, as a lost machine would be). The runs read one small data file written
by the benchmark: the first ``--rows`` rows of the demo seed set plus six bad rows (invalid UTF-8, a line
that is not JSON, a row without its instruction, a 300,000-character output, a messages-format row in
this alpaca file, a duplicate row). Their teacher is an OpenAI-compatible HTTP server inside this process
(``refine.engine=openai``), whose answers are a deterministic function of the request, so two runs that
ask the same questions get the same answers, and which counts every request by a key of its body.

First an uninterrupted *reference* run. Then the scenarios, each with its own run id (and its own free
Serve port), the random point picked by ``--seeds`` seeds (the run's own seed stays fixed, so every
final dataset is comparable with the reference's):

- ``sigkill:<stage>`` (every stage of round 2): once ``round_2/<stage>/`` exists, wait a random share
  (10-90 %) of the reference's seconds for that stage, then SIGKILL every process of the driver's
  session and wait until none is left; rerun the same command until it finishes (``--max-reruns``).
  In refine, even seeds kill after a random number of the teacher's round-2 calls instead (the
  teacher's part is the stage's first seconds; the judge app takes the rest), so requests are in flight.
- ``sigterm:<stage>`` (diagnose, refine): the same point, but SIGTERM to the driver only. Expected: exit
  code 143 and a clean stop: no process of the session left 30 s after the signal (leftovers are
  recorded, then killed). Then the rerun.
- ``teacher-500`` / ``teacher-refuse``: when round 2's refine starts, the teacher is armed: after a random
  number of its round-2 calls (up to half of what the reference's round 2 asked) it answers HTTP 500 to
  everything, or closes its listening socket (connections refused; open ones dropped), for
  ``--fault-seconds`` or until the driver exits. Expected: the driver rides it out on retries, or stops
  with a clear one-line error naming the endpoint (non-zero exit code, no traceback); then a rerun with the
  teacher well. (``teacher-blip``, not in the default set: HTTP 500 for 2 s, which the engine's retries
  should ride out without losing a rewrite.)
- ``bad-rows``: an uninterrupted run of its own (so also the control: two uninterrupted runs must give
  identical files). Rows in = rows kept (train, held-out, unused) + rows rejected, and every bad row is in
  ``round_0/data/rejects.jsonl``.
- ``second-run``: while the first run is in a random stage of round 2, a second `middo run` with the same
  run id. Expected: refused within seconds (non-zero exit) with a message naming the holder's pid, and the
  first run finishes unaffected.

Measured per scenario (and per seed in the JSON):

- *survived*: the last run exited 0 and ``final/`` is identical to the reference's: every file but
  ``summary.json`` (seconds, paths) byte for byte, Parquet files by content (schema and rows);
- *rows lost*: input lines not accounted for by the data stage (rows in - kept - rejected), plus rows of
  D_0 (``round_0/data/train``) that are neither in the final dataset nor an ancestor of one of its rows
  (through the ``parent_id`` lineage of D_1, D_2 and ``final/lineage.parquet``);
- *calls repeated*: teacher requests answered 200 more than once in the scenario, and of those the ones
  *beyond in flight*: repeats of a call whose answer was already in the run's LLM-call cache when the run
  was interrupted (every answer of this teacher carries a tag of its request, so the cached refine answers
  tell which teacher calls they hold). A call of a refine request that was still in flight at the
  interruption is not cached and must be asked again: that repeat is allowed;
- *stages redone*: stages whose ``_SUCCESS`` marker existed when a run was interrupted and was written
  again later (the marker holds its finish time);
- the seconds of the scenario, leftover processes of every run's session, and each expectation above as a
  named check; a failed check is listed in the table with a short reason (the log's last lines are in
  the JSON). A scenario that goes wrong is a row, never a crash of the benchmark.

    .venv/bin/python benchmarks/chaos.py --quick               # 30-65 min on 2 cores: see docs/robustness.md
    .venv/bin/python benchmarks/chaos.py --seeds 3             # every stage, 3 seeds (~2.5 h)
    .venv/bin/python benchmarks/chaos.py --scenarios sigkill:refine bad-rows --keep

``--quick``: 1 seed; sigkill in diagnose, refine and train; sigterm in refine; both teacher faults;
bad-rows; second-run. Prints a table and writes JSON (default benchmarks/results/chaos.json), with the
load average before and after. Run it alone: on 2 cores anything else running makes the runs slower and
their timeouts meaningless. Exit code 0 whatever the results say, unless ``--strict``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("diagnose", "select", "refine", "merge", "train", "eval")   # round 2's, in order
QUICK_SIGKILL = ("diagnose", "refine", "train")
SIGTERM_STAGES = ("diagnose", "refine")
QUICK_SIGTERM = ("refine",)
TEACHER_FAULTS = {"teacher-500": ("http500", None), "teacher-refuse": ("refuse", None),
                  "teacher-blip": ("http500", 2.0)}   # name -> (mode, fault seconds; None: --fault-seconds)
ALL_SCENARIOS = ([f"sigkill:{s}" for s in STAGES] + [f"sigterm:{s}" for s in SIGTERM_STAGES]
                 + list(TEACHER_FAULTS) + ["bad-rows", "second-run"])
DEFAULT_SCENARIOS = [s for s in ALL_SCENARIOS if s != "teacher-blip"]
QUICK_SCENARIOS = ([f"sigkill:{s}" for s in QUICK_SIGKILL] + [f"sigterm:{s}" for s in QUICK_SIGTERM]
                   + ["teacher-500", "teacher-refuse", "bad-rows", "second-run"])

KEY_ENV = "MIDDO_CHAOS_TEACHER_KEY"     # the teacher's "API key" travels in this variable, never on a command line
TEACHER_MODEL = "chaos-teacher"
TAG_RE = re.compile(r"\(ref ([0-9a-f]{12})\)")
SIGTERM_GRACE_S = 30.0                  # a SIGTERMed session must be empty this long after the signal
SECOND_RUN_LIMIT_S = 60.0               # a refused second run must have exited within this
IGNORED_FINAL = {"summary.json"}        # seconds and paths: differs between any two runs


# ----- small helpers -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _tail(log: Path, n: int = 6) -> list[str]:
    """The log's last non-blank lines (for the reason of a failure)."""
    try:
        lines = [ln.rstrip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []
    return [ln[:400] for ln in lines[-n:]]


def _session(sid: int) -> list[int]:
    """Live (non-zombie) pids of session ``sid`` (Ray's workers lead process groups of their own, so the
    session, not the group, is what holds every process of one run)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _names(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            out.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return out


def _kill_session(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGKILLs every process of ``proc``'s session until none is left; returns how many rounds of kills it
    took (so nothing of the killed run writes after this returns, unless the timeout passes)."""
    deadline = time.time() + timeout
    rounds = 0
    while (pids := _session(proc.pid)) and time.time() < deadline:
        rounds += 1
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        proc.poll()
        time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(1.0, deadline - time.time()))
    return rounds


def _rc(proc: subprocess.Popen) -> int | None:
    """The exit code as a shell reports it (a signal N is 128 + N)."""
    rc = proc.poll()
    return None if rc is None else (128 - rc if rc < 0 else rc)


def _wait_for(proc: subprocess.Popen, cond: Callable[[], bool], timeout: float, poll: float = 0.1,
              tick: Callable[[], None] | None = None) -> bool:
    """Polls until ``cond()`` holds (True), or the process ends or the timeout passes (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if tick:
            tick()
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(poll)
    return False


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# ----- the teacher ---------------------------------------------------------------------------------

_VERBS = ("Explain", "Describe", "Summarize", "Outline", "Show")
_TOPICS = ("how a bicycle gear changes the effort of pedalling", "why the sky looks blue at noon and red at dusk",
           "how to find the average of five numbers", "what a good cover letter contains",
           "how plants turn sunlight into sugar", "the difference between weather and climate",
           "how to boil an egg so that the yolk stays soft", "why bread dough rises in a warm room")
_AUDIENCE = ("to a twelve-year-old", "for a beginner", "in plain words", "to a new colleague")
_FIRST = ("Start with the main idea in one sentence.", "First, name the parts involved.",
          "Begin with a familiar everyday example.", "Say what the result should look like.")
_THEN = ("Then go through it one step at a time.", "Then compare it with a simpler case.",
         "Then show the calculation with small numbers.", "Then point out the most common mistake.")


class _QuietServer(ThreadingHTTPServer):
    """A client that goes away (a killed driver resets its kept-alive connections) is expected here."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class Teacher:
    """An OpenAI-compatible teacher on loopback: ``POST /v1/chat/completions`` and ``GET /v1/models``.

    The answer is a function of the request only: a rewrite request (its last message asks for text after
    ``#Final Rewritten Prompt#:`` or ``#New Prompt#:``) gets a short plan, the marker and a fluent prompt;
    any other request gets a short answer. Every text ends with ``(ref <tag>)``, the first 12 hex digits of
    the request's key (a hash of method, messages, max_tokens and seed), so a cached refine answer tells
    which teacher calls it holds. Every request is logged as ``(key, status)``.

    Modes: ``ok``; ``http500`` (a 500 with an OpenAI-style JSON error); ``refuse`` (the listening socket
    is closed and kept-alive connections dropped: connections are refused until :meth:`heal` listens again
    on the same port). :meth:`arm` switches to a fault after a number of further calls.
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls: list[tuple[str, int]] = []
        self.models_calls = 0
        self.fault_started: float | None = None
        self._armed: tuple[str, int] | None = None      # (mode, calls still answered before it)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: _QuietServer | None = None
        self.port = 0
        self._listen()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # control

    def _listen(self) -> None:
        server = _QuietServer(("127.0.0.1", self.port), self._handler())   # SO_REUSEADDR: the same port again
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _close(self, server: _QuietServer | None = None) -> None:
        """Stops listening (the given server, else the current one) and drops the open connections."""
        if server is None:
            with self._lock:
                server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def arm(self, mode: str, after_calls: int) -> None:
        """Switches to ``mode`` once ``after_calls`` more calls have been answered normally."""
        with self._lock:
            self._armed = (mode, max(0, int(after_calls)))
        if after_calls <= 0:
            self._fire()

    def _fire(self) -> None:
        with self._lock:
            if self._armed is None:
                return
            mode, self._armed = self._armed[0], None
            self.mode, self.fault_started = mode, time.time()
            server = self._server if mode == "refuse" else None
            if server is not None:
                self._server = None          # heal() listens anew; the thread below closes this one only
        if server is not None:               # shutdown() from a thread of its own, never a handler's
            threading.Thread(target=self._close, args=(server,), daemon=True).start()

    def heal(self) -> None:
        """Back to ``ok`` (listening again after ``refuse``); disarms a fault that has not fired."""
        with self._lock:
            self._armed = None
            self.mode, self.fault_started = "ok", None
            closed = self._server is None
        if closed:
            deadline = time.time() + 10
            while True:
                try:
                    self._listen()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)

    def close(self) -> None:
        self._close()

    def mark(self) -> int:
        with self._lock:
            return len(self.calls)

    def log_since(self, start: int) -> list[tuple[str, int]]:
        with self._lock:
            return list(self.calls[start:])

    # answers

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(["POST /v1/chat/completions", body.get("messages"), body.get("max_tokens"),
                                          body.get("seed")], sort_keys=True).encode()).hexdigest()

    @staticmethod
    def answer(body: dict, key: str) -> str:
        """The deterministic text for a request (see the class docstring)."""
        last = str(((body.get("messages") or [{}])[-1] or {}).get("content", ""))
        h = hashlib.sha256(last.encode()).digest()
        tag = f"(ref {key[:12]})"
        marker = ("#New Prompt#:" if last.startswith("You are a creative prompt writer") else
                  "#Final Rewritten Prompt#:" if last.startswith("You are an expert at rewriting prompts") else None)
        if marker:
            prompt = (f"{_VERBS[h[0] % len(_VERBS)]} {_TOPICS[h[1] % len(_TOPICS)]} "
                      f"{_AUDIENCE[h[2] % len(_AUDIENCE)]}, in three short steps with one example {tag}.")
            return f"Step 1: shorter sentences. Step 2: one idea per step. Step 3: a concrete case.\n{marker}\n{prompt}"
        return f"{_FIRST[h[3] % len(_FIRST)]} {_THEN[h[4] % len(_THEN)]} Finally, check the result {tag}."

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # quiet
                pass

            def setup(self):
                super().setup()
                with owner._lock:
                    owner._conns.add(self.connection)

            def finish(self):
                with owner._lock:
                    owner._conns.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                owner.models_calls += 1
                self._send(200, {"object": "list", "data": [{"id": TEACHER_MODEL, "object": "model"}]})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                    return
                key = owner.key(body)
                with owner._lock:
                    armed = owner._armed
                    if armed is not None:
                        owner._armed = (armed[0], armed[1] - 1)
                fire = armed is not None and armed[1] <= 0
                if fire:
                    owner._fire()
                mode = owner.mode
                if mode == "refuse":
                    # The server "died" under this request: no answer, the connection drops.
                    with owner._lock:
                        owner.calls.append((key, 0))
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status = 500 if mode == "http500" else 200
                with owner._lock:
                    owner.calls.append((key, status))
                if status != 200:
                    self._send(status, {"error": {"message": "chaos teacher fault: internal error",
                                                  "type": "server_error", "code": status}})
                    return
                text = owner.answer(body, key)
                n_in = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
                self._send(200, {"id": f"chatcmpl-{key[:16]}", "object": "chat.completion", "created": 0,
                                 "model": body.get("model"),
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": n_in, "completion_tokens": len(text.split()),
                                           "total_tokens": n_in + len(text.split())}})

        return Handler


# ----- the data file -------------------------------------------------------------------------------

def write_data(path: Path, n_good: int) -> dict:
    """The runs' input: ``n_good`` demo seed rows, then one bad row of each kind; returns what is where.

    Returns:
        ``{"lines", "good", "bad": {kind: line}}`` (lines 1-based, as the rejects file numbers them).
    """
    from middo_ray.demo import demo_path

    good = [ln for ln in demo_path("seed").read_bytes().splitlines() if ln.strip()][:n_good]
    bad = {
        "invalid-utf8": b'{"instruction": "Caf\xe9 or tea?", "input": "", "output": "Tea, thank you."}',
        "not-json": b'{"instruction": "An unfinished row", "output": ',
        "no-instruction": json.dumps({"input": "", "output": "An answer without its question."}).encode(),
        "huge-output": json.dumps({"instruction": "Repeat the letter a.", "input": "",
                                   "output": "a" * 300_000}).encode(),
        "messages-row": json.dumps({"messages": [{"role": "user", "content": "Hello?"},
                                                 {"role": "assistant", "content": "Hello! How can I help?"}]}).encode(),
        "duplicate": good[0],
    }
    lines = good + list(bad.values())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {"lines": len(lines), "good": len(good),
            "bad": {kind: len(good) + i + 1 for i, kind in enumerate(bad)}}


# ----- what a run directory says -------------------------------------------------------------------

def final_digest(run_dir: Path) -> dict[str, str] | None:
    """Per file of ``final/`` (but summary.json) a digest: bytes, or schema + rows for Parquet. None: no final/."""
    final = run_dir / "final"
    if not (final / "summary.json").is_file():
        return None
    import pyarrow.parquet as pq

    out = {}
    for p in sorted(final.rglob("*")):
        rel = str(p.relative_to(final))
        if not p.is_file() or rel in IGNORED_FINAL:
            continue
        if p.suffix == ".parquet":
            t = pq.read_table(p)
            out[rel] = "rows:" + _sha(json.dumps([str(t.schema.remove_metadata()), t.to_pylist()],
                                                 default=str, sort_keys=True).encode())
        else:
            out[rel] = _sha(p.read_bytes())
    return out


def _ids(folder: Path, cols=("sample_id", "parent_id")) -> list[dict]:
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for p in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        rows += pq.read_table(p, columns=list(cols)).to_pylist()
    return rows


def accounting(run_dir: Path, data: dict) -> dict:
    """Rows in, kept and rejected (the data stage), the bad rows' fate, and the rows lost (module docstring)."""
    out: dict[str, Any] = {"rows_in_file": data["lines"]}
    try:
        rec = json.loads((run_dir / "round_0" / "data" / "stage.json").read_text())
    except (OSError, ValueError):
        return {**out, "rows_lost": None, "why": "no data stage record"}
    kept = rec["train"] + rec["heldout"] + rec["unused"]
    out.update(rows_in=rec["rows_in"], kept=kept, rejected=rec["rejected"], train=rec["train"])
    read_lost = data["lines"] - kept - rec["rejected"]
    rejects: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for ln in (run_dir / "round_0" / "data" / "rejects.jsonl").read_text().splitlines():
            if ln.strip():
                r = json.loads(ln)
                rejects[int(r["line"])] = r["reason"]
    out["bad_rows"] = {kind: rejects.get(line, "ACCEPTED (not in rejects.jsonl)")[:160]
                       for kind, line in data["bad"].items()}
    out["bad_rows_accepted"] = sorted(k for k, line in data["bad"].items() if line not in rejects)
    d0 = [r["sample_id"] for r in _ids(run_dir / "round_0" / "data" / "train", ("sample_id",))]
    final = run_dir / "final" / "lineage.parquet"
    if not final.is_file():
        return {**out, "read_lost": read_lost, "rows_lost": None, "why": "no final/lineage.parquet"}
    import pyarrow.parquet as pq

    final_rows = pq.read_table(final, columns=["sample_id", "parent_id"]).to_pylist()
    parent = {}
    for k in range(1, 100):
        folder = run_dir / f"round_{k}" / "merge" / "dataset"
        if not folder.is_dir():
            break
        parent.update({r["sample_id"]: r["parent_id"] for r in _ids(folder) if r["parent_id"]})
    parent.update({r["sample_id"]: r["parent_id"] for r in final_rows if r["parent_id"]})
    reached, todo = set(), [r["sample_id"] for r in final_rows]
    while todo:                                   # the final rows and all their ancestors
        sid = todo.pop()
        if sid in reached:
            continue
        reached.add(sid)
        if parent.get(sid):
            todo.append(parent[sid])
    loop_lost = [sid for sid in d0 if sid not in reached]
    out.update(final_rows=len(final_rows), read_lost=read_lost, loop_lost=len(loop_lost),
               loop_lost_ids=loop_lost[:5], rows_lost=read_lost + len(loop_lost))
    return out


def markers(run_dir: Path) -> dict[str, str]:
    """``round_k/stage`` -> its _SUCCESS marker's text (which holds its finish time)."""
    out = {}
    for p in sorted(run_dir.glob("round_*/*/_SUCCESS")):
        with contextlib.suppress(OSError):
            out[f"{p.parent.parent.name}/{p.parent.name}"] = p.read_text()
    return out


def cache_tags(run_dir: Path) -> set[str]:
    """Tags of the teacher calls whose answers are inside the run's cached refine answers."""
    tags: set[str] = set()
    for p in (run_dir / "cache" / "llm").rglob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            tags.update(TAG_RE.findall(json.dumps(json.loads(p.read_text()).get("answer"))))
    return tags


def manifest_seconds(run_dir: Path, k: int) -> dict[str, float]:
    with contextlib.suppress(OSError, ValueError):
        return {s: float(v) for s, v in json.loads((run_dir / f"round_{k}" / "manifest.json").read_text())
                ["timings"].items() if v is not None}
    return {}


# ----- runs and scenarios --------------------------------------------------------------------------

class Bench:
    """Starts the runs, watches them, and measures a scenario's run directory against the reference."""

    def __init__(self, args, work: Path, teacher: Teacher, data_path: Path, data: dict):
        self.args, self.work, self.teacher = args, work, teacher
        self.data_path, self.data = data_path, data
        self.runs = work / "runs"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.live: set[subprocess.Popen] = set()
        self.reference: dict = {}

    # processes

    def command(self, run_id: str, port: int) -> list[str]:
        sets = [f"run.output_dir={self.runs}", f"run.run_id={run_id}", f"data.path={self.data_path}",
                f"data.max_samples={self.args.max_samples}", "refine.engine=openai",
                f"refine.openai_base_url={self.teacher.base_url}", f"refine.model={TEACHER_MODEL}",
                f"refine.openai_api_key_env={KEY_ENV}", f"refine.http_port={port}",
                # More, smaller refine requests: round 2 asks the teacher often enough for a fault to land.
                "refine.batch_size=2", "select.mode=budget", "select.budget_fraction=0.2", *self.args.set]
        return [sys.executable, "-m", "middo_ray.cli", "run", "--config", str(ROOT / "jobs" / "tiny.yaml"),
                *[a for s in sets for a in ("--set", s)]]

    def start(self, run_id: str, port: int, log: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **{KEY_ENV: "chaos-key"})
        with open(log, "w") as out:   # a file: a pipe nobody reads would fill up and stall the driver
            proc = subprocess.Popen(self.command(run_id, port), cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.live.add(proc)
        return proc

    def reap(self, proc: subprocess.Popen) -> list[str]:
        """After a run ended: kills what is left of its session; returns those processes' names."""
        left = _session(proc.pid)
        names = _names(left)
        if left:
            _kill_session(proc)
        self.live.discard(proc)
        return names

    def kill_all(self) -> None:
        for proc in list(self.live):
            _kill_session(proc)
            self.live.discard(proc)

    def wait(self, proc: subprocess.Popen, tick: Callable[[], None] | None = None) -> int | None:
        """Waits for the run to end (killing its session past --run-timeout); its exit code (None: timed out)."""
        done = _wait_for(proc, lambda: proc.poll() is not None, self.args.run_timeout, 0.2, tick)
        if not done:
            _kill_session(proc)
            return None
        return _rc(proc)

    # one scenario

    def new_scenario(self, name: str, seed: int | None) -> dict:
        rid = re.sub(r"[^a-z0-9-]", "-", name) + ("" if seed is None else f"-s{seed}")
        return {"scenario": name, "seed": seed, "run_id": rid, "port": _free_port(), "runs": [],
                "interruptions": [], "injected": 0, "checks": {}, "notes": [], "load_average": _load(),
                "t0": time.time(), "teacher_start": self.teacher.mark()}

    def run_dir(self, sc: dict) -> Path:
        return self.runs / sc["run_id"]

    def interrupted(self, sc: dict) -> None:
        """What the run directory and the teacher hold right after a run was interrupted."""
        rd = self.run_dir(sc)
        sc["interruptions"].append({"calls": self.teacher.mark() - sc["teacher_start"], "tags": cache_tags(rd),
                                    "markers": markers(rd)})

    def record(self, sc: dict, proc: subprocess.Popen, log: Path, rc: int | None, t0: float, **extra) -> dict:
        run = {"log": str(log), "rc": rc, "seconds": round(time.time() - t0, 1), "left": self.reap(proc),
               "tail": _tail(log), **extra}
        sc["runs"].append(run)
        return run

    def finish_runs(self, sc: dict) -> None:
        """Reruns the scenario's command until a run exits 0 (at most --max-reruns reruns)."""
        for i in range(self.args.max_reruns):
            log = self.logs / f"{sc['run_id']}.rerun{i + 1}.log"
            t0 = time.time()
            proc = self.start(sc["run_id"], sc["port"], log)
            rc = self.wait(proc)
            run = self.record(sc, proc, log, rc, t0, kind="rerun")
            if rc == 0:
                return
            self.interrupted(sc)
            sc["notes"].append(f"rerun {i + 1} ended with rc {rc}: {(run['tail'] or ['(empty log)'])[-1][:200]}")

    def measure(self, sc: dict) -> dict:
        """The scenario's measures and generic checks (module docstring); drops the bulky working fields."""
        rd = self.run_dir(sc)
        last = sc["runs"][-1] if sc["runs"] else {"rc": None}
        digest = final_digest(rd)
        ref = self.reference.get("final")
        differ = sorted(k for k in set(ref or {}) | set(digest or {}) if (ref or {}).get(k) != (digest or {}).get(k))
        acc = accounting(rd, self.data)
        # Calls repeated: a teacher call answered 200 again after its first 200.
        log = self.teacher.log_since(sc["teacher_start"])
        first: dict[str, int] = {}
        repeated, beyond = 0, []
        for i, (key, status) in enumerate(log):
            if status != 200:
                continue
            if key not in first:
                first[key] = i
                continue
            repeated += 1
            # The first interruption after the first answer: was that answer cached by then?
            cut = next((x for x in sc["interruptions"] if first[key] < x["calls"] <= i), None)
            if cut is None or key[:12] in cut["tags"]:
                beyond.append(key[:12])
        # Stages redone: a marker that existed at an interruption and was rewritten later.
        now = markers(rd)
        redone = sorted({st for x in sc["interruptions"] for st, text in x["markers"].items() if now.get(st) != text})
        sc.update(final_differs=differ if digest else ["(no final/)"], survived=bool(last["rc"] == 0 and digest
                                                                                    and not differ),
                  rows=acc, rows_lost=acc.get("rows_lost"), calls_repeated=repeated,
                  calls_repeated_beyond_in_flight=len(beyond), beyond_tags=beyond[:5],
                  teacher_calls=len(log), teacher_errors=sum(1 for _, s in log if s != 200),
                  stages_redone=redone, seconds=round(time.time() - sc["t0"], 1), load_average_end=_load())
        c = sc["checks"]
        c["finished"] = last["rc"] == 0
        c["final identical"] = bool(digest) and not differ
        c["0 rows lost"] = acc.get("rows_lost") == 0
        c["0 calls repeated beyond in flight"] = not beyond
        c["0 stages redone"] = not redone
        c["no process left"] = not any(r["left"] for r in sc["runs"] if r.get("kind") != "sigterm")
        for x in sc["interruptions"]:
            x["tags"] = len(x["tags"])
            x["markers"] = sorted(x["markers"])
        return sc

    def fail(self, sc: dict, why: str) -> dict:
        sc["notes"].append(why)
        return sc


def _killed_in(run_dir: Path) -> str:
    """Where a kill landed: the first round-2 stage that had started but not finished."""
    r2 = run_dir / "round_2"
    for st in STAGES:
        if (r2 / st).is_dir() and not (r2 / st / "_SUCCESS").exists():
            return st
    done = [st for st in STAGES if (r2 / st / "_SUCCESS").exists()]
    return f"between stages (after {done[-1]})" if done else "before round 2"


def _point(b: Bench, name: str, stage: str, seed: int) -> float:
    """The seeded delay after ``stage`` starts: 10-90 % of the reference's seconds for it."""
    rng = random.Random(f"{name}:{seed}")
    return rng.uniform(0.1, 0.9) * b.reference["stage_seconds"].get(stage, 5.0)


def _calls_point(b: Bench, name: str, stage: str, seed: int) -> int | None:
    """For refine and even seeds: kill after this many of round 2's teacher calls instead of after a delay.

    The teacher's part of refine is its first few seconds (the rest is the judge app), so points drawn
    over the stage's seconds would mostly miss it; a point drawn over the calls lands among them, with
    requests in flight.
    """
    n = b.reference.get("r2_refine_calls", 0)
    if stage != "refine" or seed % 2 or n < 2:
        return None
    return random.Random(f"{name}:{seed}:calls").randint(1, n - 1)


def reach(b: Bench, sc: dict, proc: subprocess.Popen, stage: str, delay: float,
          after_calls: int | None = None) -> tuple[bool, str]:
    """Waits until round 2's ``stage`` has run ``delay`` seconds, or the teacher has answered ``after_calls``
    calls since it started (or it finished, whichever first)."""
    sdir = b.run_dir(sc) / "round_2" / stage
    if not _wait_for(proc, sdir.is_dir, b.args.run_timeout, 0.05):
        return False, f"the driver ended (rc {_rc(proc)}) before round 2's {stage} started"
    t0, c0 = time.time(), b.teacher.mark()
    if after_calls is None:
        point = lambda: time.time() - t0 >= delay  # noqa: E731
    else:
        point = lambda: b.teacher.mark() - c0 >= after_calls  # noqa: E731
        delay = 120.0                               # a bound: the stage may ask fewer (it then finishes first)
    _wait_for(proc, lambda: point() or (sdir / "_SUCCESS").exists(), delay + 5, 0.02)
    if proc.poll() is not None:
        return False, f"the driver ended (rc {_rc(proc)}) before the fault point"
    return True, ""


def sc_signal(b: Bench, name: str, seed: int) -> dict:
    """``sigkill:<stage>`` (the whole session) or ``sigterm:<stage>`` (the driver only), then reruns."""
    kind, stage = name.split(":")
    sc = b.new_scenario(name, seed)
    delay, calls = _point(b, name, stage, seed), _calls_point(b, name, stage, seed)
    log = b.logs / f"{sc['run_id']}.log"
    t0 = time.time()
    proc = b.start(sc["run_id"], sc["port"], log)
    ok, why = reach(b, sc, proc, stage, delay, calls)
    if not ok:
        b.record(sc, proc, log, b.wait(proc), t0, kind="first")
        return b.fail(sc, why)
    sc["kill_point"] = {"stage": stage, "delay_s": None if calls else round(delay, 2), "after_calls": calls,
                        "landed_in": _killed_in(b.run_dir(sc))}
    sc["injected"] += 1
    if kind == "sigkill":
        _kill_session(proc)
        b.interrupted(sc)                 # after the kill: exactly what the killed run left
        b.record(sc, proc, log, _rc(proc), t0, kind="sigkill")
    else:
        t_sig = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        exited = _wait_for(proc, lambda: proc.poll() is not None, 2 * SIGTERM_GRACE_S, 0.1)
        stop_s = round(time.time() - t_sig, 1)
        time.sleep(max(0.0, t_sig + SIGTERM_GRACE_S - time.time()))
        left = _names(_session(proc.pid))
        rc = _rc(proc) if exited else None
        b.interrupted(sc)
        b.record(sc, proc, log, rc, t0, kind="sigterm", stop_s=stop_s, left_after_30s=left)
        sc["checks"]["exit code 143"] = rc == 143
        sc["checks"]["nothing left 30 s after SIGTERM"] = not left
        sc["checks"]["no traceback"] = "Traceback (most recent call last)" not in log.read_text(errors="replace")
        sc["sigterm"] = {"rc": rc, "stop_s": stop_s, "left_after_30s": left}
    b.finish_runs(sc)
    return sc


def sc_teacher(b: Bench, name: str, seed: int) -> dict:
    """``teacher-500`` / ``teacher-refuse`` / ``teacher-blip``: the teacher fails during round 2's refine."""
    mode, seconds = TEACHER_FAULTS[name]
    seconds = b.args.fault_seconds if seconds is None else seconds
    sc = b.new_scenario(name, seed)
    after = random.Random(f"{name}:{seed}").randint(0, max(0, b.reference["r2_refine_calls"] // 2))
    log = b.logs / f"{sc['run_id']}.log"
    t0 = time.time()
    proc = b.start(sc["run_id"], sc["port"], log)
    refine = b.run_dir(sc) / "round_2" / "refine"
    if not _wait_for(proc, refine.is_dir, b.args.run_timeout, 0.05):
        b.record(sc, proc, log, b.wait(proc), t0, kind="first")
        return b.fail(sc, f"the driver ended (rc {_rc(proc)}) before round 2's refine started")
    start = b.teacher.mark()
    b.teacher.arm(mode, after)
    fired = {"at": None, "healed": None}

    def tick() -> None:                       # heal after the fault's seconds
        t = b.teacher.fault_started
        if t is not None and fired["at"] is None:
            fired["at"] = t
        if t is not None and time.time() - t >= seconds:
            b.teacher.heal()
            fired["healed"] = time.time()

    rc = b.wait(proc, tick)
    fault_on = b.teacher.fault_started is not None
    b.teacher.heal()                          # whatever happened: the rerun gets a healthy teacher
    if fired["at"] is not None and fired["healed"] is None:
        fired["healed"] = time.time()
    text = log.read_text(errors="replace")
    stop_lines = [ln for ln in text.splitlines() if ln.startswith("middo: ")]
    sc["fault"] = {"mode": mode, "after_calls": after, "fired": fired["at"] is not None,
                   "lasted_s": round(fired["healed"] - fired["at"], 1) if fired["at"] else None,
                   "still_on_at_exit": fault_on,
                   "failed_calls": sum(1 for _, s in b.teacher.log_since(start) if s != 200),
                   "rc": rc, "stop_line": stop_lines[-1][:300] if stop_lines else None}
    sc["injected"] += int(fired["at"] is not None)
    sc["checks"]["fault fired"] = fired["at"] is not None
    if rc == 0:
        b.record(sc, proc, log, rc, t0, kind="rode-out")
        sc["notes"].append("rode the fault out (exit 0)" if fired["at"] else "the fault never fired")
    else:
        b.interrupted(sc)
        b.record(sc, proc, log, rc, t0, kind="stopped")
        url = f"127.0.0.1:{b.teacher.port}"
        sc["checks"]["one-line stop naming the endpoint"] = bool(stop_lines) and url in stop_lines[-1]
        sc["checks"]["no traceback"] = "Traceback (most recent call last)" not in text
        sc["checks"]["exit code 1"] = rc == 1
        b.finish_runs(sc)
    return sc


def sc_bad_rows(b: Bench, seed: int | None = None) -> dict:
    """An uninterrupted run of its own; the bad rows' fate (see :func:`accounting`)."""
    sc = b.new_scenario("bad-rows", None)
    sc["injected"] = len(b.data["bad"])
    log = b.logs / f"{sc['run_id']}.log"
    t0 = time.time()
    proc = b.start(sc["run_id"], sc["port"], log)
    b.record(sc, proc, log, b.wait(proc), t0, kind="plain")
    acc = accounting(b.run_dir(sc), b.data)
    sc["checks"]["rows in = kept + rejected"] = (acc.get("rows_in") == b.data["lines"]
                                                 and acc.get("kept", 0) + acc.get("rejected", 0) == b.data["lines"])
    sc["checks"]["every bad row rejected"] = "bad_rows" in acc and not acc["bad_rows_accepted"]
    return sc


def sc_second_run(b: Bench, seed: int) -> dict:
    """A second `middo run` with the same run id while the first is in a random stage of round 2."""
    sc = b.new_scenario("second-run", seed)
    rng = random.Random(f"second-run:{seed}")
    stage = rng.choice(STAGES)
    delay = rng.uniform(0.1, 0.9) * b.reference["stage_seconds"].get(stage, 5.0)
    log = b.logs / f"{sc['run_id']}.log"
    t0 = time.time()
    proc = b.start(sc["run_id"], sc["port"], log)
    ok, why = reach(b, sc, proc, stage, delay)
    if ok:
        sc["injected"] += 1
        log2 = b.logs / f"{sc['run_id']}.second.log"
        t2 = time.time()
        second = b.start(sc["run_id"], sc["port"], log2)     # the very same command
        done = _wait_for(second, lambda: second.poll() is not None, SECOND_RUN_LIMIT_S, 0.1)
        if not done:
            _kill_session(second)
        rc2 = _rc(second)
        said = " ".join(_tail(log2, 4))
        sc["second"] = {"at": f"round_2/{stage} +{delay:.1f}s", "rc": rc2, "seconds": round(time.time() - t2, 1),
                        "left": b.reap(second), "message": said[:300]}
        sc["checks"]["second refused (non-zero exit)"] = done and rc2 not in (0, None)
        sc["checks"]["refusal names the holder's pid"] = f"pid {proc.pid}" in said
    else:
        sc["notes"].append(why)
    b.record(sc, proc, log, b.wait(proc), t0, kind="first")
    return sc


def run_reference(b: Bench) -> dict:
    """The uninterrupted run every scenario is compared with; also times round 2's stages."""
    sc = b.new_scenario("reference", None)
    log = b.logs / "reference.log"
    t0 = time.time()
    proc = b.start(sc["run_id"], sc["port"], log)
    r2 = b.run_dir(sc) / "round_2" / "refine"
    seen: dict[str, int] = {}

    def tick() -> None:   # the teacher's call count when round 2's refine starts and ends
        if "start" not in seen and r2.is_dir():
            seen["start"] = b.teacher.mark()
        if "end" not in seen and (r2 / "_SUCCESS").exists():
            seen["end"] = b.teacher.mark()

    rc = b.wait(proc, tick)
    b.record(sc, proc, log, rc, t0, kind="plain")
    rd = b.run_dir(sc)
    b.reference = {"rc": rc, "final": final_digest(rd), "stage_seconds": manifest_seconds(rd, 2),
                   "r2_refine_calls": max(0, seen.get("end", 0) - seen.get("start", 0)),
                   "teacher_calls": b.teacher.mark() - sc["teacher_start"], "rows": accounting(rd, b.data),
                   "seconds": round(time.time() - t0, 1), "tail": _tail(log), "run_id": sc["run_id"]}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((rd / "round_2" / "refine" / "stage.json").read_text())["counts"]
        b.reference["r2_refine_counts"] = {k: info.get(k) for k in ("jobs", "ok", "failed", "requests",
                                                                     "judged", "rejected") if k in info}
    return b.reference


# ----- the table -----------------------------------------------------------------------------------

HEADER = (f"{'fault':<17}{'injected':>9}{'survived':>10}{'rows lost':>11}{'calls rep.':>12}{'(beyond)':>10}"
          f"{'redone':>8}{'reruns':>8}{'seconds':>9}  problems")


def aggregate(name: str, seeds: list[dict]) -> dict:
    """One table row from a scenario's seeds."""
    def total(key):
        vals = [s.get(key) for s in seeds]
        return None if any(v is None for v in vals) else sum(vals)

    problems = sorted({f"{c}" for s in seeds for c, ok in s["checks"].items() if not ok})
    return {"fault": name, "injected": sum(s["injected"] for s in seeds),
            "survived": f"{sum(bool(s.get('survived')) for s in seeds)}/{len(seeds)}",
            "rows_lost": total("rows_lost"), "calls_repeated": total("calls_repeated"),
            "beyond_in_flight": total("calls_repeated_beyond_in_flight"),
            "stages_redone": sum(len(s.get("stages_redone") or []) for s in seeds),
            "reruns": sum(1 for s in seeds for r in s["runs"] if r.get("kind") == "rerun"),
            "seconds": round(sum(s.get("seconds") or 0 for s in seeds), 1), "problems": problems,
            "notes": [n for s in seeds for n in s["notes"]]}


def table_line(r: dict) -> str:
    dash = lambda v: "-" if v is None else v  # noqa: E731
    return (f"{r['fault']:<17}{r['injected']:>9}{r['survived']:>10}{dash(r['rows_lost']):>11}"
            f"{dash(r['calls_repeated']):>12}{dash(r['beyond_in_flight']):>10}{r['stages_redone']:>8}"
            f"{r['reruns']:>8}{r['seconds']:>9}  {'; '.join(r['problems']) or 'none'}")


def detail_line(d: dict) -> str:
    """What happened in one scenario run, in a line: where the fault landed and how the driver took it."""
    bits = [f"rc {[r['rc'] for r in d['runs']]}"]
    if "kill_point" in d:
        k = d["kill_point"]
        at = f"after {k['after_calls']} teacher calls" if k.get("after_calls") else f"+{k['delay_s']}s"
        bits.append(f"{k['stage']} {at}, landed in {k['landed_in']}")
    if "sigterm" in d:
        t = d["sigterm"]
        bits.append(f"SIGTERM -> rc {t['rc']} after {t['stop_s']} s, left 30 s later: {t['left_after_30s'] or 'none'}")
    if "fault" in d:
        f = d["fault"]
        bits.append(f"{f['mode']} after {f['after_calls']} calls, fired {f['fired']}, lasted {f['lasted_s']} s, "
                    f"{f['failed_calls']} calls failed; stop line: {f['stop_line']!r}")
    if "second" in d:
        s2 = d["second"]
        bits.append(f"second run at {s2['at']}: rc {s2['rc']} in {s2['seconds']} s: {s2['message'][:160]!r}")
    if d.get("final_differs"):
        bits.append(f"final differs: {', '.join(d['final_differs'])}")
    if d.get("stages_redone"):
        bits.append(f"redone: {', '.join(d['stages_redone'])}")
    return f"  {d['scenario']}#{d['seed']}: " + "; ".join(bits)


def goals(rows: list[dict], details: list[dict]) -> list[dict]:
    return [
        {"goal": "0 rows lost", "pass": all(r["rows_lost"] == 0 for r in rows),
         "failing": [r["fault"] for r in rows if r["rows_lost"] != 0]},
        {"goal": "0 LLM calls repeated beyond the ones in flight", "pass": all(r["beyond_in_flight"] == 0 for r in rows),
         "failing": [r["fault"] for r in rows if r["beyond_in_flight"] != 0]},
        {"goal": "every run finishes with final files identical to the uninterrupted run",
         "pass": all(d.get("survived") for d in details),
         "failing": sorted({d["scenario"] for d in details if not d.get("survived")})},
        {"goal": "no stage that had finished is redone", "pass": all(r["stages_redone"] == 0 for r in rows),
         "failing": [r["fault"] for r in rows if r["stages_redone"]]},
    ]


# ----- main ----------------------------------------------------------------------------------------

def plan(args) -> list[tuple[str, int | None]]:
    """(scenario, seed) pairs in the order they run."""
    chosen = args.scenarios or (QUICK_SCENARIOS if args.quick else DEFAULT_SCENARIOS)
    out = []
    for name in ALL_SCENARIOS:
        if name not in chosen:
            continue
        seeds = [None] if name == "bad-rows" else list(range(args.seeds))
        out += [(name, s) for s in seeds]
    return out


def run_one(b: Bench, name: str, seed: int | None) -> dict:
    if name.startswith(("sigkill:", "sigterm:")):
        return sc_signal(b, name, seed)
    if name in TEACHER_FAULTS:
        return sc_teacher(b, name, seed)
    if name == "bad-rows":
        return sc_bad_rows(b)
    return sc_second_run(b, seed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=None, help="seeds per scenario (the random point; default 3, "
                                                            "1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1 seed; sigkill in diagnose/refine/train, sigterm in "
                                                         "refine, both teacher faults, bad-rows, second-run")
    ap.add_argument("--scenarios", nargs="+", choices=ALL_SCENARIOS, default=None,
                    help="subset to run (default: all but teacher-blip; --quick: its set)")
    ap.add_argument("--rows", type=int, default=48, help="good demo rows in the data file (6 bad rows follow)")
    ap.add_argument("--max-samples", type=int, default=40, help="data.max_samples of the runs")
    ap.add_argument("--fault-seconds", type=float, default=60.0,
                    help="how long a teacher fault lasts at most (it ends when the driver exits)")
    ap.add_argument("--max-reruns", type=int, default=3, help="reruns after an interruption before giving up")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds one run may take before it is killed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run (repeatable), e.g. --set refine.openai_retries=1")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (run directories and logs)")
    ap.add_argument("--work-dir", default=None, help="work directory (default: a new temporary directory)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a goal fails")
    ap.add_argument("--out", "--json", dest="out", default=str(Path(__file__).parent / "results" / "chaos.json"))
    args = ap.parse_args()
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    started = time.time()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="middo-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    todo = plan(args)
    result: dict[str, Any] = {
        "benchmark": "chaos", "quick": args.quick, "seeds": args.seeds, "plan": [f"{n}#{s}" for n, s in todo],
        "config": {"base": "jobs/tiny.yaml", "rows": args.rows, "max_samples": args.max_samples,
                   "fault_seconds": args.fault_seconds, "max_reruns": args.max_reruns, "overrides": args.set},
        "cores": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
        "python": platform.python_version(), "load_average_start": _load(), "rows": [], "details": [],
    }

    def write(status: str) -> None:
        result.update(status=status, load_average_end=_load(), wall_s=round(time.time() - started, 1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))

    teacher = Teacher()
    data_path = work / "chaos_data.jsonl"
    data = write_data(data_path, args.rows)
    b = Bench(args, work, teacher, data_path, data)
    result["data"] = data
    print(f"work directory {work}; teacher at {teacher.base_url}; {data['lines']} input rows "
          f"({len(data['bad'])} bad); {len(todo)} scenario runs; load {_load()}", flush=True)
    details: list[dict] = []
    try:
        ref = run_reference(b)
        result["reference"] = ref
        print(f"reference: rc {ref['rc']} in {ref['seconds']} s; round 2 stages (s): {ref['stage_seconds']}; "
              f"teacher calls {ref['teacher_calls']} ({ref['r2_refine_calls']} in round 2's refine); "
              f"rows {ref['rows'].get('rows_in')} in -> {ref['rows'].get('final_rows')} final", flush=True)
        if ref["rc"] != 0 or not ref["final"]:
            print("the reference run failed: nothing to compare with\n  " + "\n  ".join(ref["tail"]), flush=True)
            write("failed: reference run")
            return 1
        print(HEADER, flush=True)
        for name, seed in todo:
            try:
                sc = b.measure(run_one(b, name, seed))
            except Exception as exc:  # noqa: BLE001 - one broken scenario is a row, not the end of the benchmark
                b.kill_all()
                sc = {"scenario": name, "seed": seed, "runs": [], "injected": 0, "checks": {"benchmark ran": False},
                      "notes": [f"benchmark error: {type(exc).__name__}: {exc}"], "survived": False}
            details.append(sc)
            result["details"] = details
            sc.pop("t0", None)
            brief = "; ".join(sc["notes"])[:160]
            print(f"  {name}#{seed}: survived={sc.get('survived')} rc={[r['rc'] for r in sc['runs']]} "
                  f"{sc.get('seconds')} s {brief}", flush=True)
            write("running")
        rows = [aggregate(n, [d for d in details if d["scenario"] == n])
                for n in dict.fromkeys(d["scenario"] for d in details)]
        result["rows"], result["goals"] = rows, goals(rows, details)
        write("complete")
    except BaseException as exc:
        b.kill_all()
        with contextlib.suppress(Exception):
            write(f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        b.kill_all()
        teacher.close()
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print("\n" + HEADER)
    for r in rows:
        print(table_line(r))
    print(f"\nreference: {ref['seconds']} s; load average {result['load_average_start']} -> "
          f"{result['load_average_end']} (1, 5, 15 min); {os.cpu_count()} cores; wall {result['wall_s']} s")
    print("calls rep. = teacher calls answered 200 more than once; (beyond) = of those, calls whose answer was "
          "already cached\n  when the run was interrupted; redone = finished stages run again; "
          "problems = checks that failed")
    print("\nper run:")
    for d in details:
        print(detail_line(d))
        for n in d["notes"]:
            print(f"    note: {n}")
    print("\ngoals:")
    for g in result["goals"]:
        print(f"  {'PASS' if g['pass'] else 'FAIL'}  {g['goal']}"
              + (f"  (failing: {', '.join(g['failing'])})" if g["failing"] else ""))
    print(f"wrote {args.out}" + (f"; runs kept in {work}" if args.keep or args.work_dir else ""))
    if args.strict and not all(g["pass"] for g in result["goals"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
