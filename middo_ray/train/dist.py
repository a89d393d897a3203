"""Distributed pieces of a training worker: collectives, LoRA, FSDP2 sharding, gradient-sync control.

``strategy='ddp'`` replicates the model (``ray.train.torch.prepare_model``); ``'fsdp'`` shards parameters,
gradients and optimizer state over the workers with torch FSDP2 (``fully_shard`` per decoder layer, then
the root), on GPUs (NCCL) and on CPUs (gloo) alike.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from middo_ray.train.plan import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


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


def gather_objects(obj: Any) -> list:
    """Every worker's ``obj``, in rank order (small picklable values); ``[obj]`` alone."""
    import torch.distributed as dist

    if not _dist_on():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
