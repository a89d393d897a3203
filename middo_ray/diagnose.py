"""Diagnosis stage: per-sample signals from the models themselves, on Ray Data actor pools.

- complexity: mean response-token NLL under the pre model (``loss_pre``) and the current model
  (``loss_cur``), prompt masked, padding never counted (``scoring.forward_scores``);
- diversity: mask-aware mean of the current model's last hidden states over the prompt tokens, taken
  from the same forward pass as ``loss_cur`` (causal attention makes them equal to a prompt-only
  pass). Note: the reference pools the raw ``instruction\\ninput`` text without a template; we pool the
  templated prompt, which the pass already has;
- quality: the current model judges factuality, clarity and completeness of the prompt and of the
  response (6 judgements), in one of two modes (``diagnose.judge_mode``):
  ``prob`` (default): the expected 0-10 score under the model's distribution of the answer token after
  the judge prompt, one forward pass, no generation or parsing; the three judgements of a target share
  their body (task + sample), computed once and reused through the KV cache;
  ``generate``: the paper's way, generate at temperature 0.1 and parse a leading 0-10 number; answers
  without one are missing (NaN), never 0;
- IFD (optional part of the quality axis): ``loss_cur`` over the loss of the same response tokens after
  an empty prompt (Cherry LLM's instruction-following difficulty), the empty-prompt variants scored in
  the same length-sorted batches as ``loss_cur``.

Each actor loads its models once and receives blocks of rows, each read and tokenized once; it returns
``sample_id`` plus signal columns, and the driver joins them by ``sample_id``. Pre-model losses never
change for a sample, so they are cached by id across rounds and only uncached rows are scored with the
pre model. kNN runs on the driver (exact blocked, or FAISS for large N; ``signals.diversity``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from middo_ray.config import MiddoConfig
from middo_ray.encode import encode_row
from middo_ray.judge import JUDGE_COLUMNS, judge_generate, judge_scores
from middo_ray.schema import JUDGE_DIMENSIONS, TEXT_COLUMNS, require_columns
from middo_ray.scoring import forward_scores
from middo_ray.signals.quality import aggregate_quality

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("sample_id",) + TEXT_COLUMNS


def _rows(batch: dict) -> list[dict]:
    n = len(batch["sample_id"])
    return [{c: (batch[c][i] if batch[c][i] is not None else "") for c in INPUT_COLUMNS} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Ray Data actor class (stage adapter).

class DiagnosisScorer:
    """One actor per model replica: reads each block once and computes every per-sample signal.

    - ``loss_cur``, the prompt embedding (same pass) and, when enabled, the IFD denominator (the
      empty-prompt variants run in the same length-sorted batches) under the current model;
    - ``loss_pre`` under the pre model, only for rows whose ``need_pre`` is set (the driver caches it
      by id across rounds); the pre model is not loaded at all when no row needs it;
    - the six judge scores under the current model (probability-weighted or generated).
    """

    def __init__(self, model: str, pre_model: str | None, dtype: str, template: str, cutoff_len: int,
                 batch_tokens: int, judge: bool, judge_mode: str = "prob", ifd: bool = False,
                 judge_temperature: float = 0.1, judge_max_new_tokens: int = 8, seed: int = 0):
        from middo_ray.models import load_model, threads_for_actor

        threads_for_actor()
        self.model, self.tok = load_model(model, dtype)
        self.pre_model, self.pre_tok, self.same_tok = None, None, True
        if pre_model is not None:
            self.pre_model, self.pre_tok = load_model(pre_model, dtype)
            self.same_tok = self.pre_tok.get_vocab() == self.tok.get_vocab()
        self.template, self.cutoff, self.batch_tokens = template, cutoff_len, batch_tokens
        self.judge, self.judge_mode, self.ifd = judge, judge_mode, ifd
        self.judge_temperature, self.judge_max_new_tokens, self.seed = judge_temperature, judge_max_new_tokens, seed

    def __call__(self, batch: dict) -> dict:
        from middo_ray.encode import empty_prompt_variant

        require_columns("diagnose", batch.keys(), INPUT_COLUMNS)
        rows = _rows(batch)
        n = len(rows)
        enc = [encode_row(r, self.tok, self.template, self.cutoff) for r in rows]
        extra = [empty_prompt_variant(e, r, self.tok, self.template) for e, r in zip(enc, rows)] if self.ifd else []
        s = forward_scores(self.model, enc + extra, self.tok.pad_token_id, self.batch_tokens, want_embedding=True)
        out = {
            "sample_id": np.asarray(batch["sample_id"]),
            "loss_cur": s.loss[:n],
            "n_response_tokens": s.n_tokens[:n],
            "truncated": np.asarray([e.truncated for e in enc]),
            "embedding": s.embedding[:n].astype(np.float32),
        }
        if self.ifd:
            out["loss_empty"] = s.loss[n:]
            with np.errstate(invalid="ignore", divide="ignore"):
                out["ifd"] = np.where(s.loss[n:] > 0, s.loss[:n] / s.loss[n:], np.nan)
        else:
            out["loss_empty"] = out["ifd"] = np.full(n, np.nan)
        need = np.asarray(batch.get("need_pre", np.ones(n, bool)), dtype=bool)
        loss_pre = np.full(n, np.nan)
        if self.pre_model is not None and need.any():
            idx = np.flatnonzero(need)
            pre_enc = [enc[i] for i in idx] if self.same_tok else \
                [encode_row(rows[i], self.pre_tok, self.template, self.cutoff) for i in idx]
            loss_pre[idx] = forward_scores(self.pre_model, pre_enc, self.pre_tok.pad_token_id, self.batch_tokens).loss
        out["loss_pre"] = loss_pre
        if not self.judge:
            q = np.full((n, 6), np.nan)
        elif self.judge_mode == "generate":
            q = judge_generate(self.model, self.tok, rows, self.template, self.cutoff, self.batch_tokens,
                               self.judge_temperature, self.judge_max_new_tokens, self.seed)
        else:
            q = judge_scores(self.model, self.tok, rows, self.template, self.cutoff, self.batch_tokens)
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


def pool_options(cfg: MiddoConfig) -> dict:
    """Actor-pool size and resources from the cluster.

    GPUs present: one actor per GPU (``num_gpus=1``). CPU only: one actor per alive node, spread over
    the nodes, each using all of its node's cores through torch threads (``threads_for_actor``). The
    CPU reservation is fractional (``diagnose.cpus_per_actor``): a whole-CPU actor pool next to Ray
    Data's read tasks stalls on 2-CPU machines. ``diagnose.num_actors`` overrides the count.
    """
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus > 0:
        return {"concurrency": cfg.diagnose.num_actors or gpus, "num_gpus": 1}
    nodes = [nd for nd in ray.nodes() if nd.get("Alive") and nd.get("Resources", {}).get("CPU", 0) > 0]
    n = cfg.diagnose.num_actors or max(1, len(nodes))
    opts: dict = {"concurrency": n, "num_cpus": cfg.diagnose.cpus_per_actor}
    if n > 1:
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def _run_scorer(rows: list[dict], need_pre: list[bool], ctor_kwargs: dict, cfg: MiddoConfig) -> dict[str, np.ndarray]:
    import ray

    items = [{**{c: r.get(c) or "" for c in INPUT_COLUMNS}, "need_pre": bool(p)} for r, p in zip(rows, need_pre)]
    ds = ray.data.from_items(items)
    out = ds.map_batches(DiagnosisScorer, fn_constructor_kwargs=ctor_kwargs, batch_size=cfg.diagnose.rows_per_block,
                         batch_format="numpy", **pool_options(cfg))
    blocks = list(out.iter_batches(batch_size=None, batch_format="numpy"))
    if not blocks:
        return {}
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def run_diagnosis(rows: list[dict], cfg: MiddoConfig, current_model: str,
                  pre_cache: dict[str, float] | None = None) -> Diagnosis:
    """Computes every signal for ``rows``; ``pre_cache`` (sample_id -> loss_pre) is read and extended.

    One pass over the data: each block is read and tokenized once, and the actor computes the
    pre-model loss (only for ids not cached), the current-model loss, embedding, IFD and judge scores.
    """
    from middo_ray.signals.knn import knn_search

    t0 = time.time()
    dcfg = cfg.diagnose
    pre_cache = {} if pre_cache is None else pre_cache
    ids = [r["sample_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("diagnosis input has duplicate sample_ids; merge must deduplicate by id")
    need = [s not in pre_cache for s in ids]
    kwargs = {"model": current_model, "pre_model": (cfg.model.pre or cfg.model.base) if any(need) else None,
              "dtype": cfg.model.dtype, "template": cfg.data.template, "cutoff_len": cfg.data.cutoff_len,
              "batch_tokens": dcfg.batch_tokens, "judge": dcfg.judge, "judge_mode": dcfg.judge_mode,
              "ifd": dcfg.ifd, "judge_temperature": dcfg.judge_temperature,
              "judge_max_new_tokens": dcfg.judge_max_new_tokens, "seed": cfg.run.seed}
    t_pass = time.time()
    cur = _run_scorer(rows, need, kwargs, cfg) if rows else {}
    t_pass = time.time() - t_pass
    pos = {str(s): i for i, s in enumerate(cur.get("sample_id", []))}
    missing = [s for s in ids if s not in pos]
    if missing:
        raise RuntimeError(f"diagnosis lost {len(missing)} samples (e.g. {missing[:3]}); this is a bug")
    order = np.asarray([pos[s] for s in ids], dtype=np.int64)
    for s, i, p in zip(ids, order, need):
        if p:
            pre_cache[s] = float(cur["loss_pre"][i])
    cols = {k: np.asarray(v)[order] for k, v in cur.items() if k not in ("sample_id", "embedding")}
    emb = np.asarray(cur["embedding"])[order] if rows else np.zeros((0, 0), np.float32)
    cols["loss_pre"] = np.asarray([pre_cache[s] for s in ids], dtype=np.float64)
    q_prompt = np.stack([cols[f"q_prompt_{d}"] for d in JUDGE_DIMENSIONS], axis=1) if rows else np.zeros((0, 3))
    q_resp = np.stack([cols[f"q_response_{d}"] for d in JUDGE_DIMENSIONS], axis=1) if rows else np.zeros((0, 3))
    _, cols["quality"] = aggregate_quality(q_prompt, q_resp)
    t_knn = time.time()
    knn = knn_search(emb, k=dcfg.knn_k, method=dcfg.knn_method, exact_max_n=dcfg.knn_exact_max_n, seed=cfg.run.seed)
    cols["knn_sim"] = knn.avg_sim
    cols["nbr_idx"] = knn.nbr_idx
    t_knn = time.time() - t_knn
    judged = np.stack([cols[c] for c in JUDGE_COLUMNS], axis=1) if rows else np.zeros((0, 6))
    counts = {
        "rows": len(rows), "pre_loss_computed": int(sum(need)), "pre_loss_cached": len(rows) - int(sum(need)),
        "missing_loss_cur": int(np.isnan(cols.get("loss_cur", np.zeros(0))).sum()),
        "missing_quality": int(np.isnan(cols["quality"]).sum()),
        "judge": {"enabled": dcfg.judge, "mode": dcfg.judge_mode,
                  "judgements": int(judged.size) if dcfg.judge else 0,
                  "missing_judgements": int(np.isnan(judged).sum()) if dcfg.judge else 0},
        "ifd": {"enabled": dcfg.ifd, "missing": int(np.isnan(cols.get("ifd", np.zeros(0))).sum()) if dcfg.ifd else None,
                "above_1": int(np.nansum(cols.get("ifd", np.zeros(0)) > 1)) if dcfg.ifd else None},
        "truncated": int(np.asarray(cols.get("truncated", np.zeros(0))).sum()),
        "knn": knn.info,
        "seconds": {"pass": round(t_pass, 2), "knn": round(t_knn, 3), "total": round(time.time() - t0, 2)},
    }
    log.info("diagnosis: %d rows in %.1fs (model pass %.1fs, kNN %s %.2fs)", len(rows), time.time() - t0, t_pass,
             knn.info.get("method"), t_knn)
    return Diagnosis(ids, cols, emb, counts)
