"""Reads a run directory of the streaming data plane into the form of the pinned results (``tests/golden``).

The counterpart of ``pin_legacy.py`` for the current layout: every stage's output is read through the
stage's own ``load`` (the shard sets it recorded), never by guessing file names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cases import digest_rows, signal_record

from middo_ray import data, diagnose, merge, refine, select
from middo_ray.schema import AXES


def _rows(shards) -> list[dict]:
    return shards.read().to_pylist() if shards.total else []


def extract(run: Path, rounds: int) -> dict:
    out: dict = {"rounds": []}
    for k in range(1, rounds + 1):
        rk = run / f"round_{k}"
        diag = diagnose.load(str(rk / "diagnose")).output
        signals = []
        for name in diag.signals.names:
            signals += diag.table(name).to_pylist()
        flags = _rows(select.load(str(rk / "select")).output)
        results = _rows(refine.load(str(rk / "refine")).output)
        dataset = _rows(merge.load(str(rk / "merge")).output)
        out["rounds"].append({
            "signals": {r["sample_id"]: signal_record(r) for r in signals},
            "flags": {r["sample_id"]: [bool(r[a]) for a in AXES] for r in flags},
            "refine": sorted([[r["sample_id"], r["operation"], r["status"], r["instruction"], r["output"]]
                              for r in results]),
            "dataset": digest_rows(dataset),
            "size": len(dataset),
        })
    d = data.load(str(run / "round_0" / "data")).output
    out["data"] = {"train": digest_rows(_rows(d.train)), "heldout": digest_rows(_rows(d.heldout)),
                   "train_n": d.train.total, "heldout_n": d.heldout.total}
    summary = json.loads((run / "final" / "summary.json").read_text())
    out["final_sha256"] = hashlib.sha256(Path(summary["optimized_dataset"]).read_bytes()).hexdigest()
    out["sizes"] = summary["sizes"]
    return out
