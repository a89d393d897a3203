"""Audit: do the Middo signals find known defects in *your* data, before you spend GPU hours on it?

``middo audit`` copies the configured data, injects defects of known kinds into a fraction of the rows
(:func:`inject_defects`), runs the real diagnosis and selection on the copy, and measures per axis how
well the signals (AUROC) and the flags (precision, recall) separate the injected defects from the
untouched rows (:func:`audit_metrics`). Nothing is written back to the data; the loop is not run.

Defect kinds (each changes the row for sure; a row that cannot take a kind is skipped for another):

- ``mismatched``: the response is replaced by the response of another sample (different prompt and
  different response), as when two columns of a file are shifted against each other;
- ``truncated``: the response is cut after 20-50% of its words (responses of at least 6 words);
- ``shuffled``: the words of the response are permuted (at least 4 words, at least 2 distinct);
- ``near_duplicate``: a copy of a sample whose instruction gets one small surface edit (first letter
  lower-cased, final punctuation mark changed, a trailing "Thanks." or a doubled space). The copy is
  *added* after the source, which stays; only the copy counts as the defect, as a first-occurrence
  deduplication would see it;
- ``repeated``: the response degenerates into a loop: its first half, then the last 2-5 words of that
  half repeated 4-7 times (responses of at least 4 words);
- ``non_answer``: the response is replaced by an empty-ish non-answer ("I don't know.", "N/A", ...);
- ``garbled``: 35% of the response's letters are replaced by other characters (mojibake-like).

Directions matter. Middo's diversity axis flags *sparse* samples (low kNN similarity); a near-duplicate
makes its neighbourhood *denser*, so that axis cannot find it by design, and the audit reports that as
it is. The extra ``duplicate`` check (maximum cosine similarity of the prompt embedding to any earlier
row, flagged at ``dup_threshold``) is what finds duplicates; it is reported beside the Middo axes and
never folded into them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import string
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from middo_ray.schema import make_row

log = logging.getLogger("middo.audit")

DEFAULT_KINDS = ("mismatched", "truncated", "shuffled", "near_duplicate", "repeated", "non_answer", "garbled")
DEFAULT_DUP_THRESHOLD = 0.95
MAX_FRACTION = 0.5

# What each kind does, for the report and the docs (kept next to the code that does it).
KIND_DESCRIPTIONS = {
    "mismatched": "response replaced by the response of another sample",
    "truncated": "response cut after 20-50% of its words",
    "shuffled": "words of the response permuted",
    "near_duplicate": "added copy of a sample with one small edit of its instruction",
    "repeated": "response's first half, then that half's last 2-5 words looped 4-7 times",
    "non_answer": "response replaced by an empty-ish non-answer",
    "garbled": "35% of the response's letters replaced by other characters",
}

NON_ANSWERS = ("I don't know.", "N/A", "I'm not sure.", "Sorry, I can't answer that.", "See above.",
               "As an AI language model, I cannot help with that.", "Yes.", "...")
_GARBLE_POOL = string.ascii_letters + "ÃÂâ€™œžŸ¤§¬þðæ�"
_WORD = re.compile(r"\S+")


class AuditError(ValueError):
    """Bad audit input (fraction, kinds, data that cannot take a defect); the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Defect makers: (row, rng, donors) -> new output/instruction fields, or None if the row cannot take
# the defect. They never return an unchanged row.

def _spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _WORD.finditer(text)]


def _truncate(row: dict, rng: random.Random, _donors: Sequence[dict]) -> dict | None:
    spans = _spans(row["output"])
    n = len(spans)
    if n < 6:
        return None
    keep = rng.randint(max(1, math.ceil(0.2 * n)), max(1, n // 2))
    return {"output": row["output"][: spans[keep - 1][1]]}


def _shuffle(row: dict, rng: random.Random, _donors: Sequence[dict]) -> dict | None:
    words = row["output"].split()
    if len(words) < 4 or len(set(words)) < 2:
        return None
    perm = words[:]
    while perm == words:           # terminates: two distinct words admit a different order
        rng.shuffle(perm)
    return {"output": " ".join(perm)}


def _repeat(row: dict, rng: random.Random, _donors: Sequence[dict]) -> dict | None:
    spans = _spans(row["output"])
    if len(spans) < 4:
        return None
    half = math.ceil(len(spans) / 2)
    width = min(rng.randint(3, 5), half)
    loop = row["output"][spans[half - width][0]: spans[half - 1][1]]
    head = row["output"][: spans[half - 1][1]]
    return {"output": head + (" " + loop) * rng.randint(4, 7)}


def _non_answer(row: dict, rng: random.Random, _donors: Sequence[dict]) -> dict | None:
    choices = [a for a in NON_ANSWERS if a != row["output"].strip()]
    return {"output": rng.choice(choices)}


def _garble(row: dict, rng: random.Random, _donors: Sequence[dict]) -> dict | None:
    text = list(row["output"])
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    if len(letters) < 8:
        return None
    for i in rng.sample(letters, max(1, round(0.35 * len(letters)))):
        text[i] = rng.choice([c for c in _GARBLE_POOL if c != text[i]])
    return {"output": "".join(text)}


def _mismatch(row: dict, rng: random.Random, donors: Sequence[dict]) -> dict | None:
    own_prompt, own_out = (row["instruction"], row["input"]), row["output"].strip()
    for _ in range(min(50, len(donors))):
        d = donors[rng.randrange(len(donors))]
        if d["output"].strip() != own_out and (d["instruction"], d["input"]) != own_prompt:
            return {"output": d["output"]}
    return None


def _near_duplicate_edits(instruction: str) -> list[Callable[[], str]]:
    edits: list[Callable[[], str]] = []
    s = instruction
    if s[:1].isupper():
        edits.append(lambda: s[0].lower() + s[1:])
    if s.endswith((".", "?", "!")):
        edits.append(lambda: s[:-1] + {".": "!", "?": "??", "!": "."}[s[-1]])
    else:
        edits.append(lambda: s + ".")
    edits.append(lambda: s + " Thanks.")
    if " " in s:
        edits.append(lambda: s.replace(" ", "  ", 1))
    return edits


def _near_duplicate(row: dict, rng: random.Random, _donors: Sequence[dict]) -> dict | None:
    if not row["instruction"].strip():
        return None
    edits = _near_duplicate_edits(row["instruction"])
    rng.shuffle(edits)
    # Several candidates: the caller takes the first whose sample_id is new.
    return {"instruction_candidates": [e() for e in edits]}


_MAKERS: dict[str, Callable[[dict, random.Random, Sequence[dict]], dict | None]] = {
    "mismatched": _mismatch, "truncated": _truncate, "shuffled": _shuffle, "near_duplicate": _near_duplicate,
    "repeated": _repeat, "non_answer": _non_answer, "garbled": _garble,
}


def _with(row: dict, **fields) -> dict:
    """A fresh canonical row (new sample_id) from ``row``'s text with some fields replaced."""
    t = {c: row.get(c) or "" for c in ("instruction", "input", "output", "system", "history")}
    t.update(fields)
    return make_row(t["instruction"], t["output"], input=t["input"], system=t["system"], history=t["history"])


def check_audit_args(fraction: float, kinds: Sequence[str]) -> tuple[str, ...]:
    """Validates the audit's own arguments before any work; returns the kinds as a tuple."""
    kinds = tuple(kinds)
    problems = []
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= MAX_FRACTION):
        problems.append(f"fraction must be in (0, {MAX_FRACTION}] (got {fraction!r}); e.g. --fraction 0.1")
    unknown = [k for k in kinds if k not in _MAKERS]
    if unknown:
        problems.append(f"unknown defect kind(s) {unknown}; choose from {', '.join(DEFAULT_KINDS)}")
    if not kinds:
        problems.append(f"no defect kinds given; choose from {', '.join(DEFAULT_KINDS)}")
    if len(set(kinds)) != len(kinds):
        problems.append(f"defect kinds repeat: {list(kinds)}; name each kind once")
    if problems:
        raise AuditError("; ".join(problems))
    return kinds


def inject_defects(rows: list[dict], fraction: float = 0.1, seed: int = 0,
                   kinds: Sequence[str] = DEFAULT_KINDS) -> tuple[list[dict], list[dict]]:
    """Builds the audit dataset: the rows with defects of known kinds injected into a fraction of them.

    ``round(fraction * len(rows))`` defects are split evenly over ``kinds`` (the first kinds in the
    given order take the remainder). Each source row takes at most one defect. A defective row replaces
    its source in place, except ``near_duplicate`` copies, which are appended after all rows (their
    source stays). Every row gets a fresh ``sample_id`` and none collides with another row.

    Args:
        rows: canonical rows (``schema.make_row``), with unique sample ids.
        fraction: share of ``len(rows)`` that becomes defective, in (0, 0.5].
        seed: seed of every random choice; the same rows, fraction, seed and kinds give the same output.
        kinds: defect kinds (see the module docstring).

    Returns:
        ``(audit_rows, labels)``: labels align with audit_rows, each ``{"sample_id", "kind",
        "source_id"}`` with ``kind`` and ``source_id`` None for untouched rows.

    Raises:
        AuditError: bad fraction or kinds, fewer defects than kinds, or not enough rows that can take
            a kind (e.g. truncating needs responses of 6+ words).
    """
    kinds = check_audit_args(fraction, kinds)
    ids = [r["sample_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise AuditError("the input rows have duplicate sample_ids; read them with middo_ray.io.read_dataset, "
                         "which keeps the first of each exact duplicate")
    n_def = round(fraction * len(rows))
    if n_def < len(kinds):
        raise AuditError(f"fraction {fraction} of {len(rows)} rows gives {n_def} defects, fewer than the "
                         f"{len(kinds)} kinds; raise --fraction, use more rows, or pass fewer --kinds")
    per_kind = {k: n_def // len(kinds) + (1 if j < n_def % len(kinds) else 0) for j, k in enumerate(kinds)}

    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    taken = set(ids)                      # every id in use: a new row must not equal any of them
    used: set[int] = set()                # source rows that already took a defect
    replaced: dict[int, tuple[dict, str]] = {}
    copies: list[tuple[dict, str, str]] = []
    for kind in kinds:
        got, tried = 0, 0
        for i in order:
            if got == per_kind[kind]:
                break
            if i in used:
                continue
            tried += 1
            change = _MAKERS[kind](rows[i], rng, rows)
            if change is None:
                continue
            if kind == "near_duplicate":
                new = next((r for r in (_with(rows[i], instruction=c) for c in change["instruction_candidates"])
                            if r["sample_id"] not in taken), None)
            else:
                new = _with(rows[i], **change)
                new = None if new["sample_id"] in taken else new
            if new is None:
                continue
            taken.add(new["sample_id"])
            used.add(i)
            got += 1
            if kind == "near_duplicate":
                copies.append((new, kind, rows[i]["sample_id"]))
            else:
                replaced[i] = (new, kind)
        if got < per_kind[kind]:
            raise AuditError(f"only {got} of the {tried} free rows can take defect '{kind}' "
                             f"({KIND_DESCRIPTIONS[kind]}) but {per_kind[kind]} are needed; lower --fraction "
                             f"or leave '{kind}' out of --kinds")

    out_rows: list[dict] = []
    labels: list[dict] = []
    for i, row in enumerate(rows):
        if i in replaced:
            new, kind = replaced[i]
            out_rows.append(new)
            labels.append({"sample_id": new["sample_id"], "kind": kind, "source_id": row["sample_id"]})
        else:
            out_rows.append(row)
            labels.append({"sample_id": row["sample_id"], "kind": None, "source_id": None})
    for new, kind, src in copies:
        out_rows.append(new)
        labels.append({"sample_id": new["sample_id"], "kind": kind, "source_id": src})
    return out_rows, labels


# ---------------------------------------------------------------------------------------------
# Metrics (pure numpy).

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


def earlier_max_similarity(embeddings: np.ndarray, block: int = 1024, center: bool = True) -> np.ndarray:
    """Per row, the largest cosine similarity of its embedding to any *earlier* row's.

    This is what a keep-the-first deduplication sees: the later copy of a pair scores high, the
    first occurrence does not. The first row (nothing earlier) gets -1; rows with a zero or non-finite
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
        s = unit[start:stop] @ unit[:stop].T                       # (b, stop)
        s[:, ~valid[:stop]] = -np.inf
        s[np.arange(stop - start)[:, None] <= np.arange(stop)[None, :] - start] = -np.inf   # j >= i
        best = s.max(axis=1, initial=-np.inf)
        out[start:stop] = np.where(np.isfinite(best), best, -1.0)
    out[~valid] = np.nan
    return out


def _z(x: np.ndarray) -> np.ndarray:
    from middo_ray.signals.thresholds import mean_std

    mu, sd = mean_std(x, ddof=0)
    x = np.asarray(x, dtype=np.float64)
    if not (np.isfinite(sd) and sd > 0):
        return np.full(x.shape, np.nan)
    return (x - mu) / sd


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
    - duplicate (when ``dup_sim`` is given): max similarity to an earlier row.
    """
    out = {
        # NaN when either loss is missing: such a sample is never flagged, so it gets no score either.
        "complexity": np.minimum(_z(columns["loss_pre"]), _z(columns["loss_cur"])),
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
                  signals: dict[str, np.ndarray] | None = None, exclude: np.ndarray | None = None) -> dict:
    """Per axis and per defect kind x axis: precision, recall (flags) and AUROC (scores).

    Args:
        labels: from :func:`inject_defects`, aligned with the arrays.
        scores: axis -> suspicion score (higher = more suspicious), see :func:`axis_scores`.
        flags: axis -> boolean flags; an axis may have a score, flags, or both.
        signals: raw signal columns, reported one by one with the directions in :data:`SIGNALS`.
        exclude: rows left out of every figure (e.g. the demo's own known-bad rows, which are neither
            injected defects nor clean).

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
    for axis in axes:
        s, f = scores.get(axis), flags.get(axis)
        out["axes"][axis] = _axis_entry(None if s is None else s[keep], None if f is None else f[keep], pos[keep])
    for k in sorted({k for k in kind[pos]}):
        sub = clean | (kind == k)
        y = (kind == k)[sub]
        entry: dict = {"n": int(y.sum())}
        for axis in axes:
            s, f = scores.get(axis), flags.get(axis)
            e = _axis_entry(None if s is None else s[sub], None if f is None else f[sub], y)
            # hits: defects of this kind that the axis flagged; auroc: this kind against the clean rows.
            entry[axis] = {key: e[key] for key in ("recall", "hits", "auroc") if key in e}
        out["kinds"][k] = entry
    for name, direction in SIGNALS:
        v = None if signals is None else _optional(signals, name)
        if v is None:
            continue
        v = v if direction == "high" else -v
        by_kind = {k: _num(auroc(v[clean | (kind == k)], (kind == k)[clean | (kind == k)]).value)
                   for k in out["kinds"]}
        a = auroc(v[keep], pos[keep])
        out["signals"][name] = {"suspicious": direction, "auroc": _num(a.value), "n_nan": a.n_nan,
                                "by_kind": by_kind}
    return out


# ---------------------------------------------------------------------------------------------
# Text report.

def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


_SIDE = {"complexity": ">", "diversity": "<", "quality": "<"}


def _rule(axis: str, thresholds: dict) -> str:
    """The thresholds select used, as a readable rule ("loss_pre>2.1 & loss_cur>1.9")."""
    thr = thresholds.get(axis) or {}
    side = _SIDE.get(axis, "=")
    parts = [f"{k}{side}{v:.3g}" for k, v in thr.items()
             if k != "m" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " & ".join(parts) if parts else "-"


def format_report(report: dict) -> str:
    """The audit as a plain-text table: per axis, then per kind (recall and AUROC per axis)."""
    m = report["metrics"]
    c = report["counts"]
    lines = [
        f"middo audit: {c['audit_rows']} rows audited ({c['source_rows']} read and used, {c['rejected']} rejected, "
        f"{c['unused']} beyond data.max_samples), {m['defects']} defects injected "
        f"(base rate {_fmt(m['base_rate'], 3)}), model {report['config']['current_model']}",
    ]
    if m["excluded"]:
        lines.append(f"{m['excluded']} rows with known defects of the data itself are left out of the figures "
                     "(see known_defects in audit.json)")
    lines += ["", f"{'axis':<12} {'flags when':<34} {'defects':>7} {'flagged':>7} {'hits':>5} "
                  f"{'precision':>9} {'recall':>6} {'AUROC':>6} {'no score':>8}"]
    for axis, e in m["axes"].items():
        rule = report["rules"].get(axis, "-")
        lines.append(f"{axis:<12} {rule[:34]:<34} {e['n_defects']:>7} {e.get('flagged', '-'):>7} "
                     f"{e.get('hits', '-'):>5} {_fmt(e.get('precision')):>9} {_fmt(e.get('recall')):>6} "
                     f"{_fmt(e.get('auroc')):>6} {e.get('n_nan', '-'):>8}")
    axes = list(m["axes"])
    lines += ["", "per defect kind: recall of the flags (AUROC of the score vs clean rows)",
              f"{'kind':<15} {'n':>3}  " + "  ".join(f"{a:<12}" for a in axes) + "  best"]
    for k, e in m["kinds"].items():
        cells, best = [], (None, -1.0, -1.0)
        for a in axes:
            r, au = e[a].get("recall"), e[a].get("auroc")
            cells.append(f"{_fmt(r)} ({_fmt(au)})".ljust(12) if "recall" in e[a] else f"   ({_fmt(au)})".ljust(12))
            if a != "any" and (r or 0, au or 0) > best[1:]:
                best = (a, r or 0, au or 0)
        name = best[0] if best[1] > 0 else "none flags it"
        lines.append(f"{k:<15} {e['n']:>3}  " + "  ".join(cells) + f"  {name}")
    known = report.get("known_defects") or {}
    if known:
        lines += ["", "known defects of the data itself (not injected): recall (AUROC vs clean rows)",
                  f"{'kind':<15} {'n':>3}  " + "  ".join(f"{a:<12}" for a in axes)]
        for k, e in known.items():
            lines.append(f"{k:<15} {e['n']:>3}  " + "  ".join(
                f"{_fmt(e[a].get('recall'))} ({_fmt(e[a].get('auroc'))})".ljust(12) for a in axes if a in e))
    sig = [f"{s} ({v['suspicious']}) {_fmt(v['auroc'])}" for s, v in m["signals"].items()]
    lines += ["", "AUROC of each raw signal, all kinds together (suspicious direction in brackets):"]
    lines += ["  " + ", ".join(sig[i:i + 4]) for i in range(0, len(sig), 4)]
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------
# Driver.

def _json_ready(o):
    if isinstance(o, dict):
        return {str(k): _json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_ready(v) for v in o]
    if isinstance(o, (np.generic,)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def default_out_dir(cfg) -> Path:
    """Where ``run_audit`` writes when no directory is given: ``<output_dir>/audit_<run_id or hash>``."""
    from middo_ray.config import config_hash

    return Path(cfg.run.output_dir) / f"audit_{cfg.run.run_id or config_hash(cfg)}"


def _checks_and_flags(cfg, flags: dict[str, np.ndarray], scores: dict[str, np.ndarray], dup: np.ndarray,
                      dup_threshold: float, thresholds: dict) -> tuple[dict, dict]:
    """Adds the extra checks (ifd, duplicate) and the Middo union ``any`` to select's flags, with rules."""
    flags = {a: np.asarray(f, dtype=bool) for a, f in flags.items()}
    rules = {a: _rule(a, thresholds) for a in flags}
    middo_axes = list(flags)
    any_flag = np.zeros(len(dup), dtype=bool)
    for a in middo_axes:
        any_flag |= flags[a]
    if "ifd" in scores:
        ifd_max = float(getattr(cfg.select, "ifd_max", 1.0))
        with np.errstate(invalid="ignore"):
            flags["ifd"] = np.isfinite(scores["ifd"]) & (scores["ifd"] > ifd_max)
        rules["ifd"] = f"ifd>{_fmt(ifd_max, 3)}"
    with np.errstate(invalid="ignore"):
        flags["duplicate"] = np.isfinite(dup) & (dup >= dup_threshold)
    rules["duplicate"] = f"max sim to earlier>={_fmt(dup_threshold, 3)}"
    flags["any"] = any_flag
    rules["any"] = " | ".join(middo_axes)
    return flags, rules


def _known_defects_report(labels: list[dict], known: dict[str, str], exclude: np.ndarray,
                          scores: dict[str, np.ndarray], flags: dict[str, np.ndarray]) -> dict:
    """Recall and AUROC per axis for the data's own known defects (the demo's), each kind vs clean rows."""
    out: dict = {}
    clean = np.asarray([lab["kind"] is None for lab in labels]) & ~exclude
    known_kind = np.asarray([known.get(lab["sample_id"]) if x else None for lab, x in zip(labels, exclude)],
                            dtype=object)
    for k in sorted({k for k in known_kind if k is not None}):
        mine = known_kind == k
        sub = mine | clean
        sub_labels = [{"kind": "known" if mine[i] else None} for i in np.flatnonzero(sub)]
        m = audit_metrics(sub_labels, {a: s[sub] for a, s in scores.items()}, {a: f[sub] for a, f in flags.items()})
        out[k] = {"n": int(mine.sum()),
                  **{a: {"recall": e.get("recall"), "auroc": e.get("auroc")} for a, e in m["axes"].items()}}
    return out


def _rows_table(audit_rows: list[dict], labels: list[dict], known: dict[str, str], columns: dict,
                flags: dict[str, np.ndarray]) -> list[dict]:
    """Every audit row with its label, signals and flags, for a look at what was and was not found."""
    table = []
    names = [n for n in [s for s, _ in SIGNALS] + ["truncated"] if n in columns]
    for i, (row, lab) in enumerate(zip(audit_rows, labels)):
        rec = {c: row[c] for c in ("sample_id", "instruction", "input", "output", "system", "history")}
        rec.update(kind=lab["kind"], source_id=lab["source_id"], known_defect=known.get(row["sample_id"]))
        for name in names:
            v = np.asarray(columns[name])[i].item()
            rec[name] = None if isinstance(v, float) and not math.isfinite(v) else v
        rec.update({f"flag_{a}": bool(f[i]) for a, f in flags.items()})
        table.append(rec)
    return table


def run_audit(cfg, fraction: float = 0.1, seed: int = 0, out_dir: str | Path | None = None,
              model: str | None = None, kinds: Sequence[str] = DEFAULT_KINDS,
              dup_threshold: float = DEFAULT_DUP_THRESHOLD, echo: bool = True) -> dict:
    """Injects defects into a copy of ``cfg.data``, diagnoses it on Ray and measures what is found.

    Every axis is evaluated (``select.axes`` is widened to all of them; the other select settings,
    such as ``m`` and the mode, are the user's). The current model is ``model`` or the base model,
    as at the first diagnosis of a run. ``data.max_samples`` keeps the first rows, as the loop does.

    Writes ``audit.json`` (the returned dict), ``audit.txt`` (the table, also printed when ``echo``),
    ``rows.parquet`` (every audit row with its label, signals and flags) and ``rejects.jsonl``.

    Raises:
        AuditError: bad fraction/kinds/threshold, or data that cannot take the requested defects.
        FileNotFoundError / ValueError: unreadable data (from ``io.read_dataset``).
    """
    from middo_ray import io
    from middo_ray.diagnose import run_diagnosis
    from middo_ray.loop import init_ray, save_rows
    from middo_ray.select import AXES, select_flags

    kinds = check_audit_args(fraction, kinds)
    if not 0 < dup_threshold <= 1:
        raise AuditError(f"dup_threshold must be in (0, 1] (got {dup_threshold}); e.g. 0.95")
    t0 = time.time()
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    res = io.read_dataset(cfg.data.path, cfg.data.format, rejects_path=out / "rejects.jsonl")
    rows, unused = res.rows, []
    if cfg.data.max_samples is not None and len(rows) > cfg.data.max_samples:
        rows, unused = rows[: cfg.data.max_samples], rows[cfg.data.max_samples:]
    audit_rows, labels = inject_defects(rows, fraction, seed, kinds)
    known: dict[str, str] = {}
    if str(cfg.data.path) == "demo":
        from middo_ray.demo import demo_path

        known = json.loads(demo_path("defects").read_text())
    # The data's own known-bad rows are neither clean nor injected: kept out of the figures.
    exclude = np.asarray([lab["kind"] is None and lab["sample_id"] in known for lab in labels], dtype=bool)
    log.info("audit: %d rows read (%d rejected), %d used, %d defects injected into the copy",
             res.n_input, len(res.rejects), len(rows), sum(lab["kind"] is not None for lab in labels))

    init_ray(cfg)
    current = model or cfg.model.base
    t_diag = time.time()
    diag = run_diagnosis(audit_rows, cfg, current)
    t_diag = time.time() - t_diag
    if diag.sample_ids != [r["sample_id"] for r in audit_rows]:
        raise RuntimeError("diagnosis rows do not line up with the audit rows by sample_id; this is a bug")
    sel_cfg = cfg.select.model_copy(update={"axes": list(AXES)})
    sel_flags, thresholds, _ = select_flags(diag.columns, sel_cfg)
    dup = earlier_max_similarity(diag.embeddings)
    cols = dict(diag.columns, dup_sim=dup)
    scores = axis_scores(diag.columns, dup)
    flags, rules = _checks_and_flags(cfg, sel_flags, scores, dup, dup_threshold, thresholds)
    metrics = audit_metrics(labels, scores, flags, cols, exclude=exclude)

    n_added = sum(1 for lab in labels if lab["kind"] == "near_duplicate")
    counts = {
        "rows_in": res.n_input, "rejected": len(res.rejects), "unused": len(unused), "source_rows": len(rows),
        "replaced": sum(1 for lab in labels if lab["kind"] not in (None, "near_duplicate")),
        "added": n_added, "audit_rows": len(audit_rows),
        "injected": {k: sum(1 for lab in labels if lab["kind"] == k) for k in kinds},
        "clean": int(sum(1 for lab in labels if lab["kind"] is None)), "known_defects_excluded": int(exclude.sum()),
    }
    if counts["rows_in"] != counts["rejected"] + counts["unused"] + counts["source_rows"] or \
            counts["audit_rows"] != counts["source_rows"] + n_added:
        raise AssertionError(f"audit row accounting is broken: {counts}")
    report = _json_ready({
        "config": {"data": str(cfg.data.path), "current_model": current, "pre_model": cfg.model.pre or cfg.model.base,
                   "fraction": fraction, "seed": seed, "kinds": list(kinds), "dup_threshold": dup_threshold,
                   "select": sel_cfg.model_dump(), "judge": cfg.diagnose.judge},
        "kind_descriptions": {k: KIND_DESCRIPTIONS[k] for k in kinds},
        "counts": counts, "rules": rules, "thresholds": thresholds, "metrics": metrics,
        "known_defects": _known_defects_report(labels, known, exclude, scores, flags),
        "diagnosis": diag.counts, "out_dir": str(out),
        "seconds": {"diagnosis": round(t_diag, 2), "total": round(time.time() - t0, 2)},
    })
    text = format_report(report)
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    (out / "audit.txt").write_text(text + "\n")
    save_rows(_rows_table(audit_rows, labels, known, cols, flags), out / "rows.parquet")
    log.info("audit: written to %s in %.1fs", out, time.time() - t0)
    if echo:
        print(text)
        print(f"\nwritten: {out / 'audit.json'}, {out / 'audit.txt'}, {out / 'rows.parquet'}")
    return report
