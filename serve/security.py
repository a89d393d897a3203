"""API-key auth, request-size limits and the JSON error format of the HTTP API.

- The API key is read from an environment variable on the machine that builds the app (its name
  is configurable, the key never appears on a command line); only its SHA-256 digest travels to the
  replicas, which compare digests in constant time.
- A server that listens beyond loopback refuses to start without a key.
- The key is checked by an ASGI middleware before anything else reads the request, so an
  unauthenticated client learns nothing (not even whether its body would validate).
- Bodies larger than the limit are refused with 413 before they are parsed, by an ASGI middleware
  that checks ``Content-Length`` and counts streamed bytes; a body not complete within the body
  deadline is answered 408 and its connection closed (a slow client holds no model time and no slot
  beyond it).
- Without a key (loopback only) the ``Host`` header must name loopback too, so a web page whose DNS
  name is rebound to 127.0.0.1 cannot reach the server from a browser.
- A client's ``x-request-id`` is kept only when short and plain (:func:`clean_request_id`).
- Every error is answered as ``{"error": {"message", "type", "code"}}`` (the OpenAI layout, which
  the ``openai`` client turns into readable exceptions).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import re
import uuid
from typing import Any, Callable

from middo_ray.wire import ServeSettings

DEFAULT_KEY_ENV: str = ServeSettings.model_fields["api_key_env"].default
DEFAULT_MAX_BODY_BYTES: int = ServeSettings.model_fields["max_body_bytes"].default

# The replica's body limit. Kept here, behind functions, because Serve pickles the deployment class
# by value: module state that the class touched directly would be a copy, not what the middleware reads.
_RUNTIME: dict[str, Any] = {"max_body_bytes": DEFAULT_MAX_BODY_BYTES, "key_digest": None, "key_env": DEFAULT_KEY_ENV,
                            "body_timeout_s": ServeSettings.model_fields["body_timeout_s"].default}

# Routes anyone may call: liveness and the API description.
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})

REQUEST_ID_MAX = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,%d}" % REQUEST_ID_MAX)


class ClientError(ValueError):
    """A request the server will not serve, with the HTTP status to answer.

    A ValueError, so handle callers (the loop) see what they always saw; the gateway answers ``status``.
    """

    def __init__(self, status: int, message: str):
        super().__init__(status, message)
        self.status = int(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


def clean_request_id(value: str | None) -> str | None:
    """A client's request id when it is 1-128 characters of ``A-Za-z0-9._:-``, else None (a fresh one is made)."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return None


def with_clean_request_id(scope: dict) -> dict:
    """The ASGI scope, with an ``x-request-id`` that :func:`clean_request_id` refuses replaced by a fresh one."""
    headers = scope.get("headers", [])
    raw = next((v for k, v in headers if k == b"x-request-id"), None)
    if raw is None or clean_request_id(raw.decode("latin-1")) is not None:
        return scope
    fresh = str(uuid.uuid4()).encode()
    return {**scope, "headers": [(k, v) for k, v in headers if k != b"x-request-id"] + [(b"x-request-id", fresh)]}


def set_body_timeout(seconds: float) -> None:
    """Sets this process's body deadline (seconds from the first byte asked for to the last)."""
    _RUNTIME["body_timeout_s"] = float(seconds)


def set_api_key(digest: str | None, key_env: str) -> None:
    """Sets this process's API-key digest (None: no auth) and the variable name used in messages."""
    _RUNTIME["key_digest"], _RUNTIME["key_env"] = digest, key_env


def set_body_limit(n: int) -> None:
    """Sets this process's request-body limit (called by the replica's constructor)."""
    _RUNTIME["max_body_bytes"] = int(n)


def body_limit() -> int:
    """This process's request-body limit in bytes."""
    return _RUNTIME["max_body_bytes"]


def key_digest(key: str) -> str:
    """SHA-256 hex digest of an API key (what the replicas store)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_bearer(authorization: str | None, digest: str | None) -> str | None:
    """Why an Authorization header does not grant access, or None when it does (or no key is set)."""
    if not digest:
        return None
    if not authorization:
        return "missing 'Authorization: Bearer <key>' header"
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "the Authorization header must be 'Bearer <key>'"
    if not hmac.compare_digest(key_digest(token.strip()), digest):
        return "invalid API key"
    return None


def is_loopback(host: str) -> bool:
    """Whether a bind host only accepts connections from this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to a public address


def loopback_host_header(value: str | None) -> bool:
    """Whether a ``Host`` header names this machine (``localhost``, ``127.x.y.z``, ``[::1]``, any port)."""
    if not value:
        return True  # HTTP/1.0 without Host: nothing a browser would send
    host = value.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host)


def require_key_off_loopback(host: str, digest: str | None, key_env: str) -> None:
    """Refuses to serve beyond loopback without an API key.

    Raises:
        ValueError: ``host`` is not loopback and no key is configured; names the variable to set.
    """
    if not digest and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on host '{host}' without an API key: set the environment variable {key_env} "
            f"(e.g. export {key_env}=$(python -c 'import secrets; print(secrets.token_hex(32))')) on the machine "
            f"that deploys the app, or bind to 127.0.0.1")


def error_body(status: int, message: str, kind: str | None = None, code: Any = None) -> dict:
    """The JSON error layout of every non-2xx answer."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 422: "invalid_request_error",
             503: "overloaded_error", 504: "timeout_error"}
    return {"error": {"message": message, "type": kind or kinds.get(status, "server_error"),
                      "code": code if code is not None else status}}


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


class GuardMiddleware:
    """ASGI middleware: the Host check of keyless mode (403) and a bounded, plain ``x-request-id``.

    An id that is not 1-128 characters of ``A-Za-z0-9._:-`` is replaced by a fresh one before anything
    below reads it; the answer carries the id used.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        if not _RUNTIME["key_digest"]:
            host = next((v.decode("latin-1") for k, v in headers if k == b"host"), None)
            if not loopback_host_header(host):
                shown = host if len(host or "") <= 64 else host[:64] + "..."
                message = (f"Host '{shown}' refused: this server has no API key, so it answers only requests "
                           f"addressed to a loopback name (localhost, 127.0.0.1, [::1]); set {_RUNTIME['key_env']} "
                           f"to serve other hosts")
                return await _send_json(send, 403, error_body(403, message))
        return await self.app(with_clean_request_id(scope), receive, send)


class AuthMiddleware:
    """ASGI middleware: 401 unless ``Authorization: Bearer <key>`` matches, for every non-public path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        digest = _RUNTIME["key_digest"]
        if scope["type"] != "http" or not digest or _route_path(scope) in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        why = check_bearer(header, digest)
        if why is None:
            return await self.app(scope, receive, send)
        message = f"{why}; send 'Authorization: Bearer <key>' with the key the server reads from {_RUNTIME['key_env']}"
        await _send_json(send, 401, error_body(401, message), headers=[(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """ASGI middleware: 413 for bodies over ``limit()`` bytes, checked before the route parses them.

    Args:
        app: The wrapped ASGI app.
        limit: Returns the current limit in bytes (read per request, so the replica can set it).
    """

    def __init__(self, app, limit: Callable[[], int] = body_limit, timeout: Callable[[], float] | None = None):
        self.app = app
        self.limit = limit
        self.timeout = timeout or (lambda: _RUNTIME["body_timeout_s"])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = int(self.limit())
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return await _send_json(send, 400, error_body(400, "Content-Length is not a number"))
                if size > limit:
                    return await _send_json(send, 413, _too_large(size, limit))
        # No (or a small) Content-Length: read the body here, up to the limit and within the body
        # deadline, and replay it. FastAPI reads whole bodies before parsing anyway, so buffering costs
        # no extra memory.
        chunks: list[bytes] = []
        seen = 0
        timeout = float(self.timeout())
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, until - loop.time()))
            except asyncio.TimeoutError:
                return await _send_json(send, 408, error_body(
                    408, f"request body not received within {timeout:g}s ({seen} bytes came; body_timeout_s); "
                         f"send the whole body at once"), headers=[(b"connection", b"close")])
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await _send_json(send, 413, _too_large(seen, limit))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(size: int, limit: int) -> dict:
    return error_body(413, f"request body of {size}+ bytes exceeds this server's limit of {limit} bytes "
                           f"(max_body_bytes); send fewer or shorter samples per request")


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())] + list(headers or [])})
    await send({"type": "http.response.body", "body": payload})
