"""Audit metrics (pure numpy): AUROC, precision and recall per axis and per defect kind.

Directions matter. Middo's diversity axis flags *sparse* samples (low kNN similarity); a near-duplicate
makes its neighbourhood *denser*, so that axis cannot find it by design, and the audit reports that as
it is. The extra ``duplicate`` check (maximum cosine similarity of the prompt embedding to any other
row, flagged at ``dup_threshold``) is what finds duplicates; it is reported beside the Middo axes and
never folded into them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from middo_ray.signals.thresholds import zscore


class Auroc(NamedTuple):
    """Area under the ROC curve; ``value`` is NaN when either class is empty after dropping NaN scores."""

    value: float
    n_pos: int
    n_neg: int
    n_nan: int


class PrecisionRecall(NamedTuple):
    """Flags against labels; precision is NaN with no flags, recall NaN with no positives."""

    precision: float
    recall: float
    flagged: int
    hits: int
    positives: int


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def auroc(scores: np.ndarray, positive: np.ndarray) -> Auroc:
    """Probability that a random positive scores above a random negative (ties count 1/2).

    Computed from the Mann-Whitney U statistic on average ranks. Samples with a NaN score are left
    out and counted in ``n_nan``.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    ok = ~np.isnan(s)
    s, y = s[ok], y[ok]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return Auroc(float("nan"), n_pos, n_neg, int((~ok).sum()))
    r = average_ranks(s)
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return Auroc(float(u / (n_pos * n_neg)), n_pos, n_neg, int((~ok).sum()))


def precision_recall(flags: np.ndarray, positive: np.ndarray) -> PrecisionRecall:
    """Precision and recall of boolean flags against boolean labels."""
    f = np.asarray(flags, dtype=bool)
    y = np.asarray(positive, dtype=bool)
    if f.shape != y.shape:
        raise ValueError(f"flags {f.shape} and labels {y.shape} differ in shape")
    flagged, hits, pos = int(f.sum()), int((f & y).sum()), int(y.sum())
    return PrecisionRecall(hits / flagged if flagged else float("nan"), hits / pos if pos else float("nan"),
                           flagged, hits, pos)


def max_similarity(embeddings: np.ndarray, block: int = 1024, center: bool = True,
                   earlier_only: bool = False) -> np.ndarray:
    """Per row, the largest cosine similarity of its embedding to any other row's (both copies of a pair
    score high, wherever each one is), or with ``earlier_only`` to an *earlier* row's only.

    ``earlier_only`` is what a keep-the-first deduplication sees: the later copy of a pair scores high, the
    first occurrence does not (and a planted copy placed before its original is invisible); the audit's
    duplicate check scores both. A row with nothing to compare with gets -1; rows with a zero or non-finite
    embedding get NaN and are never compared. ``center`` subtracts the mean embedding first: LM hidden
    states share a large common direction that pushes every cosine towards 1. Memory is block x N.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    n = e.shape[0]
    out = np.full(n, np.nan)
    if n == 0:
        return out
    finite = np.isfinite(e).all(axis=1)
    if center and finite.any():
        e = e - e[finite].mean(axis=0)
    norms = np.linalg.norm(np.where(finite[:, None], e, 0.0), axis=1)
    valid = finite & (norms > 0)
    unit = np.zeros_like(e)
    unit[valid] = e[valid] / norms[valid, None]
    for start in range(0, n, block):
        stop = min(start + block, n)
        width = stop if earlier_only else n
        s = unit[start:stop] @ unit[:width].T                      # (b, width)
        s[:, ~valid[:width]] = -np.inf
        j, i = np.arange(width)[None, :], np.arange(start, stop)[:, None]
        s[(j >= i) if earlier_only else (j == i)] = -np.inf       # itself (and, earlier_only, every later row)
        best = s.max(axis=1, initial=-np.inf)
        out[start:stop] = np.where(np.isfinite(best), best, -1.0)
    out[~valid] = np.nan
    return out


def _optional(columns: dict, name: str) -> np.ndarray | None:
    """A signal column if diagnosis produced it with at least one finite value, else None."""
    v = columns.get(name)
    if v is None:
        return None
    v = np.asarray(v, dtype=np.float64)
    return v if np.isfinite(v).any() else None


def axis_scores(columns: dict[str, np.ndarray], dup_sim: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One suspicion score per axis and check, oriented so that higher means "more likely defective".

    - complexity: min of the z-scores of ``loss_pre`` and ``loss_cur`` (the flag rule "both above
      mean + m*sigma" is exactly "this min above m");
    - diversity: ``-knn_sim`` (Middo flags *low* similarity: sparse samples);
    - quality: ``-quality``;
    - ifd (when diagnosis produced it): ``ifd``;
    - duplicate (when ``dup_sim`` is given): max similarity to any other row (:func:`max_similarity`).
    """
    out = {
        # NaN when either loss is missing: such a sample is never flagged, so it gets no score either.
        "complexity": np.minimum(zscore(columns["loss_pre"]), zscore(columns["loss_cur"])),
        "diversity": -np.asarray(columns["knn_sim"], dtype=np.float64),
        "quality": -np.asarray(columns["quality"], dtype=np.float64),
    }
    ifd = _optional(columns, "ifd")
    if ifd is not None:
        out["ifd"] = ifd
    if dup_sim is not None:
        out["duplicate"] = np.asarray(dup_sim, dtype=np.float64)
    return out


# Raw signals reported one by one, with the direction that counts as suspicious. The response length
# is a baseline: a signal that does no better than "short answers are bad" adds little.
SIGNALS = (("loss_pre", "high"), ("loss_cur", "high"), ("knn_sim", "low"), ("quality", "low"),
           ("q_prompt_factuality", "low"), ("q_prompt_clarity", "low"), ("q_prompt_completeness", "low"),
           ("q_response_factuality", "low"), ("q_response_clarity", "low"), ("q_response_completeness", "low"),
           ("ifd", "high"), ("dup_sim", "high"), ("n_response_tokens", "low"))


DUPLICATE_CHECK = ("duplicate", "dup_sim")     # the axis and the signal of the duplicate check


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def _axis_entry(score: np.ndarray | None, flags: np.ndarray | None, pos: np.ndarray) -> dict:
    entry: dict = {"n_defects": int(pos.sum()), "n_clean": int((~pos).sum())}
    if flags is not None:
        pr = precision_recall(flags, pos)
        entry.update(flagged=pr.flagged, hits=pr.hits, precision=_num(pr.precision), recall=_num(pr.recall),
                     clean_flagged=int((flags & ~pos).sum()),
                     false_positive_rate=_num((flags & ~pos).sum() / max(1, int((~pos).sum()))))
    if score is not None:
        a = auroc(score, pos)
        entry.update(auroc=_num(a.value), n_nan=a.n_nan)
    return entry


def audit_metrics(labels: list[dict], scores: dict[str, np.ndarray], flags: dict[str, np.ndarray],
                  signals: dict[str, np.ndarray] | None = None, exclude: np.ndarray | None = None,
                  partners: np.ndarray | None = None) -> dict:
    """Per axis and per defect kind x axis: precision, recall (flags) and AUROC (scores).

    Args:
        labels: from :func:`inject_defects`, aligned with the arrays.
        scores: axis -> suspicion score (higher = more suspicious), see :func:`axis_scores`.
        flags: axis -> boolean flags; an axis may have a score, flags, or both.
        signals: raw signal columns, reported one by one with the directions in :data:`SIGNALS`.
        exclude: rows left out of every figure (e.g. the demo's own known-bad rows, which are neither
            injected defects nor clean).
        partners: the clean rows that a planted duplicate copies. The duplicate check (axis ``duplicate``,
            signal ``dup_sim``) scores both copies of a pair alike, and either copy is the one to drop, so
            for that check they are neither clean nor defects and are left out; every other axis counts them
            as clean.

    Returns:
        ``{"base_rate", "axes": {axis: {...}}, "kinds": {kind: {"n", axis: {...}}}, "signals": {...}}``.
    """
    kind = np.asarray([lab["kind"] for lab in labels], dtype=object)
    n = kind.size
    keep = np.ones(n, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    clean = keep & np.asarray([k is None for k in kind])
    pos = keep & ~clean
    axes = list(dict.fromkeys([*scores, *flags]))
    out: dict = {"rows": int(keep.sum()), "excluded": int((~keep).sum()), "defects": int(pos.sum()),
                 "base_rate": _num(pos.sum() / keep.sum()) if keep.any() else None, "axes": {}, "kinds": {},
                 "signals": {}}
    partner = np.zeros(n, dtype=bool) if partners is None else np.asarray(partners, dtype=bool)
    out["duplicate_partners"] = int((partner & keep).sum())      # left out of the duplicate check's figures

    def rows_for(name: str, rows: np.ndarray) -> np.ndarray:
        return rows & ~partner if name in DUPLICATE_CHECK else rows

    for axis in axes:
        s, f = scores.get(axis), flags.get(axis)
        m = rows_for(axis, keep)
        out["axes"][axis] = _axis_entry(None if s is None else s[m], None if f is None else f[m], pos[m])
    for k in sorted({k for k in kind[pos]}):
        entry: dict = {"n": int(((kind == k) & keep).sum())}
        for axis in axes:
            s, f = scores.get(axis), flags.get(axis)
            sub = rows_for(axis, clean | (kind == k))
            y = (kind == k)[sub]
            e = _axis_entry(None if s is None else s[sub], None if f is None else f[sub], y)
            # hits: defects of this kind that the axis flagged; auroc: this kind against the clean rows.
            entry[axis] = {key: e[key] for key in ("recall", "hits", "auroc") if key in e}
        out["kinds"][k] = entry
    for name, direction in SIGNALS:
        v = None if signals is None else _optional(signals, name)
        if v is None:
            continue
        v = v if direction == "high" else -v
        by_kind = {}
        for k in out["kinds"]:
            sub = rows_for(name, clean | (kind == k))
            by_kind[k] = _num(auroc(v[sub], (kind == k)[sub]).value)
        m = rows_for(name, keep)
        a = auroc(v[m], pos[m])
        out["signals"][name] = {"suspicious": direction, "auroc": _num(a.value), "n_nan": a.n_nan,
                                "by_kind": by_kind}
    return out
