"""Calls to the refiner/judge Serve apps through deployment handles: cached, bounded, timed out.

- :class:`LLMCallCache`: a content-addressed store of answers, one JSON file per key (the request's texts,
  sampling and seed, the app's engine, model id and revision, and its prompt fingerprint), written
  atomically. A rerun or a resumed run asks the service nothing it asked before.
- :func:`run_calls`: answers a list of calls from the cache or the handle with a bounded number in flight;
  a call that does not answer in time is a row failure (its items keep their originals), and so is a call
  whose teacher could not answer (:class:`~middo_ray.wire.TeacherUnavailable`: its endpoint down or refusing,
  after the engine's own retries), until ``refine.max_consecutive_failures`` of those in a row stop the stage
  (:class:`Breaker`); a call that raises anything else is fatal (a dead replica or a broken contract).
  Nothing that failed is cached, so a rerun asks again exactly what was not answered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("middo")

CACHE_FORMAT = 1          # bump when the cached answer layout changes
INFO_TIMEOUT_S = 120.0


class LLMCallCache:
    """Content-addressed store of LLM-call answers: one JSON file per key, written atomically.

    Layout: ``<root>/<key[:2]>/<key>.json``. A file that cannot be read (a crash mid-write leaves
    only a temporary file, never a partial one) counts as a miss. The root is a local or shared path:
    every refine worker of the cluster reads and writes it.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text())["answer"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, answer: dict, about: dict | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"about": about or {}, "answer": answer}, ensure_ascii=False))
        os.replace(tmp, path)


def call_key(method: str, request: dict, ident: dict) -> str:
    """Cache key of one call: the request content (texts, sampling, seed), engine, model id and revision,
    and the app's prompt fingerprint."""
    payload = {"format": CACHE_FORMAT, "method": method, "request": request,
               "engine": ident.get("engine"), "model": ident.get("model"), "revision": ident.get("revision"),
               "logic": ident.get("logic_version"), "prefill": ident.get("prefill")}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class TeacherStopped(RuntimeError):
    """Too many requests in a row found the teacher unavailable: the stage stops (a rerun continues)."""


@dataclass
class Breaker:
    """Counts the requests in a row that the teacher could not answer; at ``limit`` the stage stops.

    One per client worker, kept across the shards it works on. While the teacher is failing, only one
    request is in flight (:func:`run_calls`), so an endpoint that is down is asked about ``limit`` times.
    """

    limit: int
    consecutive: int = 0
    failed: int = 0
    stopped: str | None = None    # the stop's message, once the limit was reached

    def failure(self, call: "Call", exc: Exception) -> None:
        self.consecutive += 1
        self.failed += 1
        if self.consecutive >= self.limit:
            self.stopped = (
                f"{exc} — {self.consecutive} requests in a row failed so (refine.max_consecutive_failures="
                f"{self.limit}), the last one {call.what}. The stage stopped; the answers received so far are "
                "cached. Fix the teacher, then run the same command again: it continues from there.")
            raise TeacherStopped(self.stopped) from None

    def success(self) -> None:
        self.consecutive = 0

    @property
    def failing(self) -> bool:
        return self.consecutive > 0


@dataclass
class Call:
    """One request to the app and what became of it."""

    method: str                  # handle method: "refine" or "judge"
    request: dict
    what: str                    # for error messages: no sample text, just shape and first id
    key: str | None = None
    answer: dict | None = None
    error: str | None = None     # set when the call timed out (a row failure, not fatal)


def run_calls(handle, calls: list[Call], max_in_flight: int, timeout_s: float, cache: LLMCallCache | None,
              ident: dict, stats: dict[str, int], breaker: Breaker | None = None) -> None:
    """Answers every call from the cache or the handle, with ``max_in_flight`` requests in flight.

    A sliding window: when full, wait for the oldest (one replica serves requests in arrival order,
    so it is also the first to finish). Each call's timeout runs from the moment it was sent; a call that
    times out is cancelled, in the replica and at its engine's endpoint.

    Raises:
        TeacherStopped: ``breaker.limit`` calls in a row found the teacher unavailable.
        RuntimeError: A call raised in the service (dead replica, lost connection): fatal.
    """
    from middo_ray.wire import TeacherUnavailable

    breaker = breaker if breaker is not None else Breaker(limit=3)
    window: deque = deque()

    def finish(call: Call, response, sent: float) -> None:
        remaining = timeout_s - (time.monotonic() - sent)
        try:
            answer = response.result(timeout_s=max(0.001, remaining))
        except TimeoutError:
            response.cancel()
            stats["timeouts"] += 1
            call.error = f"the refiner did not answer within {timeout_s:g}s (refine.request_timeout_s)"
            log.warning("%s timed out after %.0fs; its items keep their originals", call.what, timeout_s)
            return
        except TeacherUnavailable as raised:
            # Ray re-raises the replica's exception as a subclass whose text is the whole remote traceback;
            # its cause is the exception itself, whose text is the one line that says what failed.
            cause = getattr(raised, "cause", None)
            exc = cause if isinstance(cause, TeacherUnavailable) else raised
            stats["teacher_errors"] = stats.get("teacher_errors", 0) + 1
            call.error = f"the teacher could not answer: {exc}"
            log.warning("%s: %s; its items keep their originals", call.what, exc)
            breaker.failure(call, exc)
            return
        except Exception as exc:
            raise RuntimeError(f"{call.what} failed in the refiner service: {type(exc).__name__}: {exc}. "
                               f"The service is down or broken; the stage stops (no sample was changed).") from exc
        breaker.success()
        call.answer = answer
        if cache is not None and call.key:
            cache.put(call.key, answer, {"method": call.method, "model": ident.get("model"),
                                         "revision": ident.get("revision")})

    try:
        for call in calls:
            if cache is not None:
                call.key = call_key(call.method, call.request, ident)
                hit = cache.get(call.key)
                if hit is not None:
                    call.answer = hit
                    stats["cache_hits"] += 1
                    continue
                stats["cache_misses"] += 1
            # While the teacher is failing one request is in flight: it probes, the others wait.
            while window and len(window) >= (1 if breaker.failing else max_in_flight):
                finish(*window.popleft())
            window.append((call, getattr(handle, call.method).remote(call.request), time.monotonic()))
        while window:
            finish(*window.popleft())
    except TeacherStopped:
        for _, response, _ in window:
            response.cancel()                         # the stage stops: so does the work it had asked for
        raise


def checked_results(call: Call, ids: list[str | None]) -> list[dict]:
    """The answer's results, checked against the ids that were sent (a mismatch is fatal)."""
    got = call.answer.get("results") if isinstance(call.answer, dict) else None
    if not isinstance(got, list) or len(got) != len(ids):
        raise RuntimeError(f"{call.what}: the refiner answered {len(got) if isinstance(got, list) else got!r} "
                           f"results for {len(ids)} samples; the service breaks its contract")
    for want, res in zip(ids, got):
        if res.get("sample_id") != want:
            raise RuntimeError(f"{call.what}: result for '{res.get('sample_id')}' arrived where '{want}' was "
                               f"expected; the service breaks its contract")
    return got


def app_info(handle, what: str) -> dict:
    """The app's identity (engine, model, revision, judge modes); a cheap call, so the request timeout
    (possibly tiny) does not apply to it."""
    try:
        return handle.info.remote().result(timeout_s=INFO_TIMEOUT_S)
    except Exception as exc:
        raise RuntimeError(f"the {what} service does not answer info(): {type(exc).__name__}: {exc}; "
                           f"the stage stops (no sample was changed)") from exc
