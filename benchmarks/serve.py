"""Benchmark: the refiner app's serving overhead and the gain from dynamic batching.

One chat completion (one prompt, ``--max-tokens`` new tokens, greedy) is the unit of work. At each
concurrency (default 1, 8, 64) a closed loop of that many clients sends ``--requests-per-client``
requests each, and the benchmark reports requests/s and p50/p99 latency for:

- ``direct``: the same engine called in this process with batches of ``concurrency`` rows (at most
  ``--batch-rows``): what the model alone can do, no serving layer;
- ``handle``: the Serve app through its deployment handle (``handle.chat``), batching on;
- ``http``: the Serve app over HTTP (``/v1/chat/completions``), batching on;
- ``http-nobatch``: the same over HTTP with ``batch_max_rows=1`` (every request its own forward pass).

``ratio`` is served requests/s over direct requests/s at the same concurrency (goal: >= 0.8 at 64);
``batching gain`` is http over http-nobatch. The four modes run one after another (never at the same
time), interleaved per concurrency and repeated ``--repeats`` times; each mode keeps its best run, so
a burst of load from other processes on a shared machine spoils one run, not the comparison. The load
generator runs on the same machine as the server: on few cores it takes CPU from it.

With ``--engine vllm`` (run it with the environment that has vLLM, e.g. ``.venv-vllm/bin/python``) the app
serves through Ray Serve LLM's vLLM deployment, ``direct`` is vLLM's own offline engine (``vllm.LLM``) on
the same model and prompt token ids in this process, and ``http-nobatch`` is an app whose vLLM engine runs
one sequence at a time (``max_num_seqs=1``).

    .venv/bin/python benchmarks/serve.py                      # tiny model
    .venv/bin/python benchmarks/serve.py --model smollm2 --max-tokens 16 --concurrency 1 8 32
    .venv-vllm/bin/python benchmarks/serve.py --engine vllm --model smollm2 --json benchmarks/results/serve_vllm.json

Prints a table and writes JSON (default: benchmarks/results/serve.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEY_ENV = "MIDDO_BENCH_SERVE_KEY"


def _prompts(n: int) -> list[str]:
    topics = ["rainbows", "tides", "prime numbers", "photosynthesis", "compound interest", "volcanoes",
              "the water cycle", "binary search", "gravity", "vaccines", "inflation", "plate tectonics"]
    return [f"Explain {topics[i % len(topics)]} to a student in two sentences (question {i})." for i in range(n)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(latencies: list[float], wall: float) -> dict:
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))]

    return {"requests": len(lat), "seconds": round(wall, 3), "rps": round(len(lat) / wall, 3),
            "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * pct(0.99), 1)}


def bench_direct(engine, prompts: list[str], concurrency: int, batch_rows: int, max_tokens: int) -> dict:
    """The engine alone: requests arrive `concurrency` at a time and run as one batch (<= batch_rows).

    The engine runs in a worker thread, as it does in the replica: torch's thread settings are per OS
    thread, and the two sides must compute under the same ones.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_direct, engine, prompts, concurrency, batch_rows, max_tokens).result()


def _direct(engine, prompts: list[str], concurrency: int, batch_rows: int, max_tokens: int) -> dict:
    from serve.engines import GenRow

    rows = [GenRow([{"role": "user", "content": p}], max_new_tokens=max_tokens, temperature=0.0, seed=i)
            for i, p in enumerate(prompts)]
    latencies: list[float] = []
    t0 = time.perf_counter()
    for start in range(0, len(rows), concurrency):
        wave = rows[start:start + concurrency]
        t = time.perf_counter()
        for b in range(0, len(wave), batch_rows):
            engine.generate_rows(wave[b:b + batch_rows])
        latencies += [time.perf_counter() - t] * len(wave)
    return _stats(latencies, time.perf_counter() - t0)


class VLLMDirect:
    """vLLM's offline engine in this process, fed exactly what the app's vLLM engine sends (token ids)."""

    def __init__(self, model: str, dtype: str, max_model_len: int, max_num_seqs: int):
        from vllm import LLM

        from middo_ray.models import load_tokenizer, resolve_model

        self._tok = load_tokenizer(model)
        self._template = bool(getattr(self._tok, "chat_template", None))
        self._max_len = max_model_len
        self._llm = LLM(model=resolve_model(model), dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                        max_num_seqs=max_num_seqs, seed=0)
        self.model_id = model

    def generate_rows(self, rows) -> list:
        from vllm import SamplingParams

        from serve.engines.vllm import prompt_token_ids

        prompts = [{"prompt_token_ids": prompt_token_ids(self._tok, self._template, r, self._max_len)} for r in rows]
        params = [SamplingParams(max_tokens=r.max_new_tokens, temperature=r.temperature, seed=r.seed) for r in rows]
        return self._llm.generate(prompts, params, use_tqdm=False)


async def _closed_loop(send, prompts: list[str], concurrency: int) -> dict:
    """`concurrency` clients, each sending its share of the prompts back to back."""
    queue = list(enumerate(prompts))
    latencies: list[float] = []

    async def client():
        while queue:
            i, p = queue.pop()
            t = time.perf_counter()
            await send(i, p)
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return _stats(latencies, time.perf_counter() - t0)


def _body(model: str, i: int, p: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,
            "temperature": 0.0, "seed": i}


def bench_http(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    import httpx

    async def run():
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600,
                                     headers={"Authorization": f"Bearer {os.environ[KEY_ENV]}"}) as client:
            async def send(i, p):
                r = await client.post("/v1/chat/completions", json=_body(model, i, p, max_tokens))
                r.raise_for_status()

            return await _closed_loop(send, prompts, concurrency)

    return asyncio.run(run())


def bench_handle(handle, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    async def run():
        async def send(i, p):
            await handle.chat.remote(_body(model, i, p, max_tokens))

        return await _closed_loop(send, prompts, concurrency)

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="'tiny', 'smollm2' or an HF path (default: tiny, or tiny-vllm "
                                                  "with --engine vllm)")
    ap.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--max-model-len", type=int, default=1024, help="--engine vllm: context length")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--requests-per-client", type=int, default=3, help="requests per client (at least 16 in all)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-rows", type=int, default=64, help="largest dynamic / direct batch")
    ap.add_argument("--batch-wait-s", type=float, default=0.1)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="logical CPUs reserved for the replica")
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode and concurrency; the best is kept")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on both sides (1 by default: on a few busy cores, multi-threaded CPU "
                         "kernels mostly wait on each other)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    args.model = args.model or ("tiny-vllm" if args.engine == "vllm" else "tiny")
    vllm = args.engine == "vllm"
    if vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import ray
    from ray import serve

    from serve.app import build_app
    from serve.engines.transformers import TransformersEngine

    os.environ.setdefault(KEY_ENV, "bench-key")
    max_c = max(args.concurrency)
    plans = {n: _prompts(max(16, n * args.requests_per_client)) for n in args.concurrency}

    # Same torch threads in this process and in the replica (threads_for_actor reads MIDDO_TORCH_THREADS).
    import torch

    os.environ["MIDDO_TORCH_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    # The in-process engine is loaded before Ray starts, so its load does not overlap Ray's boot.
    if vllm:
        engine = VLLMDirect(args.model, args.dtype, args.max_model_len, max_num_seqs=max(args.batch_rows, max_c))
    else:
        engine = TransformersEngine(args.model, dtype=args.dtype, max_batch=args.batch_rows)
    model_id = engine.model_id
    bench_direct(engine, _prompts(4), 2, args.batch_rows, args.max_tokens)  # warm-up

    # vLLM apps: an ingress replica plus an LLM replica and its engine bundle each (logical CPUs).
    ray.init(address="local", num_cpus=max(8 if vllm else 4, int(args.num_cpus) + 2), log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("MIDDO_CACHE", "MIDDO_TORCH_THREADS")
                                       if k in os.environ}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"model": args.model, "dtype": args.dtype, "num_cpus": args.num_cpus, "api_key_env": KEY_ENV,
              "max_ongoing_requests": max_c + 8, "max_queued_requests": 4 * max_c, "batch_wait_s": args.batch_wait_s,
              "max_new_tokens_limit": max(args.max_tokens, 64)}
    # Both apps stay deployed; an idle replica costs memory, not CPU.
    if vllm:
        common["engine"] = "vllm"
        batched = {"vllm_engine_kwargs": {"max_model_len": args.max_model_len, "max_num_seqs": max(args.batch_rows, max_c)}}
        single = {"vllm_engine_kwargs": {"max_model_len": args.max_model_len, "max_num_seqs": 1}}
    else:
        batched, single = {"batch_max_rows": args.batch_rows}, {"batch_max_rows": 1}
    handle = serve.run(build_app({**common, **batched}), name="bench", route_prefix="/bench")
    serve.run(build_app({**common, **single}), name="bench-nobatch", route_prefix="/nobatch")
    url, url_nb = f"http://127.0.0.1:{port}/bench", f"http://127.0.0.1:{port}/nobatch"
    bench_http(url, model_id, _prompts(4), 2, args.max_tokens)  # warm-ups
    bench_http(url_nb, model_id, _prompts(2), 1, args.max_tokens)
    bench_handle(handle, model_id, _prompts(2), 1, args.max_tokens)

    runners = {
        "direct": lambda c: bench_direct(engine, plans[c], c, args.batch_rows, args.max_tokens),
        "handle": lambda c: bench_handle(handle, model_id, plans[c], c, args.max_tokens),
        "http": lambda c: bench_http(url, model_id, plans[c], c, args.max_tokens),
        "http-nobatch": lambda c: bench_http(url_nb, model_id, plans[c], c, args.max_tokens),
    }
    table: list[dict] = []
    for c in args.concurrency:
        runs: dict[str, list[dict]] = {m: [] for m in runners}
        for rep in range(args.repeats):
            for mode, run in runners.items():
                stats = run(c)
                runs[mode].append(stats)
                print(f"  {mode:<13} c={c:<3} run {rep + 1}: {stats['rps']:>8.2f} req/s  p50 {stats['p50_ms']:>8.1f} ms"
                      f"  p99 {stats['p99_ms']:>8.1f} ms", flush=True)
        for mode, got in runs.items():
            best = max(got, key=lambda r: r["rps"])
            table.append({"mode": mode, "concurrency": c, **best, "all_rps": [r["rps"] for r in got]})
    serve.delete("bench")
    serve.delete("bench-nobatch")
    serve.shutdown()
    ray.shutdown()

    by = {(r["mode"], r["concurrency"]): r for r in table}
    summary = []
    print()
    print(f"{'concurrency':>11} | {'direct':>8} {'handle':>8} {'http':>8} {'nobatch':>8} | "
          f"{'handle/direct':>13} {'http/direct':>11} {'batching gain':>13} | {'http p50':>9} {'http p99':>9}")
    for c in args.concurrency:
        d, h, w, nb = (by[(m, c)] for m in ("direct", "handle", "http", "http-nobatch"))
        s = {"concurrency": c, "direct_rps": d["rps"], "handle_rps": h["rps"], "http_rps": w["rps"],
             "http_nobatch_rps": nb["rps"], "handle_over_direct": round(h["rps"] / d["rps"], 3),
             "http_over_direct": round(w["rps"] / d["rps"], 3), "batching_gain": round(w["rps"] / nb["rps"], 3),
             "http_p50_ms": w["p50_ms"], "http_p99_ms": w["p99_ms"]}
        summary.append(s)
        print(f"{c:>11} | {d['rps']:>8.2f} {h['rps']:>8.2f} {w['rps']:>8.2f} {nb['rps']:>8.2f} | "
              f"{s['handle_over_direct']:>13.2f} {s['http_over_direct']:>11.2f} {s['batching_gain']:>13.2f} | "
              f"{w['p50_ms']:>9.1f} {w['p99_ms']:>9.1f}")
    result = {"benchmark": "serve", "engine": args.engine, "model": args.model, "max_tokens": args.max_tokens,
              "batch_rows": args.batch_rows,
              "batch_wait_s": args.batch_wait_s, "replica_cpus": args.num_cpus, "cores": os.cpu_count(),
              "repeats": args.repeats, "requests_per_client": args.requests_per_client,
              "torch_threads": args.threads,
              "machine": platform.machine(), "goal": "http_over_direct >= 0.8 at the highest concurrency",
              "rows": table, "summary": summary}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
