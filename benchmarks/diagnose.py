"""Benchmark of the diagnosis stage, every comparison measured side by side in one run.

(a) pipeline: our Ray Data diagnosis (``run_diagnosis``: actor pool, one pass per block, pre + current
    loss, embedding, kNN) against a plain single-process loop doing the same work with the same
    functions on the same model and rows. Ratio = plain seconds / Ray seconds (1.0 = no overhead).
(b) reference-style: the same 5k Alpaca rows through an implementation in the reference's style
    (unsorted batches of 8 with the vocabulary projection on every position, one forward pass per
    sample for embeddings, a dense N x N similarity matrix) against ours; speed ratio and equality
    of the results (loss, embedding, kNN neighbours).
(c) kNN from 10k to 1M vectors: time, peak memory, recall@k (``benchmarks/knn_bench.py``).
(d) tokens/s of the scoring pass as a fraction of the model-FLOP bound: 2 x parameters x tokens over a
    matmul FLOP/s measured on this machine in the same run.

    .venv/bin/python benchmarks/diagnose.py                     # all parts, defaults below
    .venv/bin/python benchmarks/diagnose.py --parts a,d --model-a smollm2 --n-a 2000

Prints one table per part and writes JSON (default benchmarks/results/diagnose.json). The rows come
from ../shared/data/sft/alpaca_5000.json (part (a) repeats them with a numbered suffix to reach N
distinct samples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from middo_ray.config import build_config  # noqa: E402
from middo_ray.encode import encode_row  # noqa: E402
from middo_ray.schema import make_row  # noqa: E402
from middo_ray.scoring import forward_scores  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "sft" / "alpaca_5000.json"


def alpaca_rows(n: int) -> list[dict]:
    """n distinct canonical rows from the Alpaca 5k file (repeated with a numbered suffix past 5k)."""
    if not ALPACA.is_file():
        raise SystemExit(f"{ALPACA} not found: the benchmark reads the public Alpaca 5k file from ../shared/data")
    raw = json.loads(ALPACA.read_text())
    rows = []
    for i in range(n):
        r = raw[i % len(raw)]
        suffix = "" if i < len(raw) else f" (variant {i // len(raw)})"
        rows.append(make_row(r["instruction"] + suffix, r["output"], input=r["input"]))
    return rows


def _cfg(model: str, dtype: str, batch_tokens: int):
    return build_config({"model": {"base": model, "dtype": dtype}, "ray": {"num_cpus": 4},
                         "diagnose": {"judge": False, "ifd": False, "batch_tokens": batch_tokens,
                                      "rows_per_block": 256},
                         "select": {"axes": ["complexity", "diversity"]}})


def _threads() -> None:
    from middo_ray.models import threads_for_actor

    threads_for_actor()


# ---------------------------------------------------------------------------------------------
# (a) Ray Data pipeline vs a plain loop.

def plain_diagnosis(rows: list[dict], model: str, dtype: str, batch_tokens: int, block: int = 256) -> dict:
    """The same work as run_diagnosis (judge and IFD off) in one process: two models, blockwise."""
    from middo_ray.models import load_model
    from middo_ray.signals.knn import knn_search

    _threads()
    t0 = time.time()
    cur, tok = load_model(model, dtype)
    pre, _ = load_model(model, dtype)
    t_loop = time.time()
    loss_pre, loss_cur, embs, tokens = [], [], [], 0
    for s in range(0, len(rows), block):
        enc = [encode_row(r, tok, "default", 512) for r in rows[s:s + block]]
        tokens += sum(len(e.input_ids) for e in enc)
        a = forward_scores(cur, enc, tok.pad_token_id, batch_tokens, want_embedding=True)
        b = forward_scores(pre, enc, tok.pad_token_id, batch_tokens)
        loss_cur.append(a.loss)
        loss_pre.append(b.loss)
        embs.append(a.embedding)
    compute = time.time() - t_loop
    emb = np.concatenate(embs)
    knn = knn_search(emb, k=2)
    return {"seconds": time.time() - t0, "compute_s": compute, "loss_cur": np.concatenate(loss_cur),
            "loss_pre": np.concatenate(loss_pre), "knn_sim": knn.avg_sim, "tokens": tokens}


def _settle(seconds: float) -> None:
    """Waits until the 1-minute load average is below 0.5 (at most ``seconds``): the runs start idle."""
    end = time.time() + seconds
    while time.time() < end and os.getloadavg()[0] > 0.5:
        time.sleep(2)


def part_a(model: str, n: int, dtype: str, batch_tokens: int, repeat: int = 1, settle: float = 0.0) -> dict:
    """Plain loop and Ray Data diagnosis, alternately, ``repeat`` times each; the median of the ratios.

    The Ray side runs on the loop's own local Ray (``rundir.init_ray``) and includes its actor's start
    (process, imports, model load), the shards written and read back, and the kNN task; the plain side
    includes its model loads and kNN. ``steady_ratio`` compares the compute alone (the plain loop's block
    loop against the sum of the actor's per-shard compute), so the fixed cost of starting the actor shows
    apart from the per-row cost. Where the Ray side's time goes is in its ``stage`` figures.
    """
    from middo_ray.diagnose import run_diagnosis
    from middo_ray.rundir import init_ray

    rows = alpaca_rows(n)
    cfg = _cfg(model, dtype, batch_tokens)
    runs = []
    for _ in range(repeat):
        _settle(settle)
        plain = plain_diagnosis(rows, model, dtype, batch_tokens)
        init_ray(cfg)                   # the loop's own start of a local Ray (once)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        _settle(settle)
        t0 = time.time()
        d = run_diagnosis(rows, cfg, model)
        ours = time.time() - t0
        runs.append({"plain_s": round(plain["seconds"], 2), "ray_s": round(ours, 2),
                     "ratio": round(plain["seconds"] / ours, 3), "stage": d.counts["seconds"],
                     "steady_ratio": round(plain["compute_s"] / d.counts["seconds"]["units"], 3),
                     "max_abs_loss_diff": float(np.nanmax(np.abs(d.columns["loss_cur"] - plain["loss_cur"])))})
    ratios = sorted(r["ratio"] for r in runs)
    best = runs[[r["ratio"] for r in runs].index(ratios[len(ratios) // 2])]
    return {"part": "a", "model": model, "n": n, "tokens": plain["tokens"], "plain_s": best["plain_s"],
            "ray_s": best["ray_s"], "ratio": best["ratio"], "ratios": [r["ratio"] for r in runs],
            "steady_ratios": [r["steady_ratio"] for r in runs],
            "ray_tokens_per_s": round(2 * plain["tokens"] / best["ray_s"], 1),
            "max_abs_loss_diff": max(r["max_abs_loss_diff"] for r in runs), "runs": runs,
            "load_average": [round(x, 2) for x in os.getloadavg()], "goal": ">= 0.9"}


# ---------------------------------------------------------------------------------------------
# (b) Reference-style implementation.

def reference_style(rows: list[dict], model: str, dtype: str) -> dict:
    """Written in the reference's style, for comparison only: fixed batches of 8 in file order, the
    vocabulary projection on every position, one forward pass per sample for the embedding, and a
    dense N x N cosine matrix. The embedding pools the same templated prompt as ours so the results
    can be compared (the reference pools the raw text; that difference is a choice, not a speed-up)."""
    import torch

    from middo_ray.models import load_model

    _threads()
    t0 = time.time()
    m, tok = load_model(model, dtype)
    pre, _ = load_model(model, dtype)
    enc = [encode_row(r, tok, "default", 512) for r in rows]

    def losses(net) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for s in range(0, len(enc), 8):
                chunk = enc[s:s + 8]
                width = max(len(e.input_ids) for e in chunk)
                ids = torch.full((len(chunk), width), tok.pad_token_id)
                att = torch.zeros((len(chunk), width), dtype=torch.long)
                labels = torch.full((len(chunk), width), -100)
                for r, e in enumerate(chunk):
                    ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
                    att[r, :len(e.input_ids)] = 1
                    labels[r, e.prompt_len:len(e.input_ids)] = torch.tensor(e.input_ids[e.prompt_len:])
                logits = net(input_ids=ids, attention_mask=att).logits.float()
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                       reduction="none", ignore_index=-100)
                mask = (labels[:, 1:] != -100).float()
                out.append((ce * mask).sum(1) / mask.sum(1))
        return torch.cat(out).double().numpy()

    loss_cur = losses(m)
    loss_pre = losses(pre)
    embs = []
    with torch.inference_mode():
        for e in enc:
            h = m.get_decoder()(input_ids=torch.tensor([e.input_ids[:e.prompt_len]])).last_hidden_state[0]
            embs.append(h.float().mean(0).numpy())
    emb = np.stack(embs)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nbr = np.argsort(-sim, axis=1)[:, :2]
    knn_sim = np.take_along_axis(sim, nbr, axis=1).mean(1)
    return {"seconds": time.time() - t0, "loss_cur": loss_cur, "loss_pre": loss_pre, "emb": emb, "nbr": nbr,
            "knn_sim": knn_sim, "dense_matrix_mb": sim.nbytes / 2**20}


def part_b(model: str, n: int, dtype: str, batch_tokens: int) -> dict:
    from middo_ray.diagnose import run_diagnosis
    from middo_ray.rundir import init_ray

    rows = alpaca_rows(n)
    ref = reference_style(rows, model, dtype)
    init_ray(_cfg(model, dtype, batch_tokens))
    t0 = time.time()
    d = run_diagnosis(rows, _cfg(model, dtype, batch_tokens), model)
    ours = time.time() - t0
    same_nbrs = np.mean([set(a) == set(b) for a, b in zip(d.columns["nbr_idx"], ref["nbr"])])
    return {"part": "b", "model": model, "n": n, "reference_s": round(ref["seconds"], 2), "ours_s": round(ours, 2),
            "speedup": round(ref["seconds"] / ours, 2),
            "max_abs_loss_diff": float(np.nanmax(np.abs(d.columns["loss_cur"] - ref["loss_cur"]))),
            "max_abs_emb_diff": float(np.nanmax(np.abs(d.embeddings - ref["emb"]))),
            "same_neighbours": round(float(same_nbrs), 4),
            "max_abs_knn_sim_diff": float(np.nanmax(np.abs(d.columns["knn_sim"] - ref["knn_sim"]))),
            "reference_dense_matrix_mb": round(ref["dense_matrix_mb"], 1)}


# ---------------------------------------------------------------------------------------------
# (c) kNN at scale.

def part_c(sizes: list[int], dim: int) -> list[dict]:
    from knn_bench import bench_knn

    return [{"part": "c", **r} for r in bench_knn(sizes=tuple(sizes), dim=dim, k=2)]


# ---------------------------------------------------------------------------------------------
# (d) Fraction of the FLOP bound.

def matmul_flops(size: int = 2048, seconds: float = 3.0, dtype: str = "float32") -> float:
    """Sustained FLOP/s of square matmuls with torch on this machine (all cores)."""
    import torch

    _threads()
    dt = getattr(torch, dtype)
    a = torch.randn(size, size, dtype=dt)
    b = torch.randn(size, size, dtype=dt)
    torch.mm(a, b)
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * size ** 3 * n / (time.time() - t0)


def part_d(model: str, n: int, dtype: str, batch_tokens: int) -> dict:
    """Scoring throughput of one model pass (loss + embedding) against 2 x params x tokens / peak."""
    import torch

    from middo_ray.models import load_model

    _threads()
    rows = alpaca_rows(n)
    m, tok = load_model(model, dtype)
    enc = [encode_row(r, tok, "default", 512) for r in rows]
    tokens = sum(len(e.input_ids) for e in enc)
    forward_scores(m, enc[:16], tok.pad_token_id, batch_tokens, want_embedding=True)   # warm-up
    t0 = time.time()
    forward_scores(m, enc, tok.pad_token_id, batch_tokens, want_embedding=True)
    sec = time.time() - t0
    params = sum(p.numel() for p in m.parameters())
    emb_params = m.get_input_embeddings().weight.numel()
    # Every token runs the decoder (the embedding lookup is free); only response tokens hit the LM head.
    resp = sum(e.response_len for e in enc)
    head = m.get_output_embeddings().weight.numel()
    tied = m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
    body = params - emb_params - (0 if tied else head)
    flop = 2 * body * tokens + 2 * head * resp
    peak = matmul_flops(dtype="bfloat16" if m.dtype == torch.bfloat16 else "float32")
    return {"part": "d", "model": model, "dtype": str(m.dtype).replace("torch.", ""), "n": n, "tokens": tokens,
            "seconds": round(sec, 2), "tokens_per_s": round(tokens / sec, 1),
            "model_flop_per_s": round(flop / sec / 1e9, 2), "matmul_peak_gflop_s": round(peak / 1e9, 2),
            "fraction_of_bound": round(flop / sec / peak, 3),
            "naive_bound_2PT": round(2 * params * tokens / sec / peak, 3)}


# ---------------------------------------------------------------------------------------------

def _table(title: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = [k for k in rows[0] if k != "part"]
    widths = {k: max(len(k), *(len(str(r.get(k))) for r in rows)) for k in keys}
    lines = [title, "  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r.get(k)).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--model-a", default="tiny", help="model of part (a) ('tiny', 'smollm2' or a path)")
    p.add_argument("--n-a", type=int, default=20_000, help="samples of part (a)")
    p.add_argument("--repeat-a", type=int, default=5, help="runs of each side in part (a); the median ratio is reported")
    p.add_argument("--settle", type=float, default=90.0, help="part (a): most seconds to wait for the load to drop "
                                                              "below 0.5 before each timed side")
    p.add_argument("--model-b", default="tiny", help="model of part (b)")
    p.add_argument("--n-b", type=int, default=5_000, help="Alpaca samples of part (b)")
    p.add_argument("--knn-sizes", default="10000,100000,1000000", help="vector counts of part (c)")
    p.add_argument("--knn-dim", type=int, default=576, help="vector size of part (c) (SmolLM2's hidden size)")
    p.add_argument("--model-d", default="smollm2", help="model of part (d)")
    p.add_argument("--n-d", type=int, default=256, help="samples of part (d)")
    p.add_argument("--dtype", default="float32", help="compute dtype of parts (a), (b), (d)")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diagnose.json"))
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()}, "args": vars(args)}
    if "a" in parts:
        results["a"] = part_a(args.model_a, args.n_a, args.dtype, args.batch_tokens, args.repeat_a, args.settle)
        shown = {k: v for k, v in results["a"].items() if k != "runs"}
        print(_table("(a) Ray Data diagnosis vs plain loop (ratio = plain s / Ray s, median of the runs)", [shown]),
              flush=True)
    if "b" in parts:
        results["b"] = part_b(args.model_b, args.n_b, args.dtype, args.batch_tokens)
        print(_table("(b) ours vs reference-style (speedup = reference s / ours s)", [results["b"]]), flush=True)
    if "c" in parts:
        results["c"] = part_c([int(s) for s in args.knn_sizes.split(",")], args.knn_dim)
        print(_table("(c) kNN at scale", results["c"]), flush=True)
    if "d" in parts:
        results["d"] = part_d(args.model_d, args.n_d, args.dtype, args.batch_tokens)
        print(_table("(d) scoring throughput vs the FLOP bound", [results["d"]]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
