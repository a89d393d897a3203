"""Supervised fine-tuning of a causal LM on Ray Train (``TorchTrainer``, Train V2).

One call, :func:`train_sft`, trains ``init_model`` on a round's rows and leaves a standard Hugging Face
checkpoint at ``out_dir/model``: full fine-tuning as the reference does (reference §6), or LoRA (peft)
saved merged into the weights (a plain checkpoint) or as an adapter directory.

How the data flows: the driver turns the rows into a Ray Dataset holding only the text columns and
hands it to the trainer; every worker receives an equal shard (``streaming_split(equal=True)``, the
Train default), materializes it, puts it in a content order (so a restarted worker rebuilds the same
plan whatever order the shard arrives in), and tokenizes it with :func:`middo_ray.encode.encode_row`.
Every worker then plans its epochs up front: length grouping and the learning-rate schedule both need
the whole shard, and a fixed plan is what lets a restart continue at the exact next micro-batch.

Training and scoring share one encoding, so the response tokens trained on (the output plus the EOS)
are exactly the ones whose loss diagnosis and evaluation measure. The loss is the token-weighted mean
NLL over the response tokens of an optimizer step's micro-batches, across all workers. Samples are
right-padded into length-grouped micro-batches (never packed), so no sample attends to another.

Parallelism: ``strategy='ddp'`` replicates the model (``ray.train.torch.prepare_model``); ``'fsdp'``
shards parameters, gradients and optimizer state over the workers with torch FSDP2 (``fully_shard``
per decoder layer, then the root), on GPUs (NCCL) and on CPUs (gloo) alike.

Fault tolerance: every ``checkpoint_every_steps`` optimizer steps all workers write a sharded
checkpoint (``torch.distributed.checkpoint``: model and optimizer; plus scheduler, step, loss history,
RNG states and a fingerprint of each worker's data) and report it to Ray Train, which keeps it in the
run's storage (a local path or a URI). When a worker dies, ``FailureConfig(max_failures)`` restarts the
worker group; the new workers find the checkpoint with ``ray.train.get_checkpoint()`` and continue from
the step after it with the same batch plan. Re-running the same training (same storage and run name)
after the driver itself died resumes the same way.

Worker processes import this module by name: the caller must make ``middo_ray`` importable on every
node (a local Ray started from the repository root does this; on clusters install the package or pass
``runtime_env={"working_dir": ...}`` / ``py_modules`` to ``ray.init``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from middo_ray.encode import Encoded
from middo_ray.schema import TEXT_COLUMNS

if TYPE_CHECKING:
    import torch

    from middo_ray.config import MiddoConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Gradient-norm clip of HF Trainer / LLaMA-Factory (the reference's trainer); not worth a config key.
MAX_GRAD_NORM = 1.0
# A length-sorted chunk holds this many micro-batches: large enough to keep padding small, small enough
# that the batches still mix samples from across the shard.
CHUNK_BATCHES = 8
# Least seconds between two metrics-only ray.train.report calls (the V2 controller polls every 2 s).
REPORT_INTERVAL_S = 2.0
# Driver-side environment variable for the fault-tolerance test: "STEP:MARKER_FILE" makes rank 0 exit
# the process (a real worker death) just before optimizer step STEP, once (the marker file records it).
CRASH_ENV = "MIDDO_TRAIN_CRASH_AT"
# Files of a Ray Train checkpoint written by this module.
STATE_FILE = "trainer_state.pt"       # rank 0: step, scheduler, loss history, counters
RANK_FILE = "rank_{rank}.pt"          # every rank: RNG states and its data fingerprint
SUMMARY_FILE = "train_summary.json"   # final checkpoint only: the run's summary next to the HF model


# ---------------------------------------------------------------------------------------------
# Pure pieces (unit-tested without Ray).


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads encoded samples into tensors with response-only labels.

    Args:
        batch: Encoded samples (prompt tokens then response tokens, the EOS included).
        pad_id: Token id used for padding positions of ``input_ids``.

    Returns:
        ``input_ids`` and ``attention_mask`` (B, T) and ``labels`` (B, T), where labels equal the
        input ids on response tokens (EOS included) and are ``-100`` on prompt tokens and padding.
    """
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for r, enc in enumerate(batch):
        n = len(enc.input_ids)
        row = torch.tensor(enc.input_ids, dtype=torch.long)
        ids[r, :n] = row
        att[r, :n] = 1
        labels[r, enc.prompt_len:n] = row[enc.prompt_len:]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def plan_batches(lengths: list[int], batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Orders sample indices into micro-batches for all epochs, grouped by length.

    Each epoch shuffles the samples (seeded by ``seed`` and the epoch), sorts every chunk of
    ``CHUNK_BATCHES * batch_size`` samples by length so that batch-mates have similar lengths, and then
    shuffles the order of the batches so that long and short batches alternate. A fractional
    ``epochs`` keeps the first ``ceil(epochs * batches_per_epoch)`` micro-batches.

    Args:
        lengths: Token length of each sample.
        batch_size: Samples per micro-batch.
        epochs: Passes over the samples; fractions allowed.
        seed: Seed of every shuffle.

    Returns:
        Micro-batches as lists of sample indices, in training order.
    """
    n = len(lengths)
    if n == 0:
        return []
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * per_epoch))
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(n))
        rng.shuffle(order)
        chunk = CHUNK_BATCHES * batch_size
        batches: list[list[int]] = []
        for start in range(0, n, chunk):
            part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
            batches.extend(part[b:b + batch_size] for b in range(0, len(part), batch_size))
        rng.shuffle(batches)
        plan.extend(batches)
        epoch += 1
    return plan[:total]


def window_token_counts(plan: list[list[int]], response_lens: list[int], grad_accum: int) -> list[int]:
    """Tokens (e.g. response tokens, the loss denominator) of each optimizer step's micro-batches."""
    counts: list[int] = []
    for start in range(0, len(plan), grad_accum):
        counts.append(sum(response_lens[i] for mb in plan[start:start + grad_accum] for i in mb))
    return counts


def response_nll_sum(logits: torch.Tensor, labels: torch.Tensor, first_pos: int = 0) -> torch.Tensor:
    """Summed next-token NLL over the labelled (response) positions.

    Args:
        logits: (B, K, V) logits of the positions ``first_pos .. T-1`` of the sequence.
        labels: (B, T) labels with ``-100`` where no loss is taken.
        first_pos: Sequence position of ``logits[:, 0]`` (positions before it were not projected).

    Returns:
        A scalar tensor: the sum of the NLLs (float32).
    """
    import torch

    # Position p predicts token p+1; the last position predicts nothing.
    pred = logits[:, :-1, :].float()
    tgt = labels[:, first_pos + 1:]
    return torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def row_key(row: dict) -> str:
    """Content hash of a row's text columns: a shard's order-free identity for restarts."""
    text = json.dumps([str(row.get(c) or "") for c in TEXT_COLUMNS], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plan_fingerprint(keys: list[str], config: dict[str, Any], world: int) -> str:
    """Identity of one worker's batch plan: its rows and every setting the plan depends on."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
    for name in ("batch_size", "grad_accum", "epochs", "seed", "template", "cutoff_len", "init_model"):
        h.update(f"|{name}={config[name]}".encode())
    h.update(f"|world={world}".encode())
    return h.hexdigest()[:16]


def resolve_precision(setting: str, device_type: str, bf16_supported: bool) -> str:
    """The compute precision a worker uses: 'bf16' (autocast, fp32 master weights) or 'fp32'.

    Args:
        setting: ``train.precision``: 'auto' (bf16 on GPUs that support it, else fp32), 'bf16', 'fp32'.
        device_type: The worker's device type ('cuda' or 'cpu').
        bf16_supported: Whether a CUDA device computes in bf16 (ignored on CPU, where autocast
            emulates bf16 when the CPU has no bf16 instructions).

    Raises:
        ValueError: For 'bf16' on a GPU without bf16 support.
    """
    if setting == "fp32":
        return "fp32"
    if device_type == "cuda":
        if bf16_supported:
            return "bf16"
        if setting == "bf16":
            raise ValueError("train.precision=bf16 but this GPU has no bf16 support (needs compute capability "
                             ">= 8.0); set train.precision=auto or fp32")
        return "fp32"
    return "bf16" if setting == "bf16" else "fp32"


# ---------------------------------------------------------------------------------------------
# Worker side.


def _log(msg: str) -> None:
    # Train V2 configures the root logger of its workers at INFO and forwards it to the driver's console;
    # print() would appear twice there (Ray's stdout tee plus Train's print patch).
    logger.info("[middo train] %s", msg)


def _dist_on() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: list[float], dtype_name: str, op: str = "sum") -> list:
    """Sums (or takes the min of) a vector across the training workers; a no-op alone."""
    import torch
    import torch.distributed as dist

    if not _dist_on():
        return list(values)
    t = torch.tensor(values, dtype=getattr(torch, dtype_name))
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return t.cpu().tolist()


def _all_reduce_list(values: list[int], op: str = "sum") -> list[int]:
    return [int(v) for v in _all_reduce(values, "long", op)]


def _all_reduce_floats(values: list[float]) -> list[float]:
    return [float(v) for v in _all_reduce(values, "float64")]


def _keep_from(batch: dict[str, torch.Tensor]) -> int:
    """First sequence position whose logits are needed: the last prompt token of the shortest prompt."""
    import torch

    has_label = batch["labels"] != IGNORE_INDEX
    first_label = torch.where(has_label.any(dim=1), has_label.float().argmax(dim=1),
                              torch.full_like(has_label[:, 0], has_label.shape[1], dtype=torch.long))
    return max(int(first_label.min()) - 1, 0)


def _forward_module(model):
    """The module whose forward signature tells whether ``logits_to_keep`` is accepted."""
    inner = getattr(model, "module", model)           # DDP wrapper
    if hasattr(inner, "get_base_model"):               # peft: kwargs pass through to the base model
        inner = inner.get_base_model()
    return inner


def apply_lora(model, config: dict[str, Any], base_path: str):
    """Wraps the model with peft LoRA adapters; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    target = config["lora_target_modules"]
    lcfg = LoraConfig(r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                      target_modules=target if isinstance(target, str) else list(target),
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    # Recorded in adapter_config.json: where a loader finds the base weights.
    model.peft_config["default"].base_model_name_or_path = base_path
    return model


def _shard_fsdp(model, device):
    """FSDP2: shards every decoder layer, then the root (embeddings, norm, head), over all workers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (int(os.environ.get("WORLD_SIZE", "1")),))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    if not layer_classes:
        raise ValueError(f"train.strategy=fsdp: {type(base).__name__} does not name its decoder layer class "
                         "(_no_split_modules); use train.strategy=ddp for this model")
    n = 0
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
            n += 1
    fully_shard(model, mesh=mesh)
    return model, n


def _grad_sync(model, sync: bool):
    """Context that skips the gradient all-reduce/reduce-scatter on non-final micro-batches."""
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):         # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def _state_options(lora: bool, full: bool = False, cpu_offload: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA checkpoints hold only the adapter (the frozen base is reloaded from init_model).
    return StateDictOptions(full_state_dict=full, cpu_offload=cpu_offload, ignore_frozen_params=lora,
                            strict=not lora)


def _rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(model, optim, trainer_state: dict, rank: int, lora: bool, fingerprint: str) -> Path:
    """Writes this rank's part of a resumable checkpoint into a fresh temp dir and returns it."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = Path(tempfile.mkdtemp(prefix="middo_ckpt_"))
    msd, osd = get_state_dict(model, optim, options=_state_options(lora))
    # Collective: each rank writes its shards (``__<rank>_0.distcp``); replicated tensors once.
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    if rank == 0:
        torch.save(trainer_state, tmp / STATE_FILE)
    torch.save({"rng": _rng_state(), "fingerprint": fingerprint}, tmp / RANK_FILE.format(rank=rank))
    return tmp


def _load_checkpoint(ckpt_dir: Path, model, optim, rank: int, lora: bool) -> tuple[dict, dict | None]:
    """Loads model and optimizer state in place; returns the trainer state and this rank's extras."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optim, options=_state_options(lora))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt_dir))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_options(lora))
    # Our own small files (plain dicts, tensors and tuples); written by this module, not user input.
    trainer_state = torch.load(ckpt_dir / STATE_FILE, weights_only=False)
    rank_path = ckpt_dir / RANK_FILE.format(rank=rank)
    extras = torch.load(rank_path, weights_only=False) if rank_path.is_file() else None
    return trainer_state, extras


def write_hf_model(inner, tok, full_state: dict, config: dict[str, Any], out_dir: str | Path) -> Path:
    """Writes the trained model as a standard Hugging Face directory.

    Args:
        inner: The trained model without a DDP wrapper (a transformers model, or a peft model for LoRA;
            FSDP-sharded is fine, as only ``full_state`` is read from it).
        tok: Its tokenizer (saved alongside, so the directory loads on its own).
        full_state: The model's full (unsharded) state dict, as ``get_model_state_dict`` gives it; for
            LoRA the adapter weights are enough.
        config: The worker config: ``method``, ``lora_save`` and ``init_model`` (LoRA merges into a
            freshly loaded copy of it).
        out_dir: Target directory (created).

    Returns:
        ``out_dir``: a full checkpoint, or for ``lora_save='adapter'`` a peft adapter directory
        (``adapter_config.json`` naming the base, ``adapter_model.safetensors``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config["method"] != "lora" or config["lora_save"] == "adapter":
        inner.save_pretrained(out, state_dict=full_state)
    else:
        # Merge with peft into a freshly loaded CPU copy of the starting model: the same code for DDP
        # and FSDP (whose parameters are shards), and the result is a plain checkpoint.
        from peft import PeftModel

        from middo_ray.models import load_model

        adapter = Path(tempfile.mkdtemp(prefix="middo_adapter_"))
        try:
            inner.save_pretrained(adapter, state_dict=full_state)
            base, _ = load_model(config["init_model"], dtype="float32", device="cpu", train=False)
            PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(out)
        finally:
            shutil.rmtree(adapter, ignore_errors=True)
    tok.save_pretrained(out)
    return out


def _save_final(model, tok, config: dict[str, Any], summary: dict, rank: int) -> Path | None:
    """Gathers the trained weights and, on rank 0, writes the HF directory to report; None elsewhere."""
    import torch.distributed.checkpoint.state_dict as sd

    # Collective under FSDP: every rank joins the all-gather; only rank 0 keeps the (CPU) copy.
    full = sd.get_model_state_dict(model, options=_state_options(config["method"] == "lora", full=True,
                                                                 cpu_offload=True))
    if rank != 0:
        return None
    tmp = write_hf_model(getattr(model, "module", model), tok, full, config,
                         tempfile.mkdtemp(prefix="middo_model_"))
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary))
    return tmp


def _report(metrics: dict, ckpt_dir: Path | None) -> None:
    """Reports to Ray Train (with a checkpoint directory when given) and removes the temp directory."""
    import ray.train

    try:
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt)
    finally:
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def _maybe_crash(config: dict[str, Any], step: int, rank: int) -> None:
    """Test hook: a real worker death (process exit) before optimizer step ``step``, once."""
    crash = config.get("crash_at")
    if not crash or rank != 0 or step != crash[0]:
        return
    marker = Path(crash[1])
    if marker.exists():
        return
    marker.write_text(f"exited before step {step}\n")
    _log(f"test hook: worker exiting before step {step}")
    os._exit(1)


def _train_loop(config: dict[str, Any]) -> None:
    """Per-worker training function run by ``TorchTrainer``."""
    import torch
    import ray.train
    import ray.train.torch
    from transformers import get_cosine_schedule_with_warmup

    from middo_ray.encode import encode_row
    from middo_ray.models import load_model, resolve_model, threads_for_actor

    t_start = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not torch.cuda.is_available() and not os.environ.get("MIDDO_TORCH_THREADS"):
        # CPU workers on one node share its cores instead of each taking all of them.
        os.environ["MIDDO_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    threads_for_actor(config["cpus_per_worker"])
    device = ray.train.torch.get_device()

    # A finished run restarted by its driver: hand back the final model it already reported.
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            if (Path(d) / SUMMARY_FILE).is_file():
                final = Path(tempfile.mkdtemp(prefix="middo_model_")) if rank == 0 else None
                if final is not None:
                    shutil.copytree(d, final, dirs_exist_ok=True)
                summary = json.loads((Path(d) / SUMMARY_FILE).read_text())
                _log("run already finished; reporting its final model again")
                _report({k: v for k, v in summary.items() if not isinstance(v, list)}, final)
                return

    torch.manual_seed(config["seed"])
    lora = config["method"] == "lora"
    # Master weights stay float32 (AdamW in bf16 loses small updates); bf16 comes from autocast.
    model, tok = load_model(config["init_model"], dtype="float32", device=str(device), train=True)
    if lora:
        model = apply_lora(model, config, resolve_model(config["init_model"]))

    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    keyed = sorted((row_key(r), r) for r in rows)
    rows = [r for _, r in keyed]
    fingerprint = plan_fingerprint([k for k, _ in keyed], config, world)
    encoded = [encode_row(r, tok, config["template"], config["cutoff_len"]) for r in rows]
    lengths = [len(e.input_ids) for e in encoded]
    plan = plan_batches(lengths, config["batch_size"], config["epochs"], config["seed"] + rank)
    # Equal shards give equal plans; the min guards ranks against ever waiting on a missing step.
    n_micro = _all_reduce_list([len(plan)], op="min")[0]
    plan = plan[:n_micro]
    accum = config["grad_accum"]
    # One collective up front gives every step's global response-token count (so a step's loss is the
    # exact token-weighted mean over all workers) and its global input-token count (for throughput).
    local = window_token_counts(plan, [e.response_len for e in encoded], accum)
    local_in = window_token_counts(plan, lengths, accum)
    both = _all_reduce_list(local + local_in)
    global_windows, global_inputs = both[:len(local)], both[len(local):]
    total_steps = len(global_windows)
    tokens_total = sum(global_windows)
    samples_total = _all_reduce_list([len(rows)])[0]

    if config["strategy"] == "fsdp":
        model, n_units = _shard_fsdp(model, device)
        if rank == 0:
            _log(f"FSDP2: {n_units} decoder layers + root sharded over {world} worker(s)")
    else:
        model = ray.train.torch.prepare_model(model)
    use_keep = "logits_to_keep" in inspect.signature(_forward_module(model).forward).parameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": config["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}], lr=config["learning_rate"])
    warmup = math.ceil(config["warmup_ratio"] * total_steps)
    sched = get_cosine_schedule_with_warmup(optim, warmup, total_steps)
    precision = resolve_precision(config["precision"], device.type,
                                  device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    # Progress that survives a restart.
    state: dict[str, Any] = {"step": 0, "history": [], "weighted_sum": 0.0, "resumed_from": [],
                             "train_seconds": 0.0, "step_seconds": [], "exact_resume": True}
    if restored is not None:
        with restored.as_directory() as d:
            saved, extras = _load_checkpoint(Path(d), model, optim, rank, lora)
        if saved.get("total_steps") != total_steps:
            raise RuntimeError(f"checkpoint {restored.path} was written for {saved.get('total_steps')} steps, "
                               f"this run has {total_steps}; it belongs to a different training setup")
        sched.load_state_dict(saved["sched"])
        state.update(saved["progress"])
        same_plan = extras is not None and extras["fingerprint"] == fingerprint
        exact = bool(_all_reduce_list([int(same_plan)], op="min")[0])
        if extras is not None:
            _set_rng_state(extras["rng"])
        state["exact_resume"] = state["exact_resume"] and exact
        state["resumed_from"] = state["resumed_from"] + [state["step"]]
        if rank == 0:
            _log(f"resumed from the checkpoint at step {state['step']}/{total_steps}"
                 + ("" if exact else " (a worker's data differs from the checkpoint's: the batch plan is new)"))
    if rank == 0:
        _log(f"{samples_total} samples on {world} worker(s), {len(plan)} micro-batches per worker, "
             f"{total_steps} optimizer steps, {tokens_total} response tokens, warm-up {warmup} steps, "
             f"{config['method']} / {config['strategy']} / {precision}")

    every = config["checkpoint_every_steps"]
    setup_seconds = time.time() - t_start
    t_loop = last_report = time.time()
    first_step_at = None
    for step in range(state["step"], total_steps):
        _maybe_crash(config, step + 1, rank)
        t_step = time.time()
        first_step_at = first_step_at or t_step
        micro = plan[step * accum:(step + 1) * accum]
        denom = max(global_windows[step], 1)
        step_nll = torch.zeros((), dtype=torch.float64)
        for k, idx in enumerate(micro):
            batch = {key: v.to(device) for key, v in collate([encoded[i] for i in idx], tok.pad_token_id).items()}
            first = _keep_from(batch) if use_keep else 0
            kwargs = {"logits_to_keep": batch["input_ids"].shape[1] - first} if use_keep else {}
            # Gradients are reduced across workers only on the last micro-batch of a step.
            with _grad_sync(model, k == len(micro) - 1), autocast:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
                nll = response_nll_sum(out.logits, batch["labels"], first)
                # Gradients are averaged over workers, so scaling by world/denom yields the global mean.
                (nll * (world / denom)).backward()
            step_nll += nll.detach().double().cpu()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        # One collective gives the step's global loss and the mean time since the last report, so every
        # rank takes the same report decision.
        loss_sum, since_report = _all_reduce_floats([float(step_nll), (time.time() - last_report) / world])
        step_loss = loss_sum / denom
        state["history"].append(step_loss)
        state["weighted_sum"] += loss_sum
        state["step_seconds"].append(time.time() - t_step)
        state["step"] = step + 1
        lr = sched.get_last_lr()[0]
        if rank == 0:
            rate = global_inputs[step] / max(state["step_seconds"][-1], 1e-9)
            _log(f"step {step + 1}/{total_steps} loss {step_loss:.4f} lr {lr:.2e} ({rate:.0f} tok/s)")
        metrics = {"step": step + 1, "loss": step_loss, "lr": lr}
        last = step == total_steps - 1
        if every and (step + 1) % every == 0 and not last:
            # Every rank writes and reports its part; Ray Train gathers them into one checkpoint directory.
            state["train_seconds"] += time.time() - t_loop
            t_loop = time.time()
            trainer_state = {"total_steps": total_steps, "sched": sched.state_dict(), "progress": state}
            _report(metrics, _save_checkpoint(model, optim, trainer_state, rank, lora, fingerprint))
            last_report = time.time()
        # Reports are collective and the controller drains each worker's one-slot result queue only every
        # ~2 s, so a report per step would stall short steps; report when a rank-agreed interval passed.
        elif since_report >= REPORT_INTERVAL_S and not last:
            _report(metrics, None)
            last_report = time.time()
    state["train_seconds"] += time.time() - t_loop

    history = state["history"]
    summary = {
        "step": total_steps, "steps": total_steps, "loss": history[-1] if history else float("nan"),
        "train_loss": state["weighted_sum"] / max(tokens_total, 1), "tokens": tokens_total,
        "input_tokens": sum(global_inputs), "step_input_tokens": global_inputs, "samples": samples_total,
        "train_seconds": state["train_seconds"], "step_seconds": state["step_seconds"],
        "setup_seconds": setup_seconds, "first_step_at": first_step_at, "loss_history": history,
        "resumed_from": state["resumed_from"], "exact_resume": state["exact_resume"],
        "method": config["method"], "strategy": config["strategy"], "precision": precision,
        "world_size": world, "final": True,
    }
    final_dir = _save_final(model, tok, config, summary, rank)
    # Per-step lists stay in the checkpoint's summary file; Ray's result metrics get the scalars.
    _report({k: v for k, v in summary.items() if not isinstance(v, list)}, final_dir)


# ---------------------------------------------------------------------------------------------
# Driver side.


def _text_only(rows: list[dict]) -> list[dict]:
    # Only the columns the template reads travel to the workers; lineage columns with mixed or
    # all-null types would also make the Arrow schema fragile.
    return [{c: ("" if r.get(c) is None else str(r.get(c))) for c in TEXT_COLUMNS} for r in rows]


def _crash_hook() -> tuple[int, str] | None:
    """Parses the test-only crash hook from the driver's environment (see ``CRASH_ENV``)."""
    value = os.environ.get(CRASH_ENV)
    if not value:
        return None
    step, _, marker = value.partition(":")
    if not step.isdigit() or not marker:
        raise ValueError(f"{CRASH_ENV}={value!r}: expected STEP:MARKER_FILE, e.g. 5:/tmp/crashed")
    return int(step), marker


def storage_root(cfg: MiddoConfig, out_dir: Path) -> str:
    """Where Ray Train keeps the run: ``train.storage_path`` (URI as is, local path made absolute),
    or ``out_dir/ray_train``. Train V2 needs an absolute path or a URI."""
    sp = cfg.train.storage_path
    if sp is None:
        return str(out_dir / "ray_train")
    if "://" in sp:
        return sp
    return str(Path(sp).expanduser().resolve())


def loop_config(cfg: MiddoConfig, init_model: str) -> dict[str, Any]:
    """The per-worker configuration (plain values; every worker gets a copy)."""
    t = cfg.train
    return {
        "init_model": init_model, "template": cfg.data.template, "cutoff_len": cfg.data.cutoff_len,
        "batch_size": t.batch_size, "grad_accum": t.grad_accum, "epochs": t.epochs,
        "learning_rate": t.learning_rate, "weight_decay": t.weight_decay, "warmup_ratio": t.warmup_ratio,
        "seed": cfg.run.seed, "cpus_per_worker": t.cpus_per_worker, "method": t.method,
        "lora_r": t.lora_r, "lora_alpha": t.lora_alpha, "lora_dropout": t.lora_dropout,
        "lora_target_modules": t.lora_target_modules, "lora_save": t.lora_save, "strategy": t.strategy,
        "precision": t.precision, "checkpoint_every_steps": t.checkpoint_every_steps,
        "crash_at": _crash_hook(),
    }


def _fetch_model(checkpoint, out: Path) -> Path:
    """Puts the final checkpoint at ``out/model`` (moved when local, downloaded otherwise)."""
    import pyarrow.fs

    model_dir = out / "model"
    staging = out / "model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and Path(checkpoint.path).is_dir():
        # Same file system: move rather than copy, so a round does not keep two copies of the weights.
        shutil.move(checkpoint.path, str(staging))
    else:
        checkpoint.to_directory(str(staging))
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    return model_dir


def _drop_run_storage(result) -> None:
    """Deletes the run's intermediate checkpoints once the final model is safe in ``out/model``."""
    try:
        result.filesystem.delete_dir(result.path)
    except (OSError, AttributeError) as exc:  # a missing dir or a store without deletes is harmless
        logger.warning("could not remove the training run storage %s: %s", getattr(result, "path", "?"), exc)


def train_sft(rows: list[dict], cfg: MiddoConfig, out_dir: str | Path, init_model: str,
              run_name: str | None = None) -> dict:
    """Fine-tunes ``init_model`` on ``rows`` with Ray Train and saves an HF checkpoint.

    Args:
        rows: Canonical rows (``instruction``, ``input``, ``output``, ``system``, ``history``).
        cfg: Run configuration; reads ``train``, ``data`` (template, cutoff) and ``run.seed``.
        out_dir: Directory of this training; receives ``model/`` (the checkpoint),
            ``ray_train/`` (Ray Train's run storage unless ``train.storage_path`` is set; removed after
            success) and ``train_result.json``.
        init_model: Model spec to start from ('smollm2', 'tiny', or a checkpoint/adapter path or HF id).
        run_name: Ray Train run name. A run whose storage already holds checkpoints under this name
            resumes from the latest one (the loop passes a stable name per round); default: a fresh name.

    Returns:
        ``model_dir`` (absolute path of the HF directory: a full checkpoint, or an adapter directory with
        ``adapter_config.json`` when LoRA is saved as an adapter), ``adapter`` (bool), ``train_loss``
        (token-weighted mean response NLL over the run), ``last_loss``, ``loss_history`` (per optimizer
        step), ``steps``, ``tokens`` (response tokens trained, EOS included, summed over epochs),
        ``input_tokens`` (all non-pad tokens), ``samples``, ``resumed_from`` (steps of the checkpoints
        that restarts continued from), ``exact_resume``, ``method``/``strategy``/``precision``,
        ``train_seconds`` and ``step_seconds`` (worker time in the training loop), ``startup_seconds``
        (driver start to the first step) and ``seconds`` (wall time including Ray Train start-up).

    Raises:
        ValueError: When ``rows`` is empty or smaller than the number of workers.
        RuntimeError: When the training run fails (after ``train.max_failures`` restarts) or produces
            no checkpoint.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    if len(rows) < cfg.train.num_workers:
        raise ValueError(f"train_sft got {len(rows)} rows for {cfg.train.num_workers} workers; every worker "
                         "needs at least one row (lower train.num_workers or pass more rows)")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Resolve once on the driver so a slow one-time conversion (SmolLM2's GGUF) is not raced by workers
    # and a bad spec fails before any worker starts.
    from middo_ray.models import resolve_model

    resolve_model(init_model)
    if not ray.is_initialized():
        ray.init()
    name = run_name or f"sft_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
    storage = storage_root(cfg, out)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config(cfg, init_model),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            storage_path=storage, name=name,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # One resumable checkpoint is enough: Ray registers a new one before deleting the old.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        datasets={"train": ray.data.from_items(_text_only(rows))},
    )
    logger.info("training %s on %d rows with %d worker(s) (%s, %s); run %s/%s", init_model, len(rows),
                cfg.train.num_workers, cfg.train.method, cfg.train.strategy, storage, name)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(
            f"training run {name} failed after {cfg.train.max_failures} restart(s) (train.max_failures): {exc}\n"
            f"Its checkpoints stay in {storage}/{name}; training again with the same run name resumes from "
            "the last one") from exc
    if result.error is not None:
        raise RuntimeError(f"training run {name} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint (see {storage}/{name})")
    model_dir = _fetch_model(result.checkpoint, out)
    if not (model_dir / SUMMARY_FILE).is_file():
        raise RuntimeError(f"training run {name}: the last checkpoint is not a final model (see {storage}/{name})")
    _drop_run_storage(result)

    summary = json.loads((model_dir / SUMMARY_FILE).read_text())
    history = [float(x) for x in summary.get("loss_history", [])]
    first_step = summary.get("first_step_at")
    res = {
        "model_dir": str(model_dir),
        "adapter": (model_dir / "adapter_config.json").is_file(),
        "train_loss": float(summary.get("train_loss", float("nan"))),
        "last_loss": history[-1] if history else float("nan"),
        "loss_history": history,
        "steps": int(summary.get("steps", 0)),
        "tokens": int(summary.get("tokens", 0)),
        "input_tokens": int(summary.get("input_tokens", 0)),
        "samples": int(summary.get("samples", 0)),
        "resumed_from": [int(s) for s in summary.get("resumed_from", [])],
        "exact_resume": bool(summary.get("exact_resume", True)),
        "method": summary.get("method"), "strategy": summary.get("strategy"),
        "precision": summary.get("precision"), "world_size": summary.get("world_size"),
        "train_seconds": float(summary.get("train_seconds", 0.0)),
        "step_seconds": [float(x) for x in summary.get("step_seconds", [])],
        "step_input_tokens": [int(x) for x in summary.get("step_input_tokens", [])],
        "startup_seconds": (first_step - t0) if first_step else None,
        "seconds": time.time() - t0,
    }
    (out / "train_result.json").write_text(json.dumps(res, indent=2))
    logger.info("trained %d steps on %d response tokens in %.1fs; loss %.4f -> %s%s", res["steps"], res["tokens"],
                res["seconds"], res["train_loss"], model_dir,
                f" (resumed from step {res['resumed_from']})" if res["resumed_from"] else "")
    return res
