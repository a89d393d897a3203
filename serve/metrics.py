"""Application metrics of the refiner app, exported through Ray's metrics endpoint.

Made with ``ray.serve.metrics`` (``ray.util.metrics`` plus the deployment, replica and application
tags), so Prometheus scrapes them from every node's Ray metrics port with Serve's own metrics. Ray
prefixes names with ``ray_``: ``ray_middo_serve_requests_total`` and so on.

| metric | kind | tags | what |
|---|---|---|---|
| middo_serve_requests | counter | route, code | answered requests (HTTP status, or ok/error for handle calls) |
| middo_serve_request_latency_s | histogram | route | seconds from arrival to answer |
| middo_serve_failures | counter | route, kind | 5xx answers and handle calls that raised |
| middo_serve_items | counter | route, status | refine items ok/failed, judge scores given/missing |
| middo_serve_tokens | counter | kind | prompt and completion tokens of the engine |
| middo_serve_batch_rows | histogram | | rows per dynamic batch (how well batching works) |
"""

from __future__ import annotations

import time

LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# Routes are tagged by their template; anything else is "other", so random paths cannot grow the
# number of time series.
KNOWN_ROUTES = ("/v1/refine", "/v1/judge", "/v1/chat/completions", "/v1/models", "/healthz", "/openapi.json", "/docs")


def route_tag(path: str, root_path: str = "") -> str:
    """The route template of a request path (the app's route prefix removed)."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):] or "/"
    return path if path in KNOWN_ROUTES else "other"


class ServeMetrics:
    """The app's metric objects (create one per replica process)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter("middo_serve_requests", description="Requests answered by the refiner app.",
                                        tag_keys=("route", "code"))
        self.latency = metrics.Histogram("middo_serve_request_latency_s", description="Request latency in seconds.",
                                         boundaries=LATENCY_BOUNDARIES, tag_keys=("route",))
        self.failures = metrics.Counter("middo_serve_failures", description="Requests that failed in the server.",
                                        tag_keys=("route", "kind"))
        self.items = metrics.Counter("middo_serve_items", description="Refine items and judge scores by outcome.",
                                     tag_keys=("route", "status"))
        self.tokens = metrics.Counter("middo_serve_tokens", description="Tokens through the engine.",
                                      tag_keys=("kind",))
        self.batch_rows = metrics.Histogram("middo_serve_batch_rows", description="Rows per dynamic batch.",
                                            boundaries=BATCH_BOUNDARIES)

    def answered(self, route: str, code: int | str, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "code": str(code)})
        self.latency.observe(max(0.0, seconds), tags={"route": route})
        if (isinstance(code, int) and code >= 500) or code == "error":
            self.failures.inc(1, tags={"route": route, "kind": str(code)})

    def count_items(self, route: str, status: str, n: int) -> None:
        if n:
            self.items.inc(n, tags={"route": route, "status": status})

    def count_tokens(self, prompt: int, completion: int) -> None:
        if prompt:
            self.tokens.inc(prompt, tags={"kind": "prompt"})
        if completion:
            self.tokens.inc(completion, tags={"kind": "completion"})


# This process's metrics, behind functions for the same reason as serve.security's body limit.
_CURRENT: list = [None]


def set_current(metrics: "ServeMetrics | None") -> None:
    _CURRENT[0] = metrics


def current() -> "ServeMetrics | None":
    return _CURRENT[0]


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP request by route and status, and its latency."""

    def __init__(self, app, get_metrics=current):
        self.app = app
        self.get_metrics = get_metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status = {"code": 500}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            metrics = self.get_metrics()
            if metrics is not None:
                metrics.answered(route_tag(scope.get("path", ""), scope.get("root_path", "")), status["code"],
                                 time.monotonic() - t0)
