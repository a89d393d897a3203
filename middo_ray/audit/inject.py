"""Defect injection: the audit dataset is the data with defects of known kinds in a fraction of the rows.

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
"""

from __future__ import annotations

import math
import random
import re
import string
from typing import Callable, Sequence

from middo_ray.schema import make_row

DEFAULT_KINDS = ("mismatched", "truncated", "shuffled", "near_duplicate", "repeated", "non_answer", "garbled")
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
    per_kind = _defects_per_kind(rows, fraction, kinds)
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    taken = {r["sample_id"] for r in rows}    # every id in use: a new row must not equal any of them
    used: set[int] = set()                     # source rows that already took a defect
    replaced: dict[int, tuple[dict, str]] = {}
    copies: list[tuple[dict, str, str]] = []
    for kind in kinds:
        for i, new in _inject_kind(rows, kind, per_kind[kind], order, rng, taken, used):
            if kind == "near_duplicate":
                copies.append((new, kind, rows[i]["sample_id"]))
            else:
                replaced[i] = (new, kind)
    return _labelled(rows, replaced, copies)


def _defects_per_kind(rows: list[dict], fraction: float, kinds: tuple[str, ...]) -> dict[str, int]:
    """``round(fraction * len(rows))`` defects split evenly over ``kinds``, the first kinds taking the remainder."""
    kinds = check_audit_args(fraction, kinds)
    ids = [r["sample_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise AuditError("the input rows have duplicate sample_ids; read them with middo_ray.io.read_dataset, "
                         "which keeps the first of each exact duplicate")
    n_def = round(fraction * len(rows))
    if n_def < len(kinds):
        raise AuditError(f"fraction {fraction} of {len(rows)} rows gives {n_def} defects, fewer than the "
                         f"{len(kinds)} kinds; raise --fraction, use more rows, or pass fewer --kinds")
    return {k: n_def // len(kinds) + (1 if j < n_def % len(kinds) else 0) for j, k in enumerate(kinds)}


def _inject_kind(rows: list[dict], kind: str, want: int, order: list[int], rng: random.Random, taken: set[str],
                 used: set[int]) -> list[tuple[int, dict]]:
    """``want`` defects of one kind, as (source index, defective row), from the rows not yet ``used``, in ``order``.

    Adds each new sample_id to ``taken`` and each source index to ``used``.

    Raises:
        AuditError: fewer than ``want`` free rows can take the kind.
    """
    made: list[tuple[int, dict]] = []
    tried = 0
    for i in order:
        if len(made) == want:
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
        made.append((i, new))
    if len(made) < want:
        raise AuditError(f"only {len(made)} of the {tried} free rows can take defect '{kind}' "
                         f"({KIND_DESCRIPTIONS[kind]}) but {want} are needed; lower --fraction "
                         f"or leave '{kind}' out of --kinds")
    return made


def _labelled(rows: list[dict], replaced: dict[int, tuple[dict, str]],
              copies: list[tuple[dict, str, str]]) -> tuple[list[dict], list[dict]]:
    """The audit rows (defective rows in their source's place, copies appended) and their labels."""
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
