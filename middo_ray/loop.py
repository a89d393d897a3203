"""The closed loop: the only module that calls the stages, in order, with resume.

Round 0 trains M_0 on the seed data D_0 (the baseline) and evaluates it. Round k >= 1 then does

    diagnose(D_{k-1}; M_pre, M_{k-1}) -> select -> refine (Serve) -> merge -> D_k
    -> train(M_base, D_k) = M_k -> evaluate(M_k) -> converge?

so every round ends with a model trained on the round's new data and measured, and the stop rule
compares it with the rounds before (reference §1: each round trains from the base model).

Layout: ``runs/<run_id>/round_<k>/<stage>/`` holds each stage's output and a ``_SUCCESS`` marker;
``round_<k>/manifest.json`` records counts, thresholds, timings, versions and the config. A rerun with
the same run id skips finished stages. ``runs/<run_id>/final/`` holds the optimized dataset in the input
format, its lineage as Parquet, and ``summary.json`` with the stop reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from middo_ray.config import MiddoConfig, config_hash

log = logging.getLogger("middo")


# ---------------------------------------------------------------------------------------------
# Run directory helpers.

def _write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename) so a crash never leaves half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_rows(rows: list[dict], path: Path) -> None:
    """Rows to Parquet (atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.parquet")
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({}), tmp)
    tmp.replace(path)


def load_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


class Stage:
    """A stage directory with a success marker: ``done`` tells the loop to skip it on resume."""

    def __init__(self, root: Path, name: str, resume: bool):
        self.dir = root / name
        self.resume = resume

    @property
    def done(self) -> bool:
        return self.resume and (self.dir / "_SUCCESS").is_file()

    def start(self) -> Path:
        if self.dir.exists():
            shutil.rmtree(self.dir)   # a half-written stage from a crash is redone from scratch
        self.dir.mkdir(parents=True)
        return self.dir

    def finish(self, info: dict) -> None:
        _write_json(self.dir / "stage.json", info)
        (self.dir / "_SUCCESS").write_text(datetime.now(timezone.utc).isoformat())

    def info(self) -> dict:
        return _read_json(self.dir / "stage.json")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("middo-ray", "ray", "torch", "transformers", "numpy", "pydantic"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _rows_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(r["sample_id"].encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Ray.

def init_ray(cfg: MiddoConfig) -> None:
    """Joins the cluster the job runs on (RAY_ADDRESS or ray.address), else starts a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` the job's runtime env (working_dir, env_vars) already applies, and
        # Ray refuses a second one that sets the same keys.
        ray.init(address=address)
        return
    env = {k: os.environ[k] for k in ("MIDDO_CACHE", "HF_HOME", "HF_HUB_OFFLINE") if k in os.environ}
    ray.init(num_cpus=cfg.ray.num_cpus, runtime_env={"env_vars": env} if env else None)


# ---------------------------------------------------------------------------------------------
# Stages as the loop calls them.

def _heldout_split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split by a hash of (seed, sample_id): the same rows go out on every machine."""
    def key(r: dict) -> str:
        return hashlib.sha256(f"{seed}:{r['sample_id']}".encode()).hexdigest()
    n_out = int(round(len(rows) * fraction))
    out_ids = {r["sample_id"] for r in sorted(rows, key=key)[:n_out]}
    return [r for r in rows if r["sample_id"] not in out_ids], [r for r in rows if r["sample_id"] in out_ids]


def stage_data(cfg: MiddoConfig, stage: Stage) -> dict:
    from middo_ray import demo, io

    d = stage.start()
    src = io.check_data_file(demo.resolve(cfg.data.path))
    res = io.read_dataset(src, cfg.data.format, rejects_path=d / "rejects.jsonl")
    rows = res.rows
    if cfg.data.heldout_path:
        held = io.read_dataset(io.check_data_file(cfg.data.heldout_path, "data.heldout_path"), "auto",
                               rejects_path=d / "heldout_rejects.jsonl").rows
        train_rows = rows
    else:
        train_rows, held = _heldout_split(rows, cfg.data.heldout_fraction, cfg.run.seed)
    unused: list[dict] = []
    if cfg.data.max_samples is not None and len(train_rows) > cfg.data.max_samples:
        train_rows, unused = train_rows[: cfg.data.max_samples], train_rows[cfg.data.max_samples:]
    if not train_rows:
        raise ValueError(f"no usable rows in {src}: {len(res.rejects)} rejected (see {d / 'rejects.jsonl'})")
    save_rows(train_rows, d / "dataset.parquet")
    save_rows(held, d / "heldout.parquet")
    if unused:
        save_rows(unused, d / "unused.parquet")
    info = {"source": str(src), "format": res.format, "style": res.style, "rows_in": res.n_input,
            "rejected": len(res.rejects), "train": len(train_rows), "heldout": len(held), "unused": len(unused),
            "hash": _rows_hash(train_rows)}
    stage.finish(info)
    log.info("data: %d rows read from %s (%s), %d rejected, %d train, %d held out",
             res.n_input, src, res.format, len(res.rejects), len(train_rows), len(held))
    return info


def stage_train(cfg: MiddoConfig, stage: Stage, rows: list[dict], init_model: str) -> dict:
    """Trains the round's model; a training cut off by a crash of the driver resumes from its checkpoint.

    The Ray Train run is named after the run and the round, so a rerun of an unfinished round finds the
    checkpoints of the interrupted one (in the stage directory, or in ``train.storage_path``) and continues
    from the last of them instead of starting over; ``run.resume=false`` starts afresh.
    """
    from middo_ray.train import train_sft

    run_name = f"{cfg.run.run_id}-{stage.dir.parent.name}" if stage.resume else None
    storage = stage.dir / "ray_train"
    parked = stage.dir.parent / ".ray_train.resume"
    # stage.start() clears a half-written stage; keep the interrupted training's checkpoints through it.
    if run_name and cfg.train.storage_path is None and storage.is_dir():
        shutil.rmtree(parked, ignore_errors=True)
        storage.rename(parked)
    d = stage.start()
    if parked.is_dir():
        parked.rename(d / "ray_train")
    log.info("train: SFT of %s on %d samples (Ray Train, %d worker(s), %s, %s)", init_model, len(rows),
             cfg.train.num_workers, cfg.train.method, cfg.train.strategy)
    info = train_sft(rows, cfg, d, init_model, run_name=run_name)
    info["init_model"] = init_model
    # Per-step lists stay in train/train_result.json; the stage record and manifests keep the scalars.
    stage.finish({k: v for k, v in info.items() if k not in ("step_seconds", "step_input_tokens")})
    return info


def stage_eval(cfg: MiddoConfig, stage: Stage, model_dir: str, heldout: list[dict]) -> dict:
    """Scores the round's model on Ray Data: held-out loss, MC set, suites (flat dict, also in the manifest).

    ``eval/predictions.jsonl`` keeps every scored item (extracted answer, output, score) for inspection.
    """
    from middo_ray.evaluate import evaluate_remote

    d = stage.start()
    metrics = evaluate_remote(model_dir, heldout, cfg, out_dir=d)
    stage.finish(metrics)
    log.info("eval: %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()})
    return metrics


def stage_diagnose(cfg: MiddoConfig, stage: Stage, rows: list[dict], model_dir: str, cache_path: Path) -> dict:
    from middo_ray.diagnose import run_diagnosis

    d = stage.start()
    cache: dict[str, float] = {}
    key = f"{cfg.model.pre or cfg.model.base}|{cfg.data.template}|{cfg.data.cutoff_len}|{cfg.model.dtype}"
    if cache_path.is_file():
        saved = _read_json(cache_path)
        if saved.get("key") == key:
            cache = saved["loss_pre"]
    diag = run_diagnosis(rows, cfg, model_dir, cache)
    _write_json(cache_path, {"key": key, "loss_pre": cache})
    table = {"sample_id": diag.sample_ids}
    for k, v in diag.columns.items():
        table[k] = v.tolist()
    save_rows([dict(zip(table, vals)) for vals in zip(*table.values())], d / "signals.parquet")
    np.save(d / "embeddings.npy", diag.embeddings)
    stage.finish(diag.counts)
    return diag.counts


def _load_signals(stage: Stage) -> dict[str, np.ndarray]:
    rows = load_rows(stage.dir / "signals.parquet")
    cols = {k: np.asarray([r[k] for r in rows]) for k in rows[0]} if rows else {}
    for k, v in list(cols.items()):
        if k not in ("sample_id", "nbr_idx", "truncated") and v.dtype == object:
            cols[k] = np.asarray([np.nan if x is None else x for x in v], dtype=np.float64)
    return cols


def stage_select(cfg: MiddoConfig, stage: Stage, rows: list[dict], cols: dict) -> dict:
    from middo_ray.select import select_flags

    d = stage.start()
    if [r["sample_id"] for r in rows] != list(cols["sample_id"]):
        raise RuntimeError("signals do not line up with the dataset by sample_id; rerun diagnose")
    flags, thresholds, counts = select_flags(cols, cfg.select)
    save_rows([{"sample_id": s, **{a: bool(flags[a][i]) for a in flags}} for i, s in enumerate(cols["sample_id"])],
              d / "flags.parquet")
    info = {"thresholds": thresholds, "counts": counts}
    stage.finish(info)
    log.info("select: flagged %s", {a: counts[a]["flagged"] for a in ("complexity", "diversity", "quality")})
    return info


def _load_flags(stage: Stage) -> dict[str, np.ndarray]:
    rows = load_rows(stage.dir / "flags.parquet")
    return {a: np.asarray([r[a] for r in rows], dtype=bool) for a in ("complexity", "diversity", "quality")}


class Refiner:
    """The refiner (teacher) and judge Serve apps, each started on first use.

    The refiner app keeps the configured teacher for the whole run. The judge app
    (``refine.judge='current'``) serves the round's checkpoint: asked for another model than it serves,
    it is redeployed with that one, so the judge follows the model being trained. The loop releases it
    after each refine stage: its next model only exists after the next training, and its CPUs or GPUs are
    then free for training and evaluation.
    """

    def __init__(self, cfg: MiddoConfig):
        self.cfg = cfg
        self.handle = None
        self.judge_handle = None
        self.judge_model: str | None = None

    def get(self):
        if self.handle is None:
            from middo_ray.refine import start_refiner

            log.info("refine: starting the refiner Serve app (%s)", self.cfg.refine.model or self.cfg.model.base)
            self.handle = start_refiner(self.cfg)
        return self.handle

    def judge(self, model: str):
        """The judge app's handle, (re)deployed to serve ``model``."""
        if self.judge_handle is None or self.judge_model != model:
            from middo_ray.refine import start_judge

            log.info("refine: judge app now serves %s", model)
            self.judge_handle = start_judge(self.cfg, model)
            self.judge_model = model
        return self.judge_handle

    def release_judge(self) -> None:
        """Deletes the judge app (if one runs); the teacher app stays."""
        if self.judge_handle is not None:
            from ray import serve as ray_serve

            from middo_ray.refine import judge_app_name

            ray_serve.delete(judge_app_name(self.cfg))
            self.judge_handle = self.judge_model = None

    def stop(self) -> None:
        if self.handle is not None or self.judge_handle is not None:
            from middo_ray.refine import stop_refiner

            stop_refiner(self.cfg)
            self.handle = self.judge_handle = self.judge_model = None


def stage_refine(cfg: MiddoConfig, stage: Stage, jobs: list[dict], refiner: Refiner, round_k: int,
                 current_model: str) -> dict:
    """Refines the round's jobs with the teacher; rewrites are re-judged by ``current_model`` (M_{k-1},
    the model the round diagnosed with) unless ``refine.judge='teacher'``."""
    from middo_ray.refine import refine_jobs

    d = stage.start()
    t0 = time.time()
    if jobs:
        current = cfg.refine.judge == "current"
        # The current model judges with the diagnosis' template and cutoff: the original's re-judged score is
        # then the quality the diagnosis gave it, and its rewrite is measured with the same rule.
        judge_prompt = ({"judge_template": cfg.data.template, "judge_cutoff_len": cfg.data.cutoff_len}
                        if current else {})
        # LLM calls are cached by content in the run directory: a rerun or resumed run repeats none.
        try:
            outcome = refine_jobs(jobs, refiner.get(), cfg.refine, seed=cfg.run.seed * 1000 + round_k,
                                  cache_dir=stage.dir.parent.parent / "cache" / "llm",
                                  judge=(lambda: refiner.judge(current_model)) if current else None, **judge_prompt)
        finally:
            refiner.release_judge()
        results, counts = outcome.results, outcome.counts
    else:
        results, counts = [], {}
    with open(d / "results.jsonl", "w") as fh:
        for job, res in zip(jobs, results):
            fh.write(json.dumps({"job": job, "result": res}, default=_json_default) + "\n")
    info = {"jobs": len(jobs), "ok": sum(r.get("status") == "ok" for r in results),
            "failed": sum(r.get("status") != "ok" for r in results), "counts": counts,
            "seconds": round(time.time() - t0, 2)}
    stage.finish(info)
    log.info("refine: %d jobs, %d ok, %d failed (originals kept)", info["jobs"], info["ok"], info["failed"])
    return info


def _load_refine(stage: Stage) -> tuple[list[dict], list[dict]]:
    jobs, results = [], []
    with open(stage.dir / "results.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            jobs.append(rec["job"])
            results.append(rec["result"])
    return jobs, results


# ---------------------------------------------------------------------------------------------
# The loop.

def _round_manifest(cfg: MiddoConfig, k: int, stages: dict[str, dict], extra: dict) -> dict:
    return {"round": k, "run_id": cfg.run.run_id, "stages": stages, **extra,
            "versions": versions(), "config": cfg.model_dump(), "written": datetime.now(timezone.utc).isoformat()}


def _check_resumable(root: Path, cfg: MiddoConfig) -> None:
    """Refuses to resume a run directory made with a different config (its stages would be stale)."""
    saved_path = root / "config.json"
    if not (cfg.run.resume and saved_path.is_file()):
        return
    saved, now = _read_json(saved_path), cfg.model_dump()
    changed = sorted(k for k in now if k not in ("run", "ray") and saved.get(k) != now[k])
    if changed:
        raise ValueError(f"run directory {root} was made with a different config (sections: {', '.join(changed)}); "
                         f"its finished stages would not match. Use a new run.run_id, or set run.resume=false "
                         f"to redo every stage")


def run_loop(cfg: MiddoConfig, on_round: Callable[[int, dict], None] | None = None) -> dict:
    """Runs the loop to a stop rule and writes the final dataset; returns the summary."""
    from middo_ray import io

    if cfg.run.run_id is None:
        cfg.run.run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + config_hash(cfg)
    root = Path(cfg.run.output_dir).resolve() / cfg.run.run_id
    root.mkdir(parents=True, exist_ok=True)
    _check_resumable(root, cfg)
    _write_json(root / "config.json", cfg.model_dump())
    log.info("run directory: %s", root)
    init_ray(cfg)
    resume = cfg.run.resume
    t_start = time.time()

    # Round 0: data and the baseline model.
    r0 = root / "round_0"
    data_stage = Stage(r0, "data", resume)
    data_info = data_stage.info() if data_stage.done else stage_data(cfg, data_stage)
    rows = load_rows(data_stage.dir / "dataset.parquet")
    heldout = load_rows(data_stage.dir / "heldout.parquet")
    history: list[dict] = []
    models: list[str] = []
    refiner = Refiner(cfg)
    try:
        timings: dict[str, float] = {}
        st = Stage(r0, "train", resume)
        t = time.time()
        train_info = st.info() if st.done else stage_train(cfg, st, rows, cfg.model.base)
        timings["train"] = round(time.time() - t, 2)
        models.append(train_info["model_dir"])
        st = Stage(r0, "eval", resume)
        t = time.time()
        metrics = st.info() if st.done else stage_eval(cfg, st, models[-1], heldout)
        timings["eval"] = round(time.time() - t, 2)
        history.append(metrics)
        _write_json(r0 / "manifest.json", _round_manifest(cfg, 0, {"data": data_info, "train": train_info,
                                                                   "eval": metrics}, {"timings": timings,
                                                                                      "rows": len(rows)}))
        stop, reason, k = False, "", 0
        datasets = [rows]
        while not stop:
            k += 1
            rk = root / f"round_{k}"
            timings = {}
            stages: dict[str, dict] = {}
            log.info("=== round %d: %d samples ===", k, len(rows))

            st = Stage(rk, "diagnose", resume)
            t = time.time()
            stages["diagnose"] = st.info() if st.done else stage_diagnose(cfg, st, rows, models[-1],
                                                                          root / "cache" / "pre_loss.json")
            timings["diagnose"] = round(time.time() - t, 2)
            cols = _load_signals(st)

            st = Stage(rk, "select", resume)
            t = time.time()
            stages["select"] = st.info() if st.done else stage_select(cfg, st, rows, cols)
            timings["select"] = round(time.time() - t, 2)
            flags = _load_flags(st)

            from middo_ray.merge import build_jobs, merge_round

            nbr = np.stack(cols["nbr_idx"]) if len(cols["nbr_idx"]) else np.zeros((0, 2), int)
            jobs = build_jobs(rows, flags, nbr)
            st = Stage(rk, "refine", resume)
            t = time.time()
            stages["refine"] = st.info() if st.done else stage_refine(cfg, st, jobs, refiner, k, models[-1])
            timings["refine"] = round(time.time() - t, 2)
            jobs, results = _load_refine(st)

            st = Stage(rk, "merge", resume)
            t = time.time()
            if st.done:
                stages["merge"] = st.info()
            else:
                d = st.start()
                new_rows, events, mcounts = merge_round(rows, jobs, results, k, cols,
                                                        stages["select"]["thresholds"])
                save_rows(new_rows, d / "dataset.parquet")
                with open(d / "events.jsonl", "w") as fh:
                    fh.writelines(json.dumps(e) + "\n" for e in events)
                mcounts["hash"] = _rows_hash(new_rows)
                st.finish(mcounts)
                stages["merge"] = mcounts
                log.info("merge: %d -> %d samples (%d replaced, %d added, %d kept after a failed rewrite)",
                         mcounts["in"], mcounts["out"], mcounts["replaced"], mcounts["added"],
                         mcounts["kept_after_failure"])
            timings["merge"] = round(time.time() - t, 2)
            rows = load_rows(st.dir / "dataset.parquet")
            datasets.append(rows)

            st = Stage(rk, "train", resume)
            t = time.time()
            init = models[-1] if cfg.train.from_previous else cfg.model.base
            stages["train"] = st.info() if st.done else stage_train(cfg, st, rows, init)
            timings["train"] = round(time.time() - t, 2)
            models.append(stages["train"]["model_dir"])

            st = Stage(rk, "eval", resume)
            t = time.time()
            stages["eval"] = st.info() if st.done else stage_eval(cfg, st, models[-1], heldout)
            timings["eval"] = round(time.time() - t, 2)
            history.append(stages["eval"])

            from middo_ray.converge import should_stop

            stop, reason = should_stop(history, cfg.converge, cfg.eval.metric, k,
                                       stages["select"]["counts"]["any"]["fraction"])
            manifest = _round_manifest(cfg, k, stages, {
                "timings": timings,
                "rows": {"in": stages["merge"]["in"], "out": stages["merge"]["out"]},
                "flags": {a: stages["select"]["counts"][a]["flagged"] for a in ("complexity", "diversity", "quality")},
                "selection": stages["select"]["counts"],
                "thresholds": stages["select"]["thresholds"],
                "metric": {cfg.eval.metric: stages["eval"].get(cfg.eval.metric),
                           "previous": history[-2].get(cfg.eval.metric)},
                "converge": {"stop": stop, "reason": reason},
            })
            _write_json(rk / "manifest.json", manifest)
            if on_round:
                on_round(k, manifest)
            log.info("round %d done: %s = %s (before: %s)%s", k, cfg.eval.metric,
                     stages["eval"].get(cfg.eval.metric), history[-2].get(cfg.eval.metric),
                     f"; stopping: {reason}" if stop else "")
    finally:
        refiner.stop()

    # Final: the last dataset in the input's format, with lineage, and a summary.
    from middo_ray.converge import best_round

    best = best_round(history, cfg.eval.metric)
    final = root / "final"
    final.mkdir(exist_ok=True)
    fmt, style = data_info["format"], data_info.get("style")
    # Same format and extension as the input, so the user's tools read it as they read the seed.
    ext = Path(data_info["source"]).suffix or {"alpaca": ".json", "messages": ".jsonl", "parquet": ".parquet"}[fmt]
    out_path = final / f"optimized{ext}"
    io.write_dataset(rows, out_path, fmt, style)
    io.write_lineage(rows, final / "lineage.parquet")
    exports = write_exports(rows, final)
    summary = {
        "run_id": cfg.run.run_id, "run_dir": str(root), "rounds": k, "stop_reason": reason,
        "metric": cfg.eval.metric, "history": history, "best_round": best,
        "best_dataset": str((root / f"round_{best}" / ("merge" if best else "data") / "dataset.parquet")),
        "sizes": [len(d) for d in datasets], "optimized_dataset": str(out_path),
        "lineage": str(final / "lineage.parquet"), "exports": exports,
        "origins": {o: sum(r["origin"] == o for r in rows) for o in ("seed", "complexity", "quality", "diversity")},
        "seconds": round(time.time() - t_start, 1),
    }
    _write_json(final / "summary.json", summary)
    from middo_ray.report import build_report

    summary["report"] = str(build_report(root))
    log.info("done after %d round(s): %s; optimized dataset: %s", k, reason, out_path)
    return summary


# Name of the final dataset in LLaMA-Factory's dataset_info.json (``dataset: middo_optimized``).
LLAMAFACTORY_NAME = "middo_optimized"


def write_exports(rows: list[dict], final: Path) -> dict[str, str]:
    """Writes the final dataset for the trainers people already use, next to ``optimized.*``.

    - ``final/llamafactory/``: ``middo_optimized.json`` (alpaca) and its ``dataset_info.json`` entry;
      train on it with ``dataset_dir: <that dir>`` and ``dataset: middo_optimized``.
    - ``final/messages.jsonl``: OpenAI-style ``{"messages": [...]}`` lines, which TRL's ``SFTTrainer``
      reads (``load_dataset("json", data_files=...)``).

    Returns:
        Paths by export: ``llamafactory_dir``, ``llamafactory_dataset`` (the name), ``llamafactory_file``
        and ``trl_messages``.
    """
    from middo_ray import io

    lf_dir = final / "llamafactory"
    lf_file = io.export_llamafactory(rows, lf_dir, LLAMAFACTORY_NAME)
    trl = io.export_messages_jsonl(rows, final / "messages.jsonl")
    return {"llamafactory_dir": str(lf_dir), "llamafactory_dataset": LLAMAFACTORY_NAME,
            "llamafactory_file": str(lf_file), "trl_messages": str(trl)}
