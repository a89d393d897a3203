"""GPU check: the diagnosis pass, the shared-prefix judge and a training step of a ~1B Llama on one GPU.

One prepared script for a GPU machine. It needs torch and transformers only (numpy and tokenizers come
with transformers): no Ray, no vLLM, no pydantic, no downloaded weights. The model is a ~1B Llama
``LlamaForCausalLM`` built from a ``LlamaConfig`` with random weights (hidden 2048, 16 layers, 32 heads /
8 KV heads, intermediate 8192, vocabulary 32000, tied embeddings: 1,038,682,112 parameters; ``--vocab
128256`` gives the Llama-3.2-1B shape, 1,235,814,400, but then a random model puts ~8e-5 of its mass on
the ten digits, under the judge's 1e-4 floor for "answered with a number", so the judge's scores are all
missing and part (b) compares nothing); the
tokenizer is the project's tiny byte-level BPE (``middo_ray.models.ensure_tiny``, trained locally in a
second); the rows are synthetic text of controlled token lengths. Measured, each part guarded so that a
failing part is reported and the others still run:

(a) diagnosis: ``middo_ray.scoring.forward_scores`` (per-sample mean NLL over the response tokens and the
    mean-pooled prompt embedding from the same forward, as the diagnosis stage calls it) with bf16
    weights against fp32 weights on the same rows: loss agreement (max/mean absolute and relative
    difference, Spearman rank correlation), embedding cosine, tokens/s and MFU (2 x params x tokens);
(b) judge: ``middo_ray.judge.judge_scores`` (each sample's body once, the three dimension tails against
    its KV cache) against one full forward per judge prompt over the same token ids: seconds, speed-up
    and the largest score difference, in bf16 (speed) and in fp32 (exactness);
(c) training: ``middo_ray.train.worker._one_step`` (the trainer's own step: right-padded micro-batches,
    response-only loss with logits only where needed, bf16 autocast over fp32 master weights, gradient
    clipping, AdamW, cosine schedule), tokens/s and MFU (6 x params x tokens); then the same after
    ``middo_ray.train.dist._shard_fsdp`` (FSDP2 ``fully_shard``) on a one-rank process group;
(d) the peak GPU memory of each (``torch.cuda.max_memory_allocated``, reset between parts).

    python benchmarks/gpu_check.py --out gpu_check.json         # on a GPU machine, under 8 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.json  # CPU, tiny config, seconds

Prints a table with the goals (diagnosis MFU >= 0.40, training MFU >= 0.35) and writes JSON (default
benchmarks/results/gpu_check.json). See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib
import inspect
import json
import math
import os
import platform
import random
import socket
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# These modules import numpy and the project's pure prompt/row code only (checked by
# tests/unit/test_gpu_check.py, which runs this script with Ray, pyarrow and pydantic made unimportable).
from middo_ray.encode import encode_row  # noqa: E402
from middo_ray.judge import judge_scores, judge_scores_full_prompts, judge_sequences  # noqa: E402
from middo_ray.models import load_tokenizer  # noqa: E402
from middo_ray.scoring import forward_scores, length_batches  # noqa: E402

GOALS = {"diagnosis_mfu": 0.40, "train_mfu": 0.35}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name;
# the first match wins, so the specific H100 variants come before the plain "H100" (SXM).
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))
TEMPLATE = "default"
# The parts, in order, with their share of the wall-clock budget (a part past its share adds no repeats).
PART_WEIGHTS = {"diagnosis": 3.0, "judge": 2.0, "train": 2.0, "train_fsdp": 2.0}
HEAVY_MODULES = ("ray", "pyarrow", "pydantic", "vllm", "peft", "accelerate")

WORDS = (
    "river stone garden window market engine signal summer winter planet letter silver doctor basket "
    "forest camera ticket bridge orange yellow number answer simple quiet rapid gentle honest narrow "
    "bright heavy little modern ancient careful sudden proper native public secret useful wooden golden "
    "explain describe compare measure improve collect divide follow gather handle invite listen notice "
    "observe prepare protect receive remember travel wonder build carry change choose climb cover "
    "history science picture problem student teacher village kitchen journey library machine pattern "
    "question reason record season system theory volume weather balance capital channel climate concept "
    "contract culture default element example feature finance freedom harvest husband instance justice "
    "lecture message mission opinion package partner payment penalty pension pottery quarter reading "
    "and the of to in for with on by from as at into over under between after before during"
).split()


@dataclass(frozen=True)
class Sizes:
    """Model shape and workload of one run."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int              # 0: the tokenizer's size
    rows: int               # diagnosis and training rows
    prompt_tokens: tuple[int, int]
    response_tokens: tuple[int, int]
    cutoff: int
    batch_tokens: int       # forward_scores budget of padded tokens per batch
    judge_rows: int         # rows judged for speed (bf16)
    judge_exact_rows: int   # rows judged in fp32 for the exactness check
    judge_batch_tokens: int
    train_batch_size: int
    train_steps: int        # timed optimizer steps (at most)
    warmup_steps: int       # untimed optimizer steps first
    repeats: int            # timed repeats of each inference pass (at most)
    budget_s: float


FULL = Sizes(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000, rows=256,
             prompt_tokens=(64, 512), response_tokens=(32, 512), cutoff=1024, batch_tokens=32768,
             judge_rows=128, judge_exact_rows=16, judge_batch_tokens=16384, train_batch_size=8,
             train_steps=20, warmup_steps=3, repeats=5, budget_s=420.0)
SMOKE = Sizes(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=0, rows=12,
              prompt_tokens=(8, 48), response_tokens=(4, 40), cutoff=128, batch_tokens=512,
              judge_rows=6, judge_exact_rows=6, judge_batch_tokens=512, train_batch_size=4,
              train_steps=3, warmup_steps=1, repeats=2, budget_s=60.0)


# ---------------------------------------------------------------------------------------------
# Small helpers: time budget, memory, FLOPs, agreement statistics.

class Budget:
    """Wall-clock budget of the run; each part gets a deadline from its weight and the time left."""

    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def deadline_for(self, part: str, remaining: list[str]) -> float:
        share = PART_WEIGHTS[part] / sum(PART_WEIGHTS[p] for p in remaining)
        return time.perf_counter() + max(self.left(), 0.0) * share


class Device:
    """The torch device plus synchronisation and peak-memory reading (None on CPU)."""

    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.dev)

    def peak(self) -> int | None:
        if not self.cuda:
            return None
        self.sync()
        return int(self.torch.cuda.max_memory_allocated(self.dev))

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def peak_tflops(device: Device, override: float | None) -> tuple[float | None, str]:
    """The bf16 dense peak used for MFU and where it came from."""
    if override:
        return float(override), "--peak-tflops"
    if not device.cuda:
        return None, "CPU: no peak figure, MFU not reported"
    name = device.torch.cuda.get_device_name(device.dev)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"table entry '{key}' for '{name}'"
    return None, f"'{name}' is not in the table; pass --peak-tflops for MFU"


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (as Spearman's rho needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts
    return (start + (counts - 1) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """How far ``got`` is from ``ref`` (per-sample values; NaN = missing, which must match)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    both = np.isfinite(ref) & np.isfinite(got)
    r, g = ref[both], got[both]
    diff = np.abs(g - r)
    rel = diff / np.maximum(np.abs(r), 1e-12)
    std = float(r.std()) if r.size else float("nan")
    return {"rows": int(ref.size), "compared": int(both.sum()),
            "missing_mismatch": int((np.isfinite(ref) != np.isfinite(got)).sum()),
            "max_abs": float(diff.max()) if diff.size else None, "mean_abs": float(diff.mean()) if diff.size else None,
            "max_rel": float(rel.max()) if rel.size else None, "mean_rel": float(rel.mean()) if rel.size else None,
            "spearman": spearman(r, g), "ref_mean": float(r.mean()) if r.size else None, "ref_std": std,
            "max_abs_over_ref_std": float(diff.max() / std) if diff.size and std > 0 else None}


def timed_repeats(fn, device: Device, max_repeats: int, deadline: float) -> tuple[list[float], object]:
    """Runs ``fn`` at least once and again while repeats are left and another fits before the deadline."""
    seconds: list[float] = []
    result = None
    while len(seconds) < max(1, max_repeats):
        device.sync()
        t = time.perf_counter()
        out = fn()
        device.sync()
        seconds.append(time.perf_counter() - t)
        result = out if result is None else result
        if time.perf_counter() + seconds[-1] > deadline:
            break
    return seconds, result


# ---------------------------------------------------------------------------------------------
# Model, tokenizer and rows.

@dataclass
class Setup:
    """What every part shares."""

    sizes: Sizes
    device: Device
    tok: object
    cfg: object                 # LlamaConfig
    params: int
    head_params: int            # vocab x hidden: the tied embedding, used as a matmul only by the head
    rows: list[dict]
    encoded: list
    lo_dtype: object            # bf16, or fp32 where this machine cannot compute in bf16
    lo_note: str
    peak: float | None
    seed: int
    lr: float
    train_precision: str


def llama_config(sizes: Sizes, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=max(sizes.vocab, len(tok)), hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=max(2048, 2 * sizes.cutoff), tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_model(s: Setup, dtype=None, train: bool = False):
    """A fresh random-init model on the device, the same weights for the same seed (every part starts equal)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(s.seed)
    with torch.device(s.device.dev):
        model = LlamaForCausalLM(s.cfg)
    if dtype is not None:
        model.to(dtype)
    model.train(train)
    model.requires_grad_(train)
    return model


def _text(rng: random.Random, pool: list[str], n_tokens: int, tokens_per_word: float) -> str:
    n_words = max(1, round(n_tokens / tokens_per_word))
    return " ".join(rng.choice(pool) for _ in range(n_words))


def make_rows(sizes: Sizes, tok, seed: int) -> list[dict]:
    """Synthetic alpaca rows with prompt and response lengths drawn in token ranges.

    Each row draws its words from its own small subset of the word list, so rows differ in what they
    say and their losses spread (under a random model every token costs about ln V, and rows made of the
    same words would all have the same loss: a rank correlation would then measure only noise).
    """
    sample = " ".join(WORDS)
    tokens_per_word = len(tok(sample, add_special_tokens=False)["input_ids"]) / len(WORDS)
    rows = []
    for i in range(sizes.rows):
        rng = random.Random(seed * 1_000_003 + i)
        pool = rng.sample(WORDS, 12)
        rows.append({"instruction": _text(rng, pool, rng.randint(*sizes.prompt_tokens), tokens_per_word),
                     "input": _text(rng, pool, 12, tokens_per_word) if i % 3 == 0 else "",
                     "output": _text(rng, pool, rng.randint(*sizes.response_tokens), tokens_per_word),
                     "system": "", "history": "", "sample_id": f"row-{i:05d}"})
    return rows


def low_precision(device: Device) -> tuple[object, str]:
    """bf16 where the device computes in it (always on Ampere and later GPUs; most CPUs emulate it)."""
    torch = device.torch
    if device.cuda and not torch.cuda.is_bf16_supported():
        return torch.float32, "fp32 vs fp32: this GPU has no bf16"
    try:
        a = torch.ones((8, 8), dtype=torch.bfloat16, device=device.dev)
        float((a @ a).sum())
    except Exception as e:   # a CPU build without bf16 kernels
        return torch.float32, f"fp32 vs fp32: bf16 matmul failed here ({type(e).__name__}: {e})"
    return torch.bfloat16, "bf16 vs fp32"


# ---------------------------------------------------------------------------------------------
# (a) diagnosis pass.

def _padded_tokens(lengths: list[int], batch_tokens: int) -> int:
    """Tokens the decoder really runs over: forward_scores' own length batches, padding included."""
    return sum(len(b) * max(lengths[i] for i in b) for b in length_batches(lengths, batch_tokens))


def part_diagnosis(s: Setup, deadline: float) -> dict:
    dev, pad, bt = s.device, s.tok.pad_token_id, s.sizes.batch_tokens
    enc = s.encoded
    lengths = [len(e.input_ids) for e in enc]
    tokens, padded = sum(lengths), _padded_tokens(lengths, bt)

    def run(model):
        return forward_scores(model, enc, pad, bt, want_embedding=True)

    model32 = build_model(s)
    model_lo = copy.deepcopy(model32).to(s.lo_dtype)
    forward_scores(model32, enc[:2], pad, bt, want_embedding=True)       # warm-up (kernels, allocator)
    dev.reset_peak()
    t32, ref = timed_repeats(functools.partial(run, model32), dev, 1, deadline)
    mem32 = dev.peak()
    del model32
    dev.free()
    forward_scores(model_lo, enc[:2], pad, bt, want_embedding=True)
    dev.reset_peak()
    # The bf16 pass gets most of the part's time: it is the figure that matters.
    t_lo, got = timed_repeats(functools.partial(run, model_lo), dev, s.sizes.repeats, deadline)
    mem_lo = dev.peak()
    del model_lo

    head_positions = int(got.n_tokens.sum())
    emb_ref, emb_got = ref.embedding.astype(np.float64), got.embedding.astype(np.float64)
    cos = (emb_ref * emb_got).sum(1) / np.maximum(np.linalg.norm(emb_ref, axis=1) * np.linalg.norm(emb_got, axis=1),
                                                  1e-30)
    body = s.params - s.head_params
    best = min(t_lo)
    flops_model = 2.0 * s.params * tokens
    flops_run = 2.0 * body * padded + 2.0 * s.head_params * head_positions

    def speed(sec: float, times: list[float]) -> dict:
        return {"seconds": sec, "seconds_all": times, "repeats": len(times), "tokens_per_s": tokens / sec,
                "mfu": mfu(flops_model, sec, s.peak), "mfu_executed": mfu(flops_run, sec, s.peak)}

    return {
        "compare": s.lo_note, "rows": len(enc), "tokens": tokens, "padded_tokens": padded,
        "response_tokens_scored": head_positions, "batch_tokens": bt,
        "same_response_token_counts": bool(np.array_equal(ref.n_tokens, got.n_tokens)),
        "loss": agreement(ref.loss, got.loss),
        "embedding": {"dim": int(emb_ref.shape[1]), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())},
        "low": speed(best, t_lo), "fp32": speed(min(t32), t32),
        "flops": {"model_2NT": flops_model, "executed": flops_run,
                  "executed_rule": "2*(params - vocab*hidden)*padded tokens + 2*vocab*hidden*response positions"},
        "peak_memory_bytes": {"low": mem_lo, "fp32": mem32},
    }


# ---------------------------------------------------------------------------------------------
# (b) the judge: shared prefix (KV cache) against full prompts.

def judge_token_counts(tok, rows: list[dict], cutoff: int) -> dict:
    """Tokens each path pushes through the decoder (no padding) for the 6 judgements of every row."""
    shared = full = 0
    for target in ("prompt", "response"):
        bodies, tails = judge_sequences(rows, tok, TEMPLATE, cutoff, target)
        tail_sum = sum(len(t) for t in tails)
        for body in bodies:
            shared += len(body) + tail_sum
            full += len(tails) * len(body) + tail_sum
    return {"shared": shared, "full": full}


def _score_diff(ref: np.ndarray, got: np.ndarray) -> dict:
    """Score agreement; a score is missing (NaN) where the judge put < 1e-4 of its mass on the digits."""
    both = np.isfinite(ref) & np.isfinite(got)
    d = np.abs(ref - got)[both]
    std = float(ref[both].std()) if d.size else None
    return {"scores": int(ref.size), "compared": int(both.sum()), "missing": int((~np.isfinite(ref)).sum()),
            "missing_mismatch": int((np.isfinite(ref) != np.isfinite(got)).sum()),
            "max_abs": float(d.max()) if d.size else None, "mean_abs": float(d.mean()) if d.size else None,
            "score_mean": float(ref[both].mean()) if d.size else None, "score_std": std,
            "max_abs_over_score_std": float(d.max() / std) if d.size and std else None}


def _fraction_of(deadline: float, share: float) -> float:
    """A deadline ``share`` of the way from now to ``deadline``."""
    now = time.perf_counter()
    return now + max(deadline - now, 0.0) * share


def part_judge(s: Setup, deadline: float) -> dict:
    dev, cut, bt = s.device, s.sizes.cutoff, s.sizes.judge_batch_tokens
    rows = s.rows[:s.sizes.judge_rows]
    exact_rows = s.rows[:s.sizes.judge_exact_rows]
    counts = judge_token_counts(s.tok, rows, cut)
    model = build_model(s, s.lo_dtype)
    judge_scores(model, s.tok, rows[:2], TEMPLATE, cut, bt)                 # warm-up
    judge_scores_full_prompts(model, s.tok, rows[:2], TEMPLATE, cut, bt)
    # The part's time: 40% to the shared path's repeats, then 60% of what is left to the full path's,
    # the rest to the fp32 check.
    dev.reset_peak()
    t_shared, shared = timed_repeats(functools.partial(judge_scores, model, s.tok, rows, TEMPLATE, cut, bt), dev,
                                     s.sizes.repeats, _fraction_of(deadline, 0.4))
    mem_shared = dev.peak()
    dev.reset_peak()
    full_judge = functools.partial(judge_scores_full_prompts, model, s.tok, rows, TEMPLATE, cut, bt)
    t_full, full = timed_repeats(full_judge, dev,
                                 s.sizes.repeats, _fraction_of(deadline, 0.6))
    mem_full = dev.peak()
    del model
    dev.free()
    model32 = build_model(s)
    shared32 = judge_scores(model32, s.tok, exact_rows, TEMPLATE, cut, bt)
    full32 = judge_scores_full_prompts(model32, s.tok, exact_rows, TEMPLATE, cut, bt)
    del model32
    body = s.params - s.head_params
    judgements = 6 * len(rows)

    def speed(times: list[float], run_tokens: int) -> dict:
        sec = min(times)
        return {"seconds": sec, "seconds_all": times, "repeats": len(times), "judgements_per_s": judgements / sec,
                "prompt_tokens_per_s": counts["full"] / sec, "decoder_tokens": run_tokens,
                "mfu_executed": mfu(2.0 * body * run_tokens, sec, s.peak)}

    return {
        "rows": len(rows), "judgements": judgements, "dtype": str(s.lo_dtype).replace("torch.", ""),
        "judge_prompt_tokens": counts["full"], "shared": speed(t_shared, counts["shared"]),
        "full": speed(t_full, counts["full"]), "speedup": min(t_full) / min(t_shared),
        "scores_low": _score_diff(full, shared),
        "scores_fp32": {"rows": len(exact_rows), **_score_diff(full32, shared32)},
        "flops_rule": "2*(params - vocab*hidden)*decoder tokens (the head runs on 1-2 positions per judgement)",
        "peak_memory_bytes": {"shared": mem_shared, "full": mem_full},
    }


# ---------------------------------------------------------------------------------------------
# (c) a training step, plain and under FSDP2 with one rank.

def train_modules() -> tuple[object, object, object, str]:
    """``middo_ray.train.{dist,plan,worker}``, also where the package's own ``__init__`` cannot import.

    ``middo_ray/train/__init__.py`` is the Ray Train stage and imports ``middo_ray.storage`` (pyarrow) at
    import time; the three modules a training step uses need only torch. Where that import fails, they are
    loaded under a bare package object for ``middo_ray.train`` so the step is still the trainer's own code.
    """
    try:
        from middo_ray.train import dist, plan, worker
        return dist, plan, worker, "package import"
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
    for name in [n for n in sys.modules if n == "middo_ray.train" or n.startswith("middo_ray.train.")]:
        del sys.modules[name]
    pkg = types.ModuleType("middo_ray.train")
    pkg.__path__ = [str(ROOT / "middo_ray" / "train")]
    pkg.__package__ = "middo_ray.train"
    sys.modules["middo_ray.train"] = pkg
    mods = [importlib.import_module(f"middo_ray.train.{m}") for m in ("dist", "plan", "worker")]
    return mods[0], mods[1], mods[2], f"modules without the package __init__ (it needs '{missing}')"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_one_rank(device: Device) -> str:
    """A world-size-1 process group (NCCL on a GPU, gloo on CPU), the env a Ray Train worker would have."""
    import torch.distributed as dist

    backend = "nccl" if device.cuda else "gloo"
    if dist.is_initialized():
        return dist.get_backend()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    if device.cuda:
        device.torch.cuda.set_device(device.dev)
    dist.init_process_group(backend, rank=0, world_size=1, timeout=timedelta(seconds=120))
    return backend


def part_train(s: Setup, deadline: float, fsdp: bool, plain_losses: list[float] | None = None) -> dict:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    dev, sz = s.device, s.sizes
    info: dict = {}
    if fsdp:
        import torch.distributed as dist

        if not dist.is_available():
            return {"status": "unavailable", "error": "torch.distributed is not available in this torch build"}
        try:
            getattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard")
        except (ImportError, AttributeError) as e:
            return {"status": "unavailable", "error": f"no FSDP2 fully_shard in this torch: {e}"}
        info["backend"] = init_one_rank(dev)
    dist_mod, plan_mod, worker, how = train_modules()
    info["train_modules"] = how
    enc = s.encoded
    lengths = [len(e.input_ids) for e in enc]
    total_steps, accum = sz.warmup_steps + sz.train_steps, 1
    per_epoch = math.ceil(len(enc) / sz.train_batch_size)
    micro = plan_mod.plan_batches(lengths, sz.train_batch_size, total_steps * accum / per_epoch, s.seed)
    micro = micro[:total_steps * accum]
    windows = plan_mod.window_token_counts(micro, [e.response_len for e in enc], accum)
    inputs = plan_mod.window_token_counts(micro, lengths, accum)
    plan = worker.Plan(enc, micro, "gpu-check", windows, inputs, len(enc))

    dev.reset_peak()
    model = build_model(s, train=True)      # fp32 master weights, as the trainer loads them
    if fsdp:
        model, info["fsdp_units"] = dist_mod._shard_fsdp(model, dev.dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.0},
                               {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=s.lr)
    sched = get_cosine_schedule_with_warmup(optim, math.ceil(0.03 * plan.steps), plan.steps)
    precision = plan_mod.resolve_precision(s.train_precision, dev.dev.type,
                                           dev.cuda and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(dev.dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    use_keep = "logits_to_keep" in inspect.signature(dist_mod._forward_module(model).forward).parameters
    run = worker._Run(config={"grad_accum": accum}, model=model, tok=s.tok, optim=optim, sched=sched,
                      trainable=trainable, autocast=autocast, device=dev.dev, plan=plan, state={}, rank=0, world=1,
                      lora=False, use_keep=use_keep)

    # Positions the decoder and the LM head run over (padding included), per optimizer step.
    padded, projected = [], []
    for step in range(plan.steps):
        p_sum = k_sum = 0
        for idx in micro[step * accum:(step + 1) * accum]:
            batch = plan_mod.collate([enc[i] for i in idx], s.tok.pad_token_id)
            b, w = batch["input_ids"].shape
            first = dist_mod._keep_from(batch) if use_keep else 0
            p_sum, k_sum = p_sum + b * w, k_sum + b * (w - first)
        padded.append(p_sum)
        projected.append(k_sum)

    losses, seconds = [], []
    for step in range(plan.steps):
        dev.sync()
        t = time.perf_counter()
        nll = worker._one_step(run, step)
        dev.sync()
        seconds.append(time.perf_counter() - t)
        losses.append(nll / max(windows[step], 1))
        timed = step + 1 - sz.warmup_steps
        if timed >= 1 and time.perf_counter() + seconds[-1] > deadline:
            break
    mem = dev.peak()
    del run, model, optim, sched, trainable
    done = len(seconds)
    keep = list(range(min(sz.warmup_steps, done - 1), done))       # at least one timed step
    sec = sum(seconds[i] for i in keep)
    tok_in = sum(inputs[i] for i in keep)
    body = s.params - s.head_params
    flops_model = 6.0 * s.params * tok_in
    flops_run = sum(6.0 * body * padded[i] + 6.0 * s.head_params * projected[i] for i in keep)
    out = {**info, "precision": precision, "rows": len(enc), "batch_size": sz.train_batch_size, "grad_accum": accum,
           "logits_to_keep": use_keep, "steps_run": done, "warmup_steps": done - len(keep), "timed_steps": len(keep),
           "step_seconds": seconds, "tokens_timed": tok_in, "seconds_timed": sec, "tokens_per_s": tok_in / sec,
           "mfu": mfu(flops_model, sec, s.peak), "mfu_executed": mfu(flops_run, sec, s.peak),
           "flops": {"model_6NT": flops_model, "executed": flops_run,
                     "executed_rule": "6*(params - vocab*hidden)*padded tokens + 6*vocab*hidden*projected positions"},
           "losses": losses, "losses_finite": bool(all(math.isfinite(x) for x in losses)),
           "peak_memory_bytes": mem}
    if plain_losses:
        n = min(len(plain_losses), len(losses))
        out["max_loss_diff_vs_plain"] = max(abs(a - b) for a, b in zip(plain_losses[:n], losses[:n]))
    return out


# ---------------------------------------------------------------------------------------------
# The run.

def guarded(name: str, fn, device: Device) -> dict:
    """Runs one part; an exception becomes the part's recorded error, and memory is freed either way."""
    t = time.perf_counter()
    try:
        out = fn()
        out.setdefault("status", "ok")
        out.setdefault("error", None)
    except Exception as e:
        out = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        print(f"[gpu_check] part {name} failed: {out['error']}", file=sys.stderr)
    out["wall_s"] = round(time.perf_counter() - t, 3)
    device.free()
    return out


def _fmt(x, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def goals_of(parts: dict) -> list[dict]:
    diag, train, fsdp = parts.get("diagnosis", {}), parts.get("train", {}), parts.get("train_fsdp", {})

    def goal(name: str, value, target: float) -> dict:
        return {"goal": name, "value": value, "target": target, "pass": None if value is None else value >= target}

    return [goal("diagnosis MFU (bf16 pass, 2*N*tokens)", diag.get("low", {}).get("mfu"), GOALS["diagnosis_mfu"]),
            goal("training MFU (one step, 6*N*tokens)", train.get("mfu"), GOALS["train_mfu"]),
            goal("training MFU under FSDP2, 1 rank", fsdp.get("mfu"), GOALS["train_mfu"])]


def print_table(result: dict) -> None:
    p = result["parts"]
    lines: list[tuple[str, str, str]] = []

    def add(part: str, what: str, value: str) -> None:
        lines.append((part, what, value))

    for name in PART_WEIGHTS:
        if p.get(name, {}).get("status") != "ok":
            add(name, "status", f"{p.get(name, {}).get('status')}: {p.get(name, {}).get('error')}")
    d = p.get("diagnosis", {})
    if d.get("status") == "ok":
        lo = d["loss"]
        add("diagnosis", "compare", d["compare"])
        add("diagnosis", "loss max|d| / mean|d|", f"{_fmt(lo['max_abs'])} / {_fmt(lo['mean_abs'])}")
        add("diagnosis", "loss max / mean rel. diff", f"{_fmt(lo['max_rel'])} / {_fmt(lo['mean_rel'])}")
        add("diagnosis", "loss Spearman; max|d| / std", f"{_fmt(lo['spearman'], '.4f')}; "
            f"{_fmt(lo['max_abs_over_ref_std'])} (std {_fmt(lo['ref_std'])})")
        add("diagnosis", "embedding min / mean cosine", f"{d['embedding']['min_cosine']:.5f} / "
            f"{d['embedding']['mean_cosine']:.5f}")
        for key, label in (("low", "low precision"), ("fp32", "fp32")):
            v = d[key]
            add("diagnosis", f"{label} tokens/s, MFU (executed)",
                f"{v['tokens_per_s']:.0f}, {_fmt(v['mfu'])} ({_fmt(v['mfu_executed'])}), {v['repeats']} run(s)")
        add("diagnosis", "peak memory low / fp32",
            f"{_gib(d['peak_memory_bytes']['low'])} / {_gib(d['peak_memory_bytes']['fp32'])}")
    j = p.get("judge", {})
    if j.get("status") == "ok":
        add("judge", f"{j['judgements']} judgements ({j['dtype']})",
            f"shared {j['shared']['seconds']:.3f}s, full {j['full']['seconds']:.3f}s, speed-up {j['speedup']:.2f}x")
        add("judge", "judgements/s shared / full",
            f"{j['shared']['judgements_per_s']:.1f} / {j['full']['judgements_per_s']:.1f}")
        add("judge", "MFU (executed) shared / full",
            f"{_fmt(j['shared']['mfu_executed'])} / {_fmt(j['full']['mfu_executed'])}")
        add("judge", f"score max|d| {j['dtype']} / fp32",
            f"{_fmt(j['scores_low']['max_abs'])} / {_fmt(j['scores_fp32']['max_abs'])} "
            f"(score std {_fmt(j['scores_fp32']['score_std'])})")
        add("judge", "scores compared / missing (fp32)",
            f"{j['scores_fp32']['compared']} / {j['scores_fp32']['missing']} of {j['scores_fp32']['scores']}")
        add("judge", "peak memory shared / full",
            f"{_gib(j['peak_memory_bytes']['shared'])} / {_gib(j['peak_memory_bytes']['full'])}")
    for name in ("train", "train_fsdp"):
        t = p.get(name, {})
        if t.get("status") == "ok":
            add(name, f"{t['precision']}, {t['timed_steps']} timed step(s)",
                f"{t['tokens_per_s']:.0f} tokens/s, MFU {_fmt(t['mfu'])} ({_fmt(t['mfu_executed'])} executed)")
            extra = (f", loss vs plain max|d| {_fmt(t['max_loss_diff_vs_plain'])}"
                     if "max_loss_diff_vs_plain" in t else "")
            add(name, "peak memory", f"{_gib(t['peak_memory_bytes'])}{extra}")
    w1 = max(len(a) for a, _, _ in lines) if lines else 10
    w2 = max(len(b) for _, b, _ in lines) if lines else 10
    print()
    for a, b, c in lines:
        print(f"{a:<{w1}}  {b:<{w2}}  {c}")
    print()
    for g in result["goals"]:
        verdict = "n/a" if g["pass"] is None else ("pass" if g["pass"] else "FAIL")
        print(f"goal {g['goal']} >= {g['target']:.2f}: {_fmt(g['value'], '.3f')}  {verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU: the same code paths in seconds")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/gpu_check[_smoke].json)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available; cpu for --smoke)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (overrides the table)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 420 s, smoke 60 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (train.learning_rate's default)")
    ap.add_argument("--train-precision", default="bf16", choices=("auto", "bf16", "fp32"),
                    help="train.precision: bf16 autocast over fp32 master weights by default, also on CPU")
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "rows", "cutoff", "batch-tokens",
                 "judge-rows", "judge-exact-rows", "train-batch-size", "train-steps", "repeats"):
        ap.add_argument(f"--{name}", type=int, default=None, help="override the size of this name")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    sizes = SMOKE if args.smoke else FULL
    over = {f: getattr(args, f) for f in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "rows",
                                          "cutoff", "batch_tokens", "judge_rows", "judge_exact_rows",
                                          "train_batch_size", "train_steps", "repeats", "budget_s")
            if getattr(args, f) is not None}
    sizes = replace(sizes, **over)
    budget = Budget(sizes.budget_s)
    device = Device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.cuda:
        # The fp32 reference is true fp32: no TF32 inside its matmuls.
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "gpu_check_smoke.json" if args.smoke else "gpu_check.json")

    tok = load_tokenizer("tiny")
    cfg = llama_config(sizes, tok)
    rows = make_rows(sizes, tok, args.seed)
    encoded = [encode_row(r, tok, TEMPLATE, sizes.cutoff) for r in rows]
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in meta.parameters())
    attn = meta.config._attn_implementation
    del meta
    lo_dtype, lo_note = low_precision(device)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    setup = Setup(sizes, device, tok, cfg, params, cfg.vocab_size * cfg.hidden_size, rows, encoded, lo_dtype, lo_note,
                  peak, args.seed, args.lr, args.train_precision)
    lengths = [len(e.input_ids) for e in encoded]
    name = torch.cuda.get_device_name(device.dev) if device.cuda else platform.processor() or platform.machine()
    print(f"gpu_check on {name} ({device.dev}); peak {_fmt(peak)} TFLOP/s ({peak_source})")
    print(f"model: Llama {cfg.num_hidden_layers} layers x {cfg.hidden_size}, {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}, tied: {params:,} parameters ({attn})")
    print(f"rows: {len(rows)}, {sum(lengths)} tokens (mean {np.mean(lengths):.0f}, max {max(lengths)}); "
          f"budget {sizes.budget_s:.0f}s")

    parts: dict[str, dict] = {}
    order = list(PART_WEIGHTS)
    for i, part in enumerate(order):
        deadline = budget.deadline_for(part, order[i:])
        if part == "diagnosis":
            fn = lambda: part_diagnosis(setup, deadline)  # noqa: E731
        elif part == "judge":
            fn = lambda: part_judge(setup, deadline)  # noqa: E731
        elif part == "train":
            fn = lambda: part_train(setup, deadline, fsdp=False)  # noqa: E731
        else:
            fn = lambda: part_train(setup, deadline, fsdp=True,  # noqa: E731
                                    plain_losses=parts["train"].get("losses"))
        print(f"[gpu_check] {part} ...", flush=True)
        parts[part] = guarded(part, fn, device)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:   # teardown only; the figures are already taken
        pass

    result = {
        "benchmark": "gpu_check", "smoke": args.smoke,
        "device": {"type": device.dev.type, "name": name,
                   "memory_bytes": torch.cuda.get_device_properties(device.dev).total_memory if device.cuda else None,
                   "cuda": torch.version.cuda, "bf16": lo_note,
                   "fp32_matmul": torch.backends.cuda.matmul.fp32_precision if device.cuda else None},
        "peak_tflops": peak, "peak_source": peak_source,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "model": {"params": params, "head_params": setup.head_params, "tied_embeddings": True, "attention": attn,
                  "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "num_attention_heads",
                                                          "num_key_value_heads")},
                  "init": "random (transformers' own init, seeded)"},
        "sizes": asdict(sizes),
        "data": {"rows": len(rows), "tokens": sum(lengths), "mean_tokens": float(np.mean(lengths)),
                 "max_tokens": max(lengths), "truncated": sum(e.truncated for e in encoded),
                 "response_tokens": sum(e.response_len for e in encoded), "template": TEMPLATE},
        "parts": parts,
        "memory": {"diagnosis": parts["diagnosis"].get("peak_memory_bytes"),
                   "judge": parts["judge"].get("peak_memory_bytes"),
                   "train": parts["train"].get("peak_memory_bytes"),
                   "train_fsdp": parts["train_fsdp"].get("peak_memory_bytes"),
                   "unit": "bytes, torch.cuda.max_memory_allocated, reset before each measured pass; null on CPU"},
        "modules_loaded": [m for m in HEAVY_MODULES if sys.modules.get(m) is not None],
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "budget_s": sizes.budget_s, "seconds": round(time.perf_counter() - budget.t0, 2),
    }
    result["goals"] = goals_of(parts)
    print_table(result)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out_path} ({result['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
