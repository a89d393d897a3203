"""Benchmark: can one hostile client stall the refiner app? A bounded attack on loopback.

The benchmark starts its own local Ray and Serve (a free loopback port) and one refiner app from
``serve.app.build_app`` with the tiny model, an API key and small limits: ``max_ongoing_requests`` and
``max_queued_requests`` (default 4 and 8) small enough that a burst exceeds them, and a body deadline
(``body_timeout_s``) of 5 s, shorter than a scenario. Then it attacks the
app as a hostile client would, one scenario after another (never two at a time):

- ``baseline``: only the small stream and the probe (below). Always run: the others are compared with it.
- ``slow-body``: ``--slow-clients`` raw TCP connections send a valid ``POST /v1/refine`` head (with the
  key) announcing ``Content-Length: 1000``, 12 body bytes, and stall; each re-opens when the server
  drops it. Recorded: how the server ended them (the HTTP status it answered, e.g. 408, or a closed or
  reset connection, or still open when the scenario ended) and after how many seconds.
- ``huge-request``: one client keeps sending the largest chat request the server accepts (a prompt
  filling ~90 % of ``max_body_bytes``, ``n=8``, ``max_tokens`` = the server's per-item token limit,
  temperature 1); one asks for one token over the limit every second (must be a 4xx, not a 5xx); and
  every 2 s a large request is abandoned after ~1 s (client timeout). The server's cancelling of
  abandoned work can only be seen indirectly: the small requests' latency in the 3 s after each one.
- ``burst``: waves of ``3 x (max_ongoing + max_queued)`` concurrent small requests, fired at once;
  200 vs 503 are counted, every 503 should carry ``Retry-After`` and a JSON ``{"error": {...}}`` body,
  and the refused ones' latency (how fast the 503s come) is reported.
- ``replica-kill``: a third into the scenario (at most 5 s in) a few large requests are started, then the
  replica actor of the ``Refiner`` deployment is killed (``ray.kill(..., no_restart=False)``; Serve's
  controller starts a new replica, under a new actor name). The scenario lasts at least
  ``--recovery-seconds`` after the kill. Every request in flight should still get an HTTP answer; the
  time until ``/healthz`` and the small stream answer 200 again is reported, beside Serve's own view of
  the restart (``serve.status()``: the deployment's status and replica states, each change timed).

In every scenario a *small stream* runs: ``--stream-clients`` (default 2) clients in a closed loop, each
sending ``POST /v1/chat/completions`` with one "hi" message, ``max_tokens=4``, temperature 0 (after an
error answer a client pauses 0.25 s rather than spin). A *probe* GETs ``/healthz`` every 0.25 s (open
loop: a slow answer does not delay the next probe).

Per scenario one row: requests sent / answered / lost (lost = no HTTP answer at all: connection error
or client timeout; the intentional slow-body and abandoning clients are reported apart), status code
counts, the small stream's share of 200s and its p50/p99 latency (200s only) beside baseline's
(``p99x`` = the ratio), ``/healthz`` max and p99 latency (a probe without an answer counts with the
time it waited), the 5xx that are not 503-with-``Retry-After`` ("unexpected 5xx") and the error
answers whose body is not the JSON ``{"error": {...}}`` layout. Goals (PASS/FAIL, over every
scenario run): 0 lost; 0 unexpected 5xx; every ``/healthz`` probe answered 200 within 1 s; small-request
p99 under attack <= 2x baseline; and two extras: the small stream keeps being served (>= 90 % of its
requests answered 200; a fast 503 to everyone is a stall too, though goals 1-4 would not show it), and
the over-limit request is refused with a 4xx.

Bounds: every scenario lasts ``--seconds`` (default 20; 8 with ``--quick``), every request has a
client timeout (``--client-timeout``), a scenario that overruns its own cap is cancelled, scenarios
that would end past ``--max-seconds`` (default 300, counted from the start, setup included) are
shortened or skipped, and a watchdog tears Ray down and exits (code 3) if the process is still running
at ``--max-seconds``. Serve and Ray are shut down and the slow sockets closed in every case. Only
loopback hosts are accepted. The load generator runs on the same machine as the server: on few
cores it takes CPU from it (the load average is recorded).

    .venv/bin/python benchmarks/serve_attack.py --quick                 # ~1.5 min with the tiny model
    .venv/bin/python benchmarks/serve_attack.py --scenarios slow-body burst --seconds 30
    .venv/bin/python benchmarks/serve_attack.py --app-arg slice_s=0.25  # any other build_app argument
    .venv/bin/python benchmarks/serve_attack.py --strict                # exit 1 if a goal fails

Prints a table and the goals, and writes JSON (default: benchmarks/results/serve_attack.json). The exit
code is 0 whatever the goals say, unless ``--strict``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEY_ENV = "MIDDO_BENCH_SERVE_KEY"
APP_NAME = "attack"
ROUTE_PREFIX = "/attack"
COMPUTE_DEPLOYMENT = "Refiner"
SCENARIOS = ("baseline", "slow-body", "huge-request", "burst", "replica-kill")

PROBE_EVERY_S = 0.25
PROBE_GOAL_S = 1.0
ERROR_PAUSE_S = 0.25         # a small-stream client's pause after an error answer
ABANDON_EVERY_S = 2.0
ABANDON_TIMEOUT_S = 1.0
AFTER_ABANDON_WINDOW_S = 3.0
SLOW_CONTENT_LENGTH = 1000
SLOW_BODY = b'{"operation"'  # 12 bytes of a valid refine body, then nothing
TEARDOWN_RESERVE_S = 25.0    # kept free before --max-seconds for the teardown


# ----- small helpers -------------------------------------------------------------------------------

def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _require_loopback(host: str) -> str:
    """The host, if every address it names is loopback; SystemExit otherwise (this tool attacks only itself)."""
    bare = host.strip("[]")
    try:
        addrs = {ipaddress.ip_address(bare)}
    except ValueError:
        try:
            addrs = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(bare, None)}
        except OSError as exc:
            raise SystemExit(f"refusing target '{host}': it does not resolve ({exc})") from None
    if not addrs or not all(a.is_loopback for a in addrs):
        raise SystemExit(f"refusing target '{host}': not a loopback address (this benchmark attacks only loopback)")
    return bare


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def _lat_stats(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": _ms(statistics.median(values)) if values else None,
            "p99_ms": _ms(_pct(values, 0.99)), "max_ms": _ms(max(values)) if values else None}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _is_error_layout(body: bytes) -> bool:
    """Whether an error answer is the app's JSON layout {"error": {...}}."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("error"), dict)


# ----- recording -----------------------------------------------------------------------------------

class Tally:
    """Everything one group of clients saw: one event per request (start, latency, status or loss)."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.events: list[dict] = []

    def add(self, start: float, latency: float, status: int | None = None, lost: str | None = None,
            retry_after: bool = False, error_layout: bool = True) -> None:
        self.events.append({"t": start - self.t0, "latency": latency, "status": status, "lost": lost,
                            "retry_after": retry_after, "error_layout": error_layout})

    @property
    def sent(self) -> int:
        return len(self.events)

    def answered(self) -> list[dict]:
        return [e for e in self.events if e["status"] is not None]

    def statuses(self) -> Counter:
        return Counter(str(e["status"]) for e in self.answered())

    def lost(self) -> Counter:
        return Counter(e["lost"] for e in self.events if e["lost"])

    def unexpected_5xx(self) -> int:
        """5xx answers other than a refusal (503) that says when to retry."""
        return sum(1 for e in self.answered() if e["status"] >= 500 and not (e["status"] == 503 and e["retry_after"]))

    def errors_not_json(self) -> int:
        return sum(1 for e in self.answered() if e["status"] >= 400 and not e["error_layout"])

    def latencies(self, status: int | None = None, since: float | None = None) -> list[float]:
        return [e["latency"] for e in self.answered()
                if (status is None or e["status"] == status) and (since is None or e["t"] >= since)]

    def summary(self) -> dict:
        return {"sent": self.sent, "answered": len(self.answered()), "lost": sum(self.lost().values()),
                "lost_kinds": dict(self.lost()), "statuses": dict(self.statuses()),
                "unexpected_5xx": self.unexpected_5xx(), "errors_not_json": self.errors_not_json(),
                "latency_200": _lat_stats(self.latencies(200)),
                "lost_events": [{"t_s": round(e["t"], 2), "waited_s": round(e["latency"], 2), "kind": e["lost"]}
                                for e in self.events if e["lost"]][:20]}


async def _send(client, tally: Tally | None, method: str, path: str, body: dict | None = None,
                timeout: float | None = None) -> tuple[int | None, float]:
    """One request; its answer (or loss) goes into the tally. Returns (status or None, seconds)."""
    import httpx

    start = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs["json"] = body
    if timeout is not None:
        kwargs["timeout"] = timeout
    try:
        r = await client.request(method, path, **kwargs)
    except httpx.TimeoutException as exc:
        latency = time.perf_counter() - start
        if tally is not None:
            tally.add(start, latency, lost=f"timeout ({type(exc).__name__})")
        return None, latency
    except httpx.HTTPError as exc:
        latency = time.perf_counter() - start
        if tally is not None:
            tally.add(start, latency, lost=type(exc).__name__)
        return None, latency
    latency = time.perf_counter() - start
    if tally is not None:
        tally.add(start, latency, status=r.status_code, retry_after="retry-after" in r.headers,
                  error_layout=r.status_code < 400 or _is_error_layout(r.content))
    return r.status_code, latency


# ----- the target ----------------------------------------------------------------------------------

class Target:
    """The app under attack: base URL, raw host/port, key, served model id, limits; HTTP clients."""

    def __init__(self, host: str, port: int, key: str, args: argparse.Namespace):
        self.host, self.port, self.key, self.args = _require_loopback(host), port, key, args
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        self.base = f"http://{netloc}:{port}{ROUTE_PREFIX}"
        self.model_id = ""
        self.token_limit = args.token_limit
        self.body_limit = args.max_body_bytes

    def client(self, connections: int, timeout: float | None = None):
        import httpx

        _require_loopback(httpx.URL(self.base).host)
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(base_url=self.base, limits=limits, timeout=timeout or self.args.client_timeout,
                                 headers={"Authorization": f"Bearer {self.key}"})

    def small_body(self) -> dict:
        return {"model": self.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "temperature": 0}

    def huge_body(self, fill: bool = True) -> dict:
        """The largest chat request the server accepts: n=8, max_tokens at the limit, a body near max_body_bytes."""
        words = "Explain tides, prime numbers and compound interest in detail. "
        chars = int(0.9 * self.body_limit) - 512 if fill else 400
        text = (words * (chars // len(words) + 1))[:max(64, chars)]
        return {"model": self.model_id, "messages": [{"role": "user", "content": text}], "n": 8,
                "max_tokens": self.token_limit, "temperature": 1.0}

    def over_limit_body(self) -> dict:
        return {**self.small_body(), "max_tokens": self.token_limit + 1}

    def slow_head(self) -> bytes:
        lines = [f"POST {ROUTE_PREFIX}/v1/refine HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Authorization: Bearer {self.key}", "Content-Type: application/json",
                 f"Content-Length: {SLOW_CONTENT_LENGTH}", "", ""]
        return "\r\n".join(lines).encode()


# ----- the load every scenario runs ----------------------------------------------------------------

async def small_stream(target: Target, tally: Tally, end: float) -> None:
    body = target.small_body()
    n = target.args.stream_clients
    async with target.client(n + 2) as client:
        async def one():
            while time.perf_counter() < end:
                status, _ = await _send(client, tally, "POST", "/v1/chat/completions", body)
                if status != 200:
                    await asyncio.sleep(ERROR_PAUSE_S)

        await asyncio.gather(*(one() for _ in range(n)))


async def probe(target: Target, tally: Tally, end: float) -> None:
    timeout = target.args.probe_timeout
    in_flight = int(timeout / PROBE_EVERY_S) + 4
    async with target.client(in_flight, timeout=timeout) as client:
        tasks = []
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(_send(client, tally, "GET", "/healthz")))
            await asyncio.sleep(PROBE_EVERY_S)
        await asyncio.gather(*tasks)


def _probe_stats(tally: Tally) -> dict:
    lat = [e["latency"] for e in tally.events]   # lost probes count with the time they waited
    good = sum(1 for e in tally.events if e["status"] == 200 and e["latency"] <= PROBE_GOAL_S)
    return {"probes": tally.sent, "ok_within_1s": good, "statuses": dict(tally.statuses()),
            "lost": sum(tally.lost().values()), "max_ms": _ms(max(lat)) if lat else None,
            "p99_ms": _ms(_pct(lat, 0.99)), "p50_ms": _ms(statistics.median(lat)) if lat else None}


# ----- attacks -------------------------------------------------------------------------------------

class SlowRecord:
    def __init__(self):
        self.opened = 0
        self.outcomes: Counter = Counter()
        self.held: dict[str, list[float]] = {}

    def end(self, outcome: str, held: float) -> None:
        self.outcomes[outcome] += 1
        self.held.setdefault(outcome, []).append(held)

    def summary(self) -> dict:
        return {"connections_opened": self.opened, "outcomes": dict(self.outcomes),
                "held_s": {k: {"min": round(min(v), 2), "p50": round(statistics.median(v), 2),
                               "max": round(max(v), 2)} for k, v in self.held.items()}}


async def slow_client(target: Target, rec: SlowRecord, end: float, open_writers: set) -> None:
    """One stalling uploader: sends a head and 12 of 1000 body bytes, waits, re-opens when dropped."""
    payload = target.slow_head() + SLOW_BODY
    while time.perf_counter() < end - 0.2:
        writer = None
        sent_at = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), 5)
            open_writers.add(writer)
            writer.write(payload)
            await writer.drain()
            rec.opened += 1
            sent_at = time.perf_counter()
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=max(0.05, end - sent_at))
            except asyncio.TimeoutError:
                outcome = "open-at-end"
            else:
                if data.startswith(b"HTTP/"):
                    parts = data.split(b" ", 2)
                    outcome = f"http-{parts[1].decode(errors='replace')}" if len(parts) > 1 else "http-?"
                elif not data:
                    outcome = "closed"
                else:
                    outcome = "garbage"
        except asyncio.TimeoutError:
            outcome = "connect-timeout"
        except ConnectionResetError:
            outcome = "reset"
        except OSError as exc:
            outcome = f"error-{type(exc).__name__}"
        finally:
            if writer is not None:
                open_writers.discard(writer)
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1)
        rec.end(outcome, time.perf_counter() - sent_at)
        await asyncio.sleep(0.05)


async def huge_client(target: Target, tally: Tally, end: float) -> None:
    body = target.huge_body()
    async with target.client(2) as client:
        while time.perf_counter() < end:
            status, _ = await _send(client, tally, "POST", "/v1/chat/completions", body)
            if status != 200:
                await asyncio.sleep(ERROR_PAUSE_S)


async def over_limit_client(target: Target, tally: Tally, end: float) -> None:
    body = target.over_limit_body()
    async with target.client(2) as client:
        while time.perf_counter() < end:
            await _send(client, tally, "POST", "/v1/chat/completions", body)
            await asyncio.sleep(1.0)


async def abandoning_client(target: Target, tally: Tally, end: float, times: list[float]) -> None:
    body = target.huge_body()
    async with target.client(4, timeout=ABANDON_TIMEOUT_S) as client:
        await asyncio.sleep(0.5)
        while time.perf_counter() < end - 1.5:
            times.append(time.perf_counter() - tally.t0)
            await _send(client, tally, "POST", "/v1/chat/completions", body)
            await asyncio.sleep(ABANDON_EVERY_S)


async def burst_waves(target: Target, tally: Tally, end: float, waves: list[dict]) -> None:
    size = target.args.burst_factor * (target.args.max_ongoing + target.args.max_queued)
    body = target.small_body()
    async with target.client(size + 4) as client:
        await asyncio.sleep(0.5)
        while time.perf_counter() < end - 1.0:
            before = len(tally.events)
            t = time.perf_counter()
            await asyncio.gather(*(_send(client, tally, "POST", "/v1/chat/completions", body) for _ in range(size)))
            got = tally.events[before:]
            waves.append({"size": size, "seconds": round(time.perf_counter() - t, 3),
                          "statuses": dict(Counter(str(e["status"] or e["lost"]) for e in got))})
            await asyncio.sleep(1.0)


def _refiner_replicas() -> tuple[list[dict], str]:
    """ALIVE replica actors of the compute deployment: name, namespace, class; and how they were found."""
    try:
        from ray.util.state import list_actors

        found = [{"name": a.name, "namespace": getattr(a, "ray_namespace", None) or "serve",
                  "class_name": a.class_name, "actor_id": a.actor_id}
                 for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
                 if a.name and (a.class_name or "").split(":")[-1] == COMPUTE_DEPLOYMENT
                 and f":{APP_NAME}:" in f":{a.class_name}"]
        return found, "ray.util.state.list_actors"
    except Exception as exc:  # noqa: BLE001 - the state API needs the dashboard; fall back to the GCS
        import ray

        marker = f"SERVE_REPLICA::{APP_NAME}#{COMPUTE_DEPLOYMENT}#"
        found = [{"name": a["name"], "namespace": a["namespace"], "class_name": None, "actor_id": None}
                 for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(marker)]
        return found, f"ray.util.list_named_actors (state API failed: {type(exc).__name__})"


def _kill_one_replica() -> dict:
    import ray

    replicas, how = _refiner_replicas()
    info: dict[str, Any] = {"found_with": how, "alive_before": replicas}
    if not replicas:
        info["error"] = f"no ALIVE actor of deployment {COMPUTE_DEPLOYMENT!r} found"
        return info
    victim = replicas[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
    info["killed"] = victim
    return info


def _replica_states() -> dict:
    """Serve's view of the compute deployment: its status and replica counts by state."""
    from ray import serve

    dep = serve.status().applications[APP_NAME].deployments[COMPUTE_DEPLOYMENT]
    return {"status": str(getattr(dep.status, "value", dep.status)),
            "replicas": {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}}


def _kill_at(seconds: float) -> float:
    """When replica-kill kills (seconds into the scenario): a third in, at most 5 s."""
    return min(5.0, max(1.0, seconds / 3))


async def replica_killer(target: Target, tally: Tally, end: float, t0: float, report: dict) -> None:
    """A few large requests, then (at _kill_at) the replica is killed under them."""
    kill_at = min(_kill_at(target.args.seconds), (end - t0) / 3)   # the global cap may have shortened the scenario
    await asyncio.sleep(max(0.0, t0 + kill_at - 0.3 - time.perf_counter()))
    body = target.huge_body(fill=False)
    async with target.client(8) as client:
        in_flight = [asyncio.create_task(_send(client, tally, "POST", "/v1/chat/completions", body))
                     for _ in range(target.args.kill_in_flight)]
        await asyncio.sleep(0.3)
        report["kill_at_s"] = round(time.perf_counter() - t0, 3)
        try:
            report.update(await asyncio.wait_for(asyncio.to_thread(_kill_one_replica), 30))
        except Exception as exc:  # noqa: BLE001 - report, keep measuring
            report["error"] = f"{type(exc).__name__}: {exc}"
        # Serve's own view of the restart, on change (its controller answers; the replica need not).
        timeline: list[dict] = []
        report["serve_status_timeline"] = timeline
        while time.perf_counter() < end - 0.5:
            try:
                now = await asyncio.wait_for(asyncio.to_thread(_replica_states), 5)
            except Exception as exc:  # noqa: BLE001 - record and go on
                now = {"error": type(exc).__name__}
            if not timeline or {k: v for k, v in timeline[-1].items() if k != "t_s"} != now:
                timeline.append({"t_s": round(time.perf_counter() - t0, 2), **now})
            await asyncio.sleep(0.5)
        await asyncio.gather(*in_flight)
    with contextlib.suppress(Exception):
        report["alive_after"] = (await asyncio.wait_for(asyncio.to_thread(_refiner_replicas), 30))[0]


# ----- scenarios -----------------------------------------------------------------------------------

async def run_scenario(name: str, target: Target, seconds: float) -> dict:
    t0 = time.perf_counter()
    end = t0 + seconds
    stream, probes = Tally(t0), Tally(t0)
    others: dict[str, Tally] = {}         # counted in sent/answered/lost
    apart: dict[str, Tally] = {}          # intentional: reported apart
    details: dict[str, Any] = {}
    tasks = [small_stream(target, stream, end), probe(target, probes, end)]
    writers: set = set()
    if name == "slow-body":
        rec = SlowRecord()
        details["slow"] = rec
        tasks += [slow_client(target, rec, end, writers) for _ in range(target.args.slow_clients)]
    elif name == "huge-request":
        others["huge"], others["over_limit"], apart["abandoned"] = Tally(t0), Tally(t0), Tally(t0)
        details["abandon_times"] = []
        tasks += [huge_client(target, others["huge"], end), over_limit_client(target, others["over_limit"], end),
                  abandoning_client(target, apart["abandoned"], end, details["abandon_times"])]
    elif name == "burst":
        others["burst"] = Tally(t0)
        details["waves"] = []
        tasks.append(burst_waves(target, others["burst"], end, details["waves"]))
    elif name == "replica-kill":
        others["in_flight"] = Tally(t0)
        details["kill"] = {}
        tasks.append(replica_killer(target, others["in_flight"], end, t0, details["kill"]))
    cap = seconds + target.args.client_timeout + 10
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), cap)
    except asyncio.TimeoutError:
        timed_out = True
    finally:
        for w in list(writers):      # slow sockets never outlive their scenario
            w.close()
    return {"name": name, "seconds": seconds, "wall_s": round(time.perf_counter() - t0, 2), "timed_out": timed_out,
            "stream": stream, "probes": probes, "others": others, "apart": apart, "details": details}


def summarize(raw: dict, baseline: dict | None, target: Target) -> dict:
    stream: Tally = raw["stream"]
    counted = [stream, *raw["others"].values()]
    sent = sum(t.sent for t in counted)
    answered = sum(len(t.answered()) for t in counted)
    statuses: Counter = Counter()
    lost_kinds: Counter = Counter()
    for t in counted:
        statuses.update(t.statuses())
        lost_kinds.update(t.lost())
    lat = stream.latencies(200)
    p50, p99 = (statistics.median(lat) if lat else None), _pct(lat, 0.99)
    row: dict[str, Any] = {
        "scenario": raw["name"], "seconds": raw["seconds"], "wall_s": raw["wall_s"], "timed_out": raw["timed_out"],
        "sent": sent, "answered": answered, "lost": sum(lost_kinds.values()), "lost_kinds": dict(lost_kinds),
        "statuses": dict(sorted(statuses.items())),
        "small_sent": stream.sent, "small_ok": len(lat),
        "small_ok_share": round(len(lat) / stream.sent, 3) if stream.sent else None,
        "small_p50_ms": _ms(p50), "small_p99_ms": _ms(p99),
        "baseline_p50_ms": baseline["small_p50_ms"] if baseline else None,
        "baseline_p99_ms": baseline["small_p99_ms"] if baseline else None,
        "healthz": _probe_stats(raw["probes"]),
        "unexpected_5xx": sum(t.unexpected_5xx() for t in counted),
        "errors_not_json": sum(t.errors_not_json() for t in counted),
        "groups": {"small": stream.summary(), **{k: t.summary() for k, t in raw["others"].items()}},
        "intentional": {k: t.summary() for k, t in raw["apart"].items()},
    }
    b = row["baseline_p99_ms"]
    row["p99_ratio"] = round(row["small_p99_ms"] / b, 2) if b and row["small_p99_ms"] is not None else None
    row["p50_ratio"] = (round(row["small_p50_ms"] / row["baseline_p50_ms"], 2)
                        if row["baseline_p50_ms"] and row["small_p50_ms"] is not None else None)
    d = raw["details"]
    if "slow" in d:
        row["slow_body"] = d["slow"].summary()
    if "abandon_times" in d:
        ab: Tally = raw["apart"]["abandoned"]
        times = d["abandon_times"]
        after = [e["latency"] for e in stream.answered() if e["status"] == 200
                 and any(0 <= e["t"] - t <= AFTER_ABANDON_WINDOW_S for t in times)]
        over: Tally = raw["others"]["over_limit"]
        row["huge_request"] = {
            "token_limit": target.token_limit, "huge_body_bytes": len(json.dumps(target.huge_body())),
            "huge": raw["others"]["huge"].summary(),
            "over_limit": {**over.summary(),
                           "not_4xx": sum(1 for e in over.events if not (e["status"] and 400 <= e["status"] < 500))},
            "abandoned": {"sent": ab.sent, "timed_out_as_planned": sum(1 for e in ab.events if e["lost"]),
                          "answered_within_timeout": dict(ab.statuses())},
            "small_after_abandon": _lat_stats(after),
        }
    if "waves" in d:
        bt: Tally = raw["others"]["burst"]
        refused = [e for e in bt.answered() if e["status"] in (429, 503)]
        row["burst"] = {
            "wave_size": target.args.burst_factor * (target.args.max_ongoing + target.args.max_queued),
            "waves": d["waves"], "accepted_200": sum(1 for e in bt.answered() if e["status"] == 200),
            "refused": len(refused), "refused_with_retry_after": sum(1 for e in refused if e["retry_after"]),
            "refused_json_error": sum(1 for e in refused if e["error_layout"]),
            "refused_latency": _lat_stats([e["latency"] for e in refused]),
            "accepted_latency": _lat_stats(bt.latencies(200)), "lost": sum(bt.lost().values()),
            "other_errors": dict(Counter(str(e["status"]) for e in bt.answered()
                                         if e["status"] >= 400 and e["status"] not in (429, 503))),
            "other_errors_latency": _lat_stats([e["latency"] for e in bt.answered()
                                                if e["status"] >= 400 and e["status"] not in (429, 503)]),
        }
    if "kill" in d:
        kill = d["kill"]
        at = kill.get("kill_at_s")
        if at is not None:
            def first_ok_after(t: Tally) -> float | None:
                ok = [e["t"] + e["latency"] for e in t.events if e["status"] == 200 and e["t"] >= at]
                return round(min(ok) - at, 2) if ok else None

            kill["small_200_again_after_s"] = first_ok_after(stream)
            kill["healthz_200_again_after_s"] = first_ok_after(raw["probes"])
            kill["small_after_kill"] = {"statuses": dict(Counter(str(e["status"] or e["lost"]) for e in stream.events
                                                                 if e["t"] + e["latency"] >= at)),
                                        "errors_not_json": sum(1 for e in stream.events if e["t"] + e["latency"] >= at
                                                               and e["status"] and e["status"] >= 400
                                                               and not e["error_layout"])}
        fl: Tally = raw["others"]["in_flight"]
        kill["in_flight_requests"] = {**fl.summary(), "error_bodies_json": sum(
            1 for e in fl.answered() if e["status"] >= 400 and e["error_layout"])}
        row["replica_kill"] = kill
    return row


def _fmt(x: Any, width: int, digits: int = 0) -> str:
    if x is None:
        return f"{'-':>{width}}"
    if isinstance(x, float):
        return f"{x:>{width}.{digits}f}"
    return f"{x!s:>{width}}"


HEADER = (f"{'scenario':<13} {'sent':>5} {'ans':>5} {'lost':>4} | {'ok%':>4} {'p50':>7} {'p99':>7} {'base99':>7} "
          f"{'p99x':>5} | {'hz max':>7} {'hz p99':>7} {'hz ok':>7} | {'5xx!':>4} {'!json':>5} | statuses")


def table_line(r: dict) -> str:
    hz = r["healthz"]
    share = None if r["small_ok_share"] is None else 100.0 * r["small_ok_share"]
    stat = " ".join(f"{k}:{v}" for k, v in r["statuses"].items())
    if r["lost_kinds"]:
        stat += "  lost: " + ", ".join(f"{k} x{v}" for k, v in r["lost_kinds"].items())
    return (f"{r['scenario']:<13} {r['sent']:>5} {r['answered']:>5} {r['lost']:>4} | {_fmt(share, 4)} "
            f"{_fmt(r['small_p50_ms'], 7, 1)} {_fmt(r['small_p99_ms'], 7, 1)} {_fmt(r['baseline_p99_ms'], 7, 1)} "
            f"{_fmt(r['p99_ratio'], 5, 2)} | {_fmt(hz['max_ms'], 7, 1)} {_fmt(hz['p99_ms'], 7, 1)} "
            f"{hz['ok_within_1s']:>3}/{hz['probes']:<3} | {r['unexpected_5xx']:>4} {r['errors_not_json']:>5} | {stat}")


def goals(rows: list[dict]) -> list[dict]:
    attacks = [r for r in rows if r["scenario"] != "baseline"]

    def failing(pred) -> list[str]:
        return [r["scenario"] for r in rows if not pred(r)]

    out = [
        {"goal": "0 lost (every request got an HTTP answer)", "failing": failing(lambda r: r["lost"] == 0)},
        {"goal": "0 unexpected 5xx (5xx other than 503 with Retry-After)",
         "failing": failing(lambda r: r["unexpected_5xx"] == 0)},
        {"goal": "/healthz answered 200 within 1 s throughout",
         "failing": failing(lambda r: 0 < r["healthz"]["probes"] == r["healthz"]["ok_within_1s"])},
        {"goal": "small-request p99 under attack <= 2x baseline",
         "failing": [r["scenario"] for r in attacks if r["p99_ratio"] is None or r["p99_ratio"] > 2.0]},
        {"goal": "(extra) small stream served: >= 90% of small requests answered 200",
         "failing": failing(lambda r: (r["small_ok_share"] or 0.0) >= 0.9)},
    ]
    huge = [r for r in rows if "huge_request" in r]
    if huge:
        over = {r["scenario"]: r["huge_request"]["over_limit"] for r in huge}
        out.append({"goal": "(extra) over-limit request refused with a 4xx",
                    "failing": [name for name, o in over.items() if o["not_4xx"] or not o["sent"]]})
    for g in out:
        g["pass"] = not g["failing"]
    return out


# ----- setup, settling, teardown -------------------------------------------------------------------

async def _discover(target: Target) -> None:
    """The served model id (GET /v1/models, else /healthz)."""
    async with target.client(2) as client:
        r = await client.get("/v1/models")
        if r.status_code == 200 and r.json().get("data"):
            target.model_id = r.json()["data"][0]["id"]
        else:
            target.model_id = (await client.get("/healthz")).json()["model"]


async def _settle(target: Target, until: float) -> float:
    """Waits (bounded) until /healthz and a small request answer 200, then 1 s more. Returns seconds waited."""
    t = time.perf_counter()
    async with target.client(2, timeout=5) as client:
        while time.perf_counter() < until:
            hz, _ = await _send(client, None, "GET", "/healthz")
            small, _ = await _send(client, None, "POST", "/v1/chat/completions", target.small_body())
            if hz == 200 and small == 200:
                break
            await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)
    return round(time.perf_counter() - t, 2)


def _token_limit_from_server(configured: int) -> tuple[int, str]:
    """The per-item token limit the compute deployment reports (its engine may lower the configured one)."""
    try:
        from ray import serve

        info = serve.get_deployment_handle(COMPUTE_DEPLOYMENT, app_name=APP_NAME).info.remote().result(timeout_s=30)
        return int(info["limits"]["max_new_tokens"]), "Refiner.info()"
    except Exception as exc:  # noqa: BLE001 - fall back to what this benchmark configured
        return configured, f"configured (info() failed: {type(exc).__name__})"


def _app_overrides(pairs: list[str]) -> dict:
    """--app-arg KEY=VALUE pairs as build_app arguments (VALUE read as JSON when it is JSON, else text)."""
    own = {"model": "--model", "http_host": "--host", "api_key_env": None, "num_cpus": "--num-cpus",
           "max_ongoing_requests": "--max-ongoing", "max_queued_requests": "--max-queued",
           "max_new_tokens_limit": "--token-limit", "max_body_bytes": "--max-body-bytes"}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--app-arg wants KEY=VALUE, got {pair!r}")
        if key.strip() in own:
            where = f"use {own[key.strip()]}" if own[key.strip()] else "the benchmark sets it"
            raise SystemExit(f"--app-arg {key.strip()}: {where}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _teardown(state: dict) -> None:
    if state.get("serve"):
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        state["serve"] = False
    if state.get("ray"):
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        state["ray"] = False


def _watchdog(seconds: float, state: dict, write_partial) -> threading.Timer:
    """Last resort: at the global cap, write what there is, tear Ray down (bounded) and exit with code 3."""
    def fire():
        print(f"\nglobal cap of {seconds:.0f} s reached: stopping", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            write_partial("global cap reached")
        t = threading.Thread(target=_teardown, args=(state,), daemon=True)
        t.start()
        t.join(20)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (default) or another model spec of serve.app")
    ap.add_argument("--host", default="127.0.0.1", help="loopback host Serve binds and the attack targets")
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                    help="subset to run, in the standard order (baseline always runs)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="duration of each scenario (default 20; 8 with --quick)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="global wall-clock cap, setup included")
    ap.add_argument("--quick", action="store_true", help="shorter scenarios (8 s each)")
    ap.add_argument("--stream-clients", type=int, default=2, help="closed-loop clients of the small stream")
    ap.add_argument("--slow-clients", type=int, default=16, help="stalling uploads in slow-body")
    ap.add_argument("--burst-factor", type=int, default=3, help="burst wave = factor x (max_ongoing + max_queued)")
    ap.add_argument("--kill-in-flight", type=int, default=4, help="large requests in flight when the replica is killed")
    ap.add_argument("--recovery-seconds", type=float, default=None,
                    help="replica-kill lasts at least this long after the kill (default 20; 15 with --quick)")
    ap.add_argument("--max-ongoing", type=int, default=4, help="the app's max_ongoing_requests")
    ap.add_argument("--max-queued", type=int, default=8, help="the app's max_queued_requests")
    ap.add_argument("--token-limit", type=int, default=32, help="the app's max_new_tokens_limit")
    ap.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="the app's max_body_bytes")
    ap.add_argument("--client-timeout", type=float, default=10.0, help="seconds before a request counts as lost")
    ap.add_argument("--probe-timeout", type=float, default=5.0, help="seconds a /healthz probe waits")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="logical CPUs reserved for the replica")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the replica")
    ap.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra or overriding build_app argument, e.g. body_timeout_s=5 (repeatable)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any goal fails")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "serve_attack.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    host = _require_loopback(args.host)
    overrides = _app_overrides(args.app_arg)     # bad arguments fail before anything starts
    if args.seconds is None:
        args.seconds = 8.0 if args.quick else 20.0
    if args.recovery_seconds is None:
        args.recovery_seconds = 15.0 if args.quick else 20.0
    chosen = [s for s in SCENARIOS if s in args.scenarios or s == "baseline"]

    result: dict[str, Any] = {
        "benchmark": "serve_attack", "model": args.model, "host": host, "quick": args.quick,
        "scenario_seconds": args.seconds, "max_seconds": args.max_seconds, "client_timeout_s": args.client_timeout,
        "stream_clients": args.stream_clients, "slow_clients": args.slow_clients,
        "app": {"max_ongoing_requests": args.max_ongoing, "max_queued_requests": args.max_queued,
                "max_new_tokens_limit": args.token_limit, "max_body_bytes": args.max_body_bytes},
        "cores": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
        "python": platform.python_version(), "load_average_start": _load(), "rows": [], "skipped": [],
    }

    def write(status: str) -> None:
        result["status"] = status
        result["load_average_end"] = _load()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))

    state: dict[str, bool] = {}
    watchdog = _watchdog(args.max_seconds, state, write)
    plan_deadline = started + args.max_seconds - TEARDOWN_RESERVE_S
    rows: list[dict] = []
    try:
        import ray
        from ray import serve

        from serve.app import build_app

        key = os.environ.get(KEY_ENV) or "attack-bench-key"
        os.environ[KEY_ENV] = key
        os.environ["MIDDO_TORCH_THREADS"] = str(args.threads)
        from middo_ray.serve_apps import use_proxy_middleware

        use_proxy_middleware()   # Serve's proxies bound client request ids (serve/proxy.py)
        ray.init(address="local", num_cpus=4, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("MIDDO_CACHE", "MIDDO_TORCH_THREADS")
                                           if k in os.environ}})
        state["ray"] = True
        port = _free_port(host)
        serve.start(http_options={"host": host, "port": port})
        state["serve"] = True
        app_args = {"model": args.model, "num_cpus": args.num_cpus, "api_key_env": KEY_ENV, "http_host": host,
                    "max_ongoing_requests": args.max_ongoing, "max_queued_requests": args.max_queued,
                    "retry_after_s": 1, "max_new_tokens_limit": args.token_limit, "max_body_bytes": args.max_body_bytes,
                    "max_samples_per_request": 4, "batch_wait_s": 0.02,
                    # Shorter than a scenario, so the slow-body scenario sees the server drop its clients.
                    "body_timeout_s": 5, **overrides}
        result["app_args"] = {k: v for k, v in app_args.items() if k != "api_key_env"}
        serve.run(build_app(app_args), name=APP_NAME, route_prefix=ROUTE_PREFIX)
        target = Target(host, port, key, args)
        asyncio.run(_discover(target))
        target.token_limit, result["token_limit_from"] = _token_limit_from_server(args.token_limit)
        result["served_model"], result["token_limit"] = target.model_id, target.token_limit
        result["setup_s"] = round(time.perf_counter() - started, 1)
        result["replicas_at_start"] = _refiner_replicas()[0]
        print(f"app up in {result['setup_s']} s at {target.base} (model {target.model_id!r}, token limit "
              f"{target.token_limit}, max_ongoing {args.max_ongoing}, max_queued {args.max_queued}); "
              f"{args.seconds:g} s per scenario", flush=True)
        asyncio.run(_settle(target, time.perf_counter() + 30))   # warm-up

        baseline = None
        print(HEADER, flush=True)
        for name in chosen:
            left = plan_deadline - time.perf_counter() - (args.client_timeout + 10)
            wanted = args.seconds
            if name == "replica-kill":   # long enough after the kill to see Serve start a new replica
                wanted = max(wanted, _kill_at(args.seconds) + args.recovery_seconds)
            seconds = min(wanted, left)
            if seconds < 3:
                result["skipped"].append({"scenario": name, "why": "global cap (--max-seconds)"})
                print(f"{name:<13} skipped: the global cap leaves no time", flush=True)
                continue
            load = _load()
            raw = asyncio.run(run_scenario(name, target, round(seconds, 1)))
            row = summarize(raw, baseline, target)
            row["load_average"] = load
            if name == "baseline":
                baseline = row
            rows.append(row)
            result["rows"] = rows
            print(table_line(row), flush=True)
            if name != chosen[-1]:     # the next scenario starts on a healthy, quiet app
                settle_until = min(time.perf_counter() + 45, plan_deadline)
                row["settle_s"] = asyncio.run(_settle(target, settle_until))
        result["goals"] = goals(rows)
        write("complete")
    except BaseException as exc:
        result["goals"] = goals(rows) if rows else []
        with contextlib.suppress(Exception):
            write(f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        _teardown(state)
        watchdog.cancel()

    print("\nwhat the rows mean: p50/p99 = small requests answered 200 (ms); base99 = baseline's p99; "
          "p99x = p99/base99;\n  hz = /healthz (a lost probe counts with its wait); hz ok = probes answered 200 "
          "within 1 s; 5xx! = unexpected 5xx; !json = error answers not {\"error\": {...}}")
    for r in rows:
        if "slow_body" in r:
            s = r["slow_body"]
            held = ", ".join(f"{k}: {v['p50']} s (max {v['max']})" for k, v in s["held_s"].items())
            print(f"slow-body: {s['connections_opened']} stalled uploads; how they ended: {s['outcomes']}; held {held}")
        if "huge_request" in r:
            h = r["huge_request"]
            print(f"huge-request: {h['huge']['sent']} largest requests ({h['huge_body_bytes']} B, n=8, "
                  f"max_tokens={h['token_limit']}) -> {h['huge']['statuses']}; over-limit -> "
                  f"{h['over_limit']['statuses']} (not 4xx: {h['over_limit']['not_4xx']}); abandoned "
                  f"{h['abandoned']['sent']} (timed out {h['abandoned']['timed_out_as_planned']}); small p99 in the "
                  f"{AFTER_ABANDON_WINDOW_S:g} s after: {h['small_after_abandon']['p99_ms']} ms")
        if "burst" in r:
            b = r["burst"]
            print(f"burst: waves of {b['wave_size']}: {b['accepted_200']} x 200, {b['refused']} refused "
                  f"({b['refused_with_retry_after']} with Retry-After, {b['refused_json_error']} JSON error bodies) "
                  f"in p50 {b['refused_latency']['p50_ms']} / p99 {b['refused_latency']['p99_ms']} ms; other errors "
                  f"{b['other_errors']} in p50 {b['other_errors_latency']['p50_ms']} ms; lost {b['lost']}")
        if "replica_kill" in r:
            k = r["replica_kill"]
            victim = (k.get("killed") or {}).get("name", k.get("error"))
            print(f"replica-kill: killed {victim} (found with {k.get('found_with')}) at {k.get('kill_at_s')} s; "
                  f"in flight -> {k['in_flight_requests']['statuses']} lost {k['in_flight_requests']['lost']}; "
                  f"small 200 again after {k.get('small_200_again_after_s')} s, /healthz after "
                  f"{k.get('healthz_200_again_after_s')} s; alive after: "
                  f"{[a['name'] for a in k.get('alive_after', [])]}")
            steps = "; ".join(f"{e['t_s']} s {e.get('status', e.get('error'))} {e.get('replicas', '')}"
                              for e in k.get("serve_status_timeline", []))
            print(f"  Serve's view of {COMPUTE_DEPLOYMENT} after the kill: {steps}")
    print("\ngoals:")
    for g in result["goals"]:
        print(f"  {'PASS' if g['pass'] else 'FAIL'}  {g['goal']}" + (f"  (failing: {', '.join(g['failing'])})"
                                                                      if g["failing"] else ""))
    print(f"wrote {args.json}")
    if args.strict and not all(g["pass"] for g in result["goals"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
