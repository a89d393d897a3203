"""Diagnosis stage: per-sample signals from the models themselves, on Ray Data actor pools.

- complexity: mean response-token NLL under the pre model (``loss_pre``) and the current model
  (``loss_cur``), prompt masked, padding never counted (``scoring.forward_scores``);
- diversity: mask-aware mean of the current model's last hidden states over the prompt tokens, taken
  from the same forward pass as ``loss_cur`` (causal attention makes them equal to a prompt-only
  pass). Note: the reference pools the raw ``instruction\\ninput`` text without a template; we pool the
  templated prompt, which the pass already has;
- quality: the current model judges factuality, clarity and completeness of the prompt and of the
  response (6 judgements). The score is probability-weighted: the expected value of the 0-10 score
  under the model's distribution of the first answer token after the judge prompt, with no
  generation or text parsing (reference §9.8). The three judgements of a target share their body
  (task + sample), which is computed once and reused through the KV cache.

Each actor loads its model once and receives blocks of rows; it returns ``sample_id`` plus signal
columns, and the driver joins them by ``sample_id``. Pre-model losses never change for a sample, so
they are cached by id across rounds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from middo_ray.config import MiddoConfig
from middo_ray.encode import encode_row, render_prompt
from middo_ray.prompts import judge_body, judge_tail
from middo_ray.schema import JUDGE_DIMENSIONS, TEXT_COLUMNS, require_columns
from middo_ray.scoring import forward_scores, length_batches
from middo_ray.signals.quality import aggregate_quality, expected_score

log = logging.getLogger(__name__)

JUDGE_COLUMNS = tuple(f"q_{t}_{d}" for t in ("prompt", "response") for d in JUDGE_DIMENSIONS)
INPUT_COLUMNS = ("sample_id",) + TEXT_COLUMNS


def _rows(batch: dict) -> list[dict]:
    n = len(batch["sample_id"])
    return [{c: (batch[c][i] if batch[c][i] is not None else "") for c in INPUT_COLUMNS} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Probability-weighted self-judge.

@dataclass
class ScoreTokens:
    digits: list[int]               # ids of "0".."9"
    ten: int | None = None          # id of a single "10" token, if the tokenizer has one
    two_step_ten: bool = False      # "10" is spelled "1","0"


def score_tokens(tokenizer) -> ScoreTokens:
    """Token ids of the score answers; fails clearly for tokenizers that split a digit."""
    digits = []
    for d in range(10):
        ids = tokenizer(str(d), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits the digit '{d}' into {ids}; the probability-weighted "
                             "judge needs single-token digits")
        digits.append(ids[0])
    ten = tokenizer("10", add_special_tokens=False)["input_ids"]
    if len(ten) == 1:
        return ScoreTokens(digits, ten=ten[0])
    return ScoreTokens(digits, two_step_ten=(ten == [digits[1], digits[0]]))


def judge_sequences(rows: list[dict], tokenizer, template: str, cutoff_len: int, target: str
                    ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the shared bodies (one per row) and of the three tails (one per dimension).

    The full judge prompt is rendered with the template, then split where the tail starts, so
    ``body + tail`` is exactly the templated judge prompt and the tail (dimension question plus the
    template's closing text) is the same for every row.
    """
    tails_text: list[str] = []
    bodies: list[list[int]] = []
    for d in JUDGE_DIMENSIONS:
        full = render_prompt({"instruction": "\x00" + judge_tail(d, target)}, tokenizer, template)
        tails_text.append(full[full.index("\x00") + 1:])
    tails = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in tails_text]
    room = max(8, cutoff_len - max(len(t) for t in tails))
    for row in rows:
        full = render_prompt({"instruction": judge_body(row, target) + judge_tail(JUDGE_DIMENSIONS[0], target)},
                             tokenizer, template)
        head = full[: len(full) - len(tails_text[0])]
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        bodies.append(ids[-room:])   # keep the end: the sample sits right before the question
    return bodies, tails


def judge_scores(model, tokenizer, rows: list[dict], template: str, cutoff_len: int,
                 batch_tokens: int) -> np.ndarray:
    """(N, 6) expected 0-10 scores: prompt x (fact, clar, comp), then response x (fact, clar, comp).

    Per batch of samples the body runs once with a KV cache; the cache is repeated three times and
    the three dimension tails run against it in one pass. Tails that spell 10 as "1","0" get a
    trailing "1" so the same pass also gives P("0" | "1").
    """
    import torch

    st = score_tokens(tokenizer)
    out = np.full((len(rows), 6), np.nan)
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    pad = tokenizer.pad_token_id
    n_dim = len(JUDGE_DIMENSIONS)
    for t_idx, target in enumerate(("prompt", "response")):
        bodies, tails = judge_sequences(rows, tokenizer, template, cutoff_len, target)
        if st.two_step_ten:
            tails = [t + [st.digits[1]] for t in tails]
        t_len = torch.tensor([len(t) for t in tails], device=device)
        t_max = int(t_len.max())
        tail_ids = torch.full((n_dim, t_max), pad, dtype=torch.long, device=device)
        tail_att = torch.zeros((n_dim, t_max), dtype=torch.long, device=device)
        for j, t in enumerate(tails):
            tail_ids[j, : len(t)] = torch.tensor(t)
            tail_att[j, : len(t)] = 1
        lengths = [len(b) for b in bodies]
        # Budget: the body pass plus three tails per row.
        costs = [n_dim * (length + t_max) for length in lengths]
        with torch.inference_mode():
            for batch in length_batches(costs, batch_tokens * n_dim):
                width = max(lengths[i] for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                att = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):
                    ids[r, : lengths[i]] = torch.tensor(bodies[i])
                    att[r, : lengths[i]] = 1
                ids, att = ids.to(device), att.to(device)
                cache = decoder(input_ids=ids, attention_mask=att, use_cache=True).past_key_values
                cache.batch_repeat_interleave(n_dim)                    # row r*3 + j: sample r, dimension j
                b = len(batch)
                q_ids = tail_ids.repeat(b, 1)
                q_att = torch.cat([att.repeat_interleave(n_dim, 0), tail_att.repeat(b, 1)], dim=1)
                body_len = att.sum(1).repeat_interleave(n_dim)
                pos = body_len[:, None] + torch.arange(t_max, device=device)[None, :]
                hidden = decoder(input_ids=q_ids, attention_mask=q_att, position_ids=pos,
                                 past_key_values=cache, use_cache=False).last_hidden_state
                rows_t = torch.arange(b * n_dim, device=device)
                last = t_len.repeat(b) - 1
                first_pos = last - 1 if st.two_step_ten else last
                probs = torch.softmax(head(hidden[rows_t, first_pos]).float(), dim=-1)
                first = probs[:, torch.tensor(st.digits, device=device)].cpu().numpy()
                ten = probs[:, st.ten].cpu().numpy() if st.ten is not None else None
                zero_after_one = None
                if st.two_step_ten:
                    after = torch.softmax(head(hidden[rows_t, last]).float(), dim=-1)
                    zero_after_one = after[:, st.digits[0]].cpu().numpy()
                scores = expected_score(first, zero_after_one, ten).reshape(b, n_dim)
                out[np.asarray(batch), t_idx * n_dim:(t_idx + 1) * n_dim] = scores
    return out


# ---------------------------------------------------------------------------------------------
# Ray Data actor classes (stage adapters).

class PreLossScorer:
    """Actor holding the pre model; adds ``loss_pre`` per sample."""

    def __init__(self, model: str, dtype: str, template: str, cutoff_len: int, batch_tokens: int):
        from middo_ray.models import load_model, threads_for_actor

        threads_for_actor()
        self.model, self.tok = load_model(model, dtype)
        self.template, self.cutoff, self.batch_tokens = template, cutoff_len, batch_tokens

    def __call__(self, batch: dict) -> dict:
        require_columns("diagnose/pre", batch.keys(), INPUT_COLUMNS)
        rows = _rows(batch)
        enc = [encode_row(r, self.tok, self.template, self.cutoff) for r in rows]
        s = forward_scores(self.model, enc, self.tok.pad_token_id, self.batch_tokens)
        return {"sample_id": np.asarray(batch["sample_id"]), "loss_pre": s.loss}


class CurrentModelScorer:
    """Actor holding the current model M_t: ``loss_cur``, prompt embedding and 6 judge scores."""

    def __init__(self, model: str, dtype: str, template: str, cutoff_len: int, batch_tokens: int, judge: bool):
        from middo_ray.models import load_model, threads_for_actor

        threads_for_actor()
        self.model, self.tok = load_model(model, dtype)
        self.template, self.cutoff, self.batch_tokens, self.judge = template, cutoff_len, batch_tokens, judge

    def __call__(self, batch: dict) -> dict:
        require_columns("diagnose/current", batch.keys(), INPUT_COLUMNS)
        rows = _rows(batch)
        enc = [encode_row(r, self.tok, self.template, self.cutoff) for r in rows]
        s = forward_scores(self.model, enc, self.tok.pad_token_id, self.batch_tokens, want_embedding=True)
        out = {
            "sample_id": np.asarray(batch["sample_id"]),
            "loss_cur": s.loss,
            "n_response_tokens": s.n_tokens,
            "truncated": np.asarray([e.truncated for e in enc]),
            "embedding": s.embedding.astype(np.float32),
        }
        if self.judge:
            q = judge_scores(self.model, self.tok, rows, self.template, self.cutoff, self.batch_tokens)
        else:
            q = np.full((len(rows), 6), np.nan)
        for j, col in enumerate(JUDGE_COLUMNS):
            out[col] = q[:, j]
        return out


# ---------------------------------------------------------------------------------------------
# Driver side.

@dataclass
class Diagnosis:
    """Signals of one round, aligned with the input rows' order (joined by sample_id)."""

    sample_ids: list[str]
    columns: dict[str, np.ndarray]
    embeddings: np.ndarray
    counts: dict = field(default_factory=dict)


def _pool_options(cfg: MiddoConfig) -> dict:
    """Actor-pool size and resources: one actor per GPU on GPU clusters, else a fractional CPU actor."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus > 0:
        n = cfg.diagnose.num_actors or gpus
        return {"concurrency": n, "num_gpus": 1}
    n = cfg.diagnose.num_actors or 1
    # Fractional CPUs: a whole-CPU actor pool next to the read stage stalls on 2-CPU machines.
    return {"concurrency": n, "num_cpus": cfg.diagnose.cpus_per_actor}


def _run_actor(rows: list[dict], actor_cls, ctor_kwargs: dict, cfg: MiddoConfig) -> dict[str, np.ndarray]:
    import ray

    items = [{c: r.get(c) or "" for c in INPUT_COLUMNS} for r in rows]
    ds = ray.data.from_items(items)
    out = ds.map_batches(actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_size=cfg.diagnose.rows_per_block,
                         batch_format="numpy", **_pool_options(cfg))
    blocks = list(out.iter_batches(batch_size=None, batch_format="numpy"))
    if not blocks:
        return {}
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def run_diagnosis(rows: list[dict], cfg: MiddoConfig, current_model: str,
                  pre_cache: dict[str, float] | None = None) -> Diagnosis:
    """Computes every signal for ``rows``; ``pre_cache`` (sample_id -> loss_pre) is read and extended."""
    from middo_ray.signals.diversity import knn_similarity

    t0 = time.time()
    pre_cache = {} if pre_cache is None else pre_cache
    ids = [r["sample_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("diagnosis input has duplicate sample_ids; merge must deduplicate by id")
    common = {"dtype": cfg.model.dtype, "template": cfg.data.template, "cutoff_len": cfg.data.cutoff_len,
              "batch_tokens": cfg.diagnose.batch_tokens}
    todo = [r for r in rows if r["sample_id"] not in pre_cache]
    t_pre = time.time()
    if todo:
        pre = _run_actor(todo, PreLossScorer, {"model": cfg.model.pre or cfg.model.base, **common}, cfg)
        pre_cache.update({str(s): float(v) for s, v in zip(pre["sample_id"], pre["loss_pre"])})
    t_pre = time.time() - t_pre
    t_cur = time.time()
    cur = _run_actor(rows, CurrentModelScorer, {"model": current_model, "judge": cfg.diagnose.judge, **common}, cfg)
    t_cur = time.time() - t_cur
    pos = {str(s): i for i, s in enumerate(cur["sample_id"])}
    missing = [s for s in ids if s not in pos]
    if missing:
        raise RuntimeError(f"diagnosis lost {len(missing)} samples (e.g. {missing[:3]}); this is a bug")
    order = np.asarray([pos[s] for s in ids])
    cols = {k: np.asarray(v)[order] for k, v in cur.items() if k not in ("sample_id", "embedding")}
    emb = np.asarray(cur["embedding"])[order]
    cols["loss_pre"] = np.asarray([pre_cache[s] for s in ids], dtype=np.float64)
    q_prompt = np.stack([cols[f"q_prompt_{d}"] for d in JUDGE_DIMENSIONS], axis=1)
    q_resp = np.stack([cols[f"q_response_{d}"] for d in JUDGE_DIMENSIONS], axis=1)
    _, cols["quality"] = aggregate_quality(q_prompt, q_resp)
    t_knn = time.time()
    knn_sim, nbr_idx, _ = knn_similarity(emb, k=cfg.diagnose.knn_k)
    cols["knn_sim"] = knn_sim
    cols["nbr_idx"] = nbr_idx
    t_knn = time.time() - t_knn
    counts = {
        "rows": len(rows), "pre_loss_computed": len(todo), "pre_loss_cached": len(rows) - len(todo),
        "missing_loss_cur": int(np.isnan(cols["loss_cur"]).sum()),
        "missing_quality": int(np.isnan(cols["quality"]).sum()),
        "truncated": int(np.asarray(cols["truncated"]).sum()),
        "seconds": {"pre": round(t_pre, 2), "current": round(t_cur, 2), "knn": round(t_knn, 3),
                    "total": round(time.time() - t0, 2)},
    }
    log.info("diagnosis: %d rows in %.1fs (pre %.1fs, current+judge %.1fs)", len(rows), time.time() - t0, t_pre, t_cur)
    return Diagnosis(ids, cols, emb, counts)

