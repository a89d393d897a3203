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
        from middo_ray.serve_apps import use_proxy_middleware

        use_proxy_middleware()   # Serve's proxies bound client request ids (serve/proxy.py)
        ray.init(address="local", num_cpus=4, log_to_driver=False,
                 runtime_env={"env_vars": {"MIDDO_CACHE": os.environ.get("MIDDO_CACHE", "")}}
                 if os.environ.get("MIDDO_CACHE") else None)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def loop_run(ray_local, tiny_model, tmp_path_factory):
    """One finished 2-round run of the loop, shared by the tests that read a run directory (the loop's own
    contract, the report, `middo status/show/diff`): the tiny model on 69 rows, then the corpus of bad rows
    (tests/corpus); 3 of the 69 and all but one of the corpus are invalid. Read it, never change it: a test
    that needs a changed or unfinished run copies it first.

    Returns ``(run_dir, summary, port)``; ``port`` is the Serve HTTP port the run used (a rerun of the same
    config resumes it).
    """
    import socket

    from middo_ray.loop import run_loop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("loop_run")
    summary = run_loop(loop_run_config(out, port))
    return out / "t", summary, port


def loop_run_data(out_dir) -> Path:
    """The data of :func:`loop_run`: the demo's 8 rows with 3 invalid ones, then 60 rows of the demo seed
    (enough for the rounds' training to move the tiny model and the signals to spread), then the corpus of
    bad rows (tests/corpus: one valid row and 19 that must be rejected); ``bad_rows.json`` beside it maps each
    corpus line that must be rejected to its reason."""
    import json

    from middo_ray.demo import demo_path
    from tests.corpus import write_bad_alpaca

    path = Path(out_dir) / "seed.jsonl"
    if not path.is_file():
        seed = demo_path("seed").read_text().splitlines()[5:65]      # rows 1-5 are the valid ones above
        path.write_text(demo_path("seed_with_invalid").read_text().rstrip("\n") + "\n" + "\n".join(seed) + "\n")
        lines = len(path.read_text().splitlines())
        expected = write_bad_alpaca(path, json.loads(seed[0]), first_line=lines + 1, append=True)
        (Path(out_dir) / "bad_rows.json").write_text(json.dumps(expected))
    return path


def loop_run_config(out_dir, port: int):
    """The config of :func:`loop_run` (a second call with the same arguments resumes that run)."""
    from middo_ray.config import build_config

    return build_config({
        "run": {"run_id": "t", "output_dir": str(out_dir)},
        "data": {"path": str(loop_run_data(out_dir)), "heldout_fraction": 0.2, "cutoff_len": 96},
        "model": {"base": "tiny"},
        "refine": {"max_new_tokens": 8, "max_retries": 0, "http_port": port},
        "train": {"learning_rate": 1e-3},
        "eval": {"mc_limit": 5},
        "converge": {"max_rounds": 2, "patience": 2},
    })
