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
        """Checks that the directory may be resumed with this config, then records the config."""
        storage.makedirs(self.root)
        self._check_resumable()
        storage.write_json(storage.join(self.root, "config.json"), self.cfg.model_dump())
        log.info("run directory: %s", self.root)
        return self

    def _check_resumable(self) -> None:
        """Refuses to resume a run directory made with a different config (its stages would be stale)."""
        saved_path = storage.join(self.root, "config.json")
        if not (self.cfg.run.resume and storage.exists(saved_path)):
            return
        saved, now = storage.read_json(saved_path), self.cfg.model_dump()
        changed = sorted(k for k in now if k not in ("run", "ray") and saved.get(k) != now[k])
        if changed:
            raise ValueError(f"run directory {self.root} was made with a different config (sections: "
                             f"{', '.join(changed)}); its finished stages would not match. Use a new run.run_id, "
                             "or set run.resume=false to redo every stage")

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
        stage_dir = storage.join(self.dir, name)
        t0 = time.time()
        if self.run_.cfg.run.resume and stage_done(stage_dir):
            result = module.load(stage_dir)
            self.timings[name] = _finished_seconds(stage_dir)
            self.resumed.append(name)
        else:
            if not self.run_.cfg.run.resume:
                storage.remove_tree(stage_dir)
            storage.makedirs(stage_dir)
            ctx = StageContext(self.run_.cfg, stage_dir, self.k, self.run_.root, self.run_.services)
            result = module.run(ctx, section, inputs or {})
            storage.write_json(storage.join(stage_dir, RECORD), result.info)
            self.timings[name] = round(time.time() - t0, 2)
            storage.write_json(storage.join(stage_dir, MARKER), {
                "finished": datetime.now(timezone.utc).isoformat(), "seconds": self.timings[name]})
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

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` the job's runtime env (working_dir, env_vars) already applies, and
        # Ray refuses a second one that sets the same keys.
        ray.init(address=address)
        return
    env = {k: os.environ[k] for k in ("MIDDO_CACHE", "HF_HOME", "HF_HUB_OFFLINE") if k in os.environ}
    # Ray starts its workers at nice 15 so that its daemons stay responsive on shared machines. In a Ray of
    # the run's own the workers do all of the run's work and the daemons idle, and at nice 15 the workers
    # lose about 10% to them on a small machine (benchmarks/diagnose.py): they run at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # address="local": a Ray of the run's own. Without it ray.init joins whatever cluster the machine's last
    # `ray start` recorded in /tmp/ray (someone else's, or a dead one whose file a crash left behind).
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, runtime_env={"env_vars": env} if env else None)
