"""The training function every Ray Train worker runs (``TorchTrainer(train_loop, ...)``).

A worker receives its shard of the round's dataset (Ray Data reads the Parquet shards; ``streaming_split``
gives every worker an equal share), puts it in a content order (so a restarted worker rebuilds the same plan
whatever order the shard arrives in), tokenizes it with :func:`middo_ray.encode.encode_row` (the encoding
diagnosis and evaluation score, so the response tokens trained on are the ones they measure), and plans its
epochs up front: length grouping and the learning-rate schedule both need the whole shard, and a fixed plan
is what lets a restart continue at the exact next micro-batch.

When a worker dies, ``FailureConfig(max_failures)`` restarts the worker group; the new workers find the
checkpoint with ``ray.train.get_checkpoint()`` and continue from the step after it with the same batch plan.

Worker processes import this module by name: the caller must make ``middo_ray`` importable on every node
(a local Ray started from the repository root does this; on clusters install the package or pass
``runtime_env={"working_dir": ...}`` / ``py_modules``).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from middo_ray.console import report_remote
from middo_ray.train.checkpoint import SUMMARY_FILE, _load_checkpoint, _report, _save_checkpoint, _save_final
from middo_ray.train.dist import (_all_reduce_floats, _all_reduce_list, _forward_module, _grad_sync, _keep_from,
                                  _shard_fsdp, apply_lora, gather_objects)
from middo_ray.train.plan import (MAX_GRAD_NORM, collate, plan_batches, plan_fingerprint, resolve_precision,
                                  response_nll_sum, row_key, window_token_counts)

logger = logging.getLogger(__name__)

# Least seconds between two metrics-only ray.train.report calls (the V2 controller polls every 2 s).
REPORT_INTERVAL_S = 2.0


def _log(msg: str) -> None:
    # Train V2 configures the root logger of its workers at INFO and forwards it to the driver's console;
    # print() would appear twice there (Ray's stdout tee plus Train's print patch).
    logger.info("[middo train] %s", msg)


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


@dataclass
class Plan:
    """A worker's data and its batch plan, the same on every restart."""

    encoded: list
    plan: list[list[int]]
    fingerprint: str
    windows: list[int]        # global response tokens of each optimizer step
    inputs: list[int]         # global input tokens of each optimizer step
    samples: int              # rows over all workers

    @property
    def steps(self) -> int:
        return len(self.windows)

    @property
    def tokens(self) -> int:
        return sum(self.windows)


def _setup_threads(ctx, config: dict[str, Any]) -> None:
    import torch

    from middo_ray.models import threads_for_actor

    if not torch.cuda.is_available() and not os.environ.get("MIDDO_TORCH_THREADS"):
        # CPU workers on one node share its cores instead of each taking all of them.
        os.environ["MIDDO_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    threads_for_actor(config["cpus_per_worker"])


def _report_finished(restored, rank: int) -> bool:
    """A finished run restarted by its driver: hands back the final model it already reported."""
    if restored is None:
        return False
    with restored.as_directory() as d:
        if not (Path(d) / SUMMARY_FILE).is_file():
            return False
        final = Path(tempfile.mkdtemp(prefix="middo_model_")) if rank == 0 else None
        if final is not None:
            shutil.copytree(d, final, dirs_exist_ok=True)
        summary = json.loads((Path(d) / SUMMARY_FILE).read_text())
    _log("run already finished; reporting its final model again")
    _report({k: v for k, v in summary.items() if not isinstance(v, list)}, final)
    return True


def _plan(config: dict[str, Any], tok, rank: int, world: int) -> Plan:
    """Reads and orders the worker's shard, tokenizes it and plans every step; collectives agree on totals."""
    import ray.train

    from middo_ray.encode import encode_row

    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    keyed = sorted((row_key(r), r) for r in rows)
    rows = [r for _, r in keyed]
    fingerprint = plan_fingerprint([k for k, _ in keyed], config, world)
    encoded = [encode_row(r, tok, config["template"], config["cutoff_len"]) for r in rows]
    lengths = [len(e.input_ids) for e in encoded]
    plan = plan_batches(lengths, config["batch_size"], config["epochs"], config["seed"] + rank)
    # Equal shards give equal plans; the min guards ranks against ever waiting on a missing step.
    n_micro = _all_reduce_list([len(plan)], op="min")[0]
    accum = config["grad_accum"]
    if config.get("max_steps"):
        n_micro = min(n_micro, config["max_steps"] * accum)
    plan = plan[:n_micro]
    # One collective up front gives every step's global response-token count (so a step's loss is the
    # exact token-weighted mean over all workers) and its global input-token count (for throughput).
    local = window_token_counts(plan, [e.response_len for e in encoded], accum)
    local_in = window_token_counts(plan, lengths, accum)
    both = _all_reduce_list(local + local_in)
    return Plan(encoded, plan, fingerprint, both[:len(local)], both[len(local):], _all_reduce_list([len(rows)])[0])


def _prepare(model, config: dict[str, Any], device, total_steps: int, rank: int, world: int):
    """Wraps the model (DDP or FSDP2) and builds the optimizer, schedule and autocast context."""
    import ray.train.torch
    import torch
    from transformers import get_cosine_schedule_with_warmup

    if config["strategy"] == "fsdp":
        model, n_units = _shard_fsdp(model, device)
        if rank == 0:
            _log(f"FSDP2: {n_units} decoder layers + root sharded over {world} worker(s)")
    else:
        model = ray.train.torch.prepare_model(model, move_to_device=device)   # the worker's own device
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": config["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}], lr=config["learning_rate"])
    sched = get_cosine_schedule_with_warmup(optim, math.ceil(config["warmup_ratio"] * total_steps), total_steps)
    precision = resolve_precision(config["precision"], device.type,
                                  device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    return model, optim, sched, trainable, precision, autocast


def _restore(restored, model, optim, sched, rank: int, lora: bool, plan: Plan) -> dict[str, Any]:
    """Progress that survives a restart: fresh, or loaded from the checkpoint Ray Train hands back."""
    from middo_ray.train.checkpoint import _set_rng_state

    state: dict[str, Any] = {"step": 0, "history": [], "weighted_sum": 0.0, "resumed_from": [],
                             "train_seconds": 0.0, "step_seconds": [], "exact_resume": True}
    if restored is None:
        return state
    with restored.as_directory() as d:
        saved, extras = _load_checkpoint(Path(d), model, optim, rank, lora)
    if saved.get("total_steps") != plan.steps:
        raise RuntimeError(f"checkpoint {restored.path} was written for {saved.get('total_steps')} steps, "
                           f"this run has {plan.steps}; it belongs to a different training setup")
    sched.load_state_dict(saved["sched"])
    state.update(saved["progress"])
    same_plan = extras is not None and extras["fingerprint"] == plan.fingerprint
    exact = bool(_all_reduce_list([int(same_plan)], op="min")[0])
    if extras is not None:
        _set_rng_state(extras["rng"])
    state["exact_resume"] = state["exact_resume"] and exact
    state["resumed_from"] = state["resumed_from"] + [state["step"]]
    if rank == 0:
        _log(f"resumed from the checkpoint at step {state['step']}/{plan.steps}"
             + ("" if exact else " (a worker's data differs from the checkpoint's: the batch plan is new)"))
    return state


@dataclass
class _Run:
    """Everything the step loop uses."""

    config: dict
    model: Any
    tok: Any
    optim: Any
    sched: Any
    trainable: list
    autocast: Any
    device: Any
    plan: Plan
    state: dict
    rank: int
    world: int
    lora: bool
    use_keep: bool


def _one_step(r: _Run, step: int) -> float:
    """Runs optimizer step ``step`` (its micro-batches, gradient accumulation); returns its summed NLL."""
    import torch

    accum = r.config["grad_accum"]
    micro = r.plan.plan[step * accum:(step + 1) * accum]
    denom = max(r.plan.windows[step], 1)
    step_nll = torch.zeros((), dtype=torch.float64)
    for k, idx in enumerate(micro):
        batch = {key: v.to(r.device) for key, v in collate([r.plan.encoded[i] for i in idx],
                                                            r.tok.pad_token_id).items()}
        first = _keep_from(batch) if r.use_keep else 0
        kwargs = {"logits_to_keep": batch["input_ids"].shape[1] - first} if r.use_keep else {}
        # Gradients are reduced across workers only on the last micro-batch of a step.
        with _grad_sync(r.model, k == len(micro) - 1), r.autocast:
            out = r.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
            nll = response_nll_sum(out.logits, batch["labels"], first)
            # Gradients are averaged over workers, so scaling by world/denom yields the global mean.
            (nll * (r.world / denom)).backward()
        step_nll += nll.detach().double().cpu()
    torch.nn.utils.clip_grad_norm_(r.trainable, MAX_GRAD_NORM)
    r.optim.step()
    r.sched.step()
    r.optim.zero_grad(set_to_none=True)
    return float(step_nll)


def _run_steps(r: _Run) -> float | None:
    """The step loop from the restored step to the end, with reports and checkpoints; returns the first
    step's start time."""
    state, total = r.state, r.plan.steps
    every = r.config["checkpoint_every_steps"]
    t_loop = last_report = time.time()
    first_step_at = None
    for step in range(state["step"], total):
        _maybe_crash(r.config, step + 1, r.rank)
        t_step = time.time()
        first_step_at = first_step_at or t_step
        nll = _one_step(r, step)
        # One collective gives the step's global loss and the mean time since the last report, so every
        # rank takes the same report decision.
        loss_sum, since_report = _all_reduce_floats([nll, (time.time() - last_report) / r.world])
        step_loss = loss_sum / max(r.plan.windows[step], 1)
        state["history"].append(step_loss)
        state["weighted_sum"] += loss_sum
        state["step_seconds"].append(time.time() - t_step)
        state["step"] = step + 1
        lr = r.sched.get_last_lr()[0]
        if r.rank == 0:
            rate = r.plan.inputs[step] / max(state["step_seconds"][-1], 1e-9)
            _log(f"step {step + 1}/{total} loss {step_loss:.4f} lr {lr:.2e} ({rate:.0f} tok/s)")
            # The driver's console shows training as one progress display (its board polls this).
            report_remote("train", step + 1, total, f"loss {step_loss:.4f}, {rate:.0f} tok/s")
        metrics = {"step": step + 1, "loss": step_loss, "lr": lr}
        last = step == total - 1
        if every and (step + 1) % every == 0 and not last:
            # Every rank writes and reports its part; Ray Train gathers them into one checkpoint directory.
            state["train_seconds"] += time.time() - t_loop
            t_loop = time.time()
            trainer_state = {"total_steps": total, "sched": r.sched.state_dict(), "progress": state}
            _report(metrics, _save_checkpoint(r.model, r.optim, trainer_state, r.rank, r.lora, r.plan.fingerprint))
            last_report = time.time()
        # Reports are collective and the controller drains each worker's one-slot result queue only every
        # ~2 s, so a report per step would stall short steps; report when a rank-agreed interval passed.
        elif since_report >= REPORT_INTERVAL_S and not last:
            _report(metrics, None)
            last_report = time.time()
    state["train_seconds"] += time.time() - t_loop
    return first_step_at


def train_loop(config: dict[str, Any]) -> None:
    """Per-worker training function run by ``TorchTrainer``."""
    import ray.train
    import ray.train.torch
    import torch

    from middo_ray.models import load_model, resolve_model

    t_start = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup_threads(ctx, config)
    # Ray hands a GPU worker a CUDA device whenever it was given a GPU; where torch sees none (nodes that
    # only declare GPUs, as a simulated cluster does) the worker computes on its CPU.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    restored = ray.train.get_checkpoint()
    if _report_finished(restored, rank):
        return
    torch.manual_seed(config["seed"])
    lora = config["method"] == "lora"
    # Master weights stay float32 (AdamW in bf16 loses small updates); bf16 comes from autocast.
    model, tok = load_model(config["init_model"], dtype="float32", device=str(device), train=True)
    if lora:
        model = apply_lora(model, config, resolve_model(config["init_model"]))
    plan = _plan(config, tok, rank, world)
    model, optim, sched, trainable, precision, autocast = _prepare(model, config, device, plan.steps, rank, world)
    use_keep = "logits_to_keep" in inspect.signature(_forward_module(model).forward).parameters
    state = _restore(restored, model, optim, sched, rank, lora, plan)
    if rank == 0:
        _log(f"{plan.samples} samples on {world} worker(s), {len(plan.plan)} micro-batches per worker, "
             f"{plan.steps} optimizer steps, {plan.tokens} response tokens, "
             f"{config['method']} / {config['strategy']} / {precision}")
    run = _Run(config, model, tok, optim, sched, trainable, autocast, device, plan, state, rank, world, lora, use_keep)
    setup_seconds = time.time() - t_start
    first_step_at = _run_steps(run)
    history = state["history"]
    summary = {
        "step": plan.steps, "steps": plan.steps, "loss": history[-1] if history else float("nan"),
        "train_loss": state["weighted_sum"] / max(plan.tokens, 1), "tokens": plan.tokens,
        "input_tokens": sum(plan.inputs), "step_input_tokens": plan.inputs, "samples": plan.samples,
        "train_seconds": state["train_seconds"], "step_seconds": state["step_seconds"],
        "setup_seconds": setup_seconds, "first_step_at": first_step_at, "loss_history": history,
        "resumed_from": state["resumed_from"], "exact_resume": state["exact_resume"],
        "method": config["method"], "strategy": config["strategy"], "precision": precision,
        "world_size": world, "final": True,
        # Where each worker ran: its node and the GPUs Ray gave it (what a GPU hand-off is checked by).
        "placement": gather_objects({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                     "gpu_ids": gpu_ids}),
    }
    final_dir = _save_final(model, tok, config, summary, rank)
    # Per-step lists stay in the checkpoint's summary file; Ray's result metrics get the scalars.
    _report({k: v for k, v in summary.items() if not isinstance(v, list)}, final_dir)
