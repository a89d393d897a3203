"""A one-page HTML report of a run: the metric per round, sizes, flags, timings and example rewrites.

Reads only what the loop wrote (manifests, refine results, the summary), so it can be rebuilt for any
run directory with ``middo report runs/<run_id>``. Charts are inline SVG: no plotting dependency.
"""

from __future__ import annotations

import html
import json
from pathlib import Path


def _bars(values: list[float | None], labels: list[str], width: int = 420, height: int = 140,
          fmt: str = "{:.3f}") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "<p>(no values)</p>"
    top = max(vals) or 1.0
    n = len(values)
    bw = width / max(n, 1)
    parts = [f'<svg width="{width}" height="{height + 30}" role="img">']
    for i, (v, lab) in enumerate(zip(values, labels)):
        x = i * bw + 6
        if v is not None:
            h = max(1.0, (v / top) * height)
            parts.append(f'<rect x="{x:.0f}" y="{height - h:.0f}" width="{bw - 12:.0f}" height="{h:.0f}" fill="#4a7bd0"/>')
            parts.append(f'<text x="{x + (bw - 12) / 2:.0f}" y="{height - h - 3:.0f}" font-size="11" '
                         f'text-anchor="middle">{fmt.format(v)}</text>')
        parts.append(f'<text x="{x + (bw - 12) / 2:.0f}" y="{height + 16}" font-size="11" '
                     f'text-anchor="middle">{html.escape(lab)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _shards(run: Path, k: int, stage: str, name: str):
    """The shard set ``name`` a finished stage recorded (None when the stage is not finished)."""
    from middo_ray.rundir import RECORD
    from middo_ray.storage import ShardSet

    record = run / f"round_{k}" / stage / RECORD
    if not record.is_file():
        return None
    return ShardSet.from_json(json.loads(record.read_text())["shards"][name])


def _examples(run: Path, k: int, limit: int = 4) -> str:
    from middo_ray import storage

    results = _shards(run, k, "refine", "results")
    if results is None:
        return ""
    items = []
    for path in results.paths():
        items += [r for r in storage.read_table(path).to_pylist() if r["status"] == "ok"][: limit - len(items)]
        if len(items) >= limit:
            break
    if not items:
        return "<p>No accepted rewrites this round.</p>"
    rows = [[r["operation"], r["before_instruction"][:300], r["instruction"][:300], r["output"][:300]] for r in items]
    return _table(["operation", "before (prompt)", "after (prompt)", "after (answer)"], rows)


def _known_defects(run: Path) -> str:
    """For the bundled demo data: which deliberately bad samples each axis flagged in round 1."""
    from middo_ray.demo import demo_path

    data_info = run / "round_0" / "data" / "stage.json"
    flags_set = _shards(run, 1, "select", "flags")
    if not (data_info.is_file() and flags_set is not None):
        return ""
    if Path(json.loads(data_info.read_text())["source"]).resolve() != demo_path("seed").resolve():
        return ""
    defects = json.loads(demo_path("defects").read_text())
    flags = flags_set.read().to_pylist()
    kinds = sorted(set(defects.values()))
    axes = ("complexity", "quality", "diversity")
    present = [r for r in flags if r["sample_id"] in defects]
    rows = []
    for kind in kinds:
        of_kind = [r for r in present if defects[r["sample_id"]] == kind]
        rows.append([kind, len(of_kind)] + [sum(r[a] for r in of_kind) for a in axes]
                    + [sum(any(r[a] for a in axes) for r in of_kind)])
    clean = [r for r in flags if r["sample_id"] not in defects]
    rows.append(["(clean samples)", len(clean)] + [sum(r[a] for r in clean) for a in axes]
                + [sum(any(r[a] for a in axes) for r in clean)])
    return ("<h2>round 1: deliberately bad demo samples caught</h2>"
            + _table(["defect", "samples", "hard", "low quality", "sparse", "any axis"], rows))


def build_report(run_dir: str | Path) -> Path:
    """Writes ``<run_dir>/report.html`` and returns its path."""
    run = Path(run_dir)
    summary = json.loads((run / "final" / "summary.json").read_text()) if (run / "final" / "summary.json").is_file() else {}
    manifests = []
    k = 0
    while (run / f"round_{k}" / "manifest.json").is_file():
        manifests.append(json.loads((run / f"round_{k}" / "manifest.json").read_text()))
        k += 1
    metric = summary.get("metric") or (manifests[0]["config"]["eval"]["metric"] if manifests else "heldout_loss")
    history = summary.get("history") or [m["stages"]["eval"] for m in manifests]
    labels = [f"M{i}" for i in range(len(history))]
    sections = [
        f"<h1>middo-ray run <code>{html.escape(run.name)}</code></h1>",
        f"<p><b>Stopped:</b> {html.escape(summary.get('stop_reason', 'running or interrupted'))}. "
        f"<b>Best model:</b> M{summary.get('best_round', '?')}. "
        f"<b>Optimized dataset:</b> <code>{html.escape(str(summary.get('optimized_dataset', '-')))}</code></p>",
        f"<h2>{html.escape(metric)} per round (M0 = trained on the seed data)</h2>",
        _bars([h.get(metric) for h in history], labels),
    ]
    if any(h.get("mc_accuracy") is not None for h in history) and metric != "mc_accuracy":
        sections += ["<h2>multiple-choice accuracy</h2>", _bars([h.get("mc_accuracy") for h in history], labels)]
    sizes = summary.get("sizes") or []
    if sizes:
        sections += ["<h2>dataset size</h2>", _bars([float(s) for s in sizes], [f"D{i}" for i in range(len(sizes))],
                                                    fmt="{:.0f}")]
    rows = []
    for m in manifests[1:]:
        thr = m.get("thresholds", {})
        rows.append([m["round"], m["rows"]["in"], m["flags"]["complexity"], m["flags"]["quality"],
                     m["flags"]["diversity"], m["stages"]["refine"]["ok"], m["stages"]["refine"]["failed"],
                     m["rows"]["out"], json.dumps({a: {k: (round(v, 3) if isinstance(v, float) else v)
                                                       for k, v in t.items()} for a, t in thr.items()}),
                     json.dumps(m.get("timings", {}))])
    if rows:
        sections += ["<h2>rounds</h2>", _table(["round", "in", "hard", "low quality", "sparse", "rewrites ok",
                                                "rewrites failed (original kept)", "out", "thresholds",
                                                "seconds per stage"], rows)]
    sections.append(_known_defects(run))
    for m in manifests[1:]:
        sections += [f"<h2>round {m['round']}: example rewrites</h2>", _examples(run, m["round"])]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:4px 8px;vertical-align:top;text-align:left}th{background:#f2f4f8}code{font-size:12px}")
    out = run / "report.html"
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>middo-ray {html.escape(run.name)}"
                   f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>")
    return out
