"""Running the evaluation: one actor class answers every item, Ray Data spreads the items over actors.

Pipeline (:func:`evaluate_on_ray`): the held-out rows are read from their Parquet shards by Ray Data, the
benchmark items (the ``eval.mc_path`` set and every enabled suite, bounded by their subset sizes, not by
the dataset) are built by the driver and sorted by suite and prompt length; both go to
``map_batches(EvalWorker)`` on an actor pool (one GPU per actor where the cluster has GPUs, else a
fractional CPU), so each actor loads the model once. A second ``map_batches`` (tasks) scores the answers;
for code benchmarks that runs the programs in sandboxed subprocesses (:mod:`middo_ray.evalsuite.code`).
The held-out loss comes from Ray Data sums over the loss records; only the benchmark records reach the
driver, which writes them to ``predictions.jsonl`` and aggregates the flat metrics dict.

Inside an actor, items of one suite are answered together:

- ``loss``: a forward pass gives each held-out row's summed response NLL and token count (token-weighted
  mean over all rows, as :func:`middo_ray.evalsuite.scoring.heldout_loss`);
- ``mc``: every option is scored as the response under the training template
  (:func:`middo_ray.evalsuite.scoring.mc_choice_scores`), shots as earlier turns;
- ``gen``: greedy decoding with transformers in length-sorted batches of ``eval.gen_batch_size``, left
  padded, up to the suite's ``max_new_tokens``, stopped at the EOS or at the template's next turn.

Few-shot examples are earlier turns of the conversation (``history``), the same format training uses
for multi-turn rows; when the prompt exceeds ``eval.max_prompt_tokens`` the last shots are dropped
until it fits (the count used is recorded per item).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from middo_ray.encode import encode_row
from middo_ray.evalsuite.benchmarks import LEGACY_MC, score_item, suite_items
from middo_ray.evalsuite.scoring import load_mc_items, mc_choice_scores, resolve_mc_path

if TYPE_CHECKING:
    from middo_ray.config import MiddoConfig

log = logging.getLogger(__name__)

HELDOUT = "heldout"
_ROW_KEYS = ("instruction", "input", "output", "system", "history")


# ---------------------------------------------------------------------------------------------
# Items.

def heldout_item(r: dict, i: int) -> dict:
    """The loss item of one held-out row."""
    row = {k: r[k] for k in _ROW_KEYS if r.get(k) is not None}
    return {"suite": HELDOUT, "kind": "loss", "uid": f"{HELDOUT}/{r.get('sample_id', i)}", "row": row}


def build_items(heldout_rows: list[dict], cfg: MiddoConfig) -> list[dict]:
    """Every item of one evaluation: held-out rows, the eval.mc_path set, and the enabled suites."""
    return [heldout_item(r, i) for i, r in enumerate(heldout_rows)] + bench_items(cfg)


def bench_items(cfg: MiddoConfig) -> list[dict]:
    """The benchmark items: the eval.mc_path set and the enabled suites (bounded by their limits)."""
    items: list[dict] = []
    mc_file = resolve_mc_path(cfg.eval.mc_path)
    if mc_file is not None:
        for i, it in enumerate(load_mc_items(mc_file, cfg.eval.mc_limit)):
            items.append({"suite": LEGACY_MC, "kind": "mc", "uid": f"{LEGACY_MC}/{i}",
                          "row": {"instruction": it["query"]}, "choices": it["choices"], "gold": it["gold"],
                          "shots": []})
    for name, suite in cfg.eval.suites.enabled().items():
        items.extend(suite_items(name, cfg.eval.suite_file(name), cfg.eval.shots_file(name), suite.few_shot,
                                 suite.max_new_tokens, suite.limit, cfg.eval.seed))
    return items


def _length_key(item: dict) -> tuple[str, int]:
    """Sort key: suite, then the characters of the prompt (a cheap proxy of its tokens)."""
    row = item["row"]
    chars = sum(len(str(row.get(k, ""))) for k in _ROW_KEYS)
    chars += sum(len(q) + len(a) for q, a in item.get("shots", []))
    return item["suite"], chars


# ---------------------------------------------------------------------------------------------
# Prompts and generation.

def stop_strings(template: str) -> list[str]:
    """Text that ends an answer besides the EOS: the next user turn of the 'default' template."""
    return ["Human:"] if template == "default" else []


def prompt_ids(row: dict, tokenizer, template: str) -> list[int]:
    """Token ids of everything before the response, exactly as training encodes them (BOS included)."""
    enc = encode_row(row, tokenizer, template, cutoff_len=1 << 30, response="")
    return enc.input_ids[: enc.prompt_len]


def fit_shots(row: dict, shots: list[list[str]], tokenizer, template: str, budget: int
              ) -> tuple[dict, list[int], int]:
    """The row with as many leading shots as fit ``budget`` tokens, its prompt ids, and the count kept.

    Without any shot a prompt over the budget keeps its last ``budget`` tokens (the question sits at the end).
    """
    for k in range(len(shots), -1, -1):
        r = {**row, "history": json.dumps(shots[:k])} if k else dict(row)
        ids = prompt_ids(r, tokenizer, template)
        if len(ids) <= budget:
            return r, ids, k
    return r, ids[-budget:], 0


def generate_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop: list[str],
                    batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id prompts, batched by similar length with left padding.

    Each answer is cut at the first stop string; special tokens are dropped from the text.
    """
    import torch

    from middo_ray.scoring import length_batches

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    texts = [""] * len(prompts)
    lengths = [len(p) for p in prompts]
    for batch in length_batches(lengths, batch_tokens=1 << 40, max_rows=batch_size):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, width - lengths[i]:] = torch.tensor(prompts[i])
            att[r, width - lengths[i]:] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=pad, eos_token_id=sorted(e for e in eos if e is not None),
                                 stop_strings=stop or None, tokenizer=tokenizer if stop else None)
        for r, i in enumerate(batch):
            text = tokenizer.decode(out[r, width:].tolist(), skip_special_tokens=True)
            for s in stop:
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
            texts[i] = text
    return texts


# ---------------------------------------------------------------------------------------------
# The actor.

class EvalWorker:
    """Ray Data actor: loads the model once and answers blocks of items (``item`` column, JSON)."""

    def __init__(self, model: str, dtype: str = "auto", template: str = "default", cutoff_len: int = 512,
                 batch_tokens: int = 4096, gen_batch_size: int = 16, max_prompt_tokens: int = 1536):
        from middo_ray.models import load_model, threads_for_actor

        threads_for_actor()
        self.model, self.tok = load_model(model, dtype)
        self.template, self.cutoff, self.batch_tokens = template, cutoff_len, batch_tokens
        self.gen_batch_size, self.max_prompt = gen_batch_size, max_prompt_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "item" not in batch:
            raise ValueError(f"evaluation actor needs an 'item' column (JSON items); got {sorted(batch)}")
        records = self.answer([json.loads(s) for s in batch["item"]])
        return {"record": np.asarray([json.dumps(r) for r in records], dtype=object)}

    def answer(self, items: list[dict]) -> list[dict]:
        """Answers items in any mix of suites; returns records in the same order."""
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            groups[(it["suite"], it["kind"])].append(i)
        records: list[dict] = [dict(it) for it in items]
        for (suite, kind), idx in groups.items():
            t0 = time.time()
            group = [records[i] for i in idx]
            if kind == "loss":
                self._loss(group)
            elif kind == "mc":
                self._mc(group, legacy=suite == LEGACY_MC)
            elif kind == "gen":
                self._gen(group)
            else:
                raise ValueError(f"unknown evaluation item kind '{kind}' (suite {suite})")
            per_item = (time.time() - t0) / len(group)
            for rec in group:
                rec["seconds"] = per_item
        return records

    def _loss(self, group: list[dict]) -> None:
        from middo_ray.scoring import forward_scores

        enc = [encode_row(rec["row"], self.tok, self.template, self.cutoff) for rec in group]
        fs = forward_scores(self.model, enc, self.tok.pad_token_id, self.batch_tokens)
        for rec, loss, n in zip(group, fs.loss, fs.n_tokens):
            ok = n > 0 and np.isfinite(loss)
            rec["loss_sum"] = float(loss * n) if ok else 0.0
            rec["loss_tokens"] = int(n) if ok else 0

    def _mc(self, group: list[dict], legacy: bool) -> None:
        questions = []
        for rec in group:
            row, _, k = fit_shots(rec["row"], rec.get("shots", []), self.tok, self.template, self.max_prompt)
            rec["shots_used"] = k
            questions.append({"query": row["instruction"], "history": row.get("history"), "choices": rec["choices"],
                              "gold": rec["gold"]})
        # The legacy set keeps the training cutoff (its numbers stay comparable with earlier runs).
        cutoff = self.cutoff if legacy else self.max_prompt + 256
        scores = mc_choice_scores(self.model, self.tok, questions, self.template, cutoff, self.batch_tokens)
        for rec, s in zip(group, scores):
            rec["scores"] = [float(x) for x in s]

    def _gen(self, group: list[dict]) -> None:
        prompts = []
        for rec in group:
            room = max(16, self.max_prompt)
            _, ids, k = fit_shots(rec["row"], rec.get("shots", []), self.tok, self.template, room)
            rec["shots_used"] = k
            prompts.append(ids)
        by_cap: dict[int, list[int]] = defaultdict(list)
        for i, rec in enumerate(group):
            by_cap[int(rec["max_new_tokens"])].append(i)
        for cap, idx in by_cap.items():
            outs = generate_greedy(self.model, self.tok, [prompts[i] for i in idx], cap, stop_strings(self.template),
                                   self.gen_batch_size)
            for i, text in zip(idx, outs):
                group[i]["output"] = text


def worker_kwargs(model: str, cfg: MiddoConfig) -> dict[str, Any]:
    return {"model": model, "dtype": cfg.model.dtype, "template": cfg.data.template,
            "cutoff_len": cfg.data.cutoff_len, "batch_tokens": cfg.diagnose.batch_tokens,
            "gen_batch_size": cfg.eval.gen_batch_size, "max_prompt_tokens": cfg.eval.max_prompt_tokens}


# ---------------------------------------------------------------------------------------------
# Scoring and aggregation.

def score_records(records: list[dict], timeout_s: float = 10.0, memory_mb: int = 1024) -> list[dict]:
    """Adds ``score`` (0/1), ``extracted`` and ``detail`` to answered records (code runs here)."""
    for rec in records:
        if rec["kind"] == "loss":
            continue
        t0 = time.time()
        rec["score"], rec["extracted"], rec["detail"] = score_item(rec, timeout_s, memory_mb)
        rec["seconds"] = rec.get("seconds", 0.0) + (time.time() - t0)
    return records


def score_batch(batch: dict[str, np.ndarray], timeout_s: float, memory_mb: int) -> dict[str, np.ndarray]:
    """Ray Data task: :func:`score_records` over a block of ``record`` JSON strings."""
    records = score_records([json.loads(s) for s in batch["record"]], timeout_s, memory_mb)
    return {"record": np.asarray([json.dumps(r) for r in records], dtype=object)}


def aggregate(records: list[dict], cfg: MiddoConfig, seconds: float,
              heldout: tuple[int, float, int] | None = None) -> dict[str, Any]:
    """The flat metrics dict: held-out loss, mc accuracy, one score, count and seconds per suite, average.

    ``heldout`` (rows, summed NLL, tokens) replaces the held-out records when the sums were taken elsewhere.
    """
    by_suite: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_suite[rec["suite"]].append(rec)
    if heldout is None:
        held = by_suite.get(HELDOUT, [])
        heldout = (len(held), sum(r["loss_sum"] for r in held), sum(r["loss_tokens"] for r in held))
    n_held, loss_sum, tokens = heldout
    out: dict[str, Any] = {"heldout_loss": (loss_sum / tokens) if tokens else None, "heldout_n": n_held,
                           "heldout_tokens": tokens}
    mc = by_suite.get(LEGACY_MC, [])
    out["mc_accuracy"] = float(np.mean([r["score"] for r in mc])) if mc else None
    out["mc_n"] = len(mc)
    suite_scores = []
    for name in cfg.eval.suites.enabled():
        recs = by_suite.get(name, [])
        value = float(np.mean([r["score"] for r in recs])) if recs else None
        out[name] = value
        out[f"{name}_n"] = len(recs)
        out[f"{name}_seconds"] = round(sum(r.get("seconds", 0.0) for r in recs), 3)
        if value is not None:
            suite_scores.append(value)
    if cfg.eval.suites.enabled():
        out["average"] = float(np.mean(suite_scores)) if suite_scores else None
    out["seconds"] = seconds
    return out


def write_predictions(records: list[dict], path: Path) -> None:
    """One JSON line per scored item (suite, uid, score, extracted answer, output), for inspection."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = ("suite", "uid", "score", "extracted", "gold", "output", "scores", "shots_used", "detail", "subject")
    with open(path, "w", encoding="utf-8") as fh:
        for rec in sorted(records, key=lambda r: (r["suite"], r["uid"])):
            if rec["kind"] == "loss":
                continue
            fh.write(json.dumps({k: rec[k] for k in keep if k in rec}) + "\n")


# ---------------------------------------------------------------------------------------------
# Entry points.

def evaluate_local(model: str, heldout_rows: list[dict], cfg: MiddoConfig) -> tuple[dict[str, Any], list[dict]]:
    """Everything in this process (no Ray): the same worker and scorers as :func:`evaluate_on_ray`."""
    t0 = time.time()
    items = build_items(heldout_rows, cfg)   # fails on a bad file before the model loads
    records: list[dict] = []
    if items:
        worker = EvalWorker(**worker_kwargs(model, cfg))
        records = score_records(worker.answer(sorted(items, key=_length_key)), cfg.eval.code_timeout_s,
                                cfg.eval.code_memory_mb)
    return aggregate(records, cfg, time.time() - t0), records


def _pool_options(cfg: MiddoConfig) -> dict[str, Any]:
    """One actor per GPU where the cluster has GPUs, else ``eval.num_actors`` fractional-CPU actors."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus > 0:
        share = cfg.gpu_worker_share       # a whole GPU, or the rest of a sleeping teacher's
        return {"compute": ray.data.ActorPoolStrategy(size=cfg.eval.num_actors or int(gpus / share)),
                "num_gpus": share}
    # Fractional CPUs: a whole-CPU actor pool next to other stages stalls on 2-CPU machines.
    return {"compute": ray.data.ActorPoolStrategy(size=cfg.eval.num_actors or 1),
            "num_cpus": cfg.eval.cpus_per_actor}


def _to_items(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: held-out rows (text columns) to loss items."""
    rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["sample_id"]))]
    return {"item": np.asarray([json.dumps(heldout_item(r, i)) for i, r in enumerate(rows)], dtype=object)}


def _split_record(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: scored records with the columns the driver aggregates by."""
    recs = [json.loads(s) for s in batch["record"]]
    return {"record": batch["record"], "is_loss": np.asarray([r["kind"] == "loss" for r in recs]),
            "loss_sum": np.asarray([float(r.get("loss_sum", 0.0)) for r in recs]),
            "loss_tokens": np.asarray([int(r.get("loss_tokens", 0)) for r in recs], dtype=np.int64)}


def _items_dataset(heldout, cfg: MiddoConfig):
    """The held-out rows (read from their shards, or in memory) and the benchmark items, as one dataset."""
    import ray

    from middo_ray.schema import TEXT_COLUMNS
    from middo_ray.storage import ShardSet

    bench = sorted(bench_items(cfg), key=_length_key)
    parts = []
    if isinstance(heldout, ShardSet):
        if heldout.total:
            parts.append(ray.data.read_parquet(heldout.paths(), columns=["sample_id", *TEXT_COLUMNS])
                         .map_batches(_to_items, batch_format="numpy", num_cpus=0.25))
    elif heldout:
        parts.append(ray.data.from_items([{"item": json.dumps(heldout_item(r, i))} for i, r in enumerate(heldout)]))
    if bench:
        parts.append(ray.data.from_items([{"item": json.dumps(it)} for it in bench]))
    if not parts:
        return None
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def evaluate_on_ray(model: str, heldout, cfg: MiddoConfig, out_dir: Path | None = None
                    ) -> tuple[dict[str, Any], list[dict]]:
    """The evaluation as a Ray Data pipeline (actors answer, tasks score); metrics and the benchmark records.

    Args:
        heldout: The held-out rows as a ShardSet (read by Ray Data) or a list of rows.

    Writes ``predictions.jsonl`` into ``out_dir`` when given.
    """
    t0 = time.time()
    ds = _items_dataset(heldout, cfg)
    records: list[dict] = []
    sums = (0, 0.0, 0)
    if ds is not None:
        ds = ds.map_batches(EvalWorker, fn_constructor_kwargs=worker_kwargs(model, cfg),
                            batch_size=cfg.eval.rows_per_block, batch_format="numpy", **_pool_options(cfg))
        ds = ds.map_batches(score_batch, fn_kwargs={"timeout_s": cfg.eval.code_timeout_s,
                                                    "memory_mb": cfg.eval.code_memory_mb},
                            batch_size=8, batch_format="numpy", num_cpus=cfg.eval.code_cpus)
        from ray.data.expressions import col

        done = ds.map_batches(_split_record, batch_format="numpy", num_cpus=0.25).materialize()
        loss = done.filter(expr=col("is_loss"))
        n_loss = loss.count()
        if n_loss:
            sums = (n_loss, float(loss.sum("loss_sum")), int(loss.sum("loss_tokens")))
        records = [json.loads(r["record"]) for r in done.filter(expr=~col("is_loss")).take_all()]
    metrics = aggregate(records, cfg, time.time() - t0, heldout=sums)
    if out_dir is not None:
        write_predictions(records, Path(out_dir) / "predictions.jsonl")
    log.debug("eval: %d held-out rows and %d benchmark items in %.1fs", sums[0], len(records), metrics["seconds"])
    return metrics, records
