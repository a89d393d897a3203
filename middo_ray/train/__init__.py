"""Train stage: supervised fine-tuning of a causal LM on Ray Train (``TorchTrainer``, Train V2).

:func:`train_sft` trains ``init_model`` on a round's dataset and leaves a standard Hugging Face checkpoint
at ``<stage dir>/model``: full fine-tuning as the reference does (reference §6), or LoRA (peft) saved merged
into the weights (a plain checkpoint) or as an adapter directory.

How the data flows: the Ray Train workers read the round's Parquet shards through Ray Data
(``read_parquet`` of the text columns; each worker gets an equal share), so no row passes through the
driver. The pieces: :mod:`~middo_ray.train.plan` (batching, the batch plan and the loss, pure),
:mod:`~middo_ray.train.dist` (collectives, LoRA, FSDP2), :mod:`~middo_ray.train.checkpoint` (resumable
checkpoints and the final model), :mod:`~middo_ray.train.worker` (the per-worker function).

Fault tolerance: checkpoints every ``train.checkpoint_every_steps`` steps go to the run's storage; with
``train.max_failures`` a lost worker restarts from the last one, and rerunning an interrupted stage (same
storage, same run name) continues from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from middo_ray.console import follow_remote
from middo_ray.schema import TEXT_COLUMNS
from middo_ray.storage import ShardSet
from middo_ray.train.checkpoint import SUMMARY_FILE, write_hf_model
from middo_ray.train.dist import apply_lora
from middo_ray.train.plan import (collate, plan_batches, plan_fingerprint, resolve_precision, response_nll_sum,
                                  row_key, window_token_counts)
from middo_ray.train.worker import train_loop

if TYPE_CHECKING:
    from middo_ray.config import MiddoConfig, TrainConfig
    from middo_ray.rundir import StageContext, StageResult

logger = logging.getLogger(__name__)

# Driver-side environment variable for the fault-tolerance test: "STEP:MARKER_FILE" makes rank 0 exit
# the process (a real worker death) just before optimizer step STEP, once (the marker file records it).
CRASH_ENV = "MIDDO_TRAIN_CRASH_AT"

__all__ = ["CRASH_ENV", "apply_lora", "collate", "load", "loop_config", "plan_batches", "plan_fingerprint",
           "resolve_precision", "response_nll_sum", "row_key", "run", "storage_root", "train_sft",
           "window_token_counts", "write_hf_model"]


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
        "batch_size": t.batch_size, "grad_accum": t.grad_accum, "epochs": t.epochs, "max_steps": t.max_steps,
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


def _dataset(rows: ShardSet | list[dict]):
    """The training data as a Ray Dataset of the text columns: read from the shards by the workers, or
    (tests, benchmarks) built from rows in memory."""
    import ray

    if isinstance(rows, ShardSet):
        return ray.data.read_parquet(rows.paths(), columns=list(TEXT_COLUMNS))
    # Only the columns the template reads travel to the workers; lineage columns with mixed or
    # all-null types would also make the Arrow schema fragile.
    return ray.data.from_items([{c: ("" if r.get(c) is None else str(r.get(c))) for c in TEXT_COLUMNS}
                                for r in rows])


def _worker_resources(cfg: MiddoConfig) -> dict[str, float]:
    """What each training worker reserves: its CPUs and, on GPUs, a whole GPU or (``refine.gpu_handoff='sleep'``)
    the rest of the one whose share the sleeping teacher holds."""
    res = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        res["GPU"] = cfg.gpu_worker_share
    return res


def _fit(cfg: MiddoConfig, rows, storage: str, name: str, init_model: str):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config(cfg, init_model),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=_worker_resources(cfg)),
        torch_config=TorchConfig(backend=None if cfg.train.backend == "auto" else cfg.train.backend),
        run_config=ray.train.RunConfig(
            storage_path=storage, name=name,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # One resumable checkpoint is enough: Ray registers a new one before deleting the old.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        datasets={"train": _dataset(rows)},
    )
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
    return result


def _result(model_dir: Path, summary: dict, t0: float) -> dict:
    history = [float(x) for x in summary.get("loss_history", [])]
    first_step = summary.get("first_step_at")
    return {
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
        "placement": list(summary.get("placement") or []),
        "train_seconds": float(summary.get("train_seconds", 0.0)),
        "step_seconds": [float(x) for x in summary.get("step_seconds", [])],
        "step_input_tokens": [int(x) for x in summary.get("step_input_tokens", [])],
        "startup_seconds": (first_step - t0) if first_step else None,
        "seconds": time.time() - t0,
    }


def train_sft(rows: ShardSet | list[dict], cfg: MiddoConfig, out_dir: str | Path, init_model: str,
              run_name: str | None = None) -> dict:
    """Fine-tunes ``init_model`` on ``rows`` with Ray Train and saves an HF checkpoint.

    Args:
        rows: The round's dataset as a ShardSet (read by the workers), or canonical rows in memory.
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

    t0 = time.time()
    n = rows.total if isinstance(rows, ShardSet) else len(rows)
    if n < cfg.train.num_workers:
        raise ValueError(f"train_sft got {n} rows for {cfg.train.num_workers} workers; every worker "
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
    logger.debug("training %s on %d rows with %d worker(s) (%s, %s); run %s/%s", init_model, n,
                cfg.train.num_workers, cfg.train.method, cfg.train.strategy, storage, name)
    with follow_remote("train", "train", unit="steps"):
        result = _fit(cfg, rows, storage, name, init_model)
    model_dir = _fetch_model(result.checkpoint, out)
    if not (model_dir / SUMMARY_FILE).is_file():
        raise RuntimeError(f"training run {name}: the last checkpoint is not a final model (see {storage}/{name})")
    _drop_run_storage(result)
    res = _result(model_dir, json.loads((model_dir / SUMMARY_FILE).read_text()), t0)
    (out / "train_result.json").write_text(json.dumps(res, indent=2))
    logger.debug("trained %d steps on %d response tokens in %.1fs; loss %.4f -> %s%s", res["steps"], res["tokens"],
                res["seconds"], res["train_loss"], model_dir,
                f" (resumed from step {res['resumed_from']})" if res["resumed_from"] else "")
    return res


# ---------------------------------------------------------------------------------------------
# The stage contract.

def run(ctx: StageContext, cfg: TrainConfig, inputs: dict) -> StageResult:
    """Trains ``inputs["init_model"]`` on ``inputs["dataset"]`` (a ShardSet); a training cut off by a crash of
    the driver resumes from its checkpoint.

    The Ray Train run is named after the run and the round, so a rerun of an unfinished round finds the
    checkpoints of the interrupted one (in the stage directory, or in ``train.storage_path``) and continues
    from the last of them instead of starting over; ``run.resume=false`` starts afresh.
    """
    from middo_ray.rundir import StageResult

    init_model = inputs["init_model"]
    run_name = f"{ctx.cfg.run.run_id}-round_{ctx.round}" if ctx.cfg.run.resume else None
    logger.info("train: SFT of %s on %d samples (Ray Train, %d worker(s), %s, %s)", init_model,
                inputs["dataset"].total, cfg.num_workers, cfg.method, cfg.strategy)
    info = train_sft(inputs["dataset"], ctx.cfg, ctx.dir, init_model, run_name=run_name)
    info["init_model"] = init_model
    # Per-step lists stay in train/train_result.json; the stage record and manifests keep the scalars.
    record = {k: v for k, v in info.items() if k not in ("step_seconds", "step_input_tokens")}
    return StageResult(record, record["model_dir"])


def load(stage_dir: str) -> StageResult:
    from middo_ray.rundir import StageResult, read_record

    info = read_record(stage_dir)
    return StageResult(info, info["model_dir"])
