"""Shared fixtures: the tiny model, a local Ray runtime, quiet progress bars, a scratch cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Quiet and offline before anything imports ray/transformers.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' own Ray runs its workers at normal priority, as the loop's local Ray does (rundir.init_ray).
os.environ.setdefault("RAY_worker_niceness", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Path of the tiny random-init Llama (built once per cache)."""
    from middo_ray.models import ensure_tiny

    return str(ensure_tiny())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project; tests needing it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found (the public data set lives beside the project)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the session (4 logical CPUs so actor pools never starve)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, log_to_driver=False,
                 runtime_env={"env_vars": {"MIDDO_CACHE": os.environ.get("MIDDO_CACHE", "")}}
                 if os.environ.get("MIDDO_CACHE") else None)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
