"""Supervised fine-tuning of a causal LM on Ray Train (``TorchTrainer``, Train V2).

One call, :func:`train_sft`, trains ``init_model`` on a round's rows and leaves a plain Hugging Face
checkpoint at ``out_dir/model``. Full-parameter training, as the reference does (reference §6).

How the data flows: the driver turns the rows into a Ray Dataset holding only the text columns and
hands it to the trainer; every worker receives an equal shard (``streaming_split(equal=True)``, the
Train default), materializes it, and tokenizes it with :func:`middo_ray.encode.encode_row`. This keeps
tokenization off the driver and parallel across workers, gives every worker the same number of rows
(so DDP ranks run the same number of steps), and lets each worker plan its epochs up front: length
grouping and the learning-rate schedule both need the whole shard.

Training and scoring share one encoding, so the response tokens trained on (the output plus the EOS)
are exactly the ones whose loss diagnosis and evaluation measure. The loss is the token-weighted mean
NLL over the response tokens of an optimizer step's micro-batches, across all workers.

Worker processes import this module by name: the caller must make ``middo_ray`` importable on every
node (a local Ray started from the repository root does this; on clusters install the package or pass
``runtime_env={"working_dir": ...}`` / ``py_modules`` to ``ray.init``).
"""

from __future__ import annotations

import contextlib
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
# Least seconds between two ray.train.report calls (the V2 controller polls workers every 2 s by default).
REPORT_INTERVAL_S = 2.0


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
    """Response tokens (the loss denominator) of each optimizer step's micro-batches."""
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


# ---------------------------------------------------------------------------------------------
# Worker side.


def _log(msg: str) -> None:
    # Train V2 configures the root logger of its workers at INFO and forwards it to the driver's console;
    # print() would appear twice there (Ray's stdout tee plus Train's print patch).
    logger.info("[middo train] %s", msg)


def _all_reduce_list(values: list[int], op: str = "sum") -> list[int]:
    """Sums (or takes the min of) an integer vector across the training workers; a no-op alone."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return [int(v) for v in t.cpu().tolist()]


def _keep_from(batch: dict[str, torch.Tensor]) -> int:
    """First sequence position whose logits are needed: the last prompt token of the shortest prompt."""
    import torch

    has_label = batch["labels"] != IGNORE_INDEX
    first_label = torch.where(has_label.any(dim=1), has_label.float().argmax(dim=1),
                              torch.full_like(has_label[:, 0], has_label.shape[1], dtype=torch.long))
    return max(int(first_label.min()) - 1, 0)


def _train_loop(config: dict[str, Any]) -> None:
    """Per-worker training function run by ``TorchTrainer``."""
    import torch
    import ray.train
    import ray.train.torch
    from transformers import get_cosine_schedule_with_warmup

    from middo_ray.encode import encode_row
    from middo_ray.models import load_model, threads_for_actor

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not torch.cuda.is_available() and not os.environ.get("MIDDO_TORCH_THREADS"):
        # CPU workers on one node share its cores instead of each taking all of them.
        os.environ["MIDDO_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    threads_for_actor(config["cpus_per_worker"])
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    # Master weights stay float32 (AdamW in bf16 loses small updates); bf16 comes from autocast on GPU.
    model, tok = load_model(config["init_model"], dtype="float32", device=str(device), train=True)

    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    encoded = [encode_row(r, tok, config["template"], config["cutoff_len"]) for r in rows]
    lengths = [len(e.input_ids) for e in encoded]
    plan = plan_batches(lengths, config["batch_size"], config["epochs"], config["seed"] + rank)
    # Equal shards give equal plans; the min guards DDP ranks against ever waiting on a missing step.
    n_micro = _all_reduce_list([len(plan)], op="min")[0]
    plan = plan[:n_micro]
    accum = config["grad_accum"]
    local_windows = window_token_counts(plan, [e.response_len for e in encoded], accum)
    # One collective up front gives every step's global token count, so the loss of a step is the exact
    # token-weighted mean over all workers' response tokens.
    global_windows = _all_reduce_list(local_windows)
    total_steps = len(global_windows)
    tokens_total = sum(global_windows)
    samples_total = _all_reduce_list([len(rows)])[0]

    model = ray.train.torch.prepare_model(model)
    inner = getattr(model, "module", model)
    use_keep = "logits_to_keep" in inspect.signature(inner.forward).parameters
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": config["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}], lr=config["learning_rate"])
    warmup = math.ceil(config["warmup_ratio"] * total_steps)
    sched = get_cosine_schedule_with_warmup(optim, warmup, total_steps)
    on_gpu = device.type == "cuda"
    if rank == 0:
        _log(f"{samples_total} samples on {world} worker(s), {len(plan)} micro-batches per worker, "
             f"{total_steps} optimizer steps, {tokens_total} response tokens, warm-up {warmup} steps")

    history: list[float] = []
    weighted_sum = 0.0
    t0 = last_report = time.time()
    for step in range(total_steps):
        micro = plan[step * accum:(step + 1) * accum]
        denom = max(global_windows[step], 1)
        step_nll = torch.zeros((), dtype=torch.float64)
        for k, idx in enumerate(micro):
            batch = {key: v.to(device) for key, v in collate([encoded[i] for i in idx], tok.pad_token_id).items()}
            first = _keep_from(batch) if use_keep else 0
            kwargs = {"logits_to_keep": batch["input_ids"].shape[1] - first} if use_keep else {}
            # Gradients are all-reduced only on the last micro-batch of a step.
            sync = k == len(micro) - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), \
                    torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
                nll = response_nll_sum(out.logits, batch["labels"], first)
                # DDP averages gradients over ranks, so scaling by world/denom yields the global mean.
                (nll * (world / denom)).backward()
            step_nll += nll.detach().double().cpu()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        # One collective gives the step's global loss and the mean time since the last report, so every
        # rank takes the same report decision.
        loss_sum, since_report = _all_reduce_floats([float(step_nll), (time.time() - last_report) / world])
        step_loss = loss_sum / denom
        history.append(step_loss)
        weighted_sum += loss_sum
        lr = sched.get_last_lr()[0]
        if rank == 0:
            rate = sum(global_windows[:step + 1]) / max(time.time() - t0, 1e-9)
            _log(f"step {step + 1}/{total_steps} loss {step_loss:.4f} lr {lr:.2e} ({rate:.0f} resp tok/s)")
        # Reports are collective and the controller drains each worker's one-slot result queue only every
        # ~2 s, so a report per step would stall short steps; report when a rank-agreed interval passed.
        # The last step's loss goes out with the final report below.
        if since_report >= REPORT_INTERVAL_S and step < total_steps - 1:
            ray.train.report({"step": step + 1, "loss": step_loss, "lr": lr})
            last_report = time.time()

    summary = {
        "step": total_steps, "steps": total_steps, "loss": history[-1] if history else float("nan"),
        "train_loss": weighted_sum / max(tokens_total, 1), "tokens": tokens_total, "samples": samples_total,
        "train_seconds": time.time() - t0, "loss_history": history, "final": True,
    }
    if rank == 0:
        tmp = Path(tempfile.mkdtemp(prefix="middo_ckpt_"))
        try:
            inner.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "train_summary.json").write_text(json.dumps(summary))
            ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        ray.train.report(summary)


def _all_reduce_floats(values: list[float]) -> list[float]:
    """Sums a float vector across the training workers; a no-op alone."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return [float(v) for v in t.cpu().tolist()]


# ---------------------------------------------------------------------------------------------
# Driver side.


def _text_only(rows: list[dict]) -> list[dict]:
    # Only the columns the template reads travel to the workers; lineage columns with mixed or
    # all-null types would also make the Arrow schema fragile.
    return [{c: ("" if r.get(c) is None else str(r.get(c))) for c in TEXT_COLUMNS} for r in rows]


def train_sft(rows: list[dict], cfg: MiddoConfig, out_dir: str | Path, init_model: str) -> dict:
    """Fine-tunes ``init_model`` on ``rows`` with Ray Train and saves an HF checkpoint.

    Args:
        rows: Canonical rows (``instruction``, ``input``, ``output``, ``system``, ``history``).
        cfg: Run configuration; reads ``train``, ``data`` (template, cutoff) and ``run.seed``.
        out_dir: Directory of this training; receives ``model/`` (the checkpoint),
            ``ray_train/`` (Ray Train's run storage) and ``train_result.json``.
        init_model: Model spec to start from ('smollm2', 'tiny', or a checkpoint path/HF id).

    Returns:
        ``model_dir`` (absolute path that ``from_pretrained`` loads), ``train_loss`` (token-weighted
        mean response NLL over the run), ``last_loss``, ``loss_history`` (per optimizer step),
        ``steps``, ``tokens`` (response tokens trained, EOS included, summed over epochs),
        ``samples``, and ``seconds`` (wall time including Ray Train start-up).

    Raises:
        ValueError: When ``rows`` is empty or smaller than the number of workers.
        RuntimeError: When the training run fails or produces no checkpoint.
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
    loop_config = {
        "init_model": init_model, "template": cfg.data.template, "cutoff_len": cfg.data.cutoff_len,
        "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum, "epochs": cfg.train.epochs,
        "learning_rate": cfg.train.learning_rate, "weight_decay": cfg.train.weight_decay,
        "warmup_ratio": cfg.train.warmup_ratio, "seed": cfg.run.seed, "cpus_per_worker": cfg.train.cpus_per_worker,
    }
    name = f"sft_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        # Train V2 wants an absolute storage path; a retry restarts training from the base model.
        run_config=ray.train.RunConfig(storage_path=str(out / "ray_train"), name=name,
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
        datasets={"train": ray.data.from_items(_text_only(rows))},
    )
    logger.info("training %s on %d rows with %d worker(s); run %s", init_model, len(rows),
                cfg.train.num_workers, out / "ray_train" / name)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {name} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint (see {out / 'ray_train' / name})")

    model_dir = out / "model"
    staging = out / "model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    ckpt_path = Path(result.checkpoint.path)
    if ckpt_path.is_dir():
        # Same file system: move rather than copy, so a round does not keep two copies of the weights.
        shutil.move(str(ckpt_path), str(staging))
    else:
        result.checkpoint.to_directory(str(staging))
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)

    summary = json.loads((model_dir / "train_summary.json").read_text())
    m = result.metrics or {}
    history = summary.get("loss_history", [])
    res = {
        "model_dir": str(model_dir),
        "train_loss": float(summary.get("train_loss", m.get("train_loss", float("nan")))),
        "last_loss": float(history[-1]) if history else float("nan"),
        "loss_history": [float(x) for x in history],
        "steps": int(summary.get("steps", 0)),
        "tokens": int(summary.get("tokens", 0)),
        "samples": int(summary.get("samples", 0)),
        "seconds": time.time() - t0,
    }
    (out / "train_result.json").write_text(json.dumps(res, indent=2))
    logger.info("trained %d steps on %d response tokens in %.1fs; loss %.4f -> %s", res["steps"], res["tokens"],
                res["seconds"], res["train_loss"], model_dir)
    return res
