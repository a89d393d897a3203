"""Selection rules of the three axes (reference §2-4), with m per axis and NaN/empty guards.

Two forms of the same math: on one array (``mean_std``, ``zscore``, ``*_flags``), and from moments that
were aggregated elsewhere (``Moments``, ``standardize``, ``upper_threshold``/``lower_threshold``), which is
how the select stage applies the rules shard by shard with the dataset's global mean and std.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Moments(NamedTuple):
    """Count, mean and std of a column's finite values (NaN mean/std when there are too few of them)."""

    n: int
    mean: float
    std: float


def standardize(x: np.ndarray, mo: Moments, sign: float = 1.0) -> np.ndarray:
    """sign * (x - mean) / std; NaN where x is NaN, and everywhere when the std is 0 or undefined."""
    x = np.asarray(x, dtype=np.float64)
    if not (math.isfinite(mo.std) and mo.std > 0):
        return np.full(x.shape, np.nan)
    return sign * (x - mo.mean) / mo.std


def upper_threshold(mo: Moments, m: float) -> float:
    """mean + m * std (NaN when undefined: nothing is flagged then)."""
    return mo.mean + m * mo.std


def lower_threshold(mo: Moments, m: float) -> float:
    """mean - m * std (NaN when undefined: nothing is flagged then)."""
    return mo.mean - m * mo.std


def mean_std(x: np.ndarray, ddof: int = 0) -> tuple[float, float]:
    """Mean and std over finite values; NaN, NaN when there are too few of them."""
    v = np.asarray(x, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size <= ddof or v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=ddof))


def zscore(x: np.ndarray, ddof: int = 0, sign: float = 1.0) -> np.ndarray:
    """sign * (x - mean) / std over the finite values; NaN where x is NaN or the std is 0/undefined."""
    mu, sd = mean_std(x, ddof)
    return standardize(x, Moments(0, mu, sd), sign)


def upper_flags(x: np.ndarray, m: float, ddof: int = 0) -> tuple[np.ndarray, float]:
    """x > mean + m*std; NaN values are never flagged. Returns (flags, threshold)."""
    mu, sd = mean_std(x, ddof)
    thr = mu + m * sd
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        flags = np.isfinite(x) & (x > thr) if np.isfinite(thr) else np.zeros(x.shape, bool)
    return flags, thr


def lower_flags(x: np.ndarray, m: float, ddof: int = 0) -> tuple[np.ndarray, float]:
    """x < mean - m*std; NaN values are never flagged. Returns (flags, threshold)."""
    mu, sd = mean_std(x, ddof)
    thr = mu - m * sd
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        flags = np.isfinite(x) & (x < thr) if np.isfinite(thr) else np.zeros(x.shape, bool)
    return flags, thr


def complexity_flags(loss_pre: np.ndarray, loss_cur: np.ndarray, m: float) -> tuple[np.ndarray, dict]:
    """Hard iff both losses exceed their mean + m*sigma (population std, as the reference).

    The reference hard-codes m=1 and ignores its --m argument; here m is honoured.
    """
    f_pre, t_pre = upper_flags(loss_pre, m, ddof=0)
    f_cur, t_cur = upper_flags(loss_cur, m, ddof=0)
    return f_pre & f_cur, {"loss_pre": t_pre, "loss_cur": t_cur}


def diversity_flags(knn_sim: np.ndarray, m: float) -> tuple[np.ndarray, dict]:
    """Sparse iff mean kNN similarity < mean - m*sigma (population std, as the reference)."""
    f, t = lower_flags(knn_sim, m, ddof=0)
    return f, {"knn_sim": t}


def quality_flags(quality: np.ndarray, m: float) -> tuple[np.ndarray, dict]:
    """Low quality iff the mean judge score < mean - m*sigma (sample std, as the reference)."""
    f, t = lower_flags(quality, m, ddof=1)
    return f, {"quality": t}
