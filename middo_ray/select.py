"""Selection stage: the spec's rules per axis, turning signals into flags with recorded thresholds.

Two modes (``select.mode``):

- ``sigma``: the spec's rules (``signals.thresholds``): hard iff both losses exceed mean + m*sigma;
  sparse iff the kNN similarity is below mean - m*sigma; low quality iff the judge score is below
  mean - m*sigma.
- ``budget``: at most ``budget_fraction`` of the samples per axis, worst first. "Worst" is the same
  standardised distance the sigma rule thresholds (for complexity the smaller of the two losses'
  z-scores, because both must be high), so a budget run flags a prefix of the sigma rule's ranking;
  with ``budget_within_sigma`` only samples the sigma rule also flags are kept.

With ``quality_use_ifd`` the quality axis also flags samples whose IFD exceeds ``ifd_max`` (the
instruction does not make the response easier to predict); in budget mode that rule has its own
budget, highest IFD first.
"""

from __future__ import annotations

import math

import numpy as np

from middo_ray.config import SelectConfig
from middo_ray.signals.thresholds import complexity_flags, diversity_flags, mean_std, quality_flags

AXES = ("complexity", "diversity", "quality")


def _z(x: np.ndarray, ddof: int, sign: float) -> np.ndarray:
    """sign * (x - mean) / std over the finite values; NaN where x is NaN or the std is 0/undefined."""
    mu, sd = mean_std(x, ddof)
    x = np.asarray(x, dtype=np.float64)
    if not (np.isfinite(sd) and sd > 0):
        return np.full(x.shape, np.nan)
    return sign * (x - mu) / sd


def severity(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-axis badness in standard deviations (higher = worse), matching the sigma rules' ddof."""
    zc = np.fmin(_z(columns["loss_pre"], 0, 1.0), _z(columns["loss_cur"], 0, 1.0))
    # fmin returns the other value when one is NaN; both losses must be known to rank a sample.
    zc[~(np.isfinite(columns["loss_pre"]) & np.isfinite(columns["loss_cur"]))] = np.nan
    return {
        "complexity": zc,
        "diversity": _z(columns["knn_sim"], 0, -1.0),
        "quality": _z(columns["quality"], 1, -1.0),
    }


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


def select_flags(columns: dict[str, np.ndarray], cfg: SelectConfig) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Flags per axis (boolean arrays aligned with the signals), thresholds used, and counts.

    Axes not listed in ``cfg.axes`` get all-False flags but their thresholds are still recorded, so
    the manifest shows what they would have selected.
    """
    n = len(columns["loss_cur"])
    raw = {
        "complexity": complexity_flags(columns["loss_pre"], columns["loss_cur"], cfg.complexity_m),
        "diversity": diversity_flags(columns["knn_sim"], cfg.diversity_m),
        "quality": quality_flags(columns["quality"], cfg.quality_m),
    }
    budget = math.floor(cfg.budget_fraction * n) if cfg.mode == "budget" else None
    sev = severity(columns) if cfg.mode == "budget" else {}
    flags: dict[str, np.ndarray] = {}
    thresholds: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    for axis in AXES:
        f, thr = raw[axis]
        thresholds[axis] = {k: (None if not np.isfinite(v) else float(v)) for k, v in thr.items()}
        thresholds[axis]["m"] = getattr(cfg, f"{axis}_m")
        sigma_count = int(f.sum())
        if budget is not None:
            score = np.where(f, sev[axis], np.nan) if cfg.budget_within_sigma else sev[axis]
            f = worst_first(score, budget)
            picked = sev[axis][f]
            thresholds[axis]["budget"] = budget
            thresholds[axis]["severity_cutoff"] = float(picked.min()) if picked.size else None
        if axis == "quality" and cfg.quality_use_ifd and "ifd" in columns:
            ifd = np.asarray(columns["ifd"], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                f_ifd = np.isfinite(ifd) & (ifd > cfg.ifd_max)
            if budget is not None:
                f_ifd = worst_first(np.where(f_ifd, ifd, np.nan), budget)
            thresholds[axis]["ifd"] = cfg.ifd_max
            counts["quality_ifd"] = {"flagged": int(f_ifd.sum()), "judge_flagged": int(f.sum())}
            f = f | f_ifd
        active = axis in cfg.axes
        flags[axis] = f if active else np.zeros(n, dtype=bool)
        counts[axis] = {"flagged": int(flags[axis].sum()), "would_flag": int(f.sum()), "sigma_rule": sigma_count,
                        "active": active}
    any_flag = np.zeros(n, dtype=bool)
    for f in flags.values():
        any_flag |= f
    counts["any"] = {"flagged": int(any_flag.sum()), "fraction": float(any_flag.mean()) if n else 0.0}
    counts["mode"] = cfg.mode
    return flags, thresholds, counts
