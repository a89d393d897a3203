"""Selection stage: the spec's rules per axis, turning signals into flags with recorded thresholds."""

from __future__ import annotations

import numpy as np

from middo_ray.config import SelectConfig
from middo_ray.signals.thresholds import complexity_flags, diversity_flags, quality_flags

AXES = ("complexity", "diversity", "quality")


def select_flags(columns: dict[str, np.ndarray], cfg: SelectConfig) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Flags per axis (boolean arrays aligned with the signals), thresholds used, and counts.

    Axes not listed in ``cfg.axes`` get all-False flags but their thresholds are still recorded, so
    the manifest shows what they would have selected.
    """
    n = len(columns["loss_cur"])
    raw = {
        "complexity": complexity_flags(columns["loss_pre"], columns["loss_cur"], cfg.complexity_m),
        "diversity": diversity_flags(columns["knn_sim"], cfg.diversity_m),
        "quality": quality_flags(columns["quality"], cfg.quality_m),
    }
    flags: dict[str, np.ndarray] = {}
    thresholds: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    for axis in AXES:
        f, thr = raw[axis]
        active = axis in cfg.axes
        flags[axis] = f if active else np.zeros(n, dtype=bool)
        thresholds[axis] = {k: (None if not np.isfinite(v) else float(v)) for k, v in thr.items()}
        thresholds[axis]["m"] = getattr(cfg, f"{axis}_m")
        counts[axis] = {"flagged": int(flags[axis].sum()), "would_flag": int(f.sum()), "active": active}
    any_flag = np.zeros(n, dtype=bool)
    for f in flags.values():
        any_flag |= f
    counts["any"] = {"flagged": int(any_flag.sum()), "fraction": float(any_flag.mean()) if n else 0.0}
    return flags, thresholds, counts
