"""Selection stage: the spec's rules per axis turn the diagnosis into flags, with the thresholds recorded.

Two modes (``select.mode``):

- ``sigma``: the spec's rules (``signals.thresholds``): hard iff both losses exceed mean + m*sigma;
  sparse iff the kNN similarity is below mean - m*sigma; low quality iff the judge score is below
  mean - m*sigma.
- ``budget``: at most ``budget_fraction`` of the samples per axis, worst first. "Worst" is the same
  standardised distance the sigma rule thresholds (for complexity the smaller of the two losses'
  z-scores, because both must be high), so a budget run flags a prefix of the sigma rule's ranking;
  with ``budget_within_sigma`` only samples the sigma rule also flags are kept. Ties go to the
  earlier sample.

With ``quality_use_ifd`` the quality axis also flags samples whose IFD exceeds ``ifd_max`` (the
instruction does not make the response easier to predict); in budget mode that rule has its own
budget, highest IFD first.

Baselines (``select.method``, for benchmarks such as ``benchmarks/efficacy.py``): ``random`` draws ``count``
samples (the smallest SHA-256 of ``"<seed>:<round>:<sample_id>"``), ``rank`` takes the ``count`` worst by one
signal (``rank_by``), ``ids`` takes the ids listed in ``ids_path``; the choice is flagged on the one axis
``flag_as``. One task picks the samples from the thresholded columns (as the moments task reads them), then
the same per-shard unit writes the flags. The thresholds of the rules are still recorded.

How it runs: the means and standard deviations are aggregated by one task over the thresholded columns
of the signal and neighbour shards (a missing value is left out; 32 bytes per sample in that worker); in
budget mode a unit per shard writes the finite severities and a Ray Data sort of (severity, position)
gives each axis' cut-off; then a unit per shard writes its flags. What ``round_<k>/select/`` holds::

    flags/part-*.parquet   sample_id, complexity, diversity, quality (acted on), quality_ifd (IFD rule)
    stage.json             thresholds per axis (with m, budget and cut-off), counts, the shard set
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa

from middo_ray import storage
from middo_ray.config import SelectConfig
from middo_ray.rundir import StageContext, StageResult, read_record
from middo_ray.schema import AXES
from middo_ray.shardmap import map_shards, nodes_of, run_task
from middo_ray.signals.thresholds import Moments, lower_threshold, mean_std, standardize, upper_threshold
from middo_ray.storage import ShardSet

log = logging.getLogger("middo")

# The columns each axis thresholds, with the std's ddof (population std as the reference, except
# quality: the reference uses statistics.stdev, the sample std) and the rule's side.
AXIS_COLUMNS = {"complexity": (("loss_pre", 0, "upper"), ("loss_cur", 0, "upper")),
                "diversity": (("knn_sim", 0, "lower"),),
                "quality": (("quality", 1, "lower"),)}
SCORES = ("complexity", "diversity", "quality", "quality_ifd")


def thresholds_of(moments: dict[str, Moments], cfg: SelectConfig) -> dict[str, dict]:
    """Per axis the threshold of each column it reads (None where undefined) and its m."""
    out: dict[str, dict] = {}
    for axis, cols in AXIS_COLUMNS.items():
        m = getattr(cfg, f"{axis}_m")
        thr = {}
        for col, ddof, side in cols:
            t = (upper_threshold if side == "upper" else lower_threshold)(moments[f"{col}/{ddof}"], m)
            thr[col] = t if math.isfinite(t) else None
        out[axis] = {**thr, "m": m}
    return out


def _f(table: pa.Table, col: str) -> np.ndarray:
    return table.column(col).to_numpy(zero_copy_only=False).astype(np.float64)


def sigma_flags(table: pa.Table, thresholds: dict[str, dict]) -> dict[str, np.ndarray]:
    """The sigma rule of each axis on one shard (a missing value or threshold never flags)."""
    def beyond(col: str, side: str) -> np.ndarray:
        x, t = _f(table, col), thresholds_col(thresholds, col)
        if t is None:
            return np.zeros(len(x), dtype=bool)
        with np.errstate(invalid="ignore"):
            return np.isfinite(x) & ((x > t) if side == "upper" else (x < t))

    return {axis: np.logical_and.reduce([beyond(col, side) for col, _, side in cols])
            for axis, cols in AXIS_COLUMNS.items()}


def thresholds_col(thresholds: dict[str, dict], col: str) -> float | None:
    for axis, cols in AXIS_COLUMNS.items():
        if any(c == col for c, _, _ in cols):
            return thresholds[axis][col]
    raise KeyError(col)


def severity(table: pa.Table, moments: dict[str, Moments]) -> dict[str, np.ndarray]:
    """Per-axis badness in standard deviations (higher = worse), matching the sigma rules' ddof."""
    pre, cur = _f(table, "loss_pre"), _f(table, "loss_cur")
    zc = np.fmin(standardize(pre, moments["loss_pre/0"]), standardize(cur, moments["loss_cur/0"]))
    # fmin returns the other value when one is NaN; both losses must be known to rank a sample.
    zc[~(np.isfinite(pre) & np.isfinite(cur))] = np.nan
    return {"complexity": zc,
            "diversity": standardize(_f(table, "knn_sim"), moments["knn_sim/0"], sign=-1.0),
            "quality": standardize(_f(table, "quality"), moments["quality/1"], sign=-1.0)}


def budget_scores(table: pa.Table, moments: dict[str, Moments], cfg: SelectConfig,
                  thresholds: dict[str, dict]) -> dict[str, np.ndarray]:
    """The score each budget ranks by (NaN = not a candidate): severities, and IFD above ifd_max."""
    sev = severity(table, moments)
    if cfg.budget_within_sigma:
        raw = sigma_flags(table, thresholds)
        sev = {axis: np.where(raw[axis], s, np.nan) for axis, s in sev.items()}
    ifd = _f(table, "ifd")
    with np.errstate(invalid="ignore"):
        sev["quality_ifd"] = np.where(np.isfinite(ifd) & (ifd > cfg.ifd_max), ifd, np.nan)
    return sev


def within_cutoff(score: np.ndarray, ordinal: np.ndarray, cutoff: tuple[float, int] | None) -> np.ndarray:
    """Whether each sample is among the budget's worst: above the cut-off score, or on it and not later."""
    if cutoff is None:
        return np.zeros(len(score), dtype=bool)
    s_c, o_c = cutoff
    with np.errstate(invalid="ignore"):
        return np.isfinite(score) & ((score > s_c) | ((score == s_c) & (ordinal <= o_c)))


def worst_first(score: np.ndarray, budget: int) -> np.ndarray:
    """Boolean mask of the ``budget`` highest finite scores (ties broken by position)."""
    s = np.asarray(score, dtype=np.float64)
    out = np.zeros(s.shape, dtype=bool)
    finite = np.flatnonzero(np.isfinite(s))
    if budget <= 0 or finite.size == 0:
        return out
    order = finite[np.lexsort((finite, -s[finite]))]
    out[order[:budget]] = True
    return out


def local_moments(columns: dict[str, np.ndarray]) -> dict[str, Moments]:
    """The moments the stage aggregates with Ray Data, computed from columns in memory."""
    out = {}
    for col in ("loss_pre", "loss_cur", "quality", "knn_sim"):
        x = np.asarray(columns[col], dtype=np.float64)
        n = int(np.isfinite(x).sum())
        for ddof in (0, 1):
            mu, sd = mean_std(x, ddof)
            out[f"{col}/{ddof}"] = Moments(n, mu, sd)
    return out


def _table(columns: dict[str, np.ndarray]) -> pa.Table:
    n = len(columns["loss_cur"])
    cols = {k: pa.array(np.asarray(columns.get(k, np.full(n, np.nan)), dtype=np.float64), from_pandas=True)
            for k in ("loss_pre", "loss_cur", "quality", "knn_sim", "ifd")}
    return pa.table({"sample_id": pa.array([str(i) for i in range(n)]), "ordinal": pa.array(np.arange(n)), **cols})


def select_flags(columns: dict[str, np.ndarray], cfg: SelectConfig) -> tuple[dict[str, np.ndarray], dict, dict]:
    """The stage's rules on columns in memory (one shard): flags per axis, thresholds and counts.

    The same functions as the stage, with the moments and the budget cut-offs computed here instead of
    by Ray Data (used by the audit, tests and benchmarks). Axes not listed in ``cfg.axes`` get all-False
    flags but their thresholds are still recorded, so the manifest shows what they would have selected.
    """
    table = _table(columns)
    moments = local_moments(columns)
    thresholds = thresholds_of(moments, cfg)
    cutoffs = None
    if cfg.mode == "budget":
        budget = math.floor(cfg.budget_fraction * len(table))
        scores = budget_scores(table, moments, cfg, thresholds)
        cutoffs = {}
        for axis, score in scores.items():
            picked = np.flatnonzero(worst_first(score, budget))
            cutoffs[axis] = [float(score[picked].min()), int(picked[score[picked] == score[picked].min()].max())] \
                if picked.size else None
        for axis in AXES:
            thresholds[axis]["budget"] = budget
            thresholds[axis]["severity_cutoff"] = cutoffs[axis][0] if cutoffs[axis] else None
    worker = FlagShard({k: list(v) for k, v in moments.items()}, cfg.model_dump(), thresholds, cutoffs)
    flags, summary = worker.flags(table)
    if cfg.quality_use_ifd:
        thresholds["quality"]["ifd"] = cfg.ifd_max
    return {a: flags[a] for a in AXES}, thresholds, _counts([summary], cfg, len(table))


def random_keys(seed: int, round_k: int, sample_ids: list[str]) -> list[str]:
    """The key ``method='random'`` sorts by: the same samples are drawn for a seed whatever the shards."""
    import hashlib

    return [hashlib.sha256(f"{seed}:{round_k}:{sid}".encode()).hexdigest() for sid in sample_ids]


def read_ids(path: str) -> list[str]:
    """Sample ids from ``select.ids_path``: a JSON list, or one id per line (blank lines skipped)."""
    import json

    text = storage.read_text(path)
    stripped = text.strip()
    if stripped.startswith("["):
        ids = json.loads(stripped)
        if not all(isinstance(x, str) for x in ids):
            raise ValueError(f"select.ids_path {path}: the JSON list must hold sample id strings")
        return ids
    return [line.strip() for line in text.splitlines() if line.strip()]


def choose(columns: dict[str, np.ndarray], sample_ids: list[str], cfg: SelectConfig, seed: int = 0,
           round_k: int = 0, ids: list[str] | None = None) -> tuple[np.ndarray, dict]:
    """The samples a baseline method (random, rank, ids) chooses: a mask in dataset order and what it did.

    Args:
        columns: The thresholded columns (loss_pre, loss_cur, quality, knn_sim, ifd) in dataset order.
        sample_ids: The ids in the same order.
        cfg: The select section (method, count, rank_by, budget_fraction).
        seed / round_k: Seed of ``random``.
        ids: The ids of ``method='ids'`` (read from ``cfg.ids_path`` by the caller).

    Returns:
        ``(mask, info)``; info has ``method``, ``chosen``, and ``count`` (random/rank), ``rank_by`` (rank),
        ``ids_listed`` / ``ids_missing`` (ids).
    """
    n = len(sample_ids)
    info: dict = {"method": cfg.method}
    if cfg.method == "ids":
        wanted = set(ids or [])
        mask = np.asarray([sid in wanted for sid in sample_ids], dtype=bool)
        info.update(ids_listed=len(wanted), ids_missing=len(wanted - set(sample_ids)))
    else:
        count = cfg.count if cfg.count is not None else math.floor(cfg.budget_fraction * n)
        count = min(count, n)
        info["count"] = count
        if cfg.method == "random":
            order = np.argsort(np.asarray(random_keys(seed, round_k, sample_ids)), kind="stable")
            mask = np.zeros(n, dtype=bool)
            mask[order[:count]] = True
        elif cfg.method == "rank":
            info["rank_by"] = cfg.rank_by
            if cfg.rank_by == "ifd":
                score = np.asarray(columns["ifd"], dtype=np.float64)
            else:
                table = _table(columns)
                score = severity(table, local_moments(columns))[cfg.rank_by]
            mask = worst_first(score, count)
        else:
            raise ValueError(f"select.method '{cfg.method}' chooses no samples by itself; use select_flags")
    info["chosen"] = int(mask.sum())
    return mask, info


# ---------------------------------------------------------------------------------------------
# Workers.

def _shard_table(unit: dict) -> pa.Table:
    sig = storage.read_table(unit["signals"], ["sample_id", "ordinal", "loss_pre", "loss_cur", "quality", "ifd"])
    nb = storage.read_table(unit["neighbors"], ["sample_id", "knn_sim"])
    if nb.column("sample_id") != sig.column("sample_id"):
        raise RuntimeError(f"select: shard {unit['id']}: neighbours and signals are not aligned; rerun diagnose")
    return sig.append_column("knn_sim", nb.column("knn_sim"))


class ScoreShard:
    """Budget mode: writes a shard's finite budget scores, as (negated score, position) per axis."""

    def __init__(self, moments: dict, cfg: dict, thresholds: dict):
        self.moments = {k: Moments(*v) for k, v in moments.items()}
        self.cfg, self.thresholds = SelectConfig(**cfg), thresholds

    def process(self, unit: dict) -> dict:
        table = _shard_table(unit)
        scores = budget_scores(table, self.moments, self.cfg, self.thresholds)
        ordinal = table.column("ordinal").to_numpy()
        counts = {}
        for axis in SCORES:
            ok = np.isfinite(scores[axis])
            counts[axis] = int(ok.sum())
            part = pa.table({"neg": pa.array(-scores[axis][ok], pa.float64()),
                             "ordinal": pa.array(ordinal[ok], pa.int64())})
            path = unit["commit"] if axis == SCORES[-1] else unit[axis]
            storage.write_table(path, part, {"unit": unit["id"], "rows": len(table), **counts}
                                if axis == SCORES[-1] else None)
        return {"unit": unit["id"], "rows": len(table), **counts}


class FlagShard:
    """Writes one shard's flags from the thresholds (and the budget cut-offs); returns its counts."""

    def __init__(self, moments: dict, cfg: dict, thresholds: dict, cutoffs: dict | None):
        self.moments = {k: Moments(*v) for k, v in moments.items()}
        self.cfg, self.thresholds = SelectConfig(**cfg), thresholds
        self.cutoffs = {k: (tuple(v) if v is not None else None) for k, v in (cutoffs or {}).items()}

    def process(self, unit: dict) -> dict:
        table = _shard_table(unit)
        flags, counts = self.flags(table)
        counts["unit"] = unit["id"]
        out = pa.table({"sample_id": table.column("sample_id"), **{a: pa.array(flags[a], pa.bool_()) for a in AXES},
                        "quality_ifd": pa.array(flags["quality_ifd"], pa.bool_())})
        storage.write_table(unit["commit"], out, counts)
        return counts

    def flags(self, table: pa.Table) -> tuple[dict[str, np.ndarray], dict]:
        """The flags of one shard's signals (plus ``quality_ifd``: flagged by the IFD rule) and its counts."""
        raw = sigma_flags(table, self.thresholds)
        counts: dict = {"rows": len(table)}
        would = dict(raw)
        if self.cfg.mode == "budget":
            scores = budget_scores(table, self.moments, self.cfg, self.thresholds)
            ordinal = table.column("ordinal").to_numpy()
            would = {axis: within_cutoff(scores[axis], ordinal, self.cutoffs[axis]) for axis in SCORES}
            ifd = would.pop("quality_ifd")
        else:
            x = _f(table, "ifd")
            with np.errstate(invalid="ignore"):
                ifd = np.isfinite(x) & (x > self.cfg.ifd_max)
        use_ifd = self.cfg.quality_use_ifd
        counts["quality_judge"] = int(would["quality"].sum())
        if use_ifd:
            would["quality"] = would["quality"] | ifd
        flags = {axis: would[axis] if axis in self.cfg.axes else np.zeros(len(table), bool) for axis in AXES}
        anyf = np.logical_or.reduce([flags[a] for a in AXES]) if len(table) else np.zeros(0, bool)
        for axis in AXES:
            counts[f"{axis}_sigma"] = int(raw[axis].sum())
            counts[f"{axis}_would"] = int(would[axis].sum())
            counts[f"{axis}_flagged"] = int(flags[axis].sum())
        counts["quality_ifd"] = int(ifd.sum()) if use_ifd else 0
        counts["any"] = int(anyf.sum())
        flags["quality_ifd"] = ifd & use_ifd
        return flags, counts


class ChosenFlagShard(FlagShard):
    """Writes one shard's flags for a baseline method: the chosen samples on ``flag_as``, nothing else."""

    def __init__(self, moments: dict, cfg: dict, thresholds: dict, chosen: str):
        super().__init__(moments, cfg, thresholds, None)
        self.chosen = chosen

    def process(self, unit: dict) -> dict:
        table = _shard_table(unit)
        picked = set(storage.read_table(self.chosen).column("sample_id").to_pylist())
        mask = np.asarray([sid in picked for sid in table.column("sample_id").to_pylist()], dtype=bool)
        raw = sigma_flags(table, self.thresholds)
        flags = {a: (mask if a == self.cfg.flag_as else np.zeros(len(table), bool)) for a in AXES}
        counts: dict = {"unit": unit["id"], "rows": len(table), "quality_judge": 0, "quality_ifd": 0,
                        "any": int(mask.sum())}
        for axis in AXES:
            counts[f"{axis}_sigma"] = int(raw[axis].sum())
            counts[f"{axis}_would"] = counts[f"{axis}_flagged"] = int(flags[axis].sum())
        out = pa.table({"sample_id": table.column("sample_id"), **{a: pa.array(flags[a], pa.bool_()) for a in AXES},
                        "quality_ifd": pa.array(np.zeros(len(table), bool), pa.bool_())})
        storage.write_table(unit["commit"], out, counts)
        return counts


def _choose_task(signal_paths: list[str], neighbor_paths: list[str], cfg: dict, seed: int, round_k: int,
                 out: str) -> dict:
    """The baseline methods' task: reads the ids and thresholded columns in dataset order (about 50 bytes a
    sample), chooses, and writes the chosen ids to ``out``; returns what :func:`choose` reports."""
    sel = SelectConfig(**cfg)
    ids = [sid for p in signal_paths for sid in storage.read_table(p, ["sample_id"]).column("sample_id").to_pylist()]
    cols = {c: _column(signal_paths, c) for c in ("loss_pre", "loss_cur", "quality", "ifd")}
    cols["knn_sim"] = _column(neighbor_paths, "knn_sim")
    listed = read_ids(sel.ids_path) if sel.method == "ids" else None
    mask, info = choose(cols, ids, sel, seed, round_k, listed)
    storage.write_table(out, pa.table({"sample_id": pa.array([s for s, m in zip(ids, mask) if m], pa.string())}))
    return info


# ---------------------------------------------------------------------------------------------
# The stage.

def _column(paths: list[str], col: str) -> np.ndarray:
    parts = [storage.read_table(p, [col]).column(col).to_numpy(zero_copy_only=False).astype(np.float64) for p in paths]
    return np.concatenate(parts) if parts else np.zeros(0)


def _moments_task(signal_paths: list[str], neighbor_paths: list[str]) -> dict[str, list]:
    """The moments task: each thresholded column, read shard by shard in dataset order, 8 bytes a value."""
    cols = {c: _column(signal_paths, c) for c in ("loss_pre", "loss_cur", "quality")}
    cols["knn_sim"] = _column(neighbor_paths, "knn_sim")
    return {k: list(v) for k, v in local_moments(cols).items()}


def moments_of(diag) -> dict[str, Moments]:
    """Count, mean and std (both ddofs where a rule needs them) of every thresholded column.

    Computed in one worker task over the columns in dataset order with numpy (the reference's own
    arithmetic), so a threshold is the same to the last bit whatever the shards and the cluster: Ray Data's
    streaming aggregates combine partial results in an order that depends on the block layout.
    """
    got = run_task(_moments_task, diag.signals.paths(), diag.neighbors.paths(), what="select: moments")
    return {k: Moments(int(v[0]), float(v[1]), float(v[2])) for k, v in got.items()}


def budget_cutoffs(paths: dict[str, list[str]], budget: int) -> dict[str, list | None]:
    """Per score, the (score, position) of the ``budget``-th worst sample (Ray Data sort), or None."""
    import ray
    from ray.data.expressions import col

    out: dict[str, list | None] = {}
    for axis, files in paths.items():
        ds = ray.data.read_parquet(files)
        if budget <= 0 or ds.count() == 0:
            out[axis] = None
            continue
        top = ds.sort(["neg", "ordinal"]).limit(budget).materialize()
        neg = top.max("neg")
        last = top.filter(expr=col("neg") == neg).max("ordinal")
        out[axis] = [-float(neg), int(last)]
    return out


def _units(ctx: StageContext, diag, kind: str) -> list[dict]:
    units = []
    for name, rows in zip(diag.dataset.names, diag.dataset.rows):
        unit = {"id": name, "rows": rows, "signals": diag.signals.path(name), "neighbors": diag.neighbors.path(name)}
        if kind == "flags":
            unit["commit"] = ctx.path("flags", name)
        else:
            unit.update({a: ctx.path("_budget", a, name) for a in SCORES})
            unit["commit"] = unit.pop(SCORES[-1])
        units.append(unit)
    return units


def run(ctx: StageContext, cfg: SelectConfig, inputs: dict) -> StageResult:
    """Flags ``inputs["diagnosis"]`` (a DiagnosisOutput) by the rules of ``cfg``."""
    diag = inputs["diagnosis"]
    moments = moments_of(diag)
    thresholds = thresholds_of(moments, cfg)
    mom = {k: list(v) for k, v in moments.items()}
    n = diag.dataset.total
    if cfg.method != "rules":
        return _run_baseline(ctx, cfg, diag, thresholds, mom, n)
    cutoffs = None
    if cfg.mode == "budget":
        budget = math.floor(cfg.budget_fraction * n)
        units = _units(ctx, diag, "budget")
        map_shards(units, ScoreShard, {"moments": mom, "cfg": cfg.model_dump(), "thresholds": thresholds},
                   what="select: budget scores")
        paths = {a: [u[a] if a != SCORES[-1] else u["commit"] for u in units] for a in SCORES}
        cutoffs = budget_cutoffs(paths, budget)
        for axis in AXES:
            thresholds[axis]["budget"] = budget
            thresholds[axis]["severity_cutoff"] = cutoffs[axis][0] if cutoffs[axis] else None
    summaries = map_shards(_units(ctx, diag, "flags"), FlagShard,
                           {"moments": mom, "cfg": cfg.model_dump(), "thresholds": thresholds, "cutoffs": cutoffs},
                           what="select: flags")
    if cfg.quality_use_ifd:
        thresholds["quality"]["ifd"] = cfg.ifd_max
    counts = _counts(summaries, cfg, n)
    flags = ShardSet(ctx.path("flags"), diag.dataset.names, diag.dataset.rows).save()
    info = {"thresholds": thresholds, "counts": counts, "moments": mom, "nodes": nodes_of(summaries),
            "shards": {"flags": flags.to_json()}}
    log.debug("select: flagged %s", {a: counts[a]["flagged"] for a in AXES})
    return StageResult(info, flags)


def _run_baseline(ctx: StageContext, cfg: SelectConfig, diag, thresholds: dict, mom: dict, n: int) -> StageResult:
    """The stage for select.method random/rank/ids: one task chooses, a unit per shard writes the flags."""
    chosen = ctx.path("_chosen.parquet")
    info = run_task(_choose_task, diag.signals.paths(), diag.neighbors.paths(), cfg.model_dump(), ctx.seed, ctx.round,
                    chosen, what=f"select: choose ({cfg.method})")
    if cfg.method == "ids" and info["ids_missing"]:
        log.warning("select: %d of the %d ids in %s are not in the round's dataset", info["ids_missing"],
                    info["ids_listed"], cfg.ids_path)
    summaries = map_shards(_units(ctx, diag, "flags"), ChosenFlagShard,
                           {"moments": mom, "cfg": cfg.model_dump(), "thresholds": thresholds, "chosen": chosen},
                           what="select: flags")
    counts = _counts(summaries, cfg, n)
    for axis in AXES:
        counts[axis]["active"] = axis == cfg.flag_as
    counts["method"] = info
    flags = ShardSet(ctx.path("flags"), diag.dataset.names, diag.dataset.rows).save()
    rec = {"thresholds": thresholds, "counts": counts, "moments": mom, "nodes": nodes_of(summaries),
           "shards": {"flags": flags.to_json()}}
    log.debug("select: %s chose %d samples, flagged as %s", cfg.method, info["chosen"], cfg.flag_as)
    return StageResult(rec, flags)


def _counts(summaries: list[dict], cfg: SelectConfig, n: int) -> dict:
    total = {k: sum(s[k] for s in summaries) for k in summaries[0] if k not in ("unit", "node", "seconds")} \
        if summaries else {}
    counts: dict = {}
    for axis in AXES:
        counts[axis] = {"flagged": total.get(f"{axis}_flagged", 0), "would_flag": total.get(f"{axis}_would", 0),
                        "sigma_rule": total.get(f"{axis}_sigma", 0), "active": axis in cfg.axes}
    if cfg.quality_use_ifd:
        counts["quality_ifd"] = {"flagged": total.get("quality_ifd", 0), "judge_flagged": total.get("quality_judge", 0)}
    counts["any"] = {"flagged": total.get("any", 0), "fraction": total.get("any", 0) / n if n else 0.0}
    counts["mode"] = cfg.mode
    return counts


def load(stage_dir: str) -> StageResult:
    info = read_record(stage_dir)
    return StageResult(info, ShardSet.from_json(info["shards"]["flags"]))
