"""Benchmark: the self-judge with a shared body (KV cache) against one forward pass per judge prompt.

Both compute the same probability-weighted 0-10 scores for the 6 judgements of each sample; the
benchmark checks that they agree and reports the speed ratio, side by side in one run.

``--modes`` adds the measurement behind the default ``diagnose.judge_mode``: the probability-weighted
judge against the paper's generate-and-parse judge (temperature 0.1) on the bundled demo data, whose 36
deliberately bad rows are known (``middo_ray/demo/data/defects.json``): seconds, missing judgements, and
how well the per-sample quality ranks the bad rows below the good ones (AUROC).

    .venv/bin/python benchmarks/judge.py --model smollm2 --rows 48
    .venv/bin/python benchmarks/judge.py --model tiny --rows 200 --json out.json

Prints a table and writes JSON (default: benchmarks/results/judge.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from middo_ray.judge import judge_scores, judge_scores_full_prompts, judge_sequences  # noqa: E402
from middo_ray.demo import resolve as resolve_data_path  # noqa: E402
from middo_ray.io import read_dataset  # noqa: E402
from middo_ray.models import load_model  # noqa: E402


def full_prompt_tokens(tok, rows, template: str, cutoff_len: int) -> int:
    """Tokens the full-prompt judge pushes through the model: every body once per tail."""
    return sum(len(body) + len(tail) for target in ("prompt", "response")
               for bodies, tails in [judge_sequences(rows, tok, template, cutoff_len, target)]
               for body in bodies for tail in tails)


def judge_modes(model, tok, batch_tokens: int, rows_limit: int | None) -> dict:
    """prob vs generate on the demo data: time, missing judgements, AUROC of low quality for known defects."""
    from middo_ray.audit import auroc
    from middo_ray.demo import demo_path
    from middo_ray.judge import judge_generate
    from middo_ray.signals.quality import aggregate_quality

    rows = read_dataset(resolve_data_path("demo")).rows
    defects = json.loads(Path(demo_path("defects")).read_text())
    if rows_limit is not None:   # every known defect plus clean rows up to the limit, in file order
        keep_clean = max(rows_limit - sum(r["sample_id"] in defects for r in rows), 0)
        clean = [r for r in rows if r["sample_id"] not in defects][:keep_clean]
        keep = {r["sample_id"] for r in clean} | set(defects)
        rows = [r for r in rows if r["sample_id"] in keep]
    bad = np.asarray([r["sample_id"] in defects for r in rows])
    out = {}
    for mode in ("prob", "generate"):
        t = time.perf_counter()
        if mode == "prob":
            q = judge_scores(model, tok, rows, "default", 512, batch_tokens)
        else:
            q = judge_generate(model, tok, rows, "default", 512, batch_tokens, temperature=0.1, max_new_tokens=6)
        sec = time.perf_counter() - t
        _, overall = aggregate_quality(q[:, :3], q[:, 3:])
        a = auroc(-overall, bad)
        out[mode] = {"seconds": round(sec, 2), "judgements": int(q.size), "missing": int(np.isnan(q).sum()),
                     "samples_without_quality": int(np.isnan(overall).sum()),
                     "auroc_known_defects": None if not np.isfinite(a.value) else round(float(a.value), 3),
                     "distinct_scores": int(len(np.unique(np.round(overall[np.isfinite(overall)], 3))))}
    out["rows"], out["known_defects"] = len(rows), int(bad.sum())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "judge.json"))
    ap.add_argument("--modes", action="store_true", help="also compare judge_mode prob vs generate on the demo data")
    ap.add_argument("--modes-rows", type=int, default=None, help="demo rows for --modes: all known defects plus clean rows up to this many (default: all rows)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = read_dataset(resolve_data_path(args.data)).rows[: args.rows]
    model, tok = load_model(args.model)
    judge_scores(model, tok, rows[:2], "default", 512, args.batch_tokens)  # warm-up
    t = time.perf_counter()
    shared = judge_scores(model, tok, rows, "default", 512, args.batch_tokens)
    t_shared = time.perf_counter() - t
    t = time.perf_counter()
    full = judge_scores_full_prompts(model, tok, rows, "default", 512, args.batch_tokens)
    full_tokens = full_prompt_tokens(tok, rows, "default", 512)
    t_full = time.perf_counter() - t
    diff = float(np.nanmax(np.abs(shared - full)))
    result = {"model": args.model, "rows": len(rows), "judgements": 6 * len(rows), "full_prompt_tokens": full_tokens,
              "seconds_full_prompts": round(t_full, 3), "seconds_shared_body": round(t_shared, 3),
              "speedup": round(t_full / t_shared, 2), "max_abs_score_difference": diff,
              "threads": __import__("torch").get_num_threads()}
    print(f"{'method':<28}{'seconds':>10}{'judgements/s':>15}")
    print(f"{'full prompt per judgement':<28}{t_full:>10.2f}{6 * len(rows) / t_full:>15.1f}")
    print(f"{'shared body + KV cache':<28}{t_shared:>10.2f}{6 * len(rows) / t_shared:>15.1f}")
    print(f"speed-up {result['speedup']}x; largest score difference {diff:.2e} (same scores)")
    if args.modes:
        result["modes"] = modes = judge_modes(model, tok, args.batch_tokens, args.modes_rows)
        print(f"\njudge modes on the demo data ({modes['rows']} rows, {modes['known_defects']} known defects)")
        print(f"{'mode':<10}{'seconds':>10}{'missing':>10}{'no score':>10}{'AUROC':>8}{'distinct':>10}")
        for mode in ("prob", "generate"):
            m = modes[mode]
            print(f"{mode:<10}{m['seconds']:>10.1f}{m['missing']:>10}{m['samples_without_quality']:>10}"
                  f"{str(m['auroc_known_defects']):>8}{m['distinct_scores']:>10}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
