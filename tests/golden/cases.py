"""The pinned cases of the same-results test: their configs and how their results are digested.

Two cases, both with the tiny test model as base, teacher and judge (deterministic on CPU):

- ``demo``: the bundled demo seed set (with its bad rows), two rounds, so the second round diagnoses a
  merged dataset (children, the pre-loss cache) with M_1;
- ``alpaca400``: the first 400 rows of ``../shared/data/sft/alpaca_5000.json`` (written to a temporary
  file at run time, never into the project), one round.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT.parent / "shared" / "data" / "sft" / "alpaca_5000.json"
CASES = ("demo", "alpaca400")

SIGNAL_KEYS = ("loss_pre", "loss_cur", "n_response_tokens", "truncated", "loss_empty", "ifd", "quality", "knn_sim",
               "q_prompt_factuality", "q_prompt_clarity", "q_prompt_completeness",
               "q_response_factuality", "q_response_clarity", "q_response_completeness")
ROW_KEYS = ("sample_id", "instruction", "input", "output", "system", "history", "parent_id", "origin", "round",
            "trigger")


def _num(x):
    if x is None:
        return None
    if isinstance(x, bool):
        return x
    x = float(x)
    return x if math.isfinite(x) else None


def signal_record(row: dict) -> dict:
    """The pinned signal values of one sample (NaN and null both as null)."""
    return {k: _num(row.get(k)) for k in SIGNAL_KEYS}


def _shape(x):
    if isinstance(x, float):
        return "<number>"
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(v) for v in x]
    return x


def _trigger(text):
    """A row's trigger (JSON of the scores and thresholds that changed it) with its numbers left out: which
    scores and thresholds it names is pinned, their values are not. float32 matrix products differ in the
    last bits between CPUs (the exact kNN's similarities on two machines differed by 1.5e-7), the trigger
    records those numbers and thresholds made of them, and any rounding of them flips on some machine (5
    places did). The values themselves are the signals, compared within 1e-6 (compare.py)."""
    if not text:
        return text
    return json.dumps(_shape(json.loads(text)), sort_keys=True)


def digest_rows(rows: list[dict]) -> str:
    """SHA-256 of the rows' text and lineage columns, in order (the trigger without its numbers: _trigger)."""
    h = hashlib.sha256()
    for r in rows:
        values = [_trigger(r.get(k)) if k == "trigger" else r.get(k) for k in ROW_KEYS]
        h.update(json.dumps(values, ensure_ascii=False, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def alpaca_file(tmp: Path, n: int = 400) -> Path:
    """The first ``n`` Alpaca rows as a JSON list in ``tmp`` (the shared data is read, never copied in)."""
    rows = json.loads(ALPACA.read_text())[:n]
    path = tmp / f"alpaca_{n}.json"
    path.write_text(json.dumps(rows))
    return path


def case_tree(name: str, tmp: Path, port: int) -> dict:
    """The config tree of a case, with its run directory in ``tmp`` and Serve on ``port``."""
    from middo_ray.demo import demo_path

    if name == "demo":
        data = {"path": str(demo_path("seed")), "heldout_fraction": 0.1, "cutoff_len": 128}
        rounds = 2
    elif name == "alpaca400":
        data = {"path": str(alpaca_file(tmp)), "heldout_fraction": 0.1, "cutoff_len": 128}
        rounds = 1
    else:
        raise ValueError(f"unknown case {name!r}; cases: {CASES}")
    return {
        "run": {"run_id": name, "output_dir": str(tmp), "seed": 7},
        "data": data,
        "model": {"base": "tiny"},
        "refine": {"max_new_tokens": 12, "max_retries": 0, "http_port": port, "batch_size": 8},
        "train": {"learning_rate": 1e-3, "batch_size": 16},
        "eval": {"mc_limit": 5},
        "converge": {"max_rounds": rounds, "patience": 2},
    }
