"""Audit: defect injection (every kind really changes its row, ids stay unique, deterministic) and the
metrics (AUROC, precision, recall) against hand-computed cases."""

import itertools
import math

import numpy as np
import pytest

from middo_ray.audit import (DEFAULT_KINDS, NON_ANSWERS, AuditError, audit_metrics, auroc, axis_scores,
                             inject_defects, max_similarity, precision_recall)
from middo_ray.schema import make_row
from middo_ray.signals.thresholds import complexity_flags

pytestmark = pytest.mark.unit

TOPICS = ["rivers", "volcanoes", "glaciers", "deserts", "forests", "oceans", "islands", "canyons", "lakes", "caves"]


def _rows(n: int = 60) -> list[dict]:
    """Distinct rows with responses long enough for every kind; some with input/system/history."""
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        rows.append(make_row(
            f"Describe {t} in region {i}.",
            f"In region {i} the {t} are wide and old, shaped by water and wind over many long years.",
            input=f"Region {i}" if i % 3 == 0 else "",
            system="Answer briefly." if i % 4 == 0 else "",
            history=[["Hello", "Hi, ask me anything."]] if i % 5 == 0 else None))
    return rows


def _by_kind(rows, kind, **kw):
    audit, labels = inject_defects(rows, kinds=(kind,), **kw)
    src = {r["sample_id"]: r for r in rows}
    return [(r, src[lab["source_id"]], lab) for r, lab in zip(audit, labels) if lab["kind"] == kind], audit, labels


def _same_context(new, old):
    return all(new[c] == old[c] for c in ("input", "system", "history"))


def test_every_kind_changes_its_row_as_documented():
    """Each kind produces a row that differs from its source in the documented way and keeps the
    source's input, system prompt and history."""
    rows = _rows()
    outputs = {r["output"] for r in rows}
    for kind in DEFAULT_KINDS:
        got, _, _ = _by_kind(rows, kind, fraction=0.1, seed=3)
        assert len(got) == 6, kind
        for new, old, lab in got:
            assert new["sample_id"] != old["sample_id"] and lab["sample_id"] == new["sample_id"]
            assert _same_context(new, old), kind
            if kind != "near_duplicate":
                assert new["instruction"] == old["instruction"] and new["output"] != old["output"], kind
            w_new, w_old = new["output"].split(), old["output"].split()
            if kind == "mismatched":
                assert new["output"] in outputs
            elif kind == "truncated":
                assert old["output"].startswith(new["output"])
                assert 1 <= len(w_new) <= len(w_old) // 2
            elif kind == "shuffled":
                assert sorted(w_new) == sorted(w_old) and w_new != w_old
            elif kind == "near_duplicate":
                assert new["output"] == old["output"] and new["instruction"] != old["instruction"]
                assert new["instruction"].lower().split()[:3] == old["instruction"].lower().split()[:3]
            elif kind == "repeated":
                half = " ".join(w_old[: math.ceil(len(w_old) / 2)])
                assert new["output"].startswith(half) and len(w_new) >= len(w_old) // 2 + 4 * 3
                loop = " ".join(w_new[-3:])
                assert new["output"].count(loop) >= 4
            elif kind == "non_answer":
                assert new["output"] in NON_ANSWERS
            elif kind == "garbled":
                assert len(new["output"]) == len(old["output"])
                letters = [i for i, c in enumerate(old["output"]) if c.isalpha()]
                changed = sum(new["output"][i] != old["output"][i] for i in letters)
                assert changed >= 0.3 * len(letters)


def test_ids_unique_labels_aligned_and_counts_split_evenly():
    """All audit ids are unique, labels align row by row, replacements stay in place, near-duplicate
    copies are appended after their (kept, clean) source, and the defects split evenly over kinds."""
    rows = _rows(70)
    audit, labels = inject_defects(rows, fraction=0.2, seed=1)
    n_def = 14
    ids = [r["sample_id"] for r in audit]
    assert len(set(ids)) == len(ids)
    assert ids == [lab["sample_id"] for lab in labels]
    kinds = [lab["kind"] for lab in labels if lab["kind"]]
    assert len(kinds) == n_def and {k: kinds.count(k) for k in DEFAULT_KINDS} == {k: 2 for k in DEFAULT_KINDS}
    dups = [lab for lab in labels if lab["kind"] == "near_duplicate"]
    assert len(audit) == len(rows) + len(dups) and labels[-len(dups):] == dups
    clean_ids = {lab["sample_id"] for lab in labels if lab["kind"] is None}
    assert all(d["source_id"] in clean_ids for d in dups)
    for i, row in enumerate(rows):                    # position i holds the row or its replacement
        assert labels[i]["sample_id"] == row["sample_id"] or labels[i]["source_id"] == row["sample_id"]
    sources = [lab["source_id"] for lab in labels if lab["kind"]]
    assert len(set(sources)) == len(sources)          # one defect per source row


def test_deterministic_by_seed():
    """The same rows, fraction, seed and kinds give the same audit set; another seed another one."""
    rows = _rows()
    a = inject_defects(rows, fraction=0.15, seed=7)
    b = inject_defects(rows, fraction=0.15, seed=7)
    c = inject_defects(rows, fraction=0.15, seed=8)
    assert a == b
    assert [r["sample_id"] for r in a[0]] != [r["sample_id"] for r in c[0]]


def test_rows_that_cannot_take_a_kind_are_skipped_never_no_ops():
    """Truncation skips one-word responses and uses the long ones; when too few rows qualify the
    error names the kind and the fix instead of injecting fewer defects silently."""
    short = [make_row(f"Is {i} even?", "Yes." if i % 2 == 0 else "No.") for i in range(40)]
    long = [make_row(f"Explain item {i}.", f"Item {i} is a thing with several parts that fit together well.")
            for i in range(10)]
    got, _, _ = _by_kind(short + long, "truncated", fraction=0.1, seed=0)
    assert len(got) == 5 and all(old["output"].startswith("Item") for _, old, _ in got)
    with pytest.raises(AuditError, match="truncated.*--fraction"):
        inject_defects(short + long, fraction=0.3, kinds=("truncated",))
    with pytest.raises(AuditError, match="shuffled"):
        inject_defects(short, fraction=0.1, kinds=("shuffled",))


def test_near_duplicate_copies_never_collide_with_existing_rows():
    """When the data already holds some edited variants of a row, the copy takes an edit that is
    still free; no seed produces a duplicate sample_id."""
    out = "Hi there, my good friend."
    base = make_row("Say hi to me.", out)
    taken = [make_row(t, out) for t in ("say hi to me.", "Say hi to me!", "Say hi to me. Thanks.")]
    rows = [base] + taken
    seen_from_base = set()
    for seed in range(40):
        audit, labels = inject_defects(rows, fraction=0.25, seed=seed, kinds=("near_duplicate",))
        ids = [r["sample_id"] for r in audit]
        assert len(set(ids)) == len(ids) == 5
        if labels[-1]["source_id"] == base["sample_id"]:
            seen_from_base.add(audit[-1]["instruction"])
    assert seen_from_base == {"Say  hi to me."}


def test_bad_arguments_are_refused_with_the_fix():
    """Fraction out of range, unknown or repeated kinds, too few defects for the kinds, and
    duplicate input ids each give an AuditError naming the problem."""
    rows = _rows(20)
    with pytest.raises(AuditError, match="fraction"):
        inject_defects(rows, fraction=0.0)
    with pytest.raises(AuditError, match="fraction"):
        inject_defects(rows, fraction=0.9)
    with pytest.raises(AuditError, match="unknown defect kind.*typo"):
        inject_defects(rows, kinds=("typo",))
    with pytest.raises(AuditError, match="repeat"):
        inject_defects(rows, fraction=0.2, kinds=("garbled", "garbled"))
    with pytest.raises(AuditError, match="fewer than the 7 kinds"):
        inject_defects(rows, fraction=0.1)
    with pytest.raises(AuditError, match="duplicate sample_ids"):
        inject_defects(rows + rows[:1], fraction=0.5, kinds=("garbled",))


# ---------------------------------------------------------------------------------------------
# Metrics.

def _pairwise_auc(s, y):
    pos, neg = s[y], s[~y]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


def test_auroc_hand_cases():
    """Known values: a textbook example (0.75), perfect (1), reversed (0), all ties (0.5), a single
    tie pair (0.25), NaN scores left out and counted, and an empty class giving NaN."""
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])).value == pytest.approx(0.75)
    assert auroc(np.array([1.0, 2, 3, 4]), np.array([0, 0, 1, 1])).value == 1.0
    assert auroc(np.array([1.0, 2, 3, 4]), np.array([1, 1, 0, 0])).value == 0.0
    assert auroc(np.full(6, 3.0), np.array([1, 0, 1, 0, 0, 0])).value == 0.5
    assert auroc(np.array([1.0, 1.0, 2.0]), np.array([1, 0, 0])).value == pytest.approx(0.25)
    a = auroc(np.array([np.nan, 0.2, 0.9, np.nan]), np.array([1, 0, 1, 0]))
    assert a == (1.0, 1, 1, 2)
    none = auroc(np.array([0.3, 0.4]), np.array([0, 0]))
    assert math.isnan(none.value) and none.n_pos == 0 and none.n_neg == 2


def test_auroc_matches_pairwise_count_with_ties():
    """On random integer scores (many ties) the rank formula equals counting all pairs."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 5, size=37).astype(float)
        y = rng.random(37) < 0.3
        assert auroc(s, y).value == pytest.approx(_pairwise_auc(s, y))


def test_precision_recall_hand_cases():
    """3 flags, 2 of them hits, 3 positives: precision = recall = 2/3; no flags: precision NaN."""
    pr = precision_recall(np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 1, 0, 1], bool))
    assert pr.precision == pytest.approx(2 / 3) and pr.recall == pytest.approx(2 / 3)
    assert (pr.flagged, pr.hits, pr.positives) == (3, 2, 3)
    empty = precision_recall(np.zeros(4, bool), np.array([1, 0, 0, 0], bool))
    assert math.isnan(empty.precision) and empty.recall == 0.0
    with pytest.raises(ValueError, match="shape"):
        precision_recall(np.zeros(3, bool), np.zeros(4, bool))


def test_max_similarity_scores_both_copies_and_earlier_only_the_later():
    """Both copies of a pair score ~1 wherever each one is; with earlier_only the later copy does and the first
    does not (nor the first row: -1); a zero embedding gets NaN and is nobody's neighbour; block size does not
    matter."""
    e = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.01], [-1.0, 0.0]])
    for block in (1, 2, 100):
        s = max_similarity(e, block=block, center=False, earlier_only=True)
        assert s[0] == -1.0 and s[1] == pytest.approx(0.0) and math.isnan(s[2])
        assert s[3] == pytest.approx(1.0, abs=1e-4) and s[4] == pytest.approx(0.0, abs=1e-2)
        both = max_similarity(e, block=block, center=False)
        assert both[0] == pytest.approx(1.0, abs=1e-4) and both[3] == pytest.approx(1.0, abs=1e-4)
        assert both[1] == pytest.approx(0.0, abs=1e-2) and math.isnan(both[2])
        assert both[4] == pytest.approx(0.0, abs=1e-2)          # its best is row 1 (orthogonal), not itself
    assert max_similarity(np.array([[1.0, 0.0]]), center=False)[0] == -1.0
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 5)) + 10.0       # a large shared offset, as LM hidden states have
    raw, centred = max_similarity(x, center=False), max_similarity(x)
    assert np.nanmin(raw) > 0.9 and np.nanmedian(centred) < 0.9


def test_duplicate_check_leaves_the_copied_rows_out_of_its_negatives():
    """A planted copy placed *before* its original is found as well as one placed after; the original it copies
    scores as high, and counts as neither clean nor defect for the duplicate check only."""
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(40, 8))
    emb[0] = emb[30] + 1e-3                   # row 0: a planted copy of row 30, placed before it
    emb[39] = emb[5] + 1e-3                   # row 39: a planted copy of row 5, placed after it
    labels = [{"kind": None, "sample_id": str(i), "source_id": None} for i in range(40)]
    labels[0] = {"kind": "near_duplicate", "sample_id": "0", "source_id": "30"}
    labels[39] = {"kind": "near_duplicate", "sample_id": "39", "source_id": "5"}
    partners = np.zeros(40, dtype=bool)
    partners[[30, 5]] = True
    dup = max_similarity(emb)
    assert dup[0] > 0.99 and dup[39] > 0.99 and dup[30] > 0.99
    cols = {"loss_pre": rng.random(40), "loss_cur": rng.random(40), "knn_sim": rng.random(40),
            "quality": rng.random(40)}
    flags = {"duplicate": dup >= 0.95}
    m = audit_metrics(labels, axis_scores(cols, dup), flags, partners=partners)
    assert m["kinds"]["near_duplicate"]["duplicate"]["auroc"] == 1.0
    assert m["axes"]["duplicate"]["precision"] == 1.0 and m["axes"]["duplicate"]["n_clean"] == 36
    assert m["axes"]["complexity"]["n_clean"] == 38          # the copied rows are clean for every other axis
    without = audit_metrics(labels, axis_scores(cols, dup), flags)
    assert without["axes"]["duplicate"]["precision"] == 0.5  # the originals, counted as clean, are flagged too


def test_complexity_score_orders_like_its_flag_rule():
    """The complexity score is min(z_pre, z_cur), so 'score > m' is exactly the hard-sample flag."""
    rng = np.random.default_rng(2)
    cols = {"loss_pre": rng.normal(2, 0.5, 200), "loss_cur": rng.normal(1, 0.3, 200),
            "knn_sim": rng.random(200), "quality": rng.random(200) * 10}
    cols["loss_cur"][5] = np.nan
    s = axis_scores(cols)
    for m in (0.5, 1.0, 1.5):
        flags, _ = complexity_flags(cols["loss_pre"], cols["loss_cur"], m)
        np.testing.assert_array_equal(flags, np.nan_to_num(s["complexity"], nan=-np.inf) > m)
    assert math.isnan(s["complexity"][5])
    assert "ifd" not in s and "duplicate" not in s
    assert "ifd" in axis_scores({**cols, "ifd": np.linspace(0.5, 1.5, 200)})
    assert "ifd" not in axis_scores({**cols, "ifd": np.full(200, np.nan)})   # all-missing counts as absent


def test_audit_metrics_hand_computed():
    """Per axis, per kind and per raw signal, on 8 rows where each figure can be counted by hand;
    excluded rows never enter any figure."""
    kinds = [None, None, None, None, "a", "a", "b", None]
    labels = [{"sample_id": str(i), "kind": k, "source_id": None} for i, k in enumerate(kinds)]
    score = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.05, 0.7, 5.0])
    flag = np.array([0, 0, 0, 1, 1, 0, 1, 1], bool)
    exclude = np.array([0, 0, 0, 0, 0, 0, 0, 1], bool)         # row 7 would be a false positive
    m = audit_metrics(labels, {"x": score}, {"x": flag, "only_flags": flag}, exclude=exclude,
                      signals={"knn_sim": -score})
    assert (m["rows"], m["excluded"], m["defects"], m["base_rate"]) == (7, 1, 3, round(3 / 7, 4))
    x = m["axes"]["x"]
    # flagged {3,4,6}: hits 4,6 -> precision 2/3, recall 2/3; one clean of 4 flagged
    assert (x["flagged"], x["hits"], x["clean_flagged"]) == (3, 2, 1)
    assert x["precision"] == round(2 / 3, 4) and x["recall"] == round(2 / 3, 4)
    assert x["false_positive_rate"] == 0.25
    # positives 0.8, 0.05, 0.7 vs negatives 0.1, 0.2, 0.3, 0.9: wins 3 + 0 + 3 of 12
    assert x["auroc"] == 0.5 and x["n_nan"] == 0
    assert "auroc" not in m["axes"]["only_flags"]
    a, b = m["kinds"]["a"], m["kinds"]["b"]
    assert a["n"] == 2 and a["x"] == {"recall": 0.5, "hits": 1, "auroc": 0.375}
    assert b["n"] == 1 and b["x"] == {"recall": 1.0, "hits": 1, "auroc": 0.75}
    sig = m["signals"]["knn_sim"]                              # 'low' is suspicious: -(-score)
    assert sig["suspicious"] == "low" and sig["auroc"] == 0.5 and sig["by_kind"] == {"a": 0.375, "b": 0.75}


def test_cli_refuses_bad_audit_arguments_before_any_work():
    """`middo audit` with a bad fraction, an unknown kind and a config typo reports all three at once
    and exits 2 without starting Ray (checked in a fresh interpreter, whatever this session runs)."""
    import subprocess
    import sys

    code = ("import sys, ray\nfrom middo_ray.cli import main\n"
            "rc = main(['audit', '--fraction', '0.9', '--kinds', 'garbled,typo', '--set', 'selct.quality_m=1'])\n"
            "print('RC', rc, 'RAY', ray.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RC 2 RAY False" in proc.stdout, proc.stdout + proc.stderr
    err = proc.stderr
    assert "fraction must be in (0, 0.5]" in err and "typo" in err and "did you mean 'select'" in err
