"""The run directory and the stage contract: contexts, stage records, resume and manifests; Ray start-up.

Layout of ``<run.output_dir>/<run.run_id>/`` (a local path, a shared filesystem or an object-store URI)::

    config.json                   the full config of the run
    round_<k>/<stage>/            the stage's own files, stage.json (its record) and _SUCCESS
    round_<k>/manifest.json       every stage's record and seconds, versions, the config
    cache/                        what outlives a round (the LLM-call cache)
    final/                        the exports

The contract. A stage module (``data``, ``diagnose``, ``select``, ``refine``, ``merge``, ``train``,
``evaluate``) has one entry and one loader::

    run(ctx: StageContext, cfg: <its config section>, inputs: dict) -> StageResult
    load(stage_dir: str) -> StageResult

``run`` owns the stage's file formats under ``ctx.dir``; its ``StageResult.info`` (counts, thresholds, the
shard sets it wrote) is JSON and becomes ``stage.json``; ``load`` rebuilds the same result from the
files. :meth:`Round.run` is the one generic helper around them: it skips a finished stage (resume), runs
an unfinished one in its existing directory (so the stage keeps the shards it committed), times it,
writes its record and marker, and adds it to the round's manifest.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from middo_ray import storage
from middo_ray.config import MiddoConfig, config_hash

log = logging.getLogger("middo")

MARKER = "_SUCCESS"
RECORD = "stage.json"
LOCK = "_LOCK"            # held (flock) by the process running the loop in this directory
PROGRESS = "progress.json"  # the running stage and how far it is (middo_ray.console)


class RunLocked(RuntimeError):
    """Another live process runs the loop in this run directory."""


class ConfigMismatch(ValueError):
    """The run directory was made with other settings: resuming it would mix stages of two configs."""


class RunLock:
    """One run per run directory: an exclusive ``flock`` on ``<run_dir>/_LOCK``, which names its holder.

    The kernel drops the lock when its process dies however it dies (SIGKILL included), so a lock file a
    dead run left behind is simply taken over: there is no stale state to clean up and no window in which two
    processes both think they hold it. The file's JSON (host, pid, started, run id) is for the message a
    second run gets and for ``middo status``. A process that holds the lock may open the directory again
    (the lock is re-entrant per process). Object-store run directories have no lock (a warning says so).
    """

    def __init__(self, root: str, run_id: str):
        self.root, self.run_id = root, run_id
        self.path = storage.join(root, LOCK)

    def acquire(self) -> "RunLock":
        import fcntl
        import json
        import socket

        if not storage.is_local(self.root):
            log.warning("run directory %s is not on a local or shared filesystem: no lock keeps a second run "
                        "with the same run id out of it", self.root)
            return self
        if self.path in _HELD:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        # A reader (`middo status`) holds a shared lock for an instant: a few tries tell it from a live run.
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < LOCK_TRIES - 1:
                    time.sleep(0.1)
        else:
            holder = read_lock(self.root) or {}
            os.close(fd)
            raise RunLocked(
                f"run directory {self.root} is in use by another run (host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}, since {holder.get('started', '?')}). Wait for it to finish, stop it, "
                "or use another run.run_id") from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
                                  "started": datetime.now(timezone.utc).isoformat()}) + "\n").encode())
        os.fsync(fd)
        _HELD[self.path] = fd
        return self

    def release(self) -> None:
        """Drops the lock (the file stays, naming the last holder)."""
        fd = _HELD.pop(self.path, None)
        if fd is not None:
            os.close(fd)                                    # closing the descriptor releases the flock


_HELD: dict[str, int] = {}  # lock path -> descriptor, for the locks this process holds
LOCK_TRIES = 10


def lock_held(path: str) -> bool | None:
    """Whether a live process holds the run lock at ``path`` now; None where the filesystem cannot tell.

    Asked of the lock itself (a shared ``flock`` attempt that fails while a run holds it), not of the pid in the
    file, so it is right for any process on any host that shares the filesystem's locks: the kernel drops a
    dead process' lock, and a lock file that a finished or killed run left behind is free.
    """
    import fcntl

    if path in _HELD:
        return True                                         # this very process runs there
    try:
        with open(path) as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                return None
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return False
    except OSError:
        return None


def read_lock(run_dir: str) -> dict | None:
    """The run lock's holder record (host, pid, run_id, started) and ``active``: whether a live process holds
    it now (:func:`lock_held`); None without a lock file."""
    import json

    path = storage.join(run_dir, LOCK)
    if not storage.is_local(run_dir) or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            text = f.read()
        info = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        info = {}
    return {**(info if isinstance(info, dict) else {}), "active": lock_held(path)}


@dataclass
class StageResult:
    """What a stage produced: ``info`` (JSON, the stage record) and ``output`` (its typed handle)."""

    info: dict
    output: Any = None


@dataclass
class StageContext:
    """What a stage's ``run`` gets besides its config section and inputs.

    Attributes:
        cfg: The whole run config (stages read shared settings such as ``data.template``).
        dir: The stage's directory (path or URI), created.
        round: The round number k.
        run_dir: The run directory.
        services: Long-lived helpers of the loop, by name (``apps``: the Serve applications).
    """

    cfg: MiddoConfig
    dir: str
    round: int
    run_dir: str
    services: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    @property
    def seed(self) -> int:
        return self.cfg.run.seed

    @property
    def cache_dir(self) -> str:
        return storage.join(self.run_dir, "cache")


def versions() -> dict:
    """Versions of the packages whose change can change a result."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("middo-ray", "ray", "torch", "transformers", "numpy", "pydantic", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def stage_done(stage_dir: str) -> bool:
    return storage.exists(storage.join(stage_dir, MARKER))


def read_record(stage_dir: str) -> dict:
    return storage.read_json(storage.join(stage_dir, RECORD))


# Where the services listen and how they are reached: a resumed run may get other ports or a moved endpoint
# (the LLM-call cache keys name the model and its revision, not the address).
PLACE_SETTINGS = {"refine": frozenset({"http_port", "http_host", "proxy_location", "openai_base_url",
                                       "openai_api_key_env", "api_key_env"})}


def changed_settings(saved: dict, now: dict) -> list[str]:
    """The settings (``section.key: old -> new``) in which config ``now`` differs from the ``saved`` config of a
    run directory; the run and ray sections and :data:`PLACE_SETTINGS` (where and how it runs) do not count.

    A setting that the saved config does not have (added by a newer version of middo-ray) counts as changed
    only when it is not at its default, so an upgrade does not make an unfinished run unresumable; a setting
    the saved config has and ``now`` lacks (removed since) does not count either.
    """
    defaults = MiddoConfig().model_dump()
    out = []
    for section, values in now.items():
        if section in ("run", "ray") or not isinstance(values, dict):
            continue
        before = saved.get(section) or {}
        for key, value in values.items():
            if key in PLACE_SETTINGS.get(section, ()):
                continue
            if key not in before:
                if value != defaults.get(section, {}).get(key):
                    out.append(f"{section}.{key}: not set -> {value!r}")
            elif before[key] != value:
                out.append(f"{section}.{key}: {before[key]!r} -> {value!r}")
    return out


class Run:
    """A run directory: its config, its rounds and where the Serve apps and caches live."""

    def __init__(self, cfg: MiddoConfig):
        if cfg.run.run_id is None:
            cfg.run.run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + config_hash(cfg)
        self.cfg = cfg
        out = cfg.run.output_dir
        self.root = storage.join(out if "://" in out else os.path.abspath(out), cfg.run.run_id)
        self.services: dict[str, Any] = {}

    def open(self) -> "Run":
        """Takes the run lock, checks that the directory may be resumed with this config, records the config."""
        storage.makedirs(self.root)
        self.lock = RunLock(self.root, self.cfg.run.run_id).acquire()
        try:
            self._check_resumable()
        except BaseException:
            self.lock.release()
            raise
        storage.write_json(storage.join(self.root, "config.json"), self.cfg.model_dump())
        log.info("run directory: %s", self.root)
        return self

    def _check_resumable(self) -> None:
        """Refuses to resume a run directory made with a different config (its stages would be stale)."""
        saved_path = storage.join(self.root, "config.json")
        if not (self.cfg.run.resume and storage.exists(saved_path)):
            return
        changed = changed_settings(storage.read_json(saved_path), self.cfg.model_dump())
        if changed:
            raise ConfigMismatch(f"run directory {self.root} was made with a different config ({'; '.join(changed)}); "
                             "its finished stages would not match. Use a new run.run_id, or set run.resume=false "
                             "to redo every stage")

    def close(self) -> None:
        """Releases the run lock (the loop calls it however it ends)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()

    def round(self, k: int) -> "Round":
        return Round(self, k)

    @property
    def final_dir(self) -> str:
        return storage.join(self.root, "final")


def _finished_seconds(stage_dir: str) -> float | None:
    """The seconds a finished stage took when it ran (its marker's record; None for a marker without one)."""
    try:
        return storage.read_json(storage.join(stage_dir, MARKER)).get("seconds")
    except (ValueError, AttributeError):
        return None


class Round:
    """One round's stages, run through :meth:`run`, and its manifest."""

    def __init__(self, run: Run, k: int):
        self.run_ = run
        self.k = k
        self.dir = storage.join(run.root, f"round_{k}")
        self.stages: dict[str, dict] = {}
        self.timings: dict[str, float] = {}
        self.resumed: list[str] = []  # stages this process found finished and loaded

    def run(self, name: str, module, section, inputs: dict | None = None) -> StageResult:
        """Runs stage ``name`` (``module.run``) unless it finished before; records it either way."""
        from middo_ray import console, metrics

        stage_dir = storage.join(self.dir, name)
        t0 = time.time()
        resumed = self.run_.cfg.run.resume and stage_done(stage_dir)
        if resumed:
            result = module.load(stage_dir)
            self.timings[name] = _finished_seconds(stage_dir)
            self.resumed.append(name)
        else:
            console.stage_started(self.k, name)
            if not self.run_.cfg.run.resume:
                storage.remove_tree(stage_dir)
            storage.makedirs(stage_dir)
            ctx = StageContext(self.run_.cfg, stage_dir, self.k, self.run_.root, self.run_.services)
            result = module.run(ctx, section, inputs or {})
            storage.write_json(storage.join(stage_dir, RECORD), result.info)
            self.timings[name] = round(time.time() - t0, 2)
            storage.write_json(storage.join(stage_dir, MARKER), {
                "finished": datetime.now(timezone.utc).isoformat(), "seconds": self.timings[name]})
        console.stage_finished(self.k, name, self.timings[name], result.info, bool(resumed))
        metrics.record_stage(self.k, name, result.info, self.timings[name], bool(resumed),
                             self.run_.cfg.eval.metric)
        self.stages[name] = result.info
        self.write_manifest()
        return result

    def write_manifest(self, **extra: Any) -> dict:
        """The round's manifest: every stage so far, their seconds, versions, config (rewritten as it grows)."""
        cfg = self.run_.cfg
        manifest = {"round": self.k, "run_id": cfg.run.run_id, "stages": self.stages, "timings": self.timings,
                    "resumed": self.resumed,
                    **extra, "versions": versions(), "config": cfg.model_dump(),
                    "written": datetime.now(timezone.utc).isoformat()}
        storage.write_json(storage.join(self.dir, "manifest.json"), manifest)
        return manifest


def init_ray(cfg: MiddoConfig) -> None:
    """Joins the cluster the job runs on (RAY_ADDRESS or ray.address, e.g. 'auto'), else starts a local Ray of the
    run's own (never a cluster some other `ray start` left on the machine)."""
    import ray

    from middo_ray import console

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` the job's runtime env (working_dir, env_vars) already applies, and
        # Ray refuses a second one that sets the same keys.
        ray.init(address=address, **console.ray_init_kwargs())
        console.after_ray_init()
        return
    env = {k: os.environ[k] for k in ("MIDDO_CACHE", "HF_HOME", "HF_HUB_OFFLINE") if k in os.environ}
    # Ray starts its workers at nice 15 so that its daemons stay responsive on shared machines. In a Ray of
    # the run's own the workers do all of the run's work and the daemons idle, and at nice 15 the workers
    # lose about 10% to them on a small machine (benchmarks/diagnose.py): they run at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    from middo_ray.serve_apps import use_proxy_middleware

    use_proxy_middleware()   # Serve's proxies bound client request ids (serve/proxy.py)
    # address="local": a Ray of the run's own. Without it ray.init joins whatever cluster the machine's last
    # `ray start` recorded in /tmp/ray (someone else's, or a dead one whose file a crash left behind).
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, runtime_env={"env_vars": env} if env else None,
             **console.ray_init_kwargs())
    console.after_ray_init()
