"""What the loop's console shows: its own lines, one progress display per long stage, and little of Ray's.

A run on a cluster lasts hours; its operator needs to see, at a glance, which round and stage it is in, how
far the stage is and when it will end. Ray's own console output (a multi-line Ray Data progress block every
few seconds, every Serve and Train worker's INFO log, library progress bars) buries that, so by default
(``quiet``) the driver

- prints the loop's logger (``middo*``) only, one line per stage start and end;
- shows one progress display for the running stage: a single line rewritten in place on a terminal, or a
  line every :data:`LINE_EVERY_S` seconds when the output is not a terminal (CI, ``ray job logs``);
- keeps Ray's output out of the console: its workers' logs are not forwarded to the driver
  (``log_to_driver=False``), Ray Data's progress is off and its console logger warns only. Everything stays
  in Ray's session logs on disk (the start line says where), and ``--verbose`` brings it all back.

The running stage and its progress are also written to ``<run_dir>/progress.json`` (what ``middo status``
reads) and exported as metrics (:mod:`middo_ray.metrics`). Workers elsewhere in the cluster (the training
workers) report their progress to a small named actor (:class:`ProgressBoard`) that the driver polls.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("middo")

LINE_EVERY_S = 30.0      # a progress line this often when the console is not a terminal
TTY_EVERY_S = 0.5        # redraw of the in-place line on a terminal
FILE_EVERY_S = 2.0       # progress.json rewrite
BOARD_NAME = "middo-progress"

_state: dict[str, Any] = {"quiet": True, "run_dir": None, "tty": None}


def configure(verbose: bool = False, stream=None) -> None:
    """Sets up the console for ``middo run``: the loop's lines, and Ray's quiet unless ``verbose``.

    Call before Ray starts (it sets environment variables Ray's workers inherit).
    """
    stream = stream or sys.stdout
    _state["quiet"] = not verbose
    _state["tty"] = stream.isatty()
    handler = _ProgressAwareHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for name in ("middo", "middo_ray"):                 # undo an earlier configure of this process
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if isinstance(h, _ProgressAwareHandler)]:
            lg.removeHandler(h)
        lg.setLevel(logging.NOTSET)
        lg.propagate = True
    if verbose:
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
    else:
        # Only the loop's loggers reach the console; everything else warns at most.
        root.addHandler(_only_warnings(handler))
        root.setLevel(logging.WARNING)
        for name in ("middo", "middo_ray"):
            lg = logging.getLogger(name)
            lg.setLevel(logging.INFO)
            lg.addHandler(handler)
            lg.propagate = False
        for var, value in (("RAY_DATA_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                           ("TRANSFORMERS_VERBOSITY", "error"), ("TQDM_DISABLE", "1")):
            os.environ.setdefault(var, value)
    for noisy in ("urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet() -> bool:
    return bool(_state["quiet"])


def ray_init_kwargs() -> dict:
    """What ``ray.init`` gets from the console settings (workers' logs stay on disk when quiet)."""
    if not quiet():
        return {}
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def after_ray_init() -> None:
    """Quiets what Ray configures at start-up (Ray Data's progress and its console logger), and says where
    Ray's own logs are."""
    import ray

    if quiet():
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
        # Serve re-creates its driver-side handler when it starts, so a filter on the logger (which stays)
        # keeps its INFO lines ("Deployed app ...") out; Ray Data warns once that the progress it shows
        # is off, which is this module's doing.
        logging.getLogger("ray.serve").addFilter(_AtLeastWarning())
        logging.getLogger("ray.data._internal.progress").addFilter(_NotProgressNotice())
        for name in ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune"):
            lg = logging.getLogger(name)
            for h in lg.handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.setLevel(logging.WARNING)
            if lg.level < logging.WARNING and name != "ray.data":
                lg.setLevel(logging.WARNING)
    try:
        node = ray._private.worker._global_node
        logs = os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
    except Exception:  # noqa: BLE001 - only for the message
        logs = None
    ctx = ray.get_runtime_context()
    where = ctx.gcs_address if hasattr(ctx, "gcs_address") else "?"
    log.info("ray: %s; %s%s", where, f"Ray's logs: {logs}" if logs else "Ray's logs are in its session directory",
             "" if not quiet() else " (--verbose shows them here)")


def set_run_dir(run_dir: str | None) -> None:
    """Where ``progress.json`` goes (the run directory; None: nowhere)."""
    _state["run_dir"] = run_dir


def _is_tty() -> bool:
    if _state["tty"] is None:
        _state["tty"] = sys.stdout.isatty()
    return bool(_state["tty"])


def _fmt_s(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """The running stage's progress: ``update(done)`` as work completes, ``finish()`` at the end.

    On a terminal one line is rewritten in place; otherwise a line every :data:`LINE_EVERY_S` seconds.
    ``progress.json`` in the run directory and the ``middo_stage_progress`` metric follow it.
    """

    _active: "Progress | None" = None
    _lock = threading.Lock()

    def __init__(self, what: str, total: int, unit: str = "rows", stage: str | None = None,
                 round_: int | None = None):
        self.what, self.total, self.unit = what, int(total), unit
        self.stage = stage or what.split(":")[0].split()[0]
        self.round = round_ if round_ is not None else _state.get("round")
        self.done = 0
        self.extra = ""
        self.t0 = self._last_line = self._last_draw = self._last_file = time.time()
        with Progress._lock:
            Progress._active = self
        self._write_file()

    def rate(self) -> float:
        return self.done / max(time.time() - self.t0, 1e-9)

    def eta(self) -> float:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else float("nan")

    def text(self) -> str:
        pct = f" {100 * self.done / self.total:3.0f}%" if self.total else ""
        tail = f", {self.rate():.1f} {self.unit}/s, ETA {_fmt_s(self.eta())}" if self.done else ""
        where = f"[round {self.round}] " if self.round is not None else ""
        return f"{where}{self.what}: {self.done}/{self.total} {self.unit}{pct}{tail}{self.extra}"

    def update(self, done: int, extra: str = "") -> None:
        self.done, self.extra = int(done), (f", {extra}" if extra else "")
        now = time.time()
        if _is_tty():
            if now - self._last_draw >= TTY_EVERY_S or self.done >= self.total:
                self._last_draw = now
                self._draw()
        elif now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            log.info("%s", self.text())
        if now - self._last_file >= FILE_EVERY_S:
            self._last_file = now
            self._write_file()
        from middo_ray import metrics

        metrics.stage_progress(self.stage, self.done, self.total)

    def advance(self, n: int = 1, extra: str = "") -> None:
        self.update(self.done + n, extra)

    def _draw(self) -> None:
        sys.stdout.write("\r\033[K" + self.text()[:200])
        sys.stdout.flush()

    def clear_line(self) -> None:
        if _is_tty():
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()

    def finish(self) -> None:
        with Progress._lock:
            if Progress._active is self:
                Progress._active = None
        self.clear_line()
        self._write_file(state="done")

    def _write_file(self, state: str = "running") -> None:
        run_dir = _state["run_dir"]
        if not run_dir:
            return
        from middo_ray import storage

        eta = self.eta()
        try:
            storage.write_json(storage.join(run_dir, "progress.json"), {
                "round": self.round, "stage": self.stage, "what": self.what, "state": state, "done": self.done,
                "total": self.total, "unit": self.unit, "rate": round(self.rate(), 3),
                "eta_s": None if eta != eta else round(eta, 1),
                "started": datetime.fromtimestamp(self.t0, timezone.utc).isoformat(),
                "updated": datetime.now(timezone.utc).isoformat(), "pid": os.getpid()})
        except OSError as exc:  # progress is a convenience: never let it stop the run
            log.debug("progress.json not written: %s", exc)


def _stage_record(k: int, name: str, state: str, **extra: Any) -> None:
    """progress.json for a stage as a whole (its start, its end)."""
    run_dir = _state["run_dir"]
    if not run_dir:
        return
    from middo_ray import storage

    now = datetime.now(timezone.utc).isoformat()
    try:
        storage.write_json(storage.join(run_dir, "progress.json"), {
            "round": k, "stage": name, "state": state, "done": None, "total": None, "updated": now,
            "pid": os.getpid(), **({"started": now} if state == "running" else {}), **extra})
    except OSError as exc:
        log.debug("progress.json not written: %s", exc)


def stage_started(k: int, name: str) -> None:
    """The stage's start: a line, and progress.json names it (before any unit of work is done)."""
    _state["round"] = k
    log.info("[round %d] %s ...", k, name)
    _stage_record(k, name, "running")


def stage_finished(k: int, name: str, seconds: float | None, info: dict, resumed: bool) -> None:
    """The stage's end: one line with its main counts and seconds; progress.json says it is done."""
    _stage_record(k, name, "done", seconds=seconds, resumed=resumed)
    counts = summary_of(name, info)
    if resumed:
        log.info("[round %d] %s: finished before (resumed)%s", k, name, f"; {counts}" if counts else "")
    else:
        log.info("[round %d] %s: done in %s%s", k, name, _fmt_s(seconds or 0.0), f"; {counts}" if counts else "")


def summary_of(name: str, info: dict) -> str:
    """A stage record's main counts in words (empty for a record without known counts)."""
    try:
        if name == "data":
            return (f"{info['rows_in']} rows read from {info['source']} ({info['format']}): {info['train']} train, "
                    f"{info['heldout']} held out, {info['rejected']} rejected"
                    + (f" (see {info['rejects']})" if info["rejected"] else ""))
        if name == "diagnose":
            knn = info.get("knn", {})
            return (f"{info['rows']} rows, {info.get('input_tokens', 0)} tokens, {info.get('truncated', 0)} truncated"
                    + (f"; kNN {knn['method']} k={knn['k']}" if "method" in knn else ""))
        if name == "select":
            c = info["counts"]
            return (", ".join(f"{a} {c[a]['flagged']}" for a in ("complexity", "quality", "diversity"))
                    + f" flagged ({100 * c['any']['fraction']:.0f}% of the samples on some axis)")
        if name == "refine":
            c = info.get("counts", {})
            rejected = int(c.get("rejected", 0) or 0)
            return (f"{info['jobs']} rewrites: {info['ok']} accepted, {rejected} judged worse, "
                    f"{info['failed'] - rejected} failed (originals kept)"
                    + (f"; {c['requests']} requests, {c.get('cache_hits', 0)} cached" if "requests" in c else ""))
        if name == "merge":
            return (f"{info['in']} -> {info['out']} samples ({info['replaced']} replaced, {info['added']} added, "
                    f"{info['kept_after_failure']} kept after a failed rewrite)")
        if name == "train":
            return (f"{info['steps']} steps on {info['samples']} samples, {info['tokens']} response tokens, "
                    f"loss {info['train_loss']:.4f}, {info['world_size']} worker(s) -> {info['model_dir']}")
        if name == "eval":
            return ", ".join(f"{k} {v:.4f}" for k, v in info.items()
                             if isinstance(v, float) and k != "seconds" and not k.endswith("_seconds"))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return ""
    return ""


class _AtLeastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class _NotProgressNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Progress bars disabled", "Progress bars for operators disabled"))


class _ProgressAwareHandler(logging.StreamHandler):
    """A log line on a terminal first clears the in-place progress line, then redraws it below."""

    def emit(self, record: logging.LogRecord) -> None:
        active = Progress._active
        if active is not None and _is_tty():
            active.clear_line()
        super().emit(record)
        if active is not None and _is_tty():
            active._draw()


def _only_warnings(handler: logging.Handler) -> logging.Handler:
    """A copy of ``handler`` for the root logger: warnings and errors of every library."""
    h = _ProgressAwareHandler(handler.stream)
    h.setFormatter(handler.formatter)
    h.setLevel(logging.WARNING)
    return h


# ---------------------------------------------------------------------------------------------------------
# Progress from workers elsewhere in the cluster (the training workers): a named actor the driver polls.

def _board_cls():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """The latest progress each remote reporter sent, by key (e.g. ``train``)."""

        def __init__(self):
            self.items: dict[str, dict] = {}

        def put(self, key: str, item: dict) -> None:
            self.items[key] = item

        def get(self, key: str) -> dict | None:
            return self.items.get(key)

        def clear(self, key: str) -> None:
            self.items.pop(key, None)

        def partial(self, prefix: str) -> int:
            """Rows done so far by the units in flight under ``prefix`` (their workers' latest reports)."""
            return sum(int(v.get("done", 0)) for k, v in self.items.items() if k.startswith(prefix))

    return ProgressBoard


_board: dict[str, Any] = {"handle": None, "session": None}


def start_board():
    """The driver's progress board, created once per Ray session and kept: this module holds its handle, since
    a (non-detached) actor dies with its last handle and the workers find it by name."""
    import ray

    session = ray.get_runtime_context().get_worker_id()      # new with every ray.init of this process
    if _board["handle"] is None or _board["session"] != session:
        _board["handle"] = _board_cls().options(name=BOARD_NAME, get_if_exists=True, lifetime=None).remote()
        _board["session"] = session
    return _board["handle"]


_remote: dict[str, Any] = {"board": None, "looked": 0.0, "sent": 0.0}


def report_remote(key: str, done: int, total: int, extra: str = "") -> None:
    """From a worker: tells the driver's board how far ``key`` is (at most twice a second, and the last one;
    a no-op where no board runs)."""
    now = time.time()
    if done < total and now - _remote["sent"] < TTY_EVERY_S:
        return
    if _remote["board"] is None:
        if now - _remote["looked"] < 30:
            return
        _remote["looked"] = now
        try:
            import ray

            _remote["board"] = ray.get_actor(BOARD_NAME)
        except Exception:  # noqa: BLE001 - no board (a test running a stage alone): nothing to tell
            return
    _remote["sent"] = now
    try:
        _remote["board"].put.remote(key, {"done": int(done), "total": int(total), "extra": extra, "t": now})
    except Exception:  # noqa: BLE001 - the board went away: stop telling it
        _remote["board"] = None


def report_unit(unit: dict, done: int) -> None:
    """From a shard worker: how many of its unit's rows are done (before it commits; the commit's summary
    counts the rest). A no-op for a unit that no progress display follows."""
    key = unit.get("_progress")
    if key:
        report_remote(f"{key}/{unit['id']}", done, int(unit.get("rows", 0)))


class _BoardPoller:
    """A thread that asks the driver's progress board something every ``every_s`` seconds while a ``with``
    body runs (``_tick``); without a board (no Ray) the body runs without progress."""

    key: str
    every_s: float

    def __enter__(self):
        try:
            self.board = start_board()
            self._setup()
        except Exception as exc:  # noqa: BLE001 - progress must never stop the stage
            log.debug("no progress board: %s", exc)
            self.board = None
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"progress-{self.key}", daemon=True)
        self._thread.start()
        return self

    def _setup(self) -> None:
        """Before the thread starts (the board exists)."""

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - a missed poll is only a late display
                log.debug("progress poll of %s: %s", self.key, exc)

    def _tick(self) -> None:
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        if self.board is not None:
            self._stop.set()
            self._thread.join(timeout=15)


class follow_units(_BoardPoller):
    """While a shard map runs: adds the in-flight units' partial rows (their workers' reports to the board)
    to the rows of the committed units, so a stage of a few long units shows progress within them."""

    def __init__(self, key: str, progress: "Progress", committed, every_s: float = 1.0):
        self.key, self.progress, self.committed, self.every_s = key, progress, committed, every_s

    def unit_done(self, unit_id: str) -> None:
        if self.board is not None:
            self.board.clear.remote(f"{self.key}/{unit_id}")

    def _tick(self) -> None:
        import ray

        partial = ray.get(self.board.partial.remote(f"{self.key}/"), timeout=10)
        done = min(self.committed() + partial, self.progress.total)
        if done > self.progress.done:
            self.progress.update(done, self.progress.extra.lstrip(", "))


class follow_remote(_BoardPoller):
    """While the ``with`` body runs (e.g. a blocking ``trainer.fit()``), polls the board for ``key`` and shows
    it as ``what``'s progress."""

    def __init__(self, key: str, what: str, unit: str = "steps", every_s: float = 1.0, round_: int | None = None):
        self.key, self.what, self.unit, self.every_s, self.round = key, what, unit, every_s, round_
        self.progress: Progress | None = None
        self._seen = None

    def _setup(self) -> None:
        import ray

        ray.get(self.board.clear.remote(self.key))

    def _tick(self) -> None:
        import ray

        item = ray.get(self.board.get.remote(self.key), timeout=10)
        if not item or item.get("t") == self._seen:
            return
        self._seen = item.get("t")
        if self.progress is None:
            self.progress = Progress(self.what, item["total"], self.unit, stage=self.key, round_=self.round)
        self.progress.total = item["total"]
        self.progress.update(item["done"], item.get("extra", ""))

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.progress is not None:
            self.progress.finish()
