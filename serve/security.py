"""API-key auth, request-size limits and the JSON error format of the HTTP API.

- The API key is read from an environment variable on the machine that builds the app (its name
  is configurable, the key never appears on a command line); only its SHA-256 digest travels to the
  replicas, which compare digests in constant time.
- A server that listens beyond loopback refuses to start without a key.
- The key is checked by an ASGI middleware before anything else reads the request, so an
  unauthenticated client learns nothing (not even whether its body would validate).
- Bodies larger than the limit are refused with 413 before they are parsed, by an ASGI middleware
  that checks ``Content-Length`` and counts streamed bytes.
- Every error is answered as ``{"error": {"message", "type", "code"}}`` (the OpenAI layout, which
  the ``openai`` client turns into readable exceptions).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from typing import Any, Callable

from middo_ray.wire import ServeSettings

DEFAULT_KEY_ENV: str = ServeSettings.model_fields["api_key_env"].default
DEFAULT_MAX_BODY_BYTES: int = ServeSettings.model_fields["max_body_bytes"].default

# The replica's body limit. Kept here, behind functions, because Serve pickles the deployment class
# by value: module state that the class touched directly would be a copy, not what the middleware reads.
_RUNTIME: dict[str, Any] = {"max_body_bytes": DEFAULT_MAX_BODY_BYTES, "key_digest": None, "key_env": DEFAULT_KEY_ENV}

# Routes anyone may call: liveness and the API description.
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


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
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 422: "invalid_request_error", 503: "overloaded_error"}
    return {"error": {"message": message, "type": kind or kinds.get(status, "server_error"),
                      "code": code if code is not None else status}}


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


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

    def __init__(self, app, limit: Callable[[], int] = body_limit):
        self.app = app
        self.limit = limit

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
        # No (or a small) Content-Length: read the body here, up to the limit, and replay it. FastAPI
        # reads whole bodies before parsing anyway, so buffering costs no extra memory.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
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
