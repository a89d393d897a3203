"""Evaluate stage: the round's model on the held-out rows, the multiple-choice set and the enabled suites.

The harness is :mod:`middo_ray.evalsuite` (scorers, the evaluation actor, the Ray Data pipeline); this
module is its stage: it reads the held-out shard set of round 0, runs the pipeline on Ray Data and keeps

    round_<k>/eval/predictions.jsonl   every scored benchmark item (extracted answer, output, score)
    round_<k>/eval/stage.json          the flat metrics: heldout_loss, mc_accuracy, one score per suite, ...

:func:`evaluate_model` (in this process) and :func:`evaluate_remote` (on Ray) evaluate a model on rows in
memory, for tests, benchmarks and the audit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from middo_ray.rundir import StageContext, StageResult, read_record

if TYPE_CHECKING:
    from middo_ray.config import EvalConfig, MiddoConfig

log = logging.getLogger("middo")

__all__ = ["evaluate_model", "evaluate_remote", "load", "run"]


def evaluate_model(model: str, heldout_rows: list[dict], cfg: MiddoConfig) -> dict[str, Any]:
    """Every configured evaluation of one model, in this process (no Ray).

    Args:
        model: Model spec ('smollm2', 'tiny') or a checkpoint directory / HF id.
        heldout_rows: Canonical rows kept out of training.
        cfg: Run configuration; reads ``eval`` (mc_path, mc_limit, suites, ...), ``data`` (template,
            cutoff), ``model.dtype`` and ``diagnose.batch_tokens``.

    Returns:
        The flat metrics dict: ``heldout_loss`` (None without rows), ``heldout_n``, ``heldout_tokens``,
        ``mc_accuracy`` (None when skipped), ``mc_n``, per enabled suite ``<name>`` (score in [0, 1]),
        ``<name>_n`` and ``<name>_seconds``, ``average`` (when suites are enabled) and ``seconds``.

    Raises:
        FileNotFoundError: When ``eval.mc_path`` names a file that does not exist.
    """
    from middo_ray.evalsuite.runner import evaluate_local

    return evaluate_local(model, heldout_rows, cfg)[0]


def evaluate_remote(model: str, heldout, cfg: MiddoConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """:func:`evaluate_model` batched on Ray Data actors (one GPU each on GPU clusters); ``heldout`` is a list
    of rows or a ShardSet. Writes ``predictions.jsonl`` (one line per scored item) into ``out_dir`` when given."""
    from middo_ray.evalsuite.runner import evaluate_on_ray

    return evaluate_on_ray(model, heldout, cfg, Path(out_dir) if out_dir is not None else None)[0]


def run(ctx: StageContext, cfg: EvalConfig, inputs: dict) -> StageResult:
    """Scores ``inputs["model"]`` on ``inputs["heldout"]`` (a ShardSet) and the configured benchmarks."""
    metrics = evaluate_remote(inputs["model"], inputs["heldout"], ctx.cfg, out_dir=ctx.dir)
    log.debug("eval: %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()})
    return StageResult(metrics, metrics)


def load(stage_dir: str) -> StageResult:
    info = read_record(stage_dir)
    return StageResult(info, info)
