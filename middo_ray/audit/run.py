"""The audit's driver: :func:`run_audit` reads the data, injects defects, diagnoses the copy on Ray,
measures what the signals and flags find and writes the report."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from middo_ray.audit.inject import DEFAULT_KINDS, KIND_DESCRIPTIONS, AuditError, check_audit_args, inject_defects
from middo_ray.audit.metrics import SIGNALS, audit_metrics, axis_scores, max_similarity
from middo_ray.audit.report import _fmt, _json_ready, _rule, format_report

log = logging.getLogger("middo.audit")

DEFAULT_DUP_THRESHOLD = 0.95


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
    rules["duplicate"] = f"max sim to another row>={_fmt(dup_threshold, 3)}"
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


def _read_rows(cfg, out: Path):
    """The configured data as ``io.read_dataset`` reads it (rejects to ``out``), cut at ``data.max_samples``.

    Returns:
        ``(result, rows, unused)``: the read result, the rows the audit uses, those beyond ``max_samples``.
    """
    from middo_ray import demo, io

    res = io.read_dataset(demo.resolve(cfg.data.path), cfg.data.format, rejects_path=out / "rejects.jsonl")
    rows, unused = res.rows, []
    if cfg.data.max_samples is not None and len(rows) > cfg.data.max_samples:
        rows, unused = rows[: cfg.data.max_samples], rows[cfg.data.max_samples:]
    return res, rows, unused


def _known_defects(cfg) -> dict[str, str]:
    """sample_id -> kind of the data's own known defects: the demo ships them, other data has none."""
    known: dict[str, str] = {}
    if str(cfg.data.path) == "demo":
        from middo_ray.demo import demo_path

        known = json.loads(demo_path("defects").read_text())
    return known


def _counts(res, rows: list[dict], unused: list[dict], audit_rows: list[dict], labels: list[dict],
            kinds: tuple[str, ...], exclude: np.ndarray) -> dict:
    """Where every row went (read, rejected, unused, replaced, added), checked to add up."""
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
    return counts


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
    from middo_ray.diagnose import run_diagnosis
    import pyarrow as pa

    from middo_ray import storage
    from middo_ray.rundir import init_ray
    from middo_ray.schema import AXES
    from middo_ray.select import select_flags

    kinds = check_audit_args(fraction, kinds)
    if not 0 < dup_threshold <= 1:
        raise AuditError(f"dup_threshold must be in (0, 1] (got {dup_threshold}); e.g. 0.95")
    t0 = time.time()
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    res, rows, unused = _read_rows(cfg, out)
    audit_rows, labels = inject_defects(rows, fraction, seed, kinds)
    known = _known_defects(cfg)
    # The data's own known-bad rows are neither clean nor injected: kept out of the figures.
    exclude = np.asarray([lab["kind"] is None and lab["sample_id"] in known for lab in labels], dtype=bool)
    log.info("audit: %d rows read (%d rejected), %d used, %d defects injected into the copy",
             res.n_input, len(res.rejects), len(rows), sum(lab["kind"] is not None for lab in labels))

    init_ray(cfg)
    current = model or cfg.model.base
    t_diag = time.time()
    diag = run_diagnosis(audit_rows, cfg, current, work_dir=str(out / "work"))
    t_diag = time.time() - t_diag
    if diag.sample_ids != [r["sample_id"] for r in audit_rows]:
        raise RuntimeError("diagnosis rows do not line up with the audit rows by sample_id; this is a bug")
    sel_cfg = cfg.select.model_copy(update={"axes": list(AXES)})
    sel_flags, thresholds, _ = select_flags(diag.columns, sel_cfg)
    dup = max_similarity(diag.embeddings)             # both copies of a pair score high, wherever each one is
    copied = {lab["source_id"] for lab in labels if lab["kind"] == "near_duplicate"}
    partners = np.asarray([lab["kind"] is None and lab["sample_id"] in copied for lab in labels], dtype=bool)
    cols = dict(diag.columns, dup_sim=dup)
    scores = axis_scores(diag.columns, dup)
    flags, rules = _checks_and_flags(cfg, sel_flags, scores, dup, dup_threshold, thresholds)
    metrics = audit_metrics(labels, scores, flags, cols, exclude=exclude, partners=partners)

    counts = _counts(res, rows, unused, audit_rows, labels, kinds, exclude)
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
    storage.write_table(str(out / "rows.parquet"), pa.Table.from_pylist(_rows_table(audit_rows, labels, known, cols,
                                                                                     flags)))
    log.info("audit: written to %s in %.1fs", out, time.time() - t0)
    if echo:
        print(text)
        print(f"\nwritten: {out / 'audit.json'}, {out / 'audit.txt'}, {out / 'rows.parquet'}")
    return report
