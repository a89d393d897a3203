"""Batched forward passes that give per-sample response loss and prompt embeddings.

Used by diagnosis (complexity + diversity signals) and evaluation (held-out loss). The design keeps
the cost close to the FLOP bound:

- samples are sorted by length and packed into batches under a token budget (``batch_tokens`` counts
  padded tokens), so padding stays bounded;
- the decoder runs once; the vocabulary projection is applied only to the positions whose next token
  is a response token (the prompt's logits are never computed);
- the prompt embedding is pooled from the same pass: with causal attention the hidden states at prompt
  positions equal those of a prompt-only pass.

Right padding plus the attention mask means a sample's numbers do not depend on its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from middo_ray.encode import Encoded
from middo_ray.signals.loss import masked_mean


@dataclass
class ForwardScores:
    loss: np.ndarray            # (N,) mean NLL over response tokens (incl. EOS); NaN when there are none
    n_tokens: np.ndarray        # (N,) response tokens scored
    embedding: np.ndarray | None  # (N, H) mask-aware mean of last hidden states over prompt tokens


def length_batches(lengths: list[int], batch_tokens: int, max_rows: int = 256) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size stays under the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and (new_max * (len(cur) + 1) > batch_tokens or len(cur) >= max_rows):
            batches.append(cur)
            cur, cur_max = [], 0
            new_max = lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def _decoder_and_head(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    return decoder, head


def forward_scores(model, encoded: list[Encoded], pad_id: int, batch_tokens: int = 4096,
                   want_embedding: bool = False) -> ForwardScores:
    """Per-sample mean response NLL (and optionally prompt embeddings) for a list of encoded samples."""
    import torch

    n = len(encoded)
    loss = np.full(n, np.nan, dtype=np.float64)
    ntok = np.zeros(n, dtype=np.int64)
    emb: np.ndarray | None = None
    if n == 0:
        return ForwardScores(loss, ntok, np.zeros((0, 0), np.float32) if want_embedding else None)
    device = next(model.parameters()).device
    decoder, head = _decoder_and_head(model)
    lengths = [len(e.input_ids) for e in encoded]
    with torch.inference_mode():
        for batch in length_batches(lengths, batch_tokens):
            width = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, : lengths[i]] = torch.tensor(encoded[i].input_ids)
                att[r, : lengths[i]] = 1
            ids, att = ids.to(device), att.to(device)
            hidden = decoder(input_ids=ids, attention_mask=att).last_hidden_state  # (B, T, H)
            # Rows/positions whose next token is a response token.
            rows, pos, tgt, owner = [], [], [], []
            for r, i in enumerate(batch):
                start = max(encoded[i].prompt_len, 1)
                for t in range(start, lengths[i]):
                    rows.append(r)
                    pos.append(t - 1)
                    tgt.append(encoded[i].input_ids[t])
                    owner.append(i)
            if rows:
                h = hidden[torch.tensor(rows, device=device), torch.tensor(pos, device=device)]
                logits = head(h).float()
                nll = torch.nn.functional.cross_entropy(
                    logits, torch.tensor(tgt, device=device), reduction="none").cpu().numpy()
                owner_arr = np.asarray(owner)
                for i in batch:
                    sel = nll[owner_arr == i]
                    loss[i] = masked_mean(sel, np.ones_like(sel))
                    ntok[i] = sel.size
            if want_embedding:
                if emb is None:
                    emb = np.zeros((n, hidden.shape[-1]), dtype=np.float32)
                pmask = torch.zeros_like(att, dtype=hidden.dtype)
                for r, i in enumerate(batch):
                    pmask[r, : encoded[i].prompt_len] = 1
                summed = (hidden * pmask.unsqueeze(-1)).sum(dim=1).float()
                count = pmask.sum(dim=1, keepdim=True).float()
                pooled = torch.where(count > 0, summed / count.clamp(min=1), torch.full_like(summed, float("nan")))
                emb[batch] = pooled.cpu().numpy()
    return ForwardScores(loss, ntok, emb)
