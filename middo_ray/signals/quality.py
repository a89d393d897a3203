"""Pure math of the quality axis: judge outputs in, per-sample quality out."""

from __future__ import annotations

import numpy as np


def expected_score(first_probs: np.ndarray, zero_after_one: np.ndarray | None = None,
                   ten_prob: np.ndarray | None = None, min_mass: float = 1e-4) -> np.ndarray:
    """Expected 0-10 score from the judge's next-token distribution over the score tokens.

    Args:
        first_probs: (N, 10) probability of the digit tokens "0".."9" as the first answer token.
        zero_after_one: (N,) P("0" | "1") for tokenizers that spell 10 as "1","0"; the mass of "1"
            is split into 10 (followed by "0") and 1 (followed by anything else).
        ten_prob: (N,) probability of a single "10" token, for tokenizers that have one.
        min_mass: below this total probability on score tokens the judge did not answer with a
            number, and the score is missing (NaN), never 0.
    """
    p = np.asarray(first_probs, dtype=np.float64)
    digits = np.arange(10, dtype=np.float64)
    value = (p * digits).sum(axis=1)
    mass = p.sum(axis=1)
    if zero_after_one is not None:
        q = np.clip(np.asarray(zero_after_one, dtype=np.float64), 0.0, 1.0)
        # Replace the "1" term (counted as 1 above) by its split into 10 and 1.
        value += p[:, 1] * q * (10.0 - 1.0)
    if ten_prob is not None:
        t = np.asarray(ten_prob, dtype=np.float64)
        value += 10.0 * t
        mass += t
    with np.errstate(invalid="ignore", divide="ignore"):
        out = value / mass
    out[~(mass >= min_mass)] = np.nan
    return out


def aggregate_quality(prompt_scores: np.ndarray, response_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spec aggregation: per dimension (prompt + response) / 2, overall = mean of the 3 dimensions.

    Missing judgements (NaN) are left out of the means instead of counting as 0; a sample with no
    judgement at all gets NaN (and is never flagged for it).

    Returns:
        per_dim (N, 3) and overall (N,).
    """
    ps = np.asarray(prompt_scores, dtype=np.float64)
    rs = np.asarray(response_scores, dtype=np.float64)
    stacked = np.stack([ps, rs], axis=0)            # (2, N, 3)
    with np.errstate(invalid="ignore"), _quiet():
        per_dim = np.nanmean(stacked, axis=0)
        overall = np.nanmean(per_dim, axis=1)
    return per_dim, overall


class _quiet:
    """Silences numpy's 'mean of empty slice' warning: NaN is the intended answer there."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
