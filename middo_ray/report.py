"""The run report: one self-contained HTML page, ``<run_dir>/report.html``, rebuilt after every round.

It reads only what the loop wrote (manifests, stage records, the columns it needs of the stages' Parquet
shards, the summary), so ``middo report runs/<run_id>`` rebuilds it for any run directory, also one that is
still running or was interrupted: it shows what the finished stages left (a stage counts once its
``_SUCCESS`` marker exists) and says which stages are missing. What the page holds:

- the run's status, stop reason and best round, and an overview table by round;
- plots: eval metrics by round (best round marked), dataset size and composition by origin per round (growth
  vs D_0), seconds per stage, and per round the distribution of every axis' score with its threshold and the
  scatter of the loss under M_pre against the loss under M_{k-1};
- per round a table: rows, flags, thresholds, rewrites accepted / rejected with their reasons counted, merge
  counts, tokens, LLM calls, eval metrics, seconds per stage;
- the bundled demo data's deliberate defects and which axis caught them; a few before -> after examples per
  refine operation (escaped and truncated: the teacher may write any bytes).

Plots are drawn with matplotlib (``Figure`` objects, no pyplot and no GUI backend; raster parts through Agg)
and embedded as inline SVG, each in ``<figure class="plot" data-plot="<name>">``: no external file, no script.
How to read the page: docs/report.md.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from middo_ray.schema import AXIS_OF_OPERATION, OPERATIONS, ORIGINS

log = logging.getLogger("middo")

ROUND0_STAGES = ("data", "train", "eval")
ROUND_STAGES = ("diagnose", "select", "refine", "merge", "train", "eval")
AXIS_NAMES = {"complexity": "hard (complexity)", "diversity": "sparse (diversity)", "quality": "low quality"}

# One color per origin / axis (Okabe-Ito, readable for color-blind readers), the same in every plot and table.
COLORS = {"seed": "#9a9a9a", "complexity": "#D55E00", "quality": "#009E73", "diversity": "#0072B2",
          "other": "#CC79A7"}
UNFLAGGED = "#c4cad3"
BEST = "#E69F00"
STAGE_COLORS = {"data": "#999999", "diagnose": "#56B4E9", "select": "#F0E442", "refine": "#CC79A7",
                "merge": "#E69F00", "train": "#0072B2", "eval": "#009E73"}

EXAMPLES_PER_OPERATION = 3
TEXT_LIMIT = 360          # characters of a prompt or answer shown in an example
SCATTER_VECTOR_MAX = 3000  # above this many points a scatter's dots are rasterized (a PNG inside the SVG)
SCATTER_MAX = 20000        # at most this many points are drawn (all flagged ones, a seeded sample of the rest)

_RC = {"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 7.5,
       "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
       "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "svg.fonttype": "path",
       "legend.framealpha": 0.85, "figure.dpi": 100, "savefig.dpi": 110}

# Characters that could break or disguise the page: C0/C1 controls (except tab and newline), bidi overrides,
# zero-width no-break space. They are shown as visible escapes.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff\ufffe\uffff]")
_EVAL_COUNTS = ("heldout_n", "heldout_tokens", "mc_n", "seconds")
_EVAL_LABELS = {"heldout_loss": "held-out loss", "mc_accuracy": "MC accuracy", "average": "suite average"}


# ---------------------------------------------------------------------------------------------------------------
# Text and HTML helpers.


def _text(value: Any, limit: int | None = None) -> str:
    """``value`` as HTML-escaped text, cut to ``limit`` characters with an ellipsis, control characters shown."""
    s = "" if value is None else str(value)
    s = s.encode("utf-8", "replace").decode("utf-8")
    if limit is not None and len(s) > limit:
        s = s[:limit].rstrip() + "…"
    s = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", s)
    return html.escape(s, quote=True)


def _num(v: Any, digits: int = 4) -> str:
    """A number for a table cell: ints with thousands separators, floats with ``digits`` significant digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return re.sub(r"[<>&\"']", "", str(v))  # not a number: nothing that could open markup


def _metric(v: Any) -> str:
    """An eval metric (4 decimals, the precision the stop rule's messages use)."""
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "–"


def _plural(n: Any, word: str) -> str:
    return f"{_num(n)} {word}{'' if n == 1 else 's'}"


def _score(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _secs(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _table(header: list[str], rows: list[list[str]], attrs: str = "") -> str:
    """A table of already-escaped HTML cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(rows: list[tuple[str, str]], attrs: str = "") -> str:
    """A two-column table: an escaped label and an HTML value per row."""
    body = "".join(f"<tr><th>{_text(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='kv' {attrs}><tbody>{body}</tbody></table>"


def _counted(counter: Counter) -> str:
    """``"invalid JSON ×3, judged worse ×2"`` (most frequent first)."""
    return ", ".join(f"{_text(k)} ×{n}" for k, n in counter.most_common())


def _swatch(name: str) -> str:
    return f"<span class='sw' style='background:{COLORS.get(name, COLORS['other'])}'></span>"


# ---------------------------------------------------------------------------------------------------------------
# Reading the run directory.


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rebase(root: str, run: Path) -> str:
    """A path the run recorded, inside this run directory when the run was moved or copied since."""
    m = re.search(r"(round_\d+/[^/]+/[^/]+)/?$", str(root))
    if m and "://" not in str(root):
        here = run / m.group(1)
        if here.exists():
            return str(here)
    return str(root)


@dataclass
class _Round:
    """What one round's directory holds: its manifest, the finished stages and their records."""

    k: int
    dir: Path
    manifest: dict
    done: list[str]
    records: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def expected(self) -> tuple[str, ...]:
        return ROUND0_STAGES if self.k == 0 else ROUND_STAGES

    @property
    def finished(self) -> bool:
        return all(s in self.done for s in self.expected)

    def rec(self, stage: str) -> dict:
        return self.records.get(stage) or {}


def _load_round(run: Path, k: int) -> _Round:
    from middo_ray.rundir import MARKER, RECORD

    d = run / f"round_{k}"
    manifest = _read_json(d / "manifest.json")
    manifest = manifest if isinstance(manifest, dict) else {}
    stages = manifest.get("stages") if isinstance(manifest.get("stages"), dict) else {}
    names = list(ROUND0_STAGES if k == 0 else ROUND_STAGES)
    names += sorted(p.parent.name for p in d.glob(f"*/{MARKER}") if p.parent.name not in names)
    done = [s for s in names if (d / s / MARKER).is_file()]
    rnd = _Round(k, d, manifest, done)
    timings = manifest.get("timings") if isinstance(manifest.get("timings"), dict) else {}
    for s in done:
        rec = _read_json(d / s / RECORD)
        rnd.records[s] = rec if isinstance(rec, dict) else (stages.get(s) or {})
        secs = timings.get(s)
        if not isinstance(secs, (int, float)):
            marker = _read_json(d / s / MARKER)
            secs = marker.get("seconds") if isinstance(marker, dict) else None
        if isinstance(secs, (int, float)):
            rnd.seconds[s] = float(secs)
    return rnd


def _rounds(run: Path) -> list[_Round]:
    ks = sorted(int(m.group(1)) for p in run.glob("round_*")
                if p.is_dir() and (m := re.fullmatch(r"round_(\d+)", p.name)))
    return [_load_round(run, k) for k in ks]


def _shardset(run: Path, rnd: _Round, stage: str, name: str):
    """The shard set ``name`` that a finished stage recorded (None when the stage is not finished)."""
    from middo_ray.storage import ShardSet

    obj = (rnd.rec(stage).get("shards") or {}).get(name)
    if not obj:
        return None
    return ShardSet.from_json({**obj, "root": _rebase(obj["root"], run)})


def _read(shards, columns: Iterable[str]):
    """The given columns (those the shards have) of a shard set, as one pyarrow table; None when unreadable."""
    import pyarrow as pa

    from middo_ray import storage

    if shards is None:
        return None
    try:
        paths = shards.paths()
        if not paths:
            return None
        have = set(storage.read_schema(paths[0]).names)
        cols = [c for c in columns if c in have]
        return pa.concat_tables([storage.read_table(p, cols) for p in paths], promote_options="default")
    except (OSError, ValueError, KeyError) as exc:
        log.warning("report: cannot read %s: %s", shards.root, exc)
        return None


def _floats(table, col: str) -> np.ndarray:
    if table is None or col not in table.column_names:
        return np.full(0 if table is None else table.num_rows, np.nan)
    return np.asarray(table.column(col).to_numpy(zero_copy_only=False), dtype=np.float64)


def _bools(table, col: str) -> np.ndarray:
    if table is None or col not in table.column_names:
        return np.zeros(0 if table is None else table.num_rows, dtype=bool)
    return np.asarray(table.column(col).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _aligned(base, other, columns: list[str]):
    """``other``'s columns in ``base``'s row order (joined on sample_id unless the ids already line up)."""
    import pyarrow as pa

    if other is None:
        return None
    if other["sample_id"].equals(base["sample_id"]):
        return other
    ids = pa.table({"sample_id": base["sample_id"], "_pos": pa.array(np.arange(base.num_rows))})
    joined = ids.join(other.select(["sample_id"] + [c for c in columns if c in other.column_names]), "sample_id",
                      join_type="left outer").sort_by("_pos")
    return joined


def _signals(run: Path, rnd: _Round) -> dict[str, np.ndarray] | None:
    """Per sample of the round's diagnosis: loss_pre, loss_cur, knn_sim, quality and the flags per axis."""
    sig = _read(_shardset(run, rnd, "diagnose", "signals"), ["sample_id", "loss_pre", "loss_cur", "quality"])
    if sig is None or sig.num_rows == 0:
        return None
    nbr = _aligned(sig, _read(_shardset(run, rnd, "diagnose", "neighbors"), ["sample_id", "knn_sim"]), ["knn_sim"])
    axes = ["complexity", "diversity", "quality"]
    flags = _aligned(sig, _read(_shardset(run, rnd, "select", "flags"), ["sample_id"] + axes), axes)
    out = {c: _floats(sig, c) for c in ("loss_pre", "loss_cur", "quality")}
    out["knn_sim"] = _floats(nbr, "knn_sim") if nbr is not None else np.full(sig.num_rows, np.nan)
    out["flagged"] = np.asarray(flags is not None)
    for a in axes:
        out[f"flag_{a}"] = _bools(flags, a) if flags is not None else np.zeros(sig.num_rows, dtype=bool)
    return out


def _composition(run: Path, rnd: _Round) -> Counter | None:
    """Rows of the round's dataset (D_0 or D_k) by origin."""
    import pyarrow.compute as pc

    ss = _shardset(run, rnd, "data", "train") if rnd.k == 0 else _shardset(run, rnd, "merge", "dataset")
    table = _read(ss, ["origin"])
    if table is None:
        return None
    if "origin" not in table.column_names:
        return Counter({"seed": table.num_rows}) if rnd.k == 0 else None
    counts = pc.value_counts(table.column("origin").fill_null("other"))
    return Counter({str(v["values"]): int(v["counts"]) for v in counts.to_pylist()})


def _eval_keys(history: list[tuple[int, dict]]) -> list[str]:
    """The eval metrics present in any round: held-out loss, MC accuracy, then the suites, average last."""
    keys: list[str] = []
    for _, ev in history:
        for key, v in ev.items():
            if (isinstance(v, (int, float)) and not isinstance(v, bool) and key not in _EVAL_COUNTS
                    and not key.endswith(("_n", "_seconds", "_tokens")) and key not in keys):
                keys.append(key)
    first = [k for k in ("heldout_loss", "mc_accuracy") if k in keys]
    last = [k for k in ("average",) if k in keys]
    return first + [k for k in keys if k not in first + last] + last


def _eval_label(key: str) -> str:
    return _EVAL_LABELS.get(key, key)


def _reason_kind(reason: str) -> str:
    """A refine failure's reason without its numbers, so equal causes count together."""
    r = re.sub(r";?\s*original kept\.?\s*$", "", (reason or "").strip())
    if not r:
        return "no reason recorded"
    if r.startswith("rejected by re-judge: "):
        body = r[len("rejected by re-judge: "):]
        if "< original's" in body:
            return "judged worse than the original"
        if "accept_min_score" in body:
            return "judged below refine.accept_min_score"
        if "no score" in body:
            return "the re-judge gave no score"
        return "rejected by re-judge: " + re.sub(r"\d+(\.\d+)?", "N", body)[:100]
    if r.startswith("re-judge failed: "):
        return "re-judge failed: " + _reason_kind(r[len("re-judge failed: "):])
    if "did not answer within" in r:
        return "timed out (refine.request_timeout_s)"
    m = re.match(r"(rewrite|answer) failed after \d+ attempts?: (.*)$", r, flags=re.S)
    if m:
        return f"{m.group(1)} invalid: {m.group(2)[:100]}"
    return r[:120]


def _reject_kind(reason: str) -> str:
    """An input reject's reason without row numbers and ids."""
    r = re.sub(r"\s*\(sample_id [^)]*\)", "", str(reason or "no reason"))
    return re.sub(r"\d+", "N", r)[:120]


def _refine_reasons(run: Path, rnd: _Round) -> tuple[Counter, dict[str, Counter]]:
    """The failed rewrites' reasons counted, in all and per operation."""
    table = _read(_shardset(run, rnd, "refine", "results"), ["operation", "status", "reason"])
    total: Counter = Counter()
    by_op: dict[str, Counter] = {}
    if table is None:
        return total, by_op
    for op, status, reason in zip(table["operation"].to_pylist(), table["status"].to_pylist(),
                                  table["reason"].to_pylist()):
        if status != "ok":
            kind = _reason_kind(reason)
            total[kind] += 1
            by_op.setdefault(op, Counter())[kind] += 1
    return total, by_op


def _examples(run: Path, rounds: list[_Round]) -> dict[str, list[dict]]:
    """Up to EXAMPLES_PER_OPERATION accepted rewrites per operation, taken in turn from the rounds."""
    cols = ["sample_id", "operation", "before_instruction", "before_input", "before_output", "hints", "status",
            "instruction", "input", "output", "quality_before", "quality_after"]
    from middo_ray import storage

    per_round: list[dict[str, list[dict]]] = []
    for rnd in rounds:
        ss = _shardset(run, rnd, "refine", "results")
        if ss is None:
            continue
        found: dict[str, list[dict]] = {}
        for path in ss.paths():
            try:
                have = set(storage.read_schema(path).names)
                rows = storage.read_table(path, [c for c in cols if c in have],
                                          filters=[("status", "=", "ok")]).to_pylist()
            except (OSError, ValueError, KeyError):
                continue
            for r in rows:
                slot = found.setdefault(r.get("operation") or "?", [])
                if len(slot) < EXAMPLES_PER_OPERATION:
                    slot.append({**r, "round": rnd.k})
            if all(len(found.get(op, [])) >= EXAMPLES_PER_OPERATION for op in OPERATIONS):
                break
        per_round.append(found)
    out: dict[str, list[dict]] = {}
    for op in OPERATIONS + tuple(sorted({o for f in per_round for o in f} - set(OPERATIONS))):
        picked: list[dict] = []
        queues = [list(f.get(op, [])) for f in per_round]
        while len(picked) < EXAMPLES_PER_OPERATION and any(queues):
            for q in queues:
                if q and len(picked) < EXAMPLES_PER_OPERATION:
                    picked.append(q.pop(0))
        if picked:
            out[op] = picked
    return out


# ---------------------------------------------------------------------------------------------------------------
# Plots.


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig, name: str) -> str:
    """The figure as an inline ``<svg>`` element (ids salted with the plot's name, so they are unique)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"middo-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.find("<svg"):]


def _plot(name: str, title: str, draw: Callable[[], Any], caption: str = "") -> str:
    """A ``<figure class="plot" data-plot=name>`` holding the figure ``draw()`` returns (a note on failure)."""
    import matplotlib

    try:
        with matplotlib.rc_context(_RC):
            fig = draw()
            if fig is None:
                return ""
            svg = _svg(fig, name)
    except Exception as exc:  # noqa: BLE001 - a broken plot must not break the report (or the loop)
        log.warning("report: plot %s failed: %s", name, exc, exc_info=True)
        return f"<p class='error'>plot {_text(name)} could not be drawn: {_text(type(exc).__name__)}: {_text(exc)}</p>"
    cap = f"<figcaption><b>{_text(title)}</b> {caption}</figcaption>" if title or caption else ""
    return f"<figure class='plot' data-plot='{_text(name)}'>{svg}{cap}</figure>"


def _draw_eval(history: list[tuple[int, dict]], keys: list[str], best: int | None, watched: str):
    from middo_ray.converge import lower_is_better

    ncols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(3.9 * ncols, 2.7 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        pts = [(k, ev[key]) for k, ev in history if isinstance(ev.get(key), (int, float)) and math.isfinite(ev[key])]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", color="#333333", lw=1.5, ms=5, zorder=2)
        for x, y in pts:
            ax.annotate(f"{y:.4f}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7.5,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85}, zorder=4)
        if best is not None and best in xs:
            yb = ys[xs.index(best)]
            ax.scatter([best], [yb], s=220, marker="*", color=BEST, edgecolor="#333333", lw=0.6, zorder=3,
                       label=f"best round M{best} (on {watched})")
            ax.legend(loc="best")
        ax.set_xticks(xs, [f"M{x}" for x in xs])
        ax.set_xlim(min(xs, default=0) - 0.4, max(xs, default=0) + 0.4)
        ax.margins(y=0.3)
        ax.set_title(f"{_eval_label(key)}{' (watched)' if key == watched else ''}: "
                     f"{'lower' if lower_is_better(key) else 'higher'} is better")
        ax.set_xlabel("model (M0 = trained on the seed data)")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    return fig


def _draw_dataset(comps: list[tuple[int, Counter]]):
    from matplotlib.ticker import MaxNLocator

    labels = [f"D{k}" for k, _ in comps]
    origins = [o for o in ORIGINS if any(c.get(o) for _, c in comps)]
    origins += sorted({o for _, c in comps for o in c} - set(ORIGINS))
    totals = np.array([sum(c.values()) for _, c in comps], dtype=float)
    base = totals[0] if len(totals) and comps[0][0] == 0 and totals[0] else None
    fig = _figure(10.5, 3.5)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[3, 2])
    x = np.arange(len(comps))
    bottom, bottom_pct = np.zeros(len(comps)), np.zeros(len(comps))
    for o in origins:
        n = np.array([c.get(o, 0) for _, c in comps], dtype=float)
        color = COLORS.get(o, COLORS["other"])
        ax1.bar(x, n, 0.6, bottom=bottom, color=color, label=o, edgecolor="white", lw=0.5)
        pct = np.divide(100 * n, totals, out=np.zeros_like(n), where=totals > 0)
        ax2.bar(x, pct, 0.6, bottom=bottom_pct, color=color, edgecolor="white", lw=0.5)
        for i, p in enumerate(pct):
            if p >= 7:
                ax2.text(i, bottom_pct[i] + p / 2, f"{p:.0f}%", ha="center", va="center", fontsize=7,
                         color="white" if o != "seed" else "#222222")
        bottom, bottom_pct = bottom + n, bottom_pct + pct
    for i, t in enumerate(totals):
        grow = f"\n{100 * (t - base) / base:+.1f}% vs D0" if base and i > 0 else ""
        ax1.annotate(f"{t:,.0f}{grow}", (i, t), textcoords="offset points", xytext=(0, 3), ha="center",
                     va="bottom", fontsize=7.5)
    ax1.set_ylim(0, max(totals.max(initial=1), 1) * 1.28)
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylabel("samples")
    ax1.set_title("dataset size by origin (labels: total and growth vs D0)")
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("% of the dataset")
    ax2.set_title("composition by origin (drift)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, labels)
        ax.set_xlim(-0.6, len(comps) - 0.4)
        ax.grid(axis="x", visible=False)
    fig.legend(loc="outside right upper", title="origin")
    return fig


def _draw_timings(rounds: list[_Round]):
    stages = [s for s in ("data",) + ROUND_STAGES if any(s in r.seconds for r in rounds)]
    stages += sorted({s for r in rounds for s in r.seconds} - set(stages))
    shown = [r for r in rounds if r.seconds]
    fig = _figure(10.5, 0.9 + 0.42 * len(shown))
    ax = fig.subplots()
    y = np.arange(len(shown))
    left = np.zeros(len(shown))
    for s in stages:
        w = np.array([r.seconds.get(s, 0.0) for r in shown])
        ax.barh(y, w, 0.6, left=left, color=STAGE_COLORS.get(s, "#777777"), label=s, edgecolor="white", lw=0.5)
        left += w
    for i, t in enumerate(left):
        ax.annotate(f"{t:.1f} s{'' if shown[i].finished else ' (unfinished)'}", (t, i), textcoords="offset points",
                    xytext=(4, 0), va="center", fontsize=7.5)
    ax.set_yticks(y, [f"round {r.k}" for r in shown])
    ax.invert_yaxis()
    ax.set_xlim(0, max(left.max(initial=1), 1) * 1.15)
    ax.set_xlabel("seconds (wall clock per stage)")
    ax.grid(axis="y", visible=False)
    fig.legend(loc="outside right upper", title="stage")
    return fig


_DIST_PANELS = (("loss_pre", "complexity", "upper"), ("loss_cur", "complexity", "upper"),
                ("knn_sim", "diversity", "lower"), ("quality", "quality", "lower"))


def _edges(values: list[np.ndarray], extra: list[float], n: int) -> np.ndarray | None:
    """Shared histogram bin edges of a signal over all rounds (and its thresholds), so rounds compare."""
    finite = [v[np.isfinite(v)] for v in values]
    pool = np.concatenate(finite + [np.asarray([e for e in extra if e is not None and math.isfinite(e)])])
    if pool.size == 0:
        return None
    lo, hi = float(pool.min()), float(pool.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    bins = int(min(40, max(12, math.sqrt(max(n, 1)))))
    return np.linspace(lo - pad, hi + pad, bins + 1)


def _axis_m(thr: dict, axis: str) -> str:
    m = (thr.get(axis) or {}).get("m")
    return _num(m, 3) if isinstance(m, (int, float)) else "m"


def _draw_distributions(k: int, sig: dict, thr: dict, edges: dict, active: dict):
    from matplotlib.ticker import MaxNLocator

    fig = _figure(12, 3.1)
    axes = fig.subplots(1, 4)
    titles = {"loss_pre": "loss under M_pre", "loss_cur": f"loss under M{k - 1} (the current model)",
              "knn_sim": "kNN similarity of the prompt", "quality": "self-judge quality (0–10)"}
    rules = {"complexity": "hard = both losses above their thresholds", "diversity": "sparse = below the threshold",
             "quality": "low quality = below the threshold"}
    for ax, (col, axis, side) in zip(axes, _DIST_PANELS):
        x = sig[col]
        ok = np.isfinite(x)
        flag = sig[f"flag_{axis}"][ok]
        x = x[ok]
        t = (thr.get(axis) or {}).get(col)
        bins = edges.get(col)
        if x.size == 0 or bins is None:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.hist([x[~flag], x[flag]], bins=bins, stacked=True, color=[UNFLAGGED, COLORS[axis]],
                    label=[f"not flagged ({int((~flag).sum())})", f"flagged {axis} ({int(flag.sum())})"],
                    edgecolor="white", lw=0.3)
            ax.set_xlim(bins[0], bins[-1])
        if isinstance(t, (int, float)) and math.isfinite(t):
            sign = "+" if side == "upper" else "−"
            ax.axvline(t, color="#222222", ls="--", lw=1.3,
                       label=f"threshold {t:.4g} (μ{sign}{_axis_m(thr, axis)}σ)")
        ax.margins(y=0.1)
        off = "" if active.get(axis, True) else " (axis off)"
        ax.set_title(f"{titles[col]}\n{rules[axis]}{off}")
        ax.set_xlabel(col + (f" ({int((~ok).sum())} missing)" if (~ok).any() else ""))
        ax.set_ylim(0, ax.get_ylim()[1] * 1.45)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best")
    axes[0].set_ylabel("samples")
    return fig


def _draw_scatter(k: int, sig: dict, thr: dict):
    x, y, f = sig["loss_pre"], sig["loss_cur"], sig["flag_complexity"]
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, f = x[ok], y[ok], f[ok]
    if x.size == 0:
        return None
    fig = _figure(5.4, 4.3)
    ax = fig.subplots()
    idx_rest = np.flatnonzero(~f)
    note = ""
    if x.size > SCATTER_MAX:
        keep = max(SCATTER_MAX - int(f.sum()), 0)
        idx_rest = np.sort(np.random.default_rng(k).choice(idx_rest, min(keep, idx_rest.size), replace=False))
        note = f" ({idx_rest.size + int(f.sum()):,} of {x.size:,} points drawn)"
    raster = x.size > SCATTER_VECTOR_MAX
    ax.scatter(x[idx_rest], y[idx_rest], s=9, color="#8d96a3", alpha=0.6, lw=0, label="not flagged",
               rasterized=raster)
    ax.scatter(x[f], y[f], s=16, color=COLORS["complexity"], lw=0, label=f"flagged hard ({int(f.sum())})",
               rasterized=raster, zorder=3)
    lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
    ax.plot([lo, hi], [lo, hi], color="#bbbbbb", lw=0.8, ls=":", label="equal loss")
    t = thr.get("complexity") or {}
    tp, tc = t.get("loss_pre"), t.get("loss_cur")
    ax.margins(0.08)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    if isinstance(tp, (int, float)) and math.isfinite(tp):
        ax.axvline(tp, color="#222222", ls="--", lw=1.1, label=f"loss_pre threshold {tp:.4g}")
        x0, x1 = min(x0, tp - 0.02 * (x1 - x0)), max(x1, tp + 0.02 * (x1 - x0))
    if isinstance(tc, (int, float)) and math.isfinite(tc):
        ax.axhline(tc, color="#555555", ls="-.", lw=1.1, label=f"loss_cur threshold {tc:.4g}")
        y0, y1 = min(y0, tc - 0.02 * (y1 - y0)), max(y1, tc + 0.02 * (y1 - y0))
    if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (tp, tc)):
        ax.fill_between([tp, max(x1, tp)], tc, max(y1, tc), color=COLORS["complexity"], alpha=0.07, lw=0,
                        label="hard: both above")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("loss under M_pre (mean response-token NLL)")
    ax.set_ylabel(f"loss under M{k - 1}")
    ax.set_title(f"round {k}: loss under M_pre vs under M{k - 1}{note}")
    ax.legend(loc="best")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Sections.


def _safe(name: str, fn: Callable[..., str], *args) -> str:
    """``fn(*args)``, or a note saying why the section is missing: the report never fails a run."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("report: section %s failed: %s", name, exc, exc_info=True)
        return (f"<p class='error'>section {_text(name)} could not be built: {_text(type(exc).__name__)}: "
                f"{_text(exc)}</p>")


def _history(summary: dict, rounds: list[_Round]) -> list[tuple[int, dict]]:
    """(round, eval metrics) of every evaluated model, from the summary or else from the eval stages."""
    hist = summary.get("history")
    if isinstance(hist, list) and hist:
        return [(k, h) for k, h in enumerate(hist) if isinstance(h, dict)]
    return [(r.k, r.rec("eval")) for r in rounds if "eval" in r.done]


def _flags(rnd: _Round) -> dict:
    sel = rnd.manifest.get("selection") or rnd.rec("select").get("counts") or {}
    return sel if isinstance(sel, dict) else {}


def _thresholds(rnd: _Round) -> dict:
    thr = rnd.manifest.get("thresholds") or rnd.rec("select").get("thresholds") or {}
    return thr if isinstance(thr, dict) else {}


def _threshold_text(thr: dict, counts: dict) -> str:
    parts = []
    for axis, cols in (("complexity", ("loss_pre", "loss_cur")), ("diversity", ("knn_sim",)),
                       ("quality", ("quality",))):
        t = thr.get(axis) or {}
        if not t:
            continue
        sign, rule = ("+", ">") if axis == "complexity" else ("−", "<")
        cond = " and ".join(f"{c} {rule} {_num(t.get(c))}" for c in cols if c in t)
        extra = []
        if t.get("budget") is not None:
            extra.append(f"budget {_num(t['budget'])}, cut-off {_num(t.get('severity_cutoff'))}")
        if axis == "quality" and t.get("ifd") is not None:
            extra.append(f"or ifd > {_num(t['ifd'])}")
        off = "" if (counts.get(axis) or {}).get("active", True) else " (axis off)"
        parts.append(f"{_swatch(axis)}<b>{axis}</b>: {_text(cond)} (μ{sign}{_text(_axis_m(thr, axis))}σ)"
                     f"{_text('; ' + '; '.join(extra)) if extra else ''}{off}")
    return "<br>".join(parts) or "–"


def _flags_text(counts: dict, n: int | None) -> str:
    parts = []
    for axis in ("complexity", "diversity", "quality"):
        c = counts.get(axis) or {}
        if not c:
            continue
        s = f"{_swatch(axis)}{_text(AXIS_NAMES[axis])} <b>{_num(c.get('flagged'))}</b>"
        if c.get("would_flag") not in (None, c.get("flagged")):
            s += f" (σ rule alone: {_num(c.get('would_flag'))})"
        if not c.get("active", True):
            s += " (axis off)"
        parts.append(s)
    anyc = counts.get("any") or {}
    if anyc:
        frac = anyc.get("fraction")
        parts.append(f"any axis <b>{_num(anyc.get('flagged'))}</b>"
                     + (f" ({100 * frac:.1f}% of {_num(n)})" if isinstance(frac, (int, float)) and n else ""))
    return " · ".join(parts) or "–"


def _rewrites_text(refine: dict, reasons_by_op: dict[str, Counter]) -> str:
    counts = refine.get("counts") or {}
    by_op = counts.get("by_operation") or {}
    lines = []
    for op in list(OPERATIONS) + sorted(set(by_op) - set(OPERATIONS)):
        c = by_op.get(op)
        if not c:
            continue
        why = reasons_by_op.get(op)
        lines.append(f"{_swatch(AXIS_OF_OPERATION.get(op, 'other'))}{_text(op)}: <b>{_num(c.get('ok', 0))}</b> "
                     f"accepted, <b>{_num(c.get('failed', 0))}</b> rejected" + (f" ({_counted(why)})" if why else ""))
    jobs, ok = refine.get("jobs", counts.get("jobs")), refine.get("ok", counts.get("ok"))
    total = f"<b>{_num(ok)}</b> of {_num(jobs)} accepted"
    if counts.get("judged") is not None:
        total += (f"; the judge scored {_num(counts.get('judged'))} valid rewrites and rejected "
                  f"{_num(counts.get('rejected'))} (refine.accept={_text(counts.get('accept'))})")
    return "<br>".join(lines + [total])


def _tokens_text(rnd: _Round) -> str:
    parts = []
    diag, train, ev = rnd.rec("diagnose"), rnd.rec("train"), rnd.rec("eval")
    if diag.get("input_tokens") is not None:
        parts.append(f"diagnosed {_num(diag['input_tokens'])} tokens")
    if train.get("input_tokens") is not None:
        parts.append(f"trained on {_num(train['input_tokens'])} tokens ({_num(train.get('tokens'))} response tokens, "
                     f"{_num(train.get('steps'))} steps)")
    if ev.get("heldout_tokens") is not None:
        parts.append(f"held-out {_num(ev['heldout_tokens'])} tokens")
    return _text("; ".join(parts)) or "–"


def _calls_text(refine: dict) -> str:
    c = refine.get("counts") or {}
    if not c:
        return "–"
    hits, misses = c.get("cache_hits"), c.get("cache_misses")
    return _text(f"{_num(c.get('requests'))} rewrite requests, {_num(c.get('judge_requests'))} judge requests; "
                 f"cache {_num(hits)} hits / {_num(misses)} misses; {_num(c.get('timeouts'))} timeouts")


def _eval_text(ev: dict, keys: list[str], prev: dict | None, watched: str) -> str:
    if not ev:
        return "–"
    parts = []
    for key in keys:
        v = ev.get(key)
        if v is None:
            continue
        s = f"{_text(_eval_label(key))} <b>{_metric(v)}</b>"
        n = ev.get("mc_n" if key == "mc_accuracy" else f"{key}_n")
        if n is not None:
            s += f" (n={_num(n)})"
        if prev and isinstance(prev.get(key), (int, float)) and isinstance(v, (int, float)):
            s += f" (Δ {v - prev[key]:+.4f})"
        if key == watched:
            s += " ← watched"
        parts.append(s)
    return " · ".join(parts) or "–"


def _seconds_text(rnd: _Round) -> str:
    if not rnd.seconds:
        return "–"
    resumed = set(rnd.manifest.get("resumed") or [])
    items = [f"{_text(s)} {_secs(v)}{' (resumed)' if s in resumed else ''}" for s, v in rnd.seconds.items()]
    return " · ".join(items) + f" — <b>total {_secs(sum(rnd.seconds.values()))}</b>"


def _stages_text(rnd: _Round) -> str:
    missing = [s for s in rnd.expected if s not in rnd.done]
    if not missing:
        return "all finished"
    return (f"finished: {_text(', '.join(rnd.done) or 'none')}; <b class='warn'>not finished: "
            f"{_text(', '.join(missing))}</b> (running or interrupted)")


def _round0_section(run: Path, rnd: _Round, keys: list[str], watched: str) -> str:
    data = rnd.rec("data")
    rows: list[tuple[str, str]] = [("stages", _stages_text(rnd))]
    if data:
        rows.append(("input rows", _text(f"{_num(data.get('rows_in'))} read ({data.get('format', '?')}): "
                                          f"{_num(data.get('train'))} train (D0), {_num(data.get('heldout'))} "
                                          f"held-out, {_num(data.get('unused'))} unused, "
                                          f"{_num(data.get('rejected'))} rejected, "
                                          f"{_num(data.get('duplicates'))} duplicates")))
        rej = Counter()
        path = Path(_rebase(str(data.get("rejects", rnd.dir / "data" / "rejects.jsonl")), run))
        if path.is_file():
            with path.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        rej[_reject_kind(json.loads(line).get("reason"))] += 1
                    except (ValueError, AttributeError):
                        rej["unreadable reject line"] += 1
        if rej:
            rows.append(("rejected rows, by reason", _counted(rej)))
    rows += [("tokens", _tokens_text(rnd)),
             ("eval (M0)", _eval_text(rnd.rec("eval"), keys, None, watched)),
             ("seconds per stage", _seconds_text(rnd))]
    return (f"<section id='round-0'><h2>Round 0: the seed data and M0</h2>"
            + _kv_table(rows, attrs="data-table='round-0'") + "</section>")


def _round_section(run: Path, rnd: _Round, prev_eval: dict | None, keys: list[str], watched: str,
                   sig: dict | None, edges: dict) -> str:
    k = rnd.k
    counts, thr = _flags(rnd), _thresholds(rnd)
    merge, refine = rnd.rec("merge"), rnd.rec("refine")
    n_in = (rnd.manifest.get("rows") or {}).get("in") if isinstance(rnd.manifest.get("rows"), dict) else None
    n_in = n_in if n_in is not None else (rnd.rec("diagnose").get("rows") or merge.get("in"))
    n_out = merge.get("out")
    rows: list[tuple[str, str]] = [("stages", _stages_text(rnd))]
    size = f"{_num(n_in)} in (D{k - 1})"
    if n_out is not None:
        grow = f", {100 * (n_out - n_in) / n_in:+.1f}%" if n_in else ""
        size += f" → {_num(n_out)} out (D{k}; {n_out - (n_in or 0):+,}{grow})"
    rows.append(("rows", _text(size)))
    if counts:
        rows.append(("flagged", _flags_text(counts, n_in)))
    if thr:
        rows.append(("thresholds", _threshold_text(thr, counts)))
    if refine:
        total, by_op = _refine_reasons(run, rnd)
        rows.append(("rewrites", _rewrites_text(refine, by_op)))
        rows.append(("rejected rewrites, by reason", _counted(total) or "none"))
        rows.append(("LLM calls", _calls_text(refine)))
    if merge:
        rows.append(("merge", _text(f"{_num(merge.get('replaced'))} replaced, {_num(merge.get('added'))} added, "
                                    f"{_num(merge.get('kept_after_failure'))} originals kept after a rejected "
                                    f"rewrite, {_num(merge.get('duplicates_dropped'))} duplicates dropped")))
    rows += [("tokens", _tokens_text(rnd)),
             (f"eval (M{k})", _eval_text(rnd.rec("eval"), keys, prev_eval, watched))]
    conv = rnd.manifest.get("converge")
    if isinstance(conv, dict) and "eval" in rnd.done:
        rows.append(("converge", _text(("stop: " + conv.get("reason", "")) if conv.get("stop") else "continue")))
    rows.append(("seconds per stage", _seconds_text(rnd)))
    table = _kv_table(rows, attrs=f"data-table='round-{k}'")
    plots = ""
    if sig is not None:
        active = {a: (counts.get(a) or {}).get("active", True) for a in ("complexity", "diversity", "quality")}
        flags_note = "" if bool(sig["flagged"]) else " (select has not finished: no flags yet)"
        dist = _plot(f"distributions-r{k}", f"Round {k}: score distributions per axis{flags_note}.",
                     lambda: _draw_distributions(k, sig, thr, edges, active),
                     "Bars: samples per bin (bins shared by all rounds, so rounds compare); the colored part was "
                     "flagged on that axis; dashed line: the round's threshold.")
        scatter = _plot(f"loss-scatter-r{k}", f"Round {k}: the complexity axis.", lambda: _draw_scatter(k, sig, thr),
                        "A sample is hard when both losses are above their thresholds (the shaded corner).")
        plots = dist
        table = f"<div class='row'><div class='grow'>{table}</div>{scatter}</div>"
    elif "diagnose" not in rnd.done:
        plots = "<p class='muted'>No diagnosis yet: the distributions appear once diagnose has finished.</p>"
    return f"<section id='round-{k}'><h2>Round {k}</h2>{table}{plots}</section>"


def _overview(rounds: list[_Round], history: list[tuple[int, dict]], comps: dict[int, Counter], keys: list[str],
              best: int | None) -> str:
    evals = dict(history)
    base = sum(comps[0].values()) if comps.get(0) else None
    header = ["round", "model", "dataset", "by origin", "flagged (hard · sparse · low q.)", "rewrites accepted / "
              "rejected"] + [_text(_eval_label(k)) for k in keys] + ["seconds"]
    rows = []
    for rnd in rounds:
        k = rnd.k
        comp = comps.get(k)
        n = sum(comp.values()) if comp else (rnd.rec("merge").get("out") if k else rnd.rec("data").get("train"))
        size = _num(n)
        if base and n is not None and k > 0:
            size += f" ({100 * (n - base) / base:+.1f}%)"
        origin = " ".join(f"{_swatch(o)}{_num(comp[o])}" for o in ORIGINS + tuple(sorted(set(comp) - set(ORIGINS)))
                          if comp.get(o)) if comp else "–"
        fl = _flags(rnd)
        flagged = " · ".join(_num((fl.get(a) or {}).get("flagged")) for a in ("complexity", "diversity", "quality")) \
            if fl and k else "–"
        ref = rnd.rec("refine")
        rew = f"{_num(ref.get('ok'))} / {_num(ref.get('failed'))}" if ref else "–"
        ev = evals.get(k) or {}
        model = f"M{k}" + (" ★ best" if k == best else "") if ev else "–"
        status = "" if rnd.finished else " <span class='warn'>(unfinished)</span>"
        rows.append([f"{k}{status}", model, size, origin, flagged, rew] + [_metric(ev.get(key)) for key in keys]
                    + [_secs(sum(rnd.seconds.values())) if rnd.seconds else "–"])
    return _table(header, rows, attrs="class='overview' data-table='overview'")


def _known_defects(run: Path, rounds: list[_Round]) -> str:
    """For the bundled demo data: which deliberately bad samples each axis flagged in round 1."""
    from middo_ray.demo import demo_path

    r0 = next((r for r in rounds if r.k == 0), None)
    r1 = next((r for r in rounds if r.k == 1), None)
    if r0 is None or r1 is None or "data" not in r0.done or "select" not in r1.done:
        return ""
    source = r0.rec("data").get("source")
    demo = {demo_path(n).resolve() for n in ("seed", "seed_with_invalid")}
    if not source or Path(source).resolve() not in demo or not demo_path("defects").is_file():
        return ""
    defects = json.loads(demo_path("defects").read_text())
    table = _read(_shardset(run, r1, "select", "flags"), ["sample_id", "complexity", "quality", "diversity"])
    if table is None:
        return ""
    flags = table.to_pylist()
    axes = ("complexity", "quality", "diversity")
    present = [r for r in flags if r["sample_id"] in defects]
    if not present:
        return ""
    rows = []
    for kind in sorted(set(defects.values())):
        of_kind = [r for r in present if defects[r["sample_id"]] == kind]
        if of_kind:
            rows.append([_text(kind), _num(len(of_kind))] + [_num(sum(bool(r[a]) for r in of_kind)) for a in axes]
                        + [_num(sum(any(r[a] for a in axes) for r in of_kind))])
    clean = [r for r in flags if r["sample_id"] not in defects]
    rows.append(["(clean samples)", _num(len(clean))] + [_num(sum(bool(r[a]) for r in clean)) for a in axes]
                + [_num(sum(any(r[a] for a in axes) for r in clean))])
    return ("<section id='defects'><h2>Round 1: the demo data's deliberately bad samples, caught</h2>"
            "<p class='muted'>The bundled seed set has known defects; a good diagnosis flags them more often than "
            "the clean samples.</p>"
            + _table(["defect", "samples", "hard", "low quality", "sparse", "any axis"], rows,
                     attrs="data-table='defects'") + "</section>")


def _example_html(ex: dict) -> str:
    op = ex.get("operation") or "?"
    qb, qa = ex.get("quality_before"), ex.get("quality_after")
    judge = f" · judge {_score(qb)} → {_score(qa)}" if qb is not None or qa is not None else ""

    def prompt(instr, inp) -> str:
        p = _text(instr, TEXT_LIMIT)
        if inp:
            p += f"<span class='inp'>{_text(inp, TEXT_LIMIT)}</span>"
        return p

    before = prompt(ex.get("before_instruction"), ex.get("before_input"))
    hints = ex.get("hints") or []
    if op == "synthesize" and hints:
        before += "<div class='hints'>neighbours: " + " | ".join(_text(h, 120) for h in hints[:3]) + "</div>"
    return (f"<div class='ex'><div class='exh'>{_swatch(AXIS_OF_OPERATION.get(op, 'other'))}<b>{_text(op)}</b> · "
            f"round {ex.get('round')} · sample <code>{_text(ex.get('sample_id'))}</code>{judge}</div>"
            "<table class='extable'><thead><tr><th></th><th>before</th><th>after</th></tr></thead><tbody>"
            f"<tr><th>prompt</th><td>{before}</td><td>{prompt(ex.get('instruction'), ex.get('input'))}</td></tr>"
            f"<tr><th>answer</th><td>{_text(ex.get('before_output'), TEXT_LIMIT)}</td>"
            f"<td>{_text(ex.get('output'), TEXT_LIMIT)}</td></tr></tbody></table></div>")


def _examples_section(run: Path, rounds: list[_Round]) -> str:
    examples = _examples(run, [r for r in rounds if r.k > 0 and "refine" in r.done])
    if not examples:
        return ""
    body = "".join(f"<h3>{_text(op)} ({_text(AXIS_NAMES.get(AXIS_OF_OPERATION.get(op, ''), op))})</h3>"
                   + "".join(_example_html(e) for e in exs) for op, exs in examples.items())
    return ("<section id='examples'><h2>Example rewrites: before → after</h2>"
            f"<p class='muted'>Accepted rewrites, up to {EXAMPLES_PER_OPERATION} per operation taken in turn from the "
            f"rounds; texts cut at {TEXT_LIMIT} characters; control characters shown as escapes. simplify and "
            "improve replace their sample; synthesize adds a new one next to it.</p>"
            f"{body}</section>")


_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1260px;margin:1.5em auto;padding:0 1em;
 color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;font-size:13px;margin:.6em 0}td,th{border:1px solid #d5d9e0;padding:4px 8px;
 vertical-align:top;text-align:left}th{background:#f2f4f8;font-weight:600}
table.kv th{width:13em;white-space:nowrap}table.overview td{white-space:nowrap}
code{font-size:12px}.muted{color:#666;font-size:13px}.warn{color:#a04000}.error{color:#b00020}
.banner{padding:.6em 1em;border-radius:4px;margin:.8em 0}.banner.done{background:#eef6ee;border:1px solid #b9dbb9}
.banner.running{background:#fff4dc;border:1px solid #f0c36d}
.sw{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.3em;vertical-align:-.05em}
figure.plot{margin:1em 0}figure.plot svg{max-width:100%;height:auto;display:block}
figcaption{font-size:12.5px;color:#555;margin-top:.3em;max-width:900px}
.row{display:flex;gap:1.2em;align-items:flex-start;flex-wrap:wrap}.row .grow{flex:1 1 560px;min-width:0}
.row figure.plot{flex:0 1 500px;margin-top:.6em}
.ex{border:1px solid #d5d9e0;border-radius:4px;padding:.4em .6em;margin:.6em 0;background:#fcfcfd}
.exh{font-size:13px;margin-bottom:.3em}.extable{width:100%;table-layout:fixed;margin:0}
.extable th:first-child{width:5em}.extable td{white-space:pre-wrap;overflow-wrap:anywhere;overflow:hidden;
 font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.inp{display:block;color:#555;border-top:1px dashed #ccc;margin-top:.3em;padding-top:.3em}
.hints{color:#777;font-size:11px;margin-top:.4em;font-family:system-ui,sans-serif}
"""


def build_report(run_dir: str | Path) -> Path:
    """Writes ``<run_dir>/report.html`` (self-contained: inline SVG plots, no script) and returns its path.

    Works on a finished run, one still running and an interrupted one (it shows what the finished stages left
    and says that the run is running or interrupted); a section or plot that cannot be built is replaced by a
    note instead of failing, since the loop rebuilds the report after every round.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
    """
    t0 = time.monotonic()
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a run directory (runs/<run_id>, as `middo run` writes it)")
    summary = _read_json(run / "final" / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    config = _read_json(run / "config.json")
    config = config if isinstance(config, dict) else {}
    rounds = _rounds(run)
    manifest_cfg = next((r.manifest.get("config") for r in rounds if isinstance(r.manifest.get("config"), dict)), {})
    cfg = config or manifest_cfg
    watched = summary.get("metric") or (cfg.get("eval") or {}).get("metric") or "heldout_loss"
    history = _history(summary, rounds)
    keys = _eval_keys(history)
    best = summary.get("best_round")
    if best is None and history:
        from middo_ray.converge import best_round

        best = history[best_round([h for _, h in history], watched)][0]

    comps: dict[int, Counter] = {}
    for rnd in rounds:
        c = _safe_value(lambda r=rnd: _composition(run, r))
        if c:
            comps[rnd.k] = c
    signals = {r.k: _safe_value(lambda r=r: _signals(run, r)) for r in rounds if r.k > 0 and "diagnose" in r.done}
    signals = {k: v for k, v in signals.items() if v is not None}
    edges: dict[str, np.ndarray] = {}
    for col, axis, _ in _DIST_PANELS:
        e = _edges([s[col] for s in signals.values()],
                   [(_thresholds(r).get(axis) or {}).get(col) for r in rounds if r.k in signals],
                   max((s[col].size for s in signals.values()), default=0))
        if e is not None:
            edges[col] = e

    finished = bool(summary)
    done_rounds = [r.k for r in rounds if r.k > 0 and r.finished]
    if finished:
        n = summary.get("rounds", len(done_rounds))
        status = (f"<div class='banner done'><b>Finished</b> after {_text(_plural(n, 'round'))}: "
                  f"{_text(summary.get('stop_reason', ''))}</div>")
    else:
        from middo_ray.rundir import read_lock

        last = [f"round_{r.k}/{s}" for r in rounds for s in r.done]
        lock = read_lock(str(run))
        state = ("Running" if lock and lock.get("active") else "Interrupted" if lock and lock.get("active") is False
                 else "Running or interrupted")
        status = (f"<div class='banner running'><b>{state}</b>: no final summary yet; "
                  f"{_plural(len(done_rounds), 'round')} finished; last finished stage: "
                  f"<code>{_text(last[-1] if last else 'none')}</code>. Rebuild with <code>middo report "
                  f"{_text(run)}</code>.</div>")
    facts = [("run directory", f"<code>{_text(run.resolve())}</code>"),
             ("watched metric", _text(f"{watched} (eval.metric)")),
             ("best model", _text(f"M{best}") if best is not None else "–")]
    if summary.get("optimized_dataset"):
        facts.append(("optimized dataset", f"<code>{_text(summary['optimized_dataset'])}</code>"))
    if summary.get("seconds") is not None:
        facts.append(("wall clock", _text(_secs(summary["seconds"]))))
    model = (cfg.get("model") or {}).get("base")
    if model:
        facts.append(("base model", f"<code>{_text(model)}</code>"))

    parts = [f"<h1>middo-ray run <code>{_text(run.name)}</code></h1>", status, _kv_table(facts, "data-table='facts'")]
    if rounds:
        parts.append("<section id='overview'><h2>Rounds at a glance</h2>"
                     + _safe("overview", _overview, rounds, history, comps, keys, best) + "</section>")
    plots = []
    if history and keys:
        plots.append(_plot("eval", "Eval metrics by round.", lambda: _draw_eval(history, keys, best, watched),
                           "Each model is trained from the base model on that round's dataset (M0 on the seed "
                           "data); the star marks the best round on the watched metric. The y axes are zoomed to "
                           "the values."))
    if comps:
        cs = sorted(comps.items())
        plots.append(_plot("dataset", "Dataset size and composition by origin per round.", lambda: _draw_dataset(cs),
                           "origin = the axis whose rewrite produced a sample (seed = unchanged from D0)."))
    if any(r.seconds for r in rounds):
        plots.append(_plot("timings", "Seconds per stage and round.", lambda: _draw_timings(rounds)))
    if plots:
        parts.append("<section id='plots'><h2>Plots</h2>" + "".join(plots) + "</section>")
    parts.append(_safe("defects", _known_defects, run, rounds))
    evals = dict(history)
    for rnd in rounds:
        if rnd.k == 0:
            parts.append(_safe("round 0", _round0_section, run, rnd, keys, watched))
        else:
            parts.append(_safe(f"round {rnd.k}", _round_section, run, rnd, evals.get(rnd.k - 1), keys, watched,
                               signals.get(rnd.k), edges))
    parts.append(_safe("examples", _examples_section, run, rounds))
    if not rounds:
        parts.append("<p>No round has started yet.</p>")
    seconds = time.monotonic() - t0
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts.append(f"<p class='muted'>Built {stamp} in {seconds:.1f} s by middo-ray's report "
                 "(docs/report.md says how to read it).</p>")
    out = run / "report.html"
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>middo-ray {_text(run.name)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # the loop and `middo report` may both write it
    tmp.write_text(page, encoding="utf-8", errors="replace")
    tmp.replace(out)
    log.debug("report: %s (%.1f s)", out, seconds)
    return out


def _safe_value(fn: Callable[[], Any]) -> Any:
    """``fn()``, or None when it fails (logged)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        log.warning("report: %s", exc, exc_info=True)
        return None
