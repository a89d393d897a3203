"""Benchmark: does one round of the real loop improve the data with a good teacher, and does its gate keep
wrong rewrites out? A known-answer benchmark (middo_ray.audit.efficacy; figures in docs/audit.md).

Clean Alpaca rows (../shared/data/sft/alpaca_5000.json) get defects from the audit's injector in a fraction of
the seed rows; a known-answer teacher on loopback (refine.engine=openai) restores each defective sample it is
asked about to its clean original, returns other samples unchanged (a failed rewrite), and for a fixed share
of the samples returns a fluent but wrong rewrite instead (another sample's answer, another sample's prompt,
or a meta-text refusal). Side by side in one run, the same number of samples chosen by each arm:

- middo: Middo's selection (the config's rules, each axis with its own operation), which also fixes the count
  of the arms below; middo_improve: the same samples, all sent to 'improve' as the arms below are;
- random: that many samples drawn at random; rank_<axis>: the worst by one signal (complexity, diversity,
  quality, ifd); oracle: exactly the defective samples; and D_0 (no refinement, M_0).

Everything after the selection is the real system: refine with the judge's accept gate (M_0 re-judges), merge,
Ray Train from the base model, evaluation on the clean held-out split (held-out loss; MC accuracy on ARC-Easy).
Reported per arm: samples selected, rewrites sent / accepted / rejected (by the judge), wrong rewrites let in,
defects restored and left, clean rows damaged, held-out loss and MC accuracy of M_1, and the fraction of the
oracle's gain (M_0 -> oracle) the arm recovers; then the gate's variants on the known-good and known-wrong
rewrites (judge only, + meta-text, + topic overlap, + prompt-embedding similarity).

    .venv/bin/python benchmarks/efficacy.py                            # SmolLM2, 160 rows, 3 seeds: hours on 2 cores
    .venv/bin/python benchmarks/efficacy.py --seeds 0 --rows 120       # one seed
    .venv/bin/python benchmarks/efficacy.py --model tiny --rows 48 --seeds 0 --arms middo,random,oracle
    .venv/bin/python benchmarks/efficacy.py --report <work>/seed0.partial.json   # the table of a run cut short

Prints a table and writes JSON (default: benchmarks/results/efficacy.json), with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoadSampler:
    """The 1-minute load average every ``every`` seconds while the benchmark runs."""

    def __init__(self, every: float = 30.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self._every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"min": min(s), "mean": round(sum(s) / len(s), 2), "max": max(s), "samples": len(s)}


def main(argv: list[str] | None = None) -> int:
    from middo_ray.audit.efficacy import ARMS, EFFICACY_KINDS, format_table, run_seed, summarize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sft" / "alpaca_5000.json"))
    ap.add_argument("--model", default="smollm2", help="base model: smollm2 or tiny")
    ap.add_argument("--rows", type=int, default=160, help="seed rows (before the held-out rows)")
    ap.add_argument("--heldout", type=int, default=60, help="clean held-out rows")
    ap.add_argument("--fraction", type=float, default=0.2, help="share of the seed rows made defective")
    ap.add_argument("--wrong-share", type=float, default=0.25, help="share of samples the teacher answers wrongly")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms; the first must be middo")
    ap.add_argument("--kinds", default=",".join(EFFICACY_KINDS), help="defect kinds")
    ap.add_argument("--mc", default=str(ROOT.parent / "shared" / "data" / "eval" / "arc_easy_test.jsonl"),
                    help="multiple-choice set {query, choices, gold} ('none' to skip)")
    ap.add_argument("--mc-limit", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--no-embed", action="store_true", help="skip the prompt-embedding similarity of the gate study")
    ap.add_argument("--no-ifd", action="store_true", help="skip the gate study's IFD of the rewrites under M_0")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every arm, e.g. refine.accept_min_topic_overlap=0.3")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "efficacy.json"))
    ap.add_argument("--report", nargs="+", default=None, metavar="SEED_JSON",
                    help="only print the table of a finished run (its JSON) or of a run cut short (<work>/seed<k>.partial.json)")
    args = ap.parse_args(argv)
    if args.report:
        seeds = []
        for p in args.report:          # a seed's partial file, or a finished run's JSON (its seeds, IFD included)
            doc = json.loads(Path(p).read_text())
            seeds.extend(doc["seeds"] if "seeds" in doc and "arms" not in doc else [doc])
        print(format_table(summarize(seeds)))
        return 0

    import yaml

    extra: dict = {}
    for item in args.set:
        key, value = item.split("=", 1)
        node = extra
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    train = {"epochs": args.epochs, "learning_rate": args.lr}
    if args.max_steps:
        train["max_steps"] = args.max_steps
    if args.model == "tiny":
        train.update(learning_rate=1e-3, batch_size=16)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = [a for a in args.arms.split(",") if a]
    mc = None if args.mc == "none" else args.mc
    tmp = None
    work = Path(args.work) if args.work else Path(tmp := tempfile.mkdtemp(prefix="middo-efficacy-"))
    t0 = time.time()
    load0 = os.getloadavg()
    results = []
    with LoadSampler() as load:
        for seed in seeds:
            results.append(run_seed(args.data, work / f"seed{seed}", seed, args.rows, args.heldout, args.fraction,
                                    args.wrong_share, arms, args.model, _free_port(), mc, args.mc_limit, train,
                                    extra, tuple(args.kinds.split(",")), embed=not args.no_embed,
                                    progress=work / f"seed{seed}.partial.json", ifd=not args.no_ifd))
            print(f"seed {seed} done after {time.time() - t0:.0f}s", flush=True)
    summary = summarize(results)
    text = format_table(summary)
    print(text)
    report = {"benchmark": "efficacy", "args": vars(args), "summary": summary, "seeds": results,
              "seconds": round(time.time() - t0, 1), "load_average": {"start": load0, "end": os.getloadavg(),
                                                                      "sampled_1min": load.summary()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "table": text}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nload average (1 min) during the run: {load.summary()}; {report['seconds']}s; written: {out}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
