"""Benchmark: the evaluation harness's batched greedy generation against one prompt at a time, the code
sandbox's overhead against a plain subprocess, and (optionally) the model's scores on each suite.

Side by side in one run: both generation paths answer the same GSM8K prompts (the texts must agree,
greedy decoding being deterministic), both execution paths run the same HumanEval canonical solutions.

    .venv/bin/python benchmarks/eval_suite.py --model smollm2 --prompts 16 --max-new-tokens 48
    .venv/bin/python benchmarks/eval_suite.py --model smollm2 --scores 20     # + scores on 20 items per suite

Prints a table and writes JSON (default: benchmarks/results/eval_suite.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from middo_ray.config import EVAL_BENCHMARK_FILES, build_config, default_eval_data_dir  # noqa: E402
from middo_ray.evalsuite.benchmarks import humaneval_program, suite_items  # noqa: E402
from middo_ray.evalsuite.code import run_program  # noqa: E402
from middo_ray.evalsuite.runner import evaluate_local, generate_greedy, prompt_ids, stop_strings  # noqa: E402
from middo_ray.models import load_model, threads_for_actor  # noqa: E402


def bench_generation(model: str, dtype: str, n: int, max_new: int, batch: int, data_dir: Path) -> dict:
    lm, tok = load_model(model, dtype)
    items = suite_items("gsm8k", data_dir / "gsm8k_test.jsonl", None, 0, max_new, n, 0)
    prompts = [prompt_ids(it["row"], tok, "default") for it in items]
    stop = stop_strings("default")
    t0 = time.time()
    one = [generate_greedy(lm, tok, [p], max_new, stop, batch_size=1)[0] for p in prompts]
    t_one = time.time() - t0
    t0 = time.time()
    many = generate_greedy(lm, tok, prompts, max_new, stop, batch_size=batch)
    t_many = time.time() - t0
    new_tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in many)
    return {"prompts": n, "max_new_tokens": max_new, "batch_size": batch, "seconds_one_at_a_time": t_one,
            "seconds_batched": t_many, "speedup": t_one / t_many,
            "generated_tokens": new_tokens, "same_texts": sum(a == b for a, b in zip(one, many))}


def bench_exec(n: int, data_dir: Path) -> dict:
    items = suite_items("humaneval", data_dir / "HumanEval.jsonl.gz", None, 0, None, n, 0)
    programs = [humaneval_program(it["problem"], it["gold"]) for it in items]
    t0 = time.time()
    sandboxed = [run_program(p).passed for p in programs]
    t_sandbox = time.time() - t0
    t0 = time.time()
    plain = [subprocess.run([sys.executable, "-c", p], capture_output=True).returncode == 0 for p in programs]
    t_plain = time.time() - t0
    return {"programs": n, "passed_sandboxed": sum(sandboxed), "passed_plain": sum(plain),
            "ms_per_program_sandboxed": 1000 * t_sandbox / n, "ms_per_program_plain": 1000 * t_plain / n}


def bench_scores(model: str, dtype: str, limit: int, max_new: int) -> dict:
    suites = {name: {"limit": limit, "max_new_tokens": max_new} for name in EVAL_BENCHMARK_FILES if name != "math"}
    cfg = build_config({"model": {"base": model, "dtype": dtype},
                        "eval": {"mc_path": None, "suites": suites, "metric": "average"}})
    metrics, _ = evaluate_local(model, [], cfg)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--programs", type=int, default=40)
    ap.add_argument("--scores", type=int, default=0, help="items per suite for the score table (0: skip)")
    ap.add_argument("--data-dir", default=str(default_eval_data_dir()))
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "eval_suite.json"))
    args = ap.parse_args()
    threads_for_actor()
    data_dir = Path(args.data_dir)
    result = {"model": args.model, "generation": bench_generation(args.model, args.dtype, args.prompts,
                                                                  args.max_new_tokens, args.batch_size, data_dir),
              "exec": bench_exec(args.programs, data_dir)}
    if args.scores:
        result["scores"] = bench_scores(args.model, args.dtype, args.scores, args.max_new_tokens)
    g, e = result["generation"], result["exec"]
    print(f"{'generation (' + str(g['prompts']) + ' GSM8K prompts, ' + str(g['max_new_tokens']) + ' new tokens)':<52}"
          f"{'one at a time':>14}{'batched':>10}")
    print(f"{'  seconds':<52}{g['seconds_one_at_a_time']:>14.1f}{g['seconds_batched']:>10.1f}")
    print(f"{'  speedup':<52}{'':>14}{g['speedup']:>9.2f}x")
    print(f"{'  identical greedy texts':<52}{'':>14}{g['same_texts']:>6}/{g['prompts']}")
    print(f"{'code execution (' + str(e['programs']) + ' HumanEval canonical)':<52}{'plain':>14}{'sandbox':>10}")
    print(f"{'  ms per program':<52}{e['ms_per_program_plain']:>14.0f}{e['ms_per_program_sandboxed']:>10.0f}")
    print(f"{'  passed':<52}{e['passed_plain']:>14}{e['passed_sandboxed']:>10}")
    if "scores" in result:
        s = result["scores"]
        print(f"scores of {args.model} ({args.scores} items per suite, greedy, {args.max_new_tokens} new tokens)")
        for name in EVAL_BENCHMARK_FILES:
            if name in s:
                print(f"  {name:<20}{s[name]:>8.3f}   n={s[name + '_n']:<5}{s[name + '_seconds']:>8.1f}s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
