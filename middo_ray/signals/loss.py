"""Pure math of the complexity axis: per-token losses and masks in, per-sample numbers out."""

from __future__ import annotations

import numpy as np


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``values`` where ``mask`` is 1; NaN (not 0/0 garbage) when nothing is selected."""
    values = np.asarray(values, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    denom = mask.sum()
    if denom <= 0:
        return float("nan")
    return float((values * mask).sum() / denom)


def per_sample_mean_nll(token_nll: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row-wise masked mean of a (N, T) matrix of token NLLs; NaN for rows with an empty mask."""
    token_nll = np.asarray(token_nll, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    denom = mask.sum(axis=1)
    num = (token_nll * mask).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / denom
    out[denom <= 0] = np.nan
    return out
