"""Pins the loop's results as the pre-streaming code computed them (run once, at commit 9b24910).

This script reads the run-directory layout of that commit (one ``signals.parquet``, ``flags.parquet``,
``results.jsonl`` and ``dataset.parquet`` per round). It wrote ``tests/golden/*.json``, which
``tests/ray/test_same_results.py`` holds the streaming data plane against. It is kept as the record of how
the golden files were made; the current layout is read by ``tests/golden/extract.py``.

    python tests/golden/pin_legacy.py --out tests/golden
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, case_tree, digest_rows, signal_record  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extract(run: Path, rounds: int) -> dict:
    import pyarrow.parquet as pq

    out: dict = {"rounds": []}
    for k in range(1, rounds + 1):
        rk = run / f"round_{k}"
        signals = pq.read_table(rk / "diagnose" / "signals.parquet").to_pylist()
        flags = pq.read_table(rk / "select" / "flags.parquet").to_pylist()
        results = [json.loads(line) for line in (rk / "refine" / "results.jsonl").open()]
        dataset = pq.read_table(rk / "merge" / "dataset.parquet").to_pylist()
        out["rounds"].append({
            "signals": {r["sample_id"]: signal_record(r) for r in signals},
            "flags": {r["sample_id"]: [bool(r[a]) for a in ("complexity", "diversity", "quality")] for r in flags},
            "refine": sorted([[rec["job"]["sample_id"], rec["job"]["operation"], rec["result"]["status"],
                               rec["result"].get("instruction", ""), rec["result"].get("output", "")]
                              for rec in results]),
            "dataset": digest_rows(dataset),
            "size": len(dataset),
        })
    data = pq.read_table(run / "round_0" / "data" / "dataset.parquet").to_pylist()
    held = pq.read_table(run / "round_0" / "data" / "heldout.parquet").to_pylist()
    out["data"] = {"train": digest_rows(data), "heldout": digest_rows(held), "train_n": len(data),
                   "heldout_n": len(held)}
    summary = json.loads((run / "final" / "summary.json").read_text())
    final = Path(summary["optimized_dataset"])
    import hashlib

    out["final_sha256"] = hashlib.sha256(final.read_bytes()).hexdigest()
    out["sizes"] = summary["sizes"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    import ray

    from middo_ray.config import build_config
    from middo_ray.loop import run_loop

    ray.init(num_cpus=4, log_to_driver=False)
    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix=f"pin-{name}-") as tmp:
            tree = case_tree(name, Path(tmp), _free_port())
            run_loop(build_config(tree))
            got = _extract(Path(tmp) / name, tree["converge"]["max_rounds"])
            got["case"] = name
            got["pinned_by"] = "tests/golden/pin_legacy.py at commit 9b24910 (driver-side data plane)"
            Path(args.out, f"{name}.json").write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
            print(f"{name}: sizes {got['sizes']}, final {got['final_sha256'][:12]}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
