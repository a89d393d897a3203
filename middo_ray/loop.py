"""The closed loop: the stages in order, round after round, until a stop rule fires.

Round 0 reads the seed data D_0 (and the held-out rows), trains M_0 on it (the baseline) and evaluates
it. Round k >= 1 then does

    diagnose(D_{k-1}; M_pre, M_{k-1}) -> select -> refine (Serve) -> merge -> D_k
    -> train(M_base, D_k) = M_k -> evaluate(M_k) -> converge?

so every round ends with a model trained on the round's new data and measured, and the stop rule compares
it with the rounds before (reference §1: each round trains from the base model). When a rule fires, the
last dataset goes to ``final/`` in the input's format, with its lineage and the trainers' exports.

This module only orders the stages. Each stage owns its files under ``round_<k>/<stage>/`` and hands the
next one a handle to them; :meth:`middo_ray.rundir.Round.run` skips what is finished (a rerun with the
same run id resumes), times each stage and keeps the round's manifest.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from middo_ray import console, data, diagnose, evaluate, merge, metrics, refine, select, storage, train
from middo_ray.config import MiddoConfig
from middo_ray.converge import best_round, should_stop
from middo_ray.final import write_final
from middo_ray.preflight import require_inputs
from middo_ray.rundir import Run, init_ray
from middo_ray.schema import AXES
from middo_ray.serve_apps import ServeApps, check_gpu_fit
from middo_ray.storage import ShardSet

log = logging.getLogger("middo")


@dataclass
class LoopState:
    """What the loop carries from round to round: handles and counts, never rows."""

    data: data.DataOutput
    dataset: ShardSet
    models: list[str]
    history: list[dict]
    diagnosis: diagnose.DiagnosisOutput | None = None
    k: int = 0
    stop: bool = False
    reason: str = ""
    sizes: list[int] = field(default_factory=list)
    datasets: list[ShardSet] = field(default_factory=list)  # D_0, D_1, ...


def _round_zero(run: Run) -> LoopState:
    """D_0, M_0 and M_0's metrics."""
    cfg, r0 = run.cfg, run.round(0)
    d = r0.run("data", data, cfg.data).output
    model = r0.run("train", train, cfg.train, {"dataset": d.train, "init_model": cfg.model.base}).output
    metrics = r0.run("eval", evaluate, cfg.eval, {"model": model, "heldout": d.heldout}).info
    r0.write_manifest(rows=d.train.total)
    return LoopState(d, d.train, [model], [metrics], sizes=[d.train.total], datasets=[d.train])


def _next_round(run: Run, st: LoopState, apps: ServeApps) -> dict:
    """Round k = st.k + 1: diagnose, select, refine, merge, train, evaluate, converge; returns its manifest."""
    cfg = run.cfg
    k = st.k + 1
    r = run.round(k)
    log.info("=== round %d: %d samples ===", k, st.dataset.total)
    diag = r.run("diagnose", diagnose, cfg.diagnose, {"dataset": st.dataset, "model": st.models[-1],
                                                      "previous": st.diagnosis}).output
    sel = r.run("select", select, cfg.select, {"diagnosis": diag})
    counts = sel.info["counts"]
    results = r.run("refine", refine, cfg.refine, {
        "dataset": st.dataset, "flags": sel.output, "diagnosis": diag, "apps": apps, "judge_model": st.models[-1],
        "any_sparse": counts["diversity"]["flagged"] > 0, "jobs": sum(counts[a]["flagged"] for a in AXES)}).output
    merged = r.run("merge", merge, None, {"dataset": st.dataset, "results": results, "diagnosis": diag,
                                          "thresholds": sel.info["thresholds"]}).output
    init = st.models[-1] if cfg.train.from_previous else cfg.model.base
    apps.hand_off()                                   # refine.gpu_handoff: the apps' GPUs during training
    model = r.run("train", train, cfg.train, {"dataset": merged, "init_model": init}).output
    metrics = r.run("eval", evaluate, cfg.eval, {"model": model, "heldout": st.data.heldout}).info
    st.history.append(metrics)
    st.stop, st.reason = should_stop(st.history, cfg.converge, cfg.eval.metric, k, counts["any"]["fraction"])
    st.k, st.dataset, st.diagnosis = k, merged, diag
    st.models.append(model)
    st.sizes.append(merged.total)
    st.datasets.append(merged)
    log.info("round %d done: %s = %s (before: %s)%s", k, cfg.eval.metric, metrics.get(cfg.eval.metric),
             st.history[-2].get(cfg.eval.metric), f"; stopping: {st.reason}" if st.stop else "")
    return r.write_manifest(
        rows={"in": r.stages["merge"]["in"], "out": r.stages["merge"]["out"]},
        flags={a: counts[a]["flagged"] for a in AXES}, selection=counts, thresholds=sel.info["thresholds"],
        metric={cfg.eval.metric: metrics.get(cfg.eval.metric), "previous": st.history[-2].get(cfg.eval.metric)},
        converge={"stop": st.stop, "reason": st.reason},
        serve={"gpu_handoff": cfg.refine.gpu_handoff, "events": apps.take_events()})


def _finish(run: Run, st: LoopState, t_start: float) -> dict:
    """Writes ``final/`` and its summary, and the report."""
    from middo_ray.report import build_report

    cfg = run.cfg
    best = best_round(st.history, cfg.eval.metric)
    d = st.data
    out = write_final(run.final_dir, st.dataset, d.format, d.style, d.source)
    best_dir = st.datasets[best].root
    summary = {
        "run_id": cfg.run.run_id, "run_dir": run.root, "rounds": st.k, "stop_reason": st.reason,
        "metric": cfg.eval.metric, "history": st.history, "best_round": best, "best_dataset": best_dir,
        "sizes": st.sizes, **out, "seconds": round(time.time() - t_start, 1),
    }
    storage.write_json(storage.join(run.final_dir, "summary.json"), summary)
    summary["report"] = str(build_report(run.root))
    log.info("done after %d round(s): %s; optimized dataset: %s", st.k, st.reason, out["optimized_dataset"])
    return summary


def _rebuild_report(run: Run) -> None:
    """The report after a round (a failure to draw it is logged, never a failed run)."""
    from middo_ray.report import build_report

    try:
        build_report(run.root)
    except Exception as exc:  # noqa: BLE001 - the report is a view of the run, not part of it
        log.warning("report not rebuilt after this round: %s: %s", type(exc).__name__, exc)


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the driver: the loop stopped where it was.

    Raised in the main thread by the handler :func:`stop_on_signals` installs; on its way out the Serve apps
    are deleted and the run lock released, and the stages keep what they committed (a rerun continues). A
    ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


@contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise :class:`Interrupted` in the main thread (Ray's own driver handler would
    ``sys.exit`` wherever the driver is, with Ray's threads still running); a second signal ends the process
    at once. Outside the main thread nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:                                     # asked twice: no more clean-up
            os._exit(128 + signum)
        fired.append(signum)
        raise Interrupted(signum)

    before = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def run_loop(cfg: MiddoConfig, on_round: Callable[[int, dict], Any] | None = None) -> dict:
    """Runs the loop to a stop rule and writes the final dataset; returns the summary.

    Raises:
        InputError: A file or folder the run needs is missing or unusable (before anything starts).
        RunLocked: Another live process runs in this run directory.
        Interrupted: SIGTERM or SIGINT stopped it (in the main thread; see :func:`stop_on_signals`).
    """
    require_inputs(cfg)
    run = Run(cfg).open()
    try:
        console.set_run_dir(run.root)
        init_ray(cfg)                                 # Ray sets its own SIGTERM handler: ours goes on top
        with stop_on_signals():
            return _run_rounds(run, cfg, on_round)
    finally:
        console.set_run_dir(None)
        run.close()


def _run_rounds(run: Run, cfg: MiddoConfig, on_round: Callable[[int, dict], Any] | None) -> dict:
    """Round 0, then rounds until a stop rule fires, with the Serve apps up; then ``final/``."""
    metrics.set_run(cfg.run.run_id)
    check_gpu_fit(cfg)
    t_start = time.time()
    with ServeApps(cfg) as apps:
        metrics.set_round(0)
        st = _round_zero(run)
        _rebuild_report(run)
        while not st.stop:
            metrics.set_round(st.k + 1)
            manifest = _next_round(run, st, apps)
            _rebuild_report(run)
            if on_round:
                on_round(st.k, manifest)
    return _finish(run, st, t_start)
