"""Middleware for Serve's HTTP proxy itself: what must hold before any app sees a request.

Serve's proxy echoes a client's ``x-request-id`` in its answer and logs it, whatever its length and
content; the app's own guard (``serve.security.GuardMiddleware``) comes too late for that. Serve
runs the middlewares that ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names in front of its own,
in every proxy process, so the variable must be in the environment of the Ray nodes (it is read
when a proxy starts):

    export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy:middlewares   # before `ray start`

A Ray that middo starts for a run (``middo run`` without ``ray.address``) sets it itself
(:data:`middo_ray.serve_apps.PROXY_ENV`); the k8s manifests set it in every node's container.
"""

from __future__ import annotations

from serve.security import with_clean_request_id


class RequestIdGuard:
    """ASGI middleware: an ``x-request-id`` that is not 1-128 characters of ``A-Za-z0-9._:-`` is replaced by a
    fresh one, so what the proxy echoes and logs is bounded and plain."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") in ("http", "websocket"):
            scope = with_clean_request_id(scope)
        await self.app(scope, receive, send)


def middlewares() -> list:
    """The proxy callback: Serve calls it in each proxy and puts the returned middlewares in front."""
    from starlette.middleware import Middleware

    return [Middleware(RequestIdGuard)]
