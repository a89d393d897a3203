"""Benchmark: kNN diversity search (``knn_search``) from 10k to 1M embeddings.

For each size, in a fresh subprocess (so peak memory is that size's own): synthetic embeddings
that look like mean-pooled LM hidden states (see ``synthetic_embeddings``), ``knn_search(method='auto')``
timed end to end, peak RSS, and recall@k against exact search for a random sample of query rows
(their exact neighbours against the whole set, blocked). Sizes up to ``--compare-max`` also run
the other path side by side (exact vs FAISS list scan vs FAISS's own index scan).

    .venv/bin/python benchmarks/knn_bench.py --sizes 10000,100000
    .venv/bin/python benchmarks/knn_bench.py --sizes 10000,100000,1000000 --out benchmarks/results/knn.json

Prints a table and writes JSON (default: benchmarks/results/knn.json). Peak memory is the child
process's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` right after the search (whole-process
high-water mark: the embeddings themselves, generator temporaries, and the Python/numpy/FAISS
runtime). ``cpu_seconds`` (user + system of the child during the search) is reported beside wall
seconds because on a shared machine wall time is inflated by other processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from middo_ray.signals.exact import exact_neighbors, recall_at_k  # noqa: E402
from middo_ray.signals.knn import knn_search  # noqa: E402

EXACT_MAX_N = 50_000   # the default of diagnose.knn_exact_max_n


def synthetic_embeddings(n: int, dim: int = 576, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 vectors shaped like mean-pooled hidden states of a small LM.

    Calibrated on SmolLM2-135M-Instruct prompt embeddings of 1,500 Alpaca rows (mask-aware mean of
    the last hidden state over the templated prompt, as diagnosis computes them). At n=1,500 (real vs synthetic): |mean| / row norm 0.93 vs 0.92; pairwise
    cosine 0.87+-0.05 vs 0.85+-0.04; mean top-2 neighbour cosine 0.958+-0.018 vs 0.957+-0.013; the
    same after removing the mean 0.65 vs 0.69; participation ratio of the centred spectrum 19 vs 23.
    The generator:

    * a shared mean vector (norm 32) with two outsized coordinates (the "massive activations" of LMs);
    * n / 100 topic clusters with Zipf-like sizes (weight ~ rank^-0.5); centres drawn from a Gaussian
      whose variance decays as 1/j over a random orthonormal basis (total variance 80);
    * inside each cluster, a random rank-16 subspace with 1/j decaying variances (total 50), plus
      isotropic Gaussian noise of variance 0.06 on every coordinate;
    * 2% outliers (mean + wide isotropic noise) and 1% near-duplicates (a copy of another row plus
      noise of std 0.05, cosine ~0.999), as real instruction sets contain both.

    Deterministic for (n, dim, seed). Memory: the output plus O(dim^2) floats.
    """
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim)
    mean[: min(2, dim)] = [-22.0, -15.0][: min(2, dim)]
    mean *= 32.0 / np.linalg.norm(mean)
    n_clusters = max(8, n // 100)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    spread = 1.0 / np.arange(1, dim + 1)
    spread *= 80.0 / spread.sum()                                        # between-cluster variance
    centres = (rng.normal(size=(n_clusters, dim)) * np.sqrt(spread)) @ basis.T
    weights = np.arange(1, n_clusters + 1) ** -0.5
    label = rng.choice(n_clusters, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), dtype=np.float32)
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(n_clusters + 1))
    rank, within, noise = 16, 50.0, 0.06                            # variances: low-rank part, per-dim noise
    scales = np.sqrt(within / np.arange(1, rank + 1) / np.sum(1.0 / np.arange(1, rank + 1)))
    for c in range(n_clusters):
        rows = order[bounds[c]:bounds[c + 1]]
        if len(rows) == 0:
            continue
        sub, _ = np.linalg.qr(rng.normal(size=(dim, rank)))
        z = rng.normal(size=(len(rows), rank)) * scales
        out[rows] = mean + centres[c] + z @ sub.T + rng.normal(scale=np.sqrt(noise), size=(len(rows), dim))
    n_out = n // 50
    rows = rng.choice(n, size=n_out, replace=False)
    out[rows] = mean + rng.normal(scale=np.sqrt(1.5 * (80.0 + within) / dim + noise), size=(n_out, dim))
    n_dup = n // 100
    src = rng.choice(n, size=n_dup, replace=False)
    dst = rng.choice(n, size=n_dup, replace=False)
    out[dst] = out[src] + rng.normal(scale=0.05, size=(n_dup, dim))
    return out


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 / 1024 if platform.system() != "Darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _one_size(n: int, dim: int, k: int, seed: int, queries: int, method: str, opts: dict, conn) -> None:
    """Child process: one size, one method; sends its flat row back through ``conn``."""
    try:
        t = time.perf_counter()
        x = synthetic_embeddings(n, dim, seed)
        t_gen = time.perf_counter() - t
        rss_data = _peak_rss_mb()
        c = _cpu_seconds()
        res = knn_search(x, k=k, method=method, exact_max_n=EXACT_MAX_N, seed=seed, **opts)
        cpu = _cpu_seconds() - c
        peak = _peak_rss_mb()                      # before the ground truth adds its own buffers
        rng = np.random.default_rng(seed + 1)
        q = np.sort(rng.choice(n, size=min(queries, n), replace=False))
        t = time.perf_counter()
        ex_idx, ex_sim = exact_neighbors(x, q, k=k)
        t_truth = time.perf_counter() - t
        info = res.info
        ok = np.isfinite(res.avg_sim[q])
        row = {
            "n": n, "dim": dim, "k": k, "method": info["method"],
            "requested": method + ("" if not opts else ":" + ",".join(f"{a}={b}" for a, b in opts.items())),
            "seconds": info["seconds"], "cpu_seconds": round(cpu, 1), "peak_rss_mb": round(peak, 1),
            "recall_at_k": round(recall_at_k(res.nbr_idx[q], ex_idx), 4),
            "avg_sim_mean_abs_err": float(np.mean(np.abs(res.avg_sim[q][ok] - ex_sim[ok].mean(axis=1)))),
            "avg_sim_max_abs_err": float(np.max(np.abs(res.avg_sim[q][ok] - ex_sim[ok].mean(axis=1)))),
            "nlist": info.get("nlist"), "nprobe": info.get("nprobe"), "recall_estimate": info.get("recall_estimate"),
            "tries": len(info.get("tries", [])) or None, "scan": info.get("scan"),
            "seconds_train": info.get("seconds_train"), "seconds_check": info.get("seconds_check"),
            "seconds_assign": info.get("seconds_assign"), "seconds_search": info.get("seconds_search"),
            "exact_fallback_rows": info.get("exact_fallback_rows"), "threads": info.get("threads"),
            "data_mb": round(x.nbytes / 2**20, 1), "rss_after_data_mb": round(rss_data, 1),
            "queries": int(len(q)), "truth_seconds": round(t_truth, 2), "gen_seconds": round(t_gen, 2),
            "mean_avg_sim": round(float(np.nanmean(res.avg_sim)), 4),
        }
        conn.send(row)
    except BaseException as e:  # report, never hang the parent
        conn.send({"n": n, "dim": dim, "k": k, "method": method, "error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _run_child(n: int, dim: int, k: int, seed: int, queries: int, method: str, opts: dict | None = None) -> dict:
    ctx = mp.get_context("spawn")   # a fresh interpreter: ru_maxrss belongs to this size alone
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_one_size, args=(n, dim, k, seed, queries, method, opts or {}, child))
    p.start()
    child.close()
    try:
        row = parent.recv()
    except EOFError:
        row = None
    p.join()
    if row is None:
        why = " (SIGKILL: out of memory?)" if p.exitcode == -9 else ""
        row = {"n": n, "dim": dim, "k": k, "method": method,
               "error": f"child exited with code {p.exitcode} before reporting{why}"}
    elif p.exitcode not in (0, None) and "error" not in row:
        row["error"] = f"child exit code {p.exitcode}"
    return row


def bench_knn(sizes=(10_000, 100_000, 1_000_000), dim: int = 576, k: int = 2, seed: int = 0,
              queries: int = 2000, compare_max: int = 10_000) -> list[dict]:
    """One flat row per (size, method), each measured in a fresh subprocess.

    Every size runs ``knn_search(method='auto')`` (exact up to 50,000 rows, FAISS above). Sizes up
    to ``compare_max`` also run the other path side by side: FAISS (list scan, and FAISS's own
    query-by-query index scan) when auto is exact, exact when auto is FAISS.

    Row keys: n, dim, k, method, requested, seconds (knn_search wall, end to end), cpu_seconds,
    peak_rss_mb (child ru_maxrss after the search), recall_at_k (vs exact neighbours of
    ``queries`` random rows), avg_sim_mean_abs_err / avg_sim_max_abs_err, nlist, nprobe,
    recall_estimate (the search's own check), tries, scan, phase seconds, and a few more.
    """
    rows = []
    for n in sizes:
        n = int(n)
        runs = [("auto", {})]
        if n <= compare_max:
            runs += ([("faiss", {}), ("faiss", {"scan": "index"})] if n <= EXACT_MAX_N else [("exact", {})])
        for method, opts in runs:
            rows.append(_run_child(n, dim, k, seed, queries, method, opts))
    return rows


COLUMNS = [("n", "n", "{:d}"), ("method", "method", "{}"), ("requested", "requested", "{}"),
           ("seconds", "wall s", "{:.1f}"), ("cpu_seconds", "cpu s", "{:.1f}"), ("peak_rss_mb", "peak MB", "{:.0f}"),
           ("recall_at_k", "recall@k", "{:.4f}"), ("avg_sim_max_abs_err", "max|d avg|", "{:.1e}"),
           ("nlist", "nlist", "{}"), ("nprobe", "nprobe", "{}"), ("recall_estimate", "est", "{}"),
           ("seconds_train", "train s", "{}"), ("seconds_assign", "assign s", "{}"),
           ("seconds_search", "scan s", "{}")]


def format_table(rows: list[dict]) -> str:
    """Plain-text table of the main columns (errors on their own line)."""
    cells = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        if "error" in r:
            cells.append([str(r.get("n")), str(r.get("method")), "ERROR: " + r["error"]] + [""] * (len(COLUMNS) - 3))
            continue
        cells.append(["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated N values")
    ap.add_argument("--dim", type=int, default=576, help="embedding dimension (SmolLM2-135M: 576)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", type=int, default=2000, help="random rows whose exact neighbours define recall")
    ap.add_argument("--compare-max", type=int, default=10_000,
                    help="also run the other search path at sizes up to this")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "knn.json"))
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    rows = bench_knn(sizes, a.dim, a.k, a.seed, a.queries, a.compare_max)
    print(format_table(rows))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "args": vars(a), "cpus": len(os.sched_getaffinity(0))
                               if hasattr(os, "sched_getaffinity") else os.cpu_count()}, indent=2))
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
