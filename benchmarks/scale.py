"""Benchmark: one round's data plane at 10k, 100k and 1M rows, streaming against today's driver-side path.

Each (path, N) runs in a fresh driver process on a simulated 2-node cluster of its own (two raylets of 2
logical CPUs each on this machine, ``ray.cluster_utils.Cluster``):

    data -> diagnose (tiny model; judge and IFD off) -> select -> refine* -> merge -> training input

(*) refine is a synthetic teacher without an LLM: half of the jobs come back rewritten (the prompt and
answer with a marker appended), the other half failed, so merge replaces, adds and keeps as in a real
round while the benchmark measures the data plane and not a model's generation. The training input is the
train stage itself with ``train.max_steps=2``: the Ray Train worker reads the whole merged dataset and
tokenizes it before its two steps.

- ``streaming``: the stages of this tree (rows as Parquet shards, worker-side reads and writes);
- ``legacy``: the same steps as the loop made them before the data plane moved to Ray Data, run from a git
  worktree of ``--legacy-rev`` (rows read into the driver, ``from_items`` to the actors, results and
  embeddings back in the driver; its training input is the old ``train_sft`` at a tiny ``epochs``, one step).

Reported per run: wall seconds per stage, rows/s, the driver's peak RSS (sampled every 0.1 s, and per
stage), the object store's peak use (sampled every 2 s from the raylets), the load average. Goal: the
streaming driver's peak RSS at 1M rows within 1.3x of its 10k figure, and the 1M round completing.

    .venv/bin/python benchmarks/scale.py --sizes 10000,100000,1000000 --legacy-max 100000

Prints a table and writes JSON (default benchmarks/results/scale.json). Reads ../shared/data/sft/alpaca_5000.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "sft" / "alpaca_5000.json"
STAGES = ("data", "diagnose", "select", "refine", "merge", "train_input")


# ---------------------------------------------------------------------------------------------
# Measuring.

class Sampler:
    """The driver's RSS every 0.1 s and the cluster's object-store use every 2 s, in a thread."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak_rss = self.proc.memory_info().rss
        self.stage_peak: dict[str, int] = {}
        self.store_peak = 0
        self.stage = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _store_used(self) -> int:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(os.environ["MIDDO_BENCH_ADDRESS"]))
        return int(reply.store_stats.object_store_bytes_used)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            self.stage_peak[self.stage] = max(self.stage_peak.get(self.stage, 0), rss)
            if tick % 20 == 0:
                try:
                    self.store_peak = max(self.store_peak, self._store_used())
                except Exception:           # a sample lost while a node is busy is harmless
                    pass
            tick += 1
            time.sleep(0.1)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def write_rows(n: int, path: Path) -> None:
    """n distinct alpaca rows: the Alpaca 5k rows, repeated with a numbered suffix past 5k."""
    raw = json.loads(ALPACA.read_text())
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            r = raw[i % len(raw)]
            suffix = "" if i < len(raw) else f" (variant {i // len(raw)})"
            fh.write(json.dumps({"instruction": r["instruction"] + suffix, "input": r["input"],
                                 "output": r["output"]}) + "\n")


def tree(tmp: Path, data: Path) -> dict:
    return {"run": {"run_id": "scale", "output_dir": str(tmp), "seed": 0},
            # 64 tokens: the model pass is not what this measures, and 1M rows must fit an afternoon on 2 cores.
            "data": {"path": str(data), "cutoff_len": 64, "heldout_fraction": 0.01},
            "model": {"base": "tiny"},
            "diagnose": {"judge": False, "ifd": False, "rows_per_block": 256},
            "select": {"axes": ["complexity", "diversity"]},
            "train": {"max_steps": 2, "batch_size": 8}}


def synthetic_result(job: dict, k: int) -> dict:
    """The synthetic teacher: every other job rewritten with a marker, the rest failed."""
    if k % 2:
        return {"status": "failed", "reason": "synthetic teacher: no rewrite"}
    return {"status": "ok", "instruction": job["instruction"] + " [rewritten]", "input": "",
            "output": job["output"] + " [rewritten]"}


# ---------------------------------------------------------------------------------------------
# The streaming path (this tree).

class SyntheticRefine:
    """A shard's refine results from the synthetic teacher (a shardmap unit worker)."""

    def process(self, unit: dict) -> dict:
        from middo_ray import storage
        from middo_ray.refine import _result_table, build_jobs
        from middo_ray.schema import JOB_AXES

        rows = storage.read_table(unit["dataset"], ["sample_id", "instruction", "input", "output"]).to_pylist()
        flags = storage.read_table(unit["flags"], ["sample_id", *JOB_AXES])
        jobs = build_jobs(rows, {a: flags.column(a).to_pylist() for a in JOB_AXES}, {})
        results = [{"sample_id": j["sample_id"], "attempts": 1, **synthetic_result(j, i)} for i, j in enumerate(jobs)]
        storage.write_table(unit["commit"], _result_table(jobs, results), {"unit": unit["id"], "jobs": len(jobs)})
        return {"unit": unit["id"], "rows": len(rows), "jobs": len(jobs)}


def run_streaming(cfg, sampler: Sampler, times: dict) -> dict:
    from middo_ray import data, diagnose, merge, select, train
    from middo_ray.rundir import Run
    from middo_ray.shardmap import map_shards
    from middo_ray.storage import ShardSet

    run = Run(cfg).open()
    r0, r1 = run.round(0), run.round(1)

    def timed(name, fn):
        sampler.stage = name
        t0 = time.time()
        out = fn()
        times[name] = round(time.time() - t0, 2)
        return out

    d = timed("data", lambda: r0.run("data", data, cfg.data).output)
    diag = timed("diagnose", lambda: r1.run("diagnose", diagnose, cfg.diagnose,
                                            {"dataset": d.train, "model": "tiny"}).output)
    sel = timed("select", lambda: r1.run("select", select, cfg.select, {"diagnosis": diag}))
    results_dir = Path(r1.dir) / "refine" / "results"

    def refine():
        units = [{"id": n, "rows": r, "dataset": d.train.path(n), "flags": sel.output.path(n),
                  "commit": str(results_dir / n)} for n, r in zip(d.train.names, d.train.rows)]
        map_shards(units, SyntheticRefine, {}, what="refine (synthetic)")
        return ShardSet(str(results_dir), d.train.names, d.train.rows)

    results = timed("refine", refine)
    merged = timed("merge", lambda: r1.run("merge", merge, None, {
        "dataset": d.train, "results": results, "diagnosis": diag, "thresholds": sel.info["thresholds"]}))
    timed("train_input", lambda: r1.run("train", train, cfg.train, {"dataset": merged.output, "init_model": "tiny"}))
    return {"rows_in": d.train.total, "rows_out": merged.info["out"], "flagged": sel.info["counts"]["any"]["flagged"]}


# ---------------------------------------------------------------------------------------------
# Today's path (the driver-side loop, from a git worktree of --legacy-rev).

def run_legacy(cfg, sampler: Sampler, times: dict, out_dir: Path) -> dict:
    from middo_ray import io  # the worktree's modules: sys.path has it first
    from middo_ray.diagnose import run_diagnosis
    from middo_ray.loop import _heldout_split
    from middo_ray.merge import build_jobs, merge_round
    from middo_ray.select import select_flags
    from middo_ray.train import train_sft

    def timed(name, fn):
        sampler.stage = name
        t0 = time.time()
        out = fn()
        times[name] = round(time.time() - t0, 2)
        return out

    rows = timed("data", lambda: _heldout_split(io.read_dataset(cfg.data.path).rows, cfg.data.heldout_fraction,
                                                cfg.run.seed)[0])
    diag = timed("diagnose", lambda: run_diagnosis(rows, cfg, "tiny"))
    flags, thresholds, counts = timed("select", lambda: select_flags(diag.columns, cfg.select))
    import numpy as np

    jobs = timed("refine", lambda: build_jobs(rows, flags, np.stack(diag.columns["nbr_idx"])))
    results = [synthetic_result(j, i) for i, j in enumerate(jobs)]
    new_rows, _, mcounts = timed("merge", lambda: merge_round(rows, jobs, results, 1, diag.columns, thresholds))
    legacy_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1e-9})})
    timed("train_input", lambda: train_sft(new_rows, legacy_cfg, out_dir / "train", "tiny"))
    return {"rows_in": len(rows), "rows_out": mcounts["out"], "flagged": counts["any"]["flagged"]}


# ---------------------------------------------------------------------------------------------
# One child run, and the parent.

def child(path: str, n: int, data: Path, out_json: Path, legacy_root: str | None) -> None:
    """One (path, N) run on its own 2-node cluster; writes its figures to out_json."""
    if legacy_root:
        sys.path.insert(0, legacy_root)
    else:
        sys.path.insert(0, str(ROOT))
    sys.path.insert(1, str(ROOT / "benchmarks"))
    import ray
    from ray.cluster_utils import Cluster

    from middo_ray.config import build_config
    from middo_ray.models import ensure_tiny

    ensure_tiny()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    os.environ["MIDDO_BENCH_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix=f"scale-{path}-{n}-"))
    cfg = build_config({k: v for k, v in tree(tmp, data).items()
                        if not (legacy_root and k == "train")} | ({"train": {"batch_size": 8}} if legacy_root else {}))
    sampler = Sampler().start()
    times: dict = {}
    t0 = time.time()
    error = None
    try:
        counts = run_legacy(cfg, sampler, times, tmp) if legacy_root else run_streaming(cfg, sampler, times)
    except Exception as exc:  # recorded: where today's path stops is a result
        counts, error = {}, f"{type(exc).__name__}: {str(exc)[:500]}"
    sampler.stop()
    out = {"path": path, "n": n, "seconds": times, "total_s": round(time.time() - t0, 1), **counts,
           "driver_peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
           "driver_peak_rss_mb_by_stage": {k: round(v / 2**20, 1) for k, v in sampler.stage_peak.items()},
           "object_store_peak_mb": round(sampler.store_peak / 2**20, 1), "error": error,
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    out["rows_per_s"] = round(n / out["total_s"], 1) if out["total_s"] else None
    out_json.write_text(json.dumps(out, indent=2))
    ray.shutdown()
    cluster.shutdown()


def _worktree(rev: str) -> str:
    target = Path(tempfile.gettempdir()) / f"middo-legacy-{rev}"
    if not (target / "middo_ray").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(target), rev], check=True,
                       capture_output=True)
    # The worktree reads ../shared/data beside itself, as the project does.
    shared = target.parent / "shared"
    if not shared.exists():
        shared.symlink_to(ROOT.parent / "shared")
    return str(target)


def _table(results: list[dict]) -> str:
    head = ["path", "n", *STAGES, "total_s", "rows/s", "driver peak MB", "store peak MB", "error"]
    lines = ["  ".join(head)]
    for r in results:
        cells = [r["path"], r["n"], *[r["seconds"].get(s, "-") for s in STAGES], r["total_s"], r.get("rows_per_s"),
                 r["driver_peak_rss_mb"], r["object_store_peak_mb"], (r.get("error") or "")[:60]]
        lines.append("  ".join(str(c) for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--paths", default="streaming,legacy", help="comma-separated: streaming, legacy")
    p.add_argument("--legacy-rev", default="9b24910", help="commit of today's driver-side path")
    p.add_argument("--legacy-max", type=int, default=100_000, help="largest N the legacy path is run at")
    p.add_argument("--timeout", type=int, default=14_400, help="seconds one (path, N) run may take")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    p.add_argument("--child", nargs=4, metavar=("PATH", "N", "DATA", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--legacy-root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        path, n, data, out = args.child
        child(path, int(n), Path(data), Path(out), args.legacy_root)
        return 0
    if not ALPACA.is_file():
        raise SystemExit(f"{ALPACA} not found: the benchmark reads the public Alpaca 5k file from ../shared/data")
    results = []
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_worker_niceness="0")
    for n in (int(s) for s in args.sizes.split(",")):
        data = work / f"rows_{n}.jsonl"
        write_rows(n, data)
        for path in args.paths.split(","):
            if path == "legacy" and n > args.legacy_max:
                continue
            out = work / f"{path}_{n}.json"
            extra = ["--legacy-root", _worktree(args.legacy_rev)] if path == "legacy" else []
            roots = [extra[1]] if extra else [str(ROOT)]
            child_env = dict(env, PYTHONPATH=os.pathsep.join(roots + [str(ROOT / "benchmarks")]))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", path, str(n), str(data), str(out), *extra]
            try:
                # cwd = the tree under test: Ray puts the driver's working directory first on its workers' path.
                subprocess.run(cmd, env=child_env, cwd=roots[0], timeout=args.timeout, check=False)
                results.append(json.loads(out.read_text()))
            except (subprocess.TimeoutExpired, FileNotFoundError) as exc:
                results.append({"path": path, "n": n, "seconds": {}, "total_s": None, "driver_peak_rss_mb": None,
                                "object_store_peak_mb": None, "error": f"{type(exc).__name__}: {exc}"})
            print(_table(results[-1:]), flush=True)
    streaming = {r["n"]: r for r in results if r["path"] == "streaming" and r.get("driver_peak_rss_mb")}
    summary = {}
    if streaming:
        small, large = min(streaming), max(streaming)
        summary = {"driver_rss_ratio": round(streaming[large]["driver_peak_rss_mb"] / streaming[small]
                                             ["driver_peak_rss_mb"], 3), "between": [small, large], "goal": "<= 1.3"}
    print(_table(results))
    print(json.dumps(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "args": vars(args), "results": results, "summary": summary}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
