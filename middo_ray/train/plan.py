"""The pure pieces of training: batching, the batch plan, the loss, identities; unit-tested without Ray.

Samples are right-padded into length-grouped micro-batches (never packed), so no sample attends to
another; the loss is the summed next-token NLL over response tokens, normalised by the response tokens of
an optimizer step's micro-batches across all workers (the token-weighted mean).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import TYPE_CHECKING, Any

from middo_ray.encode import Encoded
from middo_ray.schema import TEXT_COLUMNS

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
# Gradient-norm clip of HF Trainer / LLaMA-Factory (the reference's trainer); not worth a config key.
MAX_GRAD_NORM = 1.0
# A length-sorted chunk holds this many micro-batches: large enough to keep padding small, small enough
# that the batches still mix samples from across the shard.
CHUNK_BATCHES = 8


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
