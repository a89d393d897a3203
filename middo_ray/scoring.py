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


@dataclass
class ForwardScores:
    loss: np.ndarray            # (N,) mean NLL over response tokens (incl. EOS); NaN when there are none
    n_tokens: np.ndarray        # (N,) response tokens scored
    embedding: np.ndarray | None  # (N, H) mask-aware mean of last hidden states over prompt tokens (or Encoded.pool)


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


def _head_chunk(vocab: int, budget_floats: int = 1 << 26) -> int:
    """Positions per vocabulary projection so the logits chunk stays under ~256 MB of float32."""
    return max(64, budget_floats // max(vocab, 1))


def forward_scores(model, encoded: list[Encoded], pad_id: int, batch_tokens: int = 4096,
                   want_embedding: bool = False) -> ForwardScores:
    """Per-sample mean response NLL (and optionally prompt embeddings) for a list of encoded samples.

    All index work is vectorised: the response positions of a batch come from one mask, their
    hidden states are gathered at once, projected through the LM head in memory-bounded chunks, and
    the per-sample means are reduced with ``index_add_`` in float64.
    """
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
    chunk = _head_chunk(head.weight.shape[0])
    with torch.inference_mode():
        for batch in length_batches(lengths, batch_tokens):
            b = len(batch)
            width = max(lengths[i] for i in batch)
            ids = torch.full((b, width), pad_id, dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, : lengths[i]] = torch.as_tensor(encoded[i].input_ids)
            lens = torch.as_tensor([lengths[i] for i in batch])
            plen = torch.as_tensor([encoded[i].prompt_len for i in batch])
            ar = torch.arange(width)
            att = (ar[None, :] < lens[:, None]).long()
            ids, att = ids.to(device), att.to(device)
            hidden = decoder(input_ids=ids, attention_mask=att).last_hidden_state  # (B, T, H)
            # Positions t holding a response token that has a predecessor: predicted from t - 1.
            target = (ar[None, :] >= plen.clamp(min=1)[:, None]) & (ar[None, :] < lens[:, None])
            r_idx, t_idx = target.nonzero(as_tuple=True)
            if r_idx.numel():
                r_dev, t_dev = r_idx.to(device), t_idx.to(device)
                h = hidden[r_dev, t_dev - 1]
                tgt = ids[r_dev, t_dev]
                nll = torch.cat([
                    torch.nn.functional.cross_entropy(head(h[s:s + chunk]).float(), tgt[s:s + chunk],
                                                      reduction="none")
                    for s in range(0, h.shape[0], chunk)]).double().cpu()
                sums = torch.zeros(b, dtype=torch.float64).index_add_(0, r_idx, nll)
                counts = torch.zeros(b, dtype=torch.float64).index_add_(0, r_idx, torch.ones_like(nll))
                rows = np.asarray(batch)
                has = counts.numpy() > 0
                loss[rows[has]] = (sums / counts.clamp(min=1)).numpy()[has]
                ntok[rows] = counts.numpy().astype(np.int64)
            if want_embedding:
                if emb is None:
                    emb = np.zeros((n, hidden.shape[-1]), dtype=np.float32)
                # The prompt tokens, or the span of them that the encoding names (Encoded.pool).
                span = [encoded[i].pool or (0, encoded[i].prompt_len) for i in batch]
                lo, hi = torch.as_tensor([a for a, _ in span]), torch.as_tensor([z for _, z in span])
                pmask = ((ar[None, :] >= lo[:, None]) & (ar[None, :] < hi[:, None])).to(device=device,
                                                                                           dtype=torch.float32)
                summed = (hidden.float() * pmask.unsqueeze(-1)).sum(dim=1)
                count = pmask.sum(dim=1, keepdim=True).float()
                pooled = torch.where(count > 0, summed / count.clamp(min=1), torch.full_like(summed, float("nan")))
                emb[batch] = pooled.cpu().numpy()
    return ForwardScores(loss, ntok, emb)


def ifd_ratio(loss: np.ndarray, loss_empty: np.ndarray) -> np.ndarray:
    """IFD = loss(response | prompt) / loss(response | empty prompt); NaN where the denominator is not positive."""
    loss, loss_empty = np.asarray(loss, dtype=np.float64), np.asarray(loss_empty, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(loss_empty > 0, loss / loss_empty, np.nan)


def ifd_scores(model, tokenizer, rows: list[dict], template: str = "default", cutoff_len: int = 512,
               batch_tokens: int = 4096) -> np.ndarray:
    """(N,) IFD of each row under ``model``, encoded as the diagnosis encodes it (NaN: undefined).

    Rows are dicts with ``instruction``, ``input``, ``output`` (``system``, ``history`` optional). One forward
    pass scores both encodings of every row (with its prompt and with the empty one)."""
    from middo_ray.encode import empty_prompt_variant, encode_row

    n = len(rows)
    enc = [encode_row(r, tokenizer, template, cutoff_len) for r in rows]
    extra = [empty_prompt_variant(e, r, tokenizer, template) for e, r in zip(enc, rows)]
    s = forward_scores(model, enc + extra, tokenizer.pad_token_id, batch_tokens)
    return ifd_ratio(s.loss[:n], s.loss[n:])
