"""Benchmark: fine-tuning through Ray Train against a plain single-process torch loop, in one run.

Both sides train the same model on the same Alpaca rows with the same batch plan (the rows in content
order, the same length-grouped micro-batches, AdamW, cosine schedule with warm-up, gradient clipping,
response-only loss computed only where it is needed), so their per-step losses agree and their speeds
compare directly. Reported:

- steady-state training tokens/s (all non-pad tokens, the first ``--skip`` optimizer steps excluded),
  and the ratio Ray Train / plain (goal: >= 0.9);
- the fixed start-up cost: seconds from the call to the first optimizer step, and wall time minus the
  time the steady-state rate would need for all steps;
- the largest per-step loss difference between the two (same computation, so ~0).

    .venv/bin/python benchmarks/train.py                          # tiny model, 256 Alpaca rows
    .venv/bin/python benchmarks/train.py --model smollm2 --rows 96 --batch-size 4 --cutoff 256
    .venv/bin/python benchmarks/train.py --repeat 3            # medians of 3 alternating runs

Prints a table and writes JSON (default: benchmarks/results/train.json). Reads the data from
../shared/data/sft/alpaca_5000.json beside the project (override with --data).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from middo_ray.config import build_config  # noqa: E402
from middo_ray.io import read_dataset  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sft" / "alpaca_5000.json"


def steady_rate(tokens: list[int], seconds: list[float], skip: int) -> tuple[float, int]:
    """Tokens per second over the steps after the first ``skip`` (all steps when there are too few)."""
    start = skip if len(tokens) > skip + 1 else 0
    return sum(tokens[start:]) / max(sum(seconds[start:]), 1e-9), len(tokens) - start


def plain_loop(rows: list[dict], cfg, spec: str) -> dict:
    """The reference: one process, no Ray, the computation train_sft's workers do, timed per step."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from middo_ray.encode import encode_row
    from middo_ray.models import load_model, threads_for_actor
    from middo_ray.train.dist import _keep_from
    from middo_ray.train.plan import (MAX_GRAD_NORM, collate, plan_batches, response_nll_sum, row_key,
                                      window_token_counts)

    t0 = time.time()
    threads = threads_for_actor()
    torch.manual_seed(cfg.run.seed)
    model, tok = load_model(spec, dtype="float32", device="cpu", train=True)
    rows = [r for _, r in sorted((row_key(r), r) for r in rows)]   # the workers' content order
    enc = [encode_row(r, tok, cfg.data.template, cfg.data.cutoff_len) for r in rows]
    lengths = [len(e.input_ids) for e in enc]
    t = cfg.train
    plan = plan_batches(lengths, t.batch_size, t.epochs, cfg.run.seed)   # rank 0's seed
    denoms = window_token_counts(plan, [e.response_len for e in enc], t.grad_accum)
    inputs = window_token_counts(plan, lengths, t.grad_accum)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate)
    sched = get_cosine_schedule_with_warmup(optim, math.ceil(t.warmup_ratio * len(denoms)), len(denoms))
    losses, step_seconds = [], []
    first_step_at = None
    for step, denom in enumerate(denoms):
        ts = time.time()
        first_step_at = first_step_at or ts
        total = 0.0
        for idx in plan[step * t.grad_accum:(step + 1) * t.grad_accum]:
            batch = collate([enc[i] for i in idx], tok.pad_token_id)
            first = _keep_from(batch)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        logits_to_keep=batch["input_ids"].shape[1] - first)
            nll = response_nll_sum(out.logits, batch["labels"], first)
            (nll / max(denom, 1)).backward()
            total += float(nll.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(total / max(denom, 1))
        step_seconds.append(time.time() - ts)
    return {"loss_history": losses, "step_seconds": step_seconds, "step_input_tokens": inputs,
            "startup_seconds": first_step_at - t0, "seconds": time.time() - t0, "threads": threads,
            "params": sum(p.numel() for p in model.parameters())}


def ray_train(rows: list[dict], cfg, spec: str) -> dict:
    """The same training through train_sft: Ray Data feed, TorchTrainer with one worker."""
    from middo_ray.train import train_sft

    with tempfile.TemporaryDirectory(prefix="middo_bench_train_") as tmp:
        return train_sft(rows, cfg, Path(tmp) / "train", init_model=spec)


def summarize(res: dict, skip: int) -> dict:
    rate, n = steady_rate(res["step_input_tokens"], res["step_seconds"], skip)
    total_tokens = sum(res["step_input_tokens"])
    return {
        "steady_tokens_per_s": rate, "steady_steps": n, "steps": len(res["step_seconds"]),
        "tokens": total_tokens, "first_step_after_s": res["startup_seconds"], "wall_s": res["seconds"],
        "fixed_cost_s": res["seconds"] - total_tokens / rate,
        "mean_step_ms": 1000 * sum(res["step_seconds"]) / max(len(res["step_seconds"]), 1),
    }


def _num(x: float) -> str:
    """A rate with sensible digits: whole numbers from 100 up, one decimal below."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def median_summary(runs: list[dict]) -> dict:
    """Per-key median over repeated runs (each key separately)."""
    import statistics

    return {k: statistics.median(run[k] for run in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny', 'smollm2' or a checkpoint dir")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="alpaca JSON/JSONL (default: shared Alpaca 5K)")
    ap.add_argument("--rows", type=int, default=256, help="training rows (the first N of the file)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--cutoff", type=int, default=256, help="data.cutoff_len")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--skip", type=int, default=3, help="optimizer steps left out of the steady state")
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate plain / Ray Train this many times and report medians (steadier on busy machines)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"), help="JSON output")
    args = ap.parse_args(argv)

    data = Path(args.data)
    if not data.is_file():
        sys.exit(f"data file {data} not found; pass --data with an alpaca JSON/JSONL file")
    rows = read_dataset(data).rows[:args.rows]
    cfg = build_config(overrides=[
        f"train.batch_size={args.batch_size}", f"train.grad_accum={args.grad_accum}", f"train.epochs={args.epochs}",
        f"train.learning_rate={args.lr}", f"data.cutoff_len={args.cutoff}", "train.num_workers=1",
        "train.checkpoint_every_steps=0", "train.precision=fp32"])

    import ray
    import torch

    from middo_ray.models import resolve_model

    from middo_ray.rundir import init_ray

    resolve_model(args.model)   # one-time conversions happen before anything is timed
    # The loop's own start of a local Ray (its workers at normal priority, as a run's are).
    init_ray(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_cpus": max(4, os.cpu_count() or 1)})}))

    print(f"training {args.model} on {len(rows)} rows of {data.name}: plain torch loop, then Ray Train "
          f"(1 worker), {args.repeat} time(s)")
    plains, rays = [], []
    for _ in range(args.repeat):
        plain = plain_loop(rows, cfg, args.model)
        through_ray = ray_train(rows, cfg, args.model)
        plains.append(summarize(plain, args.skip))
        rays.append(summarize(through_ray, args.skip))
    ray.shutdown()

    p, r = median_summary(plains), median_summary(rays)
    n = min(len(plain["loss_history"]), len(through_ray["loss_history"]))
    loss_diff = max(abs(a - b) for a, b in zip(plain["loss_history"][:n], through_ray["loss_history"][:n]))
    ratio = r["steady_tokens_per_s"] / p["steady_tokens_per_s"]
    flop_per_token = 6 * plain["params"]

    rows_out = [
        ("steady-state tokens/s", _num(p["steady_tokens_per_s"]), _num(r["steady_tokens_per_s"])),
        ("model GFLOP/s (6*N*tokens/s)", f"{flop_per_token * p['steady_tokens_per_s'] / 1e9:.1f}",
         f"{flop_per_token * r['steady_tokens_per_s'] / 1e9:.1f}"),
        ("mean step (ms)", f"{p['mean_step_ms']:.1f}", f"{r['mean_step_ms']:.1f}"),
        ("optimizer steps (steady)", f"{p['steps']:.0f} ({p['steady_steps']:.0f})", f"{r['steps']:.0f} ({r['steady_steps']:.0f})"),
        ("time to first step (s)", f"{p['first_step_after_s']:.1f}", f"{r['first_step_after_s']:.1f}"),
        ("wall (s)", f"{p['wall_s']:.1f}", f"{r['wall_s']:.1f}"),
        ("fixed cost: wall - tokens/steady rate (s)", f"{p['fixed_cost_s']:.1f}", f"{r['fixed_cost_s']:.1f}"),
    ]
    w = max(len(a) for a, _, _ in rows_out)
    print(f"\n{'':<{w}}  {'plain torch':>12}  {'Ray Train':>12}")
    for name, a, b in rows_out:
        print(f"{name:<{w}}  {a:>12}  {b:>12}")
    print(f"\nsteady-state ratio Ray Train / plain: {ratio:.3f} (goal >= 0.9)")
    print(f"largest per-step loss difference: {loss_diff:.2e} (same batch plan and math)")
    print(f"Ray Train fixed start-up cost: {r['first_step_after_s'] - p['first_step_after_s']:.1f}s more to the "
          f"first step; {r['fixed_cost_s'] - p['fixed_cost_s']:.1f}s more outside steady-state training")

    result = {
        "benchmark": "train", "model": args.model, "rows": len(rows), "data": data.name,
        "settings": {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "cutoff_len": args.cutoff,
                     "epochs": args.epochs, "learning_rate": args.lr, "skip_steps": args.skip, "precision": "fp32"},
        "load_average": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": plain["threads"], "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__,
                    "cuda": torch.cuda.is_available()},
        "params": plain["params"], "repeat": args.repeat, "plain": p, "ray_train": r,
        "plain_runs": plains, "ray_train_runs": rays, "ratio": ratio, "max_loss_diff": loss_diff,
        "startup_extra_s": r["first_step_after_s"] - p["first_step_after_s"],
        "fixed_cost_extra_s": r["fixed_cost_s"] - p["fixed_cost_s"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
