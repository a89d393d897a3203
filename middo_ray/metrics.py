"""The loop's Prometheus metrics, through Ray's metrics API (``ray.util.metrics``).

Ray's metrics agent on each node serves them beside Ray's own and the Serve apps' (``ray_serve_*``,
``ray_middo_serve_*``) at ``http://<node>:<metrics_export_port>/metrics`` (Prometheus' scrape target; the
Ray dashboard's Metrics view reads the same series). Every name gets Ray's ``ray_`` prefix, and every series
the tags ``run_id`` and, where it applies, ``stage`` or ``axis``:

=============================  =======  =====================================================================
``middo_round``                gauge    the round the loop is in (0: the baseline)
``middo_stage_seconds``        gauge    seconds the stage took in its latest round
``middo_stage_rows``           gauge    rows out of the stage in its latest round (data: train rows, diagnose:
                                        rows diagnosed, select: flagged, refine: rewrites, merge: D_k size)
``middo_stage_progress``       gauge    share of the running stage done (0..1)
``middo_flags``                gauge    samples flagged per axis in the latest round
``middo_rewrites_total``       counter  rewrites by ``result``: accepted, rejected (judged worse), failed
``middo_tokens_total``         counter  tokens processed by ``stage`` (diagnose input, train response tokens,
                                        eval held-out tokens)
``middo_rows_total``           counter  rows processed by ``stage``
``middo_metric``               gauge    the watched eval metric (``name`` tag) of the latest round
=============================  =======  =====================================================================

Counters count the work of this driver process (a resumed stage adds nothing). Ray's metrics agent drops a
gauge that was not set again for two export intervals, so the latest value of every gauge is set again every
:data:`REFRESH_S` seconds while the process runs (a Prometheus scrape at any time sees it). Recording never
stops the run: without Ray (a stage run alone in a test) every call is a no-op.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("middo")

REFRESH_S = 5.0

_m: dict[str, Any] = {}
_tags: dict[str, str] = {}
_gauges: dict[tuple, float] = {}          # (metric key, tags as a sorted tuple) -> latest value
_refresher: dict[str, Any] = {"thread": None}
_lock = threading.Lock()


def _set(key: str, value: float, tags: dict[str, str]) -> None:
    """Sets gauge ``key`` and keeps its value for the refresher."""
    with _lock:                           # one writer at a time: the refresher never sets a stale value
        _m[key].set(value, tags=tags)
        _gauges[(key, tuple(sorted(tags.items())))] = value
        if _refresher["thread"] is None:
            t = threading.Thread(target=_refresh, name="middo-metrics", daemon=True)
            _refresher["thread"] = t
            t.start()


def _refresh() -> None:
    import time

    while True:
        time.sleep(REFRESH_S)
        with _lock:
            for (key, tags), value in _gauges.items():
                try:
                    _m[key].set(value, tags=dict(tags))
                except Exception as exc:  # noqa: BLE001 - Ray went away (the loop finished): nothing to keep
                    log.debug("metric %s not refreshed: %s", key, exc)


def _metrics() -> dict[str, Any] | None:
    if _m:
        return _m
    try:
        import ray
        from ray.util.metrics import Counter, Gauge

        if not ray.is_initialized():
            return None
        _m.update(
            round=Gauge("middo_round", "The round the Middo loop is in (0: the baseline).", tag_keys=("run_id",)),
            seconds=Gauge("middo_stage_seconds", "Seconds the stage took in its latest round.",
                          tag_keys=("run_id", "stage")),
            rows=Gauge("middo_stage_rows", "Rows out of the stage in its latest round.", tag_keys=("run_id", "stage")),
            progress=Gauge("middo_stage_progress", "Share of the running stage done (0..1).",
                           tag_keys=("run_id", "stage")),
            flags=Gauge("middo_flags", "Samples flagged per axis in the latest round.", tag_keys=("run_id", "axis")),
            rewrites=Counter("middo_rewrites", "Rewrites by result (accepted, rejected by the judge, failed).",
                             tag_keys=("run_id", "result")),
            tokens=Counter("middo_tokens", "Tokens processed, by stage.", tag_keys=("run_id", "stage")),
            rows_total=Counter("middo_rows", "Rows processed, by stage.", tag_keys=("run_id", "stage")),
            metric=Gauge("middo_metric", "The watched eval metric of the latest round.", tag_keys=("run_id", "name")),
        )
    except Exception as exc:  # noqa: BLE001 - metrics are never worth a failed run
        log.debug("metrics unavailable: %s", exc)
        return None
    return _m


def set_run(run_id: str) -> None:
    _tags["run_id"] = str(run_id)


def _t(**tags: str) -> dict[str, str]:
    return {"run_id": _tags.get("run_id", ""), **tags}


def _safe(fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.debug("metric not recorded: %s", exc)
            return None
    return wrapper


@_safe
def set_round(k: int) -> None:
    m = _metrics()
    if m:
        _set("round", k, _t())


@_safe
def stage_progress(stage: str, done: int, total: int) -> None:
    m = _metrics()
    if m and total:
        _set("progress", min(1.0, done / total), _t(stage=stage))


def _rows_out(name: str, info: dict) -> int | None:
    keys = {"data": "train", "diagnose": "rows", "refine": "jobs", "merge": "out", "eval": "heldout_n"}
    if name == "select":
        return info.get("counts", {}).get("any", {}).get("flagged")
    if name == "train":
        return info.get("rows") or info.get("samples")
    value = info.get(keys.get(name, ""))
    return int(value) if isinstance(value, (int, float)) else None


@_safe
def record_stage(k: int, name: str, info: dict, seconds: float | None, resumed: bool, metric: str | None = None) -> None:
    """A finished (or resumed) stage's numbers."""
    m = _metrics()
    if not m:
        return
    tags = _t(stage=name)
    if seconds is not None:
        _set("seconds", float(seconds), tags)
    rows = _rows_out(name, info)
    if rows is not None:
        _set("rows", rows, tags)
    _set("progress", 1.0, tags)
    if name == "select":
        for axis, c in info.get("counts", {}).items():
            if isinstance(c, dict) and "flagged" in c and axis != "any":
                _set("flags", c["flagged"], _t(axis=axis))
    if name == "eval" and metric and isinstance(info.get(metric), (int, float)):
        _set("metric", float(info[metric]), _t(name=metric))
    if resumed:
        return
    if rows:
        m["rows_total"].inc(rows, tags=tags)
    tokens = {"diagnose": info.get("input_tokens"), "train": info.get("tokens"),
              "eval": info.get("heldout_tokens")}.get(name)
    if tokens:
        m["tokens"].inc(float(tokens), tags=tags)
    if name == "refine":
        c = info.get("counts", {})
        rejected = int(c.get("rejected", 0) or 0)
        for result, n in (("accepted", int(info.get("ok", 0))), ("rejected", rejected),
                          ("failed", int(info.get("failed", 0)) - rejected)):
            if n > 0:
                m["rewrites"].inc(n, tags=_t(result=result))
