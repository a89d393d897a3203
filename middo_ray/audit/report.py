"""The audit's report: the plain-text table (:func:`format_report`) and values made JSON-ready."""

from __future__ import annotations

import math

import numpy as np


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
