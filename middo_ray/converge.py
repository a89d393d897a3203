"""Stop rules of the loop: max rounds, plateau of the eval metric, flagged fraction below epsilon.

The watched metric (``eval.metric``) is any key of the eval dict the loop records per round:
``heldout_loss`` (lower is better), ``mc_accuracy``, a suite name such as ``gsm8k`` or ``arc_challenge``,
or ``average`` (all scores in [0, 1], higher is better).
"""

from __future__ import annotations

from middo_ray.config import ConvergeConfig

# Metrics where lower is better; every other metric (accuracies, pass@1, their average) is higher-better.
LOWER_IS_BETTER = {"heldout_loss": True}


def lower_is_better(metric: str) -> bool:
    """Direction of a metric: losses go down, scores go up."""
    return LOWER_IS_BETTER.get(metric, metric.endswith("_loss"))


def improvement(metric: str, old: float, new: float) -> float:
    """Signed improvement of ``new`` over ``old`` (positive = better) for the named metric."""
    return (old - new) if lower_is_better(metric) else (new - old)


def best_round(history: list[dict], metric: str) -> int:
    """Index in ``history`` of the round whose model scored best (earliest on ties)."""
    vals = [(h.get(metric), i) for i, h in enumerate(history) if h.get(metric) is not None]
    if not vals:
        return len(history) - 1
    sign = 1 if lower_is_better(metric) else -1
    return min(vals, key=lambda t: (sign * t[0], t[1]))[1]


def should_stop(history: list[dict], cfg: ConvergeConfig, metric: str, rounds_done: int,
                flagged_fraction: float | None) -> tuple[bool, str]:
    """Decides after a round whether to stop, and why.

    Args:
        history: eval metrics per trained model, round 0 (seed data) first.
        cfg: the stop-rule settings.
        metric: the metric the plateau rule watches.
        rounds_done: refinement rounds completed so far.
        flagged_fraction: fraction of samples flagged in the last diagnosis (None if unknown).
    """
    reasons: list[str] = []
    if rounds_done >= cfg.max_rounds:
        reasons.append(f"reached converge.max_rounds={cfg.max_rounds}")
    if flagged_fraction is not None and cfg.min_flagged_fraction > 0 and flagged_fraction < cfg.min_flagged_fraction:
        reasons.append(f"flagged fraction {flagged_fraction:.3f} below converge.min_flagged_fraction "
                       f"{cfg.min_flagged_fraction}")
    values = [h.get(metric) for h in history]
    if len(values) > cfg.patience and all(v is not None for v in values[-cfg.patience - 1:]):
        best_before = values[: len(values) - cfg.patience]
        ref = best_before[best_round([{metric: v} for v in best_before], metric)]
        recent = values[-cfg.patience:]
        if all(improvement(metric, ref, v) <= cfg.min_delta for v in recent):
            reasons.append(f"plateau: {metric} did not improve by more than {cfg.min_delta} over "
                           f"{cfg.patience} round(s) (best earlier {ref:.4f}, recent {[round(v, 4) for v in recent]})")
    # Every rule that fired is recorded, so a run stopped at max_rounds still says it had plateaued.
    return bool(reasons), "; ".join(reasons)
