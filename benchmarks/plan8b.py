"""The worked GPU plan for the paper's setting (Llama-3.1-8B, Alpaca-52K, full fine-tuning, one 8-GPU node).

Prints, for jobs/llama8b_alpaca.yaml, the GPUs, the memory per GPU and the expected minutes of every phase
of a round, the minutes of rounds 0-3, and the storage a run needs; the README's section "Running on a GPU
cluster" quotes its output. Every figure is arithmetic on stated assumptions (the ``Assumptions`` fields,
each with its reason) and on token counts of real Alpaca rows, not a measurement on GPUs.

    .venv/bin/python benchmarks/plan8b.py                      # the table, with the built-in token counts
    .venv/bin/python benchmarks/plan8b.py --mfu-train 0.25     # any assumption can be changed
    .venv/bin/python benchmarks/plan8b.py --tokenizer /models/Llama-3.1-8B   # recount the tokens

The built-in token counts (``SEED_TOKENS``) were taken from ``../shared/data/sft/alpaca_5000.json`` (a random
5,000 of the 52,002 Alpaca rows) with a copy of the Llama-3 vocabulary (128,000 BPE ranks in tiktoken's format,
from a tokenizer package; not a dependency of the project) through :func:`token_stats`, i.e. the project's own
encoding and judge prompts. Its counts matched a cl100k_base count of the same texts within 0.03%, as they
should: Llama 3's vocabulary extends cl100k_base's. ``--tokenizer`` recounts them with any Hugging Face
tokenizer the machine has (SmolLM2's gives 83 tokens a row instead of 79).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

GB = 1e9
GIB = 2 ** 30


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture decoder (what the parameter and KV-cache sizes follow from)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * self.inter + 2 * h     # q, o; k, v; gate, up, down; 2 norms

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Untied input embedding and output head, as Llama-3.1-8B and -70B have."""
        return self.layers * self.layer_params + 2 * self.embed_params + self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2    # K and V, bf16


LLAMA_8B = Shape(hidden=4096, layers=32, heads=32, kv_heads=8, inter=14336, vocab=128256)
LLAMA_70B = Shape(hidden=8192, layers=80, heads=64, kv_heads=8, inter=28672, vocab=128256)

# Mean tokens per Alpaca row under the 'default' template (Llama-3 BPE, 5,000 rows; see the docstring):
# prompt = BOS-less "Human: {instruction}\n{input}\nAssistant:", response = output + EOS, ifd = the IFD
# denominator's pass (empty-prompt template + response), judge = the two shared judge bodies plus the six
# dimension tails; judge_pre_* = what a body adds to the sample's prompt (or prompt + response).
SEED_TOKENS = {"rows": 5000, "prompt": 21.4, "response": 57.3, "ifd": 62.3, "judge": 339.1,
               "judge_pre_prompt": 45.8, "judge_pre_response": 47.1, "tails": 146.0, "p99": 277, "max": 583}


@dataclass
class Assumptions:
    """Every number the plan rests on that is not a fact of the model or the config (each with its reason)."""

    gpus: int = 8                       # one 8-GPU node (H100 SXM 80 GB)
    batch_size: int = 4                 # train.batch_size of the plan (reference: per_device_train_batch_size)
    grad_accum: int = 8                 # train.grad_accum of the plan (reference: gradient_accumulation_steps)
    peak_tflops: float = 989.0          # H100 SXM bf16 dense peak (no sparsity), as benchmarks/gpu_check.py
    gpu_mem_gib: float = 79.2           # what torch reports for an H100 80 GB
    mfu_fwd: float = 0.40               # diagnosis and judge passes: benchmarks/gpu_check.py's goal
    mfu_train: float = 0.35             # training: benchmarks/gpu_check.py's goal
    busbw_gbs: float = 360.0            # NCCL all-gather / reduce-scatter bus bandwidth over NVLink 4 (8 GPUs)
    storage_gbs: float = 2.0            # shared filesystem read or write, one stream
    cpu_tflops: float = 1.0             # numpy fp32 matmul on the node's CPUs (the exact kNN runs there)
    seed_rows: int = 52002              # Alpaca
    heldout_fraction: float = 0.02      # data.heldout_fraction of the plan
    replaced: float = 0.12              # per round: rows replaced (hard or low quality, rewrite accepted) ...
    added: float = 0.11                 # ... and rows added (sparse); MiddOptimized llama_alpaca is +10.8%
    valid: float = 0.9                  # rewrites that pass validation and are re-judged with their original
    teacher_prompt: float = 60.0        # tokens of a rewritten prompt
    teacher_response: float = 400.0     # tokens of a teacher answer (capped by refine.max_new_tokens=1024)
    pad_overhead: float = 1.05          # length-grouped micro-batches: padded / real tokens
    act_bytes_per_token_layer: float = 70 * 4096   # training activations kept for backward (see memory())
    longest_sample: int = 1100          # longest training sample: a teacher answer at its 1024-token cap
    decode_step_s: float = 0.030        # one transformers generate step of the 8B model at batch 64
    eval_prefill_tokens: float = 3.0e6  # prompts of the evaluation (few-shot included) and held-out rows
    model_start_s: float = 30.0         # process start, imports and weight conversion per model load
    serve_start_s: float = 120.0        # a vLLM replica's start beyond reading its weights (CUDA graphs)
    train_start_s: float = 60.0         # Ray Train: controller, workers, process group, dataset split


# Generated benchmarks of jobs/llama8b_alpaca.yaml (items, max_new_tokens); evaluation blocks hold 64 items.
EVAL_GEN = {"gsm8k": (1319, 512), "math500": (500, 1024), "humaneval": (164, 512), "mbpp": (500, 512)}
EVAL_BLOCK = 64
CUTOFF = 4096


def token_stats(rows: list[dict], tok, template: str = "default", cutoff: int = CUTOFF) -> dict:
    """Mean tokens per row of each pass diagnosis makes, with the project's own encoding and judge prompts."""
    import numpy as np

    from middo_ray.encode import empty_prompt_variant, encode_row
    from middo_ray.judge import judge_sequences

    enc = [encode_row(r, tok, template, cutoff) for r in rows]
    prompt = np.array([e.prompt_len for e in enc], float)
    resp = np.array([e.response_len for e in enc], float)
    ifd = np.array([len(empty_prompt_variant(e, r, tok, template).input_ids) for e, r in zip(enc, rows)], float)
    bodies_p, tails_p = judge_sequences(rows, tok, template, cutoff, "prompt")
    bodies_r, tails_r = judge_sequences(rows, tok, template, cutoff, "response")
    body_p = np.array([len(b) for b in bodies_p], float)
    body_r = np.array([len(b) for b in bodies_r], float)
    tails = float(sum(len(t) for t in tails_p + tails_r))
    total = prompt + resp
    def mean(x) -> float:
        return round(float(np.mean(x)), 1)

    return {"rows": len(rows), "prompt": mean(prompt), "response": mean(resp), "ifd": mean(ifd),
            "judge": mean(body_p + body_r + tails), "judge_pre_prompt": mean(body_p - prompt),
            "judge_pre_response": mean(body_r - total), "tails": tails,
            "p99": int(np.percentile(total, 99)), "max": int(total.max())}


@dataclass
class RowKind:
    """Mean tokens per row of one kind (seed rows, teacher-written rows) in each pass."""

    total: float
    ifd: float
    judge: float


def row_kinds(t: dict, a: Assumptions) -> tuple[RowKind, RowKind]:
    seed = RowKind(t["prompt"] + t["response"], t["ifd"], t["judge"])
    p, r = a.teacher_prompt, a.teacher_response + 1          # + EOS
    empty = t["ifd"] - t["response"]
    teacher = RowKind(p + r, empty + r, (t["judge_pre_prompt"] + p) + (t["judge_pre_response"] + p + r) + t["tails"])
    return seed, teacher


@dataclass
class Round:
    k: int
    diagnosed: float = 0.0          # rows of D_{k-1} diagnosed
    diagnosed_teacher: float = 0.0  # of which teacher-written
    pre_rows: float = 0.0           # rows without a cached M_pre loss
    pre_teacher: float = 0.0
    jobs: float = 0.0               # refine jobs (flagged rows)
    trained: float = 0.0            # rows of D_k
    trained_teacher: float = 0.0


def rounds(a: Assumptions, n_rounds: int) -> list[Round]:
    """Dataset sizes per round: each round replaces ``replaced`` and adds ``added`` of the rows it diagnoses;
    M_pre scores only rows the previous merge created (the cross-round loss_pre cache)."""
    n = a.seed_rows * (1 - a.heldout_fraction)
    out = [Round(0, trained=n)]
    t, new, new_t = 0.0, n, 0.0
    for k in range(1, n_rounds + 1):
        r = Round(k, diagnosed=n, diagnosed_teacher=t, pre_rows=new, pre_teacher=new_t,
                  jobs=(a.replaced + a.added) * n)
        made = (a.replaced + a.added) * n
        t = t * (1 - a.replaced) + made
        n = n * (1 + a.added)
        new, new_t = made, made
        r.trained, r.trained_teacher = n, t
        out.append(r)
    return out


def phase_minutes(rd: Round, a: Assumptions, tok: dict) -> dict[str, dict]:
    """Work and minutes of each phase of round ``rd``: {phase: {gpus, pflop, compute_s, fixed_s, note}}."""
    seed, teach = row_kinds(tok, a)
    n8 = LLAMA_8B.params
    fwd = a.gpus * a.peak_tflops * 1e12 * a.mfu_fwd
    ph: dict[str, dict] = {}

    def mix(rows: float, teacher_rows: float, attr: str) -> float:
        return (rows - teacher_rows) * getattr(seed, attr) + teacher_rows * getattr(teach, attr)

    ckpt_fp32 = 4 * n8 / GB          # the trained model as the code saves it (fp32 master weights)
    if rd.k > 0:
        tok_pre = mix(rd.pre_rows, rd.pre_teacher, "total")
        tok_cur = sum(mix(rd.diagnosed, rd.diagnosed_teacher, x) for x in ("total", "ifd", "judge"))
        flop = 2 * n8 * (tok_pre + tok_cur)
        load = (2 * n8 / GB + ckpt_fp32) / a.storage_gbs + 2 * a.model_start_s      # M_pre (bf16) + M_{k-1}
        ph["diagnose"] = {"gpus": a.gpus, "pflop": flop / 1e15, "compute_s": flop / fwd, "fixed_s": load,
                          "note": f"M_pre on {rd.pre_rows:,.0f} rows, M_{rd.k - 1} on {rd.diagnosed:,.0f} (loss, "
                                  "embedding, IFD, 6 judgements)"}
        knn = 2 * rd.diagnosed ** 2 * LLAMA_8B.hidden
        ph["kNN (CPU)"] = {"gpus": 0, "pflop": knn / 1e15, "compute_s": knn / (a.cpu_tflops * 1e12), "fixed_s": 5.0,
                           "note": "exact blocked search, 4096-d, in one CPU task"}
        pairs = a.valid * rd.jobs
        judged = pairs * (mix(rd.diagnosed, rd.diagnosed_teacher, "judge") / rd.diagnosed + teach.judge)
        judge_gpus = a.gpus - 4
        flop = 2 * n8 * judged
        ph["refine re-judge"] = {"gpus": judge_gpus, "pflop": flop / 1e15,
                                 "compute_s": flop / (judge_gpus * a.peak_tflops * 1e12 * a.mfu_fwd),
                                 "fixed_s": ckpt_fp32 / a.storage_gbs + a.serve_start_s,
                                 "note": f"{pairs:,.0f} rewrites + originals on {judge_gpus} judge replicas "
                                         "(teacher: 4 GPUs, excluded)"}
        ph["select + merge (CPU)"] = {"gpus": 0, "pflop": 0.0, "compute_s": 0.0, "fixed_s": 30.0,
                                      "note": "moments, flags, joins by sample_id"}
    ph["train"] = train_phase(rd, a, seed, teach)
    ph["evaluate"] = eval_phase(a, ckpt_fp32)
    return ph


def train_phase(rd: Round, a: Assumptions, seed: RowKind, teach: RowKind) -> dict:
    """Training time: per micro-batch the larger of compute at mfu_train and FSDP2's traffic, which the
    code sends in fp32 (no MixedPrecisionPolicy): two all-gathers of the weights per micro-batch (forward
    and backward, FSDP2 reshards after each), one reduce-scatter of the fp32 gradients per step."""
    n8 = LLAMA_8B.params
    tokens = ((rd.trained - rd.trained_teacher) * seed.total + rd.trained_teacher * teach.total) * a.pad_overhead
    micro_per_worker = math.ceil(rd.trained / a.gpus / a.batch_size)
    steps = micro_per_worker // a.grad_accum
    micro_tokens = tokens / (micro_per_worker * a.gpus)                  # per GPU per micro-batch
    compute = 6 * n8 * micro_tokens / (a.peak_tflops * 1e12 * a.mfu_train)
    ring = (a.gpus - 1) / a.gpus
    gather = 2 * 4 * n8 * ring / (a.busbw_gbs * GB)
    scatter = 4 * n8 * ring / (a.busbw_gbs * GB)
    step = a.grad_accum * max(compute, gather) + scatter
    seconds = steps * step
    flop = 6 * n8 * tokens
    achieved = flop / (seconds * a.gpus * a.peak_tflops * 1e12)
    fixed = a.train_start_s + 2 * n8 / GB / a.storage_gbs + a.model_start_s + 4 * n8 / GB / a.storage_gbs
    return {"gpus": a.gpus, "pflop": flop / 1e15, "compute_s": seconds, "fixed_s": fixed,
            "note": f"{rd.trained:,.0f} rows, {tokens / 1e6:.1f}M tokens, {steps} steps; micro-batch "
                    f"{micro_tokens:.0f} tokens: compute {compute:.3f} s vs fp32 all-gathers {gather:.3f} s, "
                    f"MFU {achieved:.2f}",
            "steps": steps, "micro_tokens": micro_tokens, "mfu": achieved}


def eval_phase(a: Assumptions, ckpt_gb: float) -> dict:
    """Evaluation is decoding-bound, not FLOP-bound: every block of 64 items decodes to its longest answer."""
    steps = sum(math.ceil(n / EVAL_BLOCK) * new for n, new in EVAL_GEN.values())
    prefill = 2 * LLAMA_8B.params * a.eval_prefill_tokens / (a.gpus * a.peak_tflops * 1e12 * a.mfu_fwd)
    return {"gpus": a.gpus, "pflop": 2 * LLAMA_8B.params * a.eval_prefill_tokens / 1e15,
            "compute_s": steps * a.decode_step_s / a.gpus + prefill,
            "fixed_s": ckpt_gb / a.storage_gbs + a.model_start_s,
            "note": f"{steps:,} decode steps over {a.gpus} actors at {a.decode_step_s * 1e3:.0f} ms; MMLU, ARC "
                    "and held-out by log-likelihood"}


def memory(a: Assumptions, micro_tokens: float, seed_max: int) -> list[tuple[str, str, str]]:
    """Memory per GPU per phase, GiB: (phase, estimate, what it is made of)."""
    n8, s = LLAMA_8B.params, LLAMA_8B
    bf16 = 2 * n8 / GIB
    # Diagnosis: M_t and M_pre in bf16; a 32,768-token batch: the judge's body cache and its 3 copies for
    # the tails, and the MLP's largest transient.
    kv = 32768 * s.kv_bytes_per_token / GIB
    mlp = 3 * 32768 * s.inter * 2 / GIB
    diag = 2 * bf16 + 4 * kv + mlp
    # Training (FSDP2 over a.gpus, fp32 master weights, bf16 autocast, no activation recomputation).
    states = 16 * n8 / a.gpus / GIB                                   # fp32 weights, grads, Adam m and v: 1/8
    accum_grads = 4 * n8 / GIB                                         # unsharded fp32 grads kept between syncs
    casts = 2 * n8 / GIB                                               # autocast's bf16 weight copies, saved for backward
    gathered = (2 * s.layer_params + 2 * s.embed_params) * 4 / GIB     # two layers in flight + the root, fp32
    # Saved for backward per token and layer, read off transformers' Llama forward under bf16 autocast with
    # fp32 weights (so an fp32 residual stream): the two RMSNorms keep their fp32 input and output (16h
    # bytes), each of the five input projections its own bf16 cast of the input (10h), RoPE its inputs (5h),
    # SDPA q and the repeated k, v and its output (8h; a padding mask rules out GQA-aware SDPA), o_proj its
    # input (2h), the MLP its gate, SiLU, up and product outputs (4 x 7h): about 70h bytes.
    act_per_token = s.layers * a.act_bytes_per_token_layer
    logits_per_token = s.vocab * (2 + 4 + 4)                           # bf16 logits, fp32 log-softmax and its grad

    def train(tokens: float) -> float:
        return states + accum_grads + casts + gathered + tokens * (act_per_token + logits_per_token) / GIB

    # What FSDP2 would hold with bf16 parameters (MixedPrecisionPolicy) and a gradient sync on every
    # micro-batch: the shards, bf16 gathered layers and root, one layer's unsharded fp32 gradient.
    lean = states + (2 * s.layer_params + 2 * s.embed_params) * 2 / GIB + s.layer_params * 4 / GIB
    longest = a.batch_size * a.longest_sample
    cutoff = a.batch_size * CUTOFF
    # Teacher (70B, tensor parallel over 4) and judges (8B): vLLM fills gpu_memory_utilization of the GPU.
    util = 0.90 * a.gpu_mem_gib
    t_w = 2 * LLAMA_70B.params / 4 / GIB
    t_kv = (util - t_w - 3) * GIB / (LLAMA_70B.kv_bytes_per_token / 4)
    j_kv = (util - bf16 - 3) * GIB / s.kv_bytes_per_token
    ev = bf16 + EVAL_BLOCK * (3072 + 1024) * s.kv_bytes_per_token / GIB
    return [
        ("diagnose", f"{diag:.0f}", f"M_t + M_pre bf16 {2 * bf16:.0f}, judge KV cache x4 {4 * kv:.0f}, MLP {mlp:.1f}"),
        ("refine: teacher", f"{util:.0f}", f"70B bf16 / 4 = {t_w:.0f} weights + KV cache to 0.90 "
                                            f"(~{t_kv / 1e3:.0f}k tokens)"),
        ("refine: judge", f"{util:.0f}", f"8B bf16 {bf16:.0f} + KV cache to 0.90 (~{j_kv / 1e3:.0f}k tokens)"),
        ("train, mean micro-batch", f"{train(micro_tokens):.0f}",
         f"states/8 {states:.0f} + unsharded fp32 grads {accum_grads:.0f} + bf16 casts {casts:.0f} + gathered "
         f"{gathered:.1f} + {micro_tokens:.0f} tokens x {(act_per_token + logits_per_token) / 2**20:.1f} MiB"),
        ("train, longest seed micro-batch", f"{train(a.batch_size * seed_max):.0f}",
         f"{a.batch_size * seed_max:,} tokens ({a.batch_size} x the longest Alpaca rows, ~{seed_max})"),
        ("train, longest micro-batch", f"{train(longest):.0f}",
         f"{longest:,} tokens ({a.batch_size} x {a.longest_sample}: teacher answers at their cap)"),
        (f"train, {a.batch_size} x cutoff 4096", f"{train(cutoff):.0f}",
         f"{cutoff:,} tokens: needs activation recomputation"),
        ("train, largest that fits", f"{a.gpu_mem_gib:.0f}",
         f"{(a.gpu_mem_gib - train(0)) * GIB / (act_per_token + logits_per_token):,.0f} tokens per micro-batch "
         f"beside the {train(0):.0f} GiB held before any activation"),
        ("train, bf16 FSDP + sync per micro-batch", f"{lean:.0f}",
         f"not in the code: {(a.gpu_mem_gib - lean) * GIB / (act_per_token + logits_per_token):,.0f} tokens "
         "per micro-batch would fit"),
        ("evaluate", f"{ev:.0f}", f"8B bf16 {bf16:.0f} + KV cache of 64 x 4,096 tokens"),
    ]


def storage(a: Assumptions, rds: list[Round]) -> list[tuple[str, str]]:
    n8 = LLAMA_8B.params
    emb = LLAMA_8B.hidden * 4 + 150                   # float32 embedding + sample_id, Parquet
    per_row = 250 + 140 + 80 + emb                    # dataset, signals, neighbours (measured on Alpaca rows)
    r1 = rds[1]
    parquet = r1.diagnosed * per_row / GB + r1.jobs * 2500 / GB + r1.trained * 400 / GB
    last = rds[-1]
    return [
        ("model per round (train/model)", f"{4 * n8 / GB:.0f} GB: the code saves the fp32 master weights "
                                           f"(bf16 would be {2 * n8 / GB:.0f} GB)"),
        ("resumable checkpoint (while training)", f"{12 * n8 / GB:.0f} GB: fp32 model + Adam m, v (x2 while Ray "
                                                  "swaps one for the next); none with checkpoint_every_steps=0"),
        ("Parquet per round", f"{parquet:.1f} GB: embeddings {emb / 1e3:.1f} kB/row of {r1.diagnosed:,.0f} rows, "
                              "dataset, signals, flags, refine results, D_k"),
        (f"a {len(rds) - 1}-round run", f"{len(rds) * 4 * n8 / GB + (len(rds) - 1) * parquet:.0f} GB "
                                        f"({len(rds)} models + Parquet; largest D = {last.trained:,.0f} rows)"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Assumptions):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"default {f.default} (see Assumptions)")
    p.add_argument("--rounds", type=int, default=3, help="rounds after round 0 (converge.max_rounds)")
    p.add_argument("--tokenizer", help="recount SEED_TOKENS with this Hugging Face tokenizer (path or cached id)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/sft/alpaca_5000.json"))
    args = p.parse_args(argv)
    a = Assumptions(**{f.name: getattr(args, f.name) for f in fields(Assumptions)})
    tok = SEED_TOKENS
    if args.tokenizer:
        import json

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from transformers import AutoTokenizer

        tok = token_stats(json.loads(Path(args.data).read_text()), AutoTokenizer.from_pretrained(args.tokenizer))
    seed, teach = row_kinds(tok, a)
    print(f"Llama-3.1-8B: N = {LLAMA_8B.params / 1e9:.2f}B; teacher Llama-3.3-70B: {LLAMA_70B.params / 1e9:.1f}B")
    print(f"tokens per row ({tok['rows']:,} Alpaca rows): seed {seed.total:.0f} (p99 {tok['p99']}, max {tok['max']}), "
          f"IFD pass {seed.ifd:.0f}, judge {seed.judge:.0f}; teacher-written {teach.total:.0f} / {teach.ifd:.0f} / "
          f"{teach.judge:.0f} (assumed)")
    print(f"{a.gpus} GPUs x {a.peak_tflops:.0f} TFLOP/s, MFU {a.mfu_fwd} forward / {a.mfu_train} training\n")
    rds = rounds(a, args.rounds)
    totals = []
    for rd in rds:
        ph = phase_minutes(rd, a, tok)
        if rd.k <= 1:
            print(f"round {rd.k}" + (" (M_0 on the seed data)" if rd.k == 0 else " (M_pre on every row)"))
            print("| phase | GPUs | PFLOP | compute min | fixed min | minutes | what |\n|---|---|---|---|---|---|---|")
            for name, v in ph.items():
                print(f"| {name} | {v['gpus'] or 'CPU'} | {v['pflop']:.0f} | {v['compute_s'] / 60:.1f} | "
                      f"{v['fixed_s'] / 60:.1f} | {(v['compute_s'] + v['fixed_s']) / 60:.1f} | {v['note']} |")
            print()
        totals.append((rd, sum(v["compute_s"] + v["fixed_s"] for v in ph.values()) / 60, ph))
    print("| round | rows diagnosed | rows trained | minutes | goal <= 45 |\n|---|---|---|---|---|")
    for rd, minutes, _ in totals:
        diagnosed = f"{rd.diagnosed:,.0f}" if rd.k else "-"
        print(f"| {rd.k} | {diagnosed} | {rd.trained:,.0f} | {minutes:.0f} | {'yes' if minutes <= 45 else 'no'} |")
    teacher_load = 2 * LLAMA_70B.params / GB / a.storage_gbs + a.serve_start_s
    print(f"\nnot counted (the teacher): its calls, and its redeploy after each release "
          f"(~{teacher_load / 60:.0f} min: {2 * LLAMA_70B.params / GB:.0f} GB of weights + start)\n")
    print("| memory per GPU | GiB | of |\n|---|---|---|")
    for row in memory(a, totals[1][2]["train"]["micro_tokens"], tok["max"]):
        print("| " + " | ".join(row) + " |")
    print(f"(an H100 80 GB gives {a.gpu_mem_gib} GiB)\n")
    print("| storage | size |\n|---|---|")
    for row in storage(a, rds):
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
