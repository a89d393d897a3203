"""Checkpoints of a training run: resumable sharded checkpoints, and the final Hugging Face model.

Every ``checkpoint_every_steps`` optimizer steps all workers write a sharded checkpoint
(``torch.distributed.checkpoint``: model and optimizer; plus scheduler, step, loss history, RNG states and
a fingerprint of each worker's data) and report it to Ray Train, which keeps it in the run's storage (a
local path or a URI). The last report carries the final model as a standard Hugging Face directory.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Files of a Ray Train checkpoint written by this module.
STATE_FILE = "trainer_state.pt"       # rank 0: step, scheduler, loss history, counters
RANK_FILE = "rank_{rank}.pt"          # every rank: RNG states and its data fingerprint
SUMMARY_FILE = "train_summary.json"   # final checkpoint only: the run's summary next to the HF model


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
