"""Diagnosis stage: per-sample signals from the models themselves, shard by shard on a Ray Data actor pool.

- complexity: mean response-token NLL under the pre model (``loss_pre``) and the current model
  (``loss_cur``), prompt masked, padding never counted (``scoring.forward_scores``);
- diversity: mask-aware mean of the current model's last hidden states over the prompt tokens, taken
  from the same forward pass as ``loss_cur`` (causal attention makes them equal to a prompt-only
  pass); under the chat template only the positions of the sample's own instruction and input are
  pooled (``encode.encode_row``, ``Encoded.pool``: the template's shared system prompt would raise every
  similarity). The reference pools the raw ``instruction\\ninput`` text in a pass of its own. Each sample's
  k nearest neighbours by cosine similarity of these embeddings give ``knn_sim``;
- quality: the current model judges factuality, clarity and completeness of the prompt and of the
  response (6 judgements, :mod:`middo_ray.judge`), by token probabilities (``diagnose.judge_mode=prob``)
  or by generating and parsing a score (``generate``, the paper's way; an unparsed answer is missing);
- IFD (optional part of the quality axis): ``loss_cur`` over the loss of the same response tokens after
  an empty prompt, the empty-prompt variants scored in the same length-sorted batches as ``loss_cur``.

What ``round_<k>/diagnose/`` holds::

    signals/part-*.parquet     sample_id, ordinal (position in the dataset), loss_pre, loss_cur,
                               n_response_tokens, truncated, loss_empty, ifd, the 6 judgements q_*,
                               quality (a missing value is null)
    embeddings/part-*.parquet  sample_id, embedding (float32, the hidden size)
    neighbors/part-*.parquet   sample_id, knn_sim, nbr_ids (the k nearest, most similar first), nbr_sims
    stage.json                 counts (pre losses computed and reused, missing values, judge, IFD, kNN)

Each dataset shard is one unit of work (``middo_ray.shardmap``): an actor that loaded the models once
reads the shard, scores it in blocks of ``diagnose.rows_per_block`` rows (each tokenized once; the pre
loss, current loss, embedding, IFD and judge scores from the same blocks), and commits its signal and
embedding shards. Pre-model losses never change for a sample, and a sample that survives a round keeps
its shard (merge writes shard i of D_k from shard i of D_{k-1}), so the actor reads ``loss_pre`` from its
shard's signals of the previous round and scores only new samples with the pre model, which it loads
only when a shard has one. The kNN step then runs as one task over the embedding shards (exact blocked
search, a FAISS index, or the exact search sharded over many tasks: :mod:`middo_ray.neighbors`; memory
model in docs/knn.md) and writes neighbour shards aligned with the signal shards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from middo_ray import neighbors, storage
from middo_ray.config import DiagnoseConfig
from middo_ray.console import report_unit
from middo_ray.encode import empty_prompt_variant, encode_row
from middo_ray.judge import JUDGE_COLUMNS, judge_generate, judge_scores
from middo_ray.rundir import StageContext, StageResult, read_record
from middo_ray.schema import JUDGE_DIMENSIONS, TEXT_COLUMNS
from middo_ray.scoring import forward_scores, ifd_ratio
from middo_ray.shardmap import map_shards, node_pool, nodes_of
from middo_ray.signals.quality import aggregate_quality
from middo_ray.storage import ShardSet

log = logging.getLogger("middo")

INPUT_COLUMNS = ("sample_id",) + TEXT_COLUMNS
SIGNAL_FLOATS = ("loss_pre", "loss_cur", "loss_empty", "ifd") + JUDGE_COLUMNS + ("quality",)
COUNT_KEYS = ("rows", "pre_loss_computed", "pre_loss_cached", "missing_loss_cur", "missing_quality", "judgements",
              "missing_judgements", "ifd_missing", "ifd_above_1", "truncated", "input_tokens")


@dataclass
class DiagnosisOutput:
    """The diagnosis of one dataset: three shard sets aligned with its shards (same names, same rows)."""

    dataset: ShardSet
    signals: ShardSet
    embeddings: ShardSet
    neighbors: ShardSet

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """One shard's signals joined with its neighbours (``knn_sim``, ``nbr_ids``, ``nbr_sims``)."""
        sig = storage.read_table(self.signals.path(name), columns and ["sample_id"] + [
            c for c in columns if c not in ("knn_sim", "nbr_ids", "nbr_sims", "sample_id")])
        want = [c for c in ("knn_sim", "nbr_ids", "nbr_sims") if columns is None or c in columns]
        if want:
            nb = storage.read_table(self.neighbors.path(name), ["sample_id"] + want)
            if nb.column("sample_id") != sig.column("sample_id"):
                raise RuntimeError(f"diagnosis shard {name}: neighbours and signals are not aligned; rerun diagnose")
            for c in want:
                sig = sig.append_column(c, nb.column(c))
        return sig


# ---------------------------------------------------------------------------------------------
# The actor.

def _nulls(x: np.ndarray) -> pa.Array:
    """float64 values with NaN (a missing value) as null."""
    x = np.asarray(x, dtype=np.float64)
    return pa.array(np.where(np.isfinite(x), x, np.nan), type=pa.float64(), from_pandas=True)


class DiagnoseShards:
    """One actor per model replica: loads M_t (and lazily the pre model, unless it is M_t) once, then diagnoses
    shards."""

    def __init__(self, model: str, pre_model: str, dtype: str, template: str, cutoff_len: int, batch_tokens: int,
                 rows_per_block: int, judge: bool, judge_mode: str = "prob", ifd: bool = False,
                 judge_temperature: float = 0.1, judge_max_new_tokens: int = 8, seed: int = 0):
        from middo_ray.models import load_model, resolve_model, threads_for_actor

        threads_for_actor()
        self.model, self.tok = load_model(model, dtype)
        self.pre_spec, self.dtype = pre_model, dtype
        self.pre_model = self.pre_tok = None
        self.same_tok = True
        # The pre model is the current one (the audit diagnoses the base with itself): one checkpoint, loaded
        # once, and loss_pre is the loss_cur of the same pass rather than a second pass that differs by rounding.
        self.pre_is_current = resolve_model(pre_model) == resolve_model(model)
        self.template, self.cutoff, self.batch_tokens, self.block = template, cutoff_len, batch_tokens, rows_per_block
        self.judge, self.judge_mode, self.ifd = judge, judge_mode, ifd
        self.judge_temperature, self.judge_max_new_tokens, self.seed = judge_temperature, judge_max_new_tokens, seed

    def _load_pre(self) -> None:
        from middo_ray.models import load_model

        if self.pre_model is None:
            self.pre_model, self.pre_tok = load_model(self.pre_spec, self.dtype)
            self.same_tok = self.pre_tok.get_vocab() == self.tok.get_vocab()

    def process(self, unit: dict) -> dict:
        t0 = time.time()
        rows = [{c: (v if v is not None else "") for c, v in r.items()}
                for r in storage.read_table(unit["input"], INPUT_COLUMNS).to_pylist()]
        cached: dict[str, float] = {}
        if unit.get("previous") and storage.exists(unit["previous"]):
            prev = storage.read_table(unit["previous"], ["sample_id", "loss_pre"]).to_pylist()
            cached = {r["sample_id"]: r["loss_pre"] for r in prev if r["loss_pre"] is not None}
        blocks = []
        for s in range(0, len(rows), self.block):
            blocks.append(self._block(rows[s:s + self.block], cached))
            if s + self.block < len(rows):
                report_unit(unit, s + self.block)            # the console's progress within the shard
        cols = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]} if blocks else _empty_columns()
        emb = cols.pop("embedding")
        ids = [r["sample_id"] for r in rows]
        width = emb.shape[1] if emb.ndim == 2 else 0
        storage.write_table(unit["embeddings"], pa.table({
            "sample_id": pa.array(ids, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float32).ravel()), width)}))
        table = pa.table({"sample_id": pa.array(ids, pa.string()),
                          "ordinal": pa.array(unit["offset"] + np.arange(len(rows)), pa.int64()),
                          **{c: _nulls(cols[c]) for c in SIGNAL_FLOATS},
                          "n_response_tokens": pa.array(cols["n_response_tokens"], pa.int64()),
                          "truncated": pa.array(cols["truncated"], pa.bool_())})
        summary = self._summary(unit, cols, len(rows), int(cols["_computed"].sum()))
        summary["compute_seconds"] = round(time.time() - t0, 3)
        storage.write_table(unit["commit"], table, summary)
        return summary

    def _block(self, rows: list[dict], cached: dict[str, float]) -> dict[str, np.ndarray]:
        """Every signal of one block of rows, each row tokenized once."""
        n = len(rows)
        enc = [encode_row(r, self.tok, self.template, self.cutoff) for r in rows]
        extra = [empty_prompt_variant(e, r, self.tok, self.template) for e, r in zip(enc, rows)] if self.ifd else []
        s = forward_scores(self.model, enc + extra, self.tok.pad_token_id, self.batch_tokens, want_embedding=True)
        out = {"loss_cur": s.loss[:n], "n_response_tokens": s.n_tokens[:n],
               "truncated": np.asarray([e.truncated for e in enc], dtype=bool),
               "embedding": s.embedding[:n].astype(np.float32),
               "_input_tokens": np.asarray([len(e.input_ids) for e in enc], dtype=np.int64)}
        if self.ifd:
            out["loss_empty"] = s.loss[n:]
            out["ifd"] = ifd_ratio(s.loss[:n], s.loss[n:])
        else:
            out["loss_empty"] = out["ifd"] = np.full(n, np.nan)
        need = np.asarray([r["sample_id"] not in cached for r in rows], dtype=bool)
        loss_pre = np.asarray([cached.get(r["sample_id"], np.nan) for r in rows], dtype=np.float64)
        if need.any() and self.pre_is_current:
            loss_pre[need] = out["loss_cur"][need]
        elif need.any():
            self._load_pre()
            idx = np.flatnonzero(need)
            pre_enc = [enc[i] for i in idx] if self.same_tok else \
                [encode_row(rows[i], self.pre_tok, self.template, self.cutoff) for i in idx]
            loss_pre[idx] = forward_scores(self.pre_model, pre_enc, self.pre_tok.pad_token_id, self.batch_tokens).loss
        out["loss_pre"], out["_computed"] = loss_pre, need
        q = self._judge(rows)
        for j, col in enumerate(JUDGE_COLUMNS):
            out[col] = q[:, j]
        out["quality"] = aggregate_quality(q[:, :3], q[:, 3:])[1]
        return out

    def _judge(self, rows: list[dict]) -> np.ndarray:
        if not self.judge:
            return np.full((len(rows), 6), np.nan)
        if self.judge_mode == "generate":
            return judge_generate(self.model, self.tok, rows, self.template, self.cutoff, self.batch_tokens,
                                  self.judge_temperature, self.judge_max_new_tokens, self.seed)
        return judge_scores(self.model, self.tok, rows, self.template, self.cutoff, self.batch_tokens)

    def _summary(self, unit: dict, cols: dict, n: int, computed: int) -> dict:
        judged = np.stack([cols[c] for c in JUDGE_COLUMNS], axis=1) if n else np.zeros((0, 6))
        return {"unit": unit["id"], "rows": n, "pre_loss_computed": computed, "pre_loss_cached": n - computed,
                "missing_loss_cur": int(np.isnan(cols["loss_cur"]).sum()),
                "missing_quality": int(np.isnan(cols["quality"]).sum()),
                "judgements": int(judged.size) if self.judge else 0,
                "missing_judgements": int(np.isnan(judged).sum()) if self.judge else 0,
                "ifd_missing": int(np.isnan(cols["ifd"]).sum()) if self.ifd else 0,
                "ifd_above_1": int(np.nansum(cols["ifd"] > 1)) if self.ifd else 0,
                "truncated": int(cols["truncated"].sum()), "input_tokens": int(cols["_input_tokens"].sum())}


def _empty_columns() -> dict[str, np.ndarray]:
    cols = {c: np.zeros(0) for c in SIGNAL_FLOATS}
    cols.update(n_response_tokens=np.zeros(0, np.int64), truncated=np.zeros(0, bool), _computed=np.zeros(0, bool),
                _input_tokens=np.zeros(0, np.int64), embedding=np.zeros((0, 0), np.float32))
    return cols


# ---------------------------------------------------------------------------------------------
# The stage.

def _units(ctx: StageContext, dataset: ShardSet, previous: "DiagnosisOutput | None") -> list[dict]:
    units = []
    for name, rows, offset in zip(dataset.names, dataset.rows, dataset.offsets()):
        prev = previous.signals.path(name) if previous is not None and name in previous.signals.names else None
        units.append({"id": name, "rows": rows, "offset": offset, "input": dataset.path(name), "previous": prev,
                      "embeddings": ctx.path("embeddings", name), "commit": ctx.path("signals", name)})
    return units


def _worker_kwargs(ctx: StageContext, cfg: DiagnoseConfig, model: str) -> dict:
    c = ctx.cfg
    return {"model": model, "pre_model": c.model.pre or c.model.base, "dtype": c.model.dtype,
            "template": c.data.template, "cutoff_len": c.data.cutoff_len, "batch_tokens": cfg.batch_tokens,
            "rows_per_block": cfg.rows_per_block, "judge": cfg.judge, "judge_mode": cfg.judge_mode, "ifd": cfg.ifd,
            "judge_temperature": cfg.judge_temperature, "judge_max_new_tokens": cfg.judge_max_new_tokens,
            "seed": ctx.seed}


def run(ctx: StageContext, cfg: DiagnoseConfig, inputs: dict) -> StageResult:
    """Diagnoses ``inputs["dataset"]`` (a ShardSet) with ``inputs["model"]`` (M_t) as the current model.

    ``inputs["previous"]`` (the previous round's DiagnosisOutput, optional) supplies the pre-model losses of
    the samples it already scored.
    """
    t0 = time.time()
    dataset: ShardSet = inputs["dataset"]
    summaries = map_shards(_units(ctx, dataset, inputs.get("previous")), DiagnoseShards,
                           _worker_kwargs(ctx, cfg, inputs["model"]), what="diagnose",
                           actors=node_pool(cfg.num_actors, cfg.cpus_per_actor, ctx.cfg.gpu_worker_share))
    t_pass = time.time() - t0
    signals = ShardSet(ctx.path("signals"), dataset.names, dataset.rows).save()
    embeddings = ShardSet(ctx.path("embeddings"), dataset.names, dataset.rows).save()
    width = _width(embeddings)
    t1 = time.time()
    knn = neighbors.run(embeddings, ctx.path("neighbors"), width, cfg.knn_k, cfg.knn_method, cfg.knn_exact_max_n,
                        ctx.seed, cfg.cpus_per_actor, cfg.knn_task_memory_gb) if dataset.total else {"method": "none"}
    nbrs = ShardSet(ctx.path("neighbors"), dataset.names, dataset.rows).save()
    totals = {k: sum(int(s.get(k, 0)) for s in summaries) for k in COUNT_KEYS}
    info = {**{k: totals[k] for k in ("rows", "pre_loss_computed", "pre_loss_cached", "missing_loss_cur",
                                      "missing_quality", "truncated", "input_tokens")},
            "judge": {"enabled": cfg.judge, "mode": cfg.judge_mode, "judgements": totals["judgements"],
                      "missing_judgements": totals["missing_judgements"]},
            "ifd": {"enabled": cfg.ifd, "missing": totals["ifd_missing"] if cfg.ifd else None,
                    "above_1": totals["ifd_above_1"] if cfg.ifd else None},
            "knn": knn, "hidden_size": width, "nodes": nodes_of(summaries),
            "seconds": {"pass": round(t_pass, 2), "knn": round(time.time() - t1, 3), "total": round(time.time() - t0, 2),
                        "units": round(sum(float(s.get("compute_seconds", 0)) for s in summaries), 2)},
            "shards": {"dataset": dataset.to_json(), "signals": signals.to_json(), "embeddings": embeddings.to_json(),
                       "neighbors": nbrs.to_json()}}
    log.debug("diagnose: %d rows in %.1fs (model pass %.1fs, kNN %s %.2fs)", totals["rows"], time.time() - t0, t_pass,
             knn.get("method"), info["seconds"]["knn"])
    return StageResult(info, _output(info))


def _width(embeddings: ShardSet) -> int:
    for name, n in zip(embeddings.names, embeddings.rows):
        if n:
            return int(storage.read_schema(embeddings.path(name)).field("embedding").type.list_size)
    return 0


def _output(info: dict) -> DiagnosisOutput:
    sh = info["shards"]
    return DiagnosisOutput(*(ShardSet.from_json(sh[k]) for k in ("dataset", "signals", "embeddings", "neighbors")))


def load(stage_dir: str) -> StageResult:
    info = read_record(stage_dir)
    return StageResult(info, _output(info))


# ---------------------------------------------------------------------------------------------
# Rows in memory (tests, benchmarks, the audit).

@dataclass
class Diagnosis:
    """Signals of rows held in memory, aligned with the rows' order (joined by sample_id)."""

    sample_ids: list[str]
    columns: dict[str, np.ndarray]
    embeddings: np.ndarray
    counts: dict
    output: DiagnosisOutput | None = None


def collect(out: DiagnosisOutput) -> Diagnosis:
    """Every shard's signals, neighbours (also as row positions, ``nbr_idx``) and embeddings, in order."""
    tables = [out.table(name) for name in out.signals.names]
    table = pa.concat_tables(tables) if tables else None
    ids = table.column("sample_id").to_pylist() if table is not None else []
    pos = {s: i for i, s in enumerate(ids)}
    cols: dict[str, np.ndarray] = {}
    if table is not None:
        for c in SIGNAL_FLOATS + ("knn_sim",):
            cols[c] = table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
        cols["n_response_tokens"] = table.column("n_response_tokens").to_numpy()
        cols["truncated"] = table.column("truncated").to_numpy(zero_copy_only=False).astype(bool)
        cols["nbr_idx"] = np.asarray([[pos[j] if j is not None else -1 for j in row]
                                      for row in table.column("nbr_ids").to_pylist()], dtype=np.int64)
    emb, emb_ids = neighbors.read_embeddings(out.embeddings.paths())
    if emb_ids.to_pylist() != ids:
        raise RuntimeError("diagnosis embeddings are not aligned with the signals; rerun diagnose")
    return Diagnosis(ids, cols, emb, {}, out)


def run_diagnosis(rows: list[dict], cfg, current_model: str, work_dir: str | None = None,
                  previous: DiagnosisOutput | None = None) -> Diagnosis:
    """Diagnoses rows held in memory: writes them as shards (``data.rows_per_shard``) under ``work_dir`` (a
    temporary directory by default), runs the stage there and reads every signal back in row order."""
    import tempfile

    from middo_ray.io.write import write_shards

    ids = [r["sample_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("diagnosis input has duplicate sample_ids; merge must deduplicate by id")
    root = work_dir or tempfile.mkdtemp(prefix="middo_diagnose_")
    dataset = write_shards(rows, storage.join(root, "dataset"), cfg.data.rows_per_shard)
    stage_dir = storage.join(root, "diagnose")
    storage.makedirs(stage_dir)
    ctx = StageContext(cfg, stage_dir, 1, root)
    result = run(ctx, cfg.diagnose, {"dataset": dataset, "model": current_model, "previous": previous})
    diag = collect(result.output)
    diag.counts = result.info
    if diag.sample_ids != ids:
        raise RuntimeError("diagnosis lost or reordered samples; this is a bug")
    return diag


__all__ = ["DiagnoseShards", "Diagnosis", "DiagnosisOutput", "JUDGE_DIMENSIONS", "collect", "load", "run",
           "run_diagnosis"]
