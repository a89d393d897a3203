"""A real OpenAI-compatible HTTP server on loopback, whose faults the tests switch: the teacher of
``refine.engine=openai`` when it fails.

It answers ``POST /v1/chat/completions`` with a short deterministic text derived from the last message, after
the marker a rewrite request asks for (a trivial model, but real HTTP, real JSON and the real ``openai``
client on the other side), and
``GET /v1/models``. Its ``mode``:

- ``ok``: 200;
- ``http500`` / ``http429`` / ``http400`` / ``http401``: that status with an OpenAI-style JSON error;
- ``slow``: waits ``slow_s`` before answering, and records a caller that hung up meanwhile (``hung_up``);
- ``fail_after``: ``ok`` for the first ``ok_calls`` calls, then ``http500``.

``refuse()`` closes the listening socket (connections are then refused) and ``resume()`` opens it again on
the same port. Every call is counted, by a key of its body, with the status it got (``calls``).
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class TeacherServer:
    def __init__(self, port: int = 0):
        self.mode = "ok"
        self.ok_calls = 0
        self.slow_s = 30.0
        self.calls: list[tuple[str, int]] = []          # (body key, status), in arrival order
        self.hung_up = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self.port = port
        self.resume()

    # ----- control ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def resume(self) -> None:
        """Listens (again) on the same port."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def refuse(self) -> None:
        """Stops listening: new connections are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:                   # and the kept-alive ones are dropped
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.refuse()

    def statuses(self) -> list[int]:
        with self._lock:
            return [s for _, s in self.calls]

    def answered_twice(self) -> list[str]:
        """Body keys that got a 200 more than once (a call the client should not have repeated)."""
        seen: dict[str, int] = {}
        with self._lock:
            for key, status in self.calls:
                if status == 200:
                    seen[key] = seen.get(key, 0) + 1
        return [k for k, n in seen.items() if n > 1]

    # ----- serving ---------------------------------------------------------------------------

    def _status_for_call(self) -> int:
        with self._lock:
            n = len(self.calls)
        mode = self.mode
        if mode == "fail_after":
            return 200 if n < self.ok_calls else 500
        if mode.startswith("http"):
            return int(mode[4:])
        return 200

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):     # quiet
                pass

            def setup(self):
                super().setup()
                with owner._lock:
                    owner._conns.add(self.connection)

            def finish(self):
                with owner._lock:
                    owner._conns.discard(self.connection)
                super().finish()

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "teacher", "object": "model"}]})

            def _hung_up(self) -> bool:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                key = hashlib.sha256(json.dumps([body.get("messages"), body.get("max_tokens"), body.get("seed")],
                                                sort_keys=True).encode()).hexdigest()[:16]
                status = owner._status_for_call()
                if owner.mode == "slow":
                    until = time.monotonic() + owner.slow_s
                    while time.monotonic() < until:
                        if self._hung_up():
                            with owner._lock:
                                owner.hung_up += 1
                                owner.calls.append((key, 499))
                            return
                        time.sleep(0.02)
                with owner._lock:
                    owner.calls.append((key, status))
                if status != 200:
                    self._send(status, {"error": {"message": f"teacher fault {status}", "type": "server_error",
                                                  "code": status}})
                    return
                last = (body.get("messages") or [{}])[-1].get("content", "")
                digest = hashlib.sha256(last.encode()).hexdigest()[:12]
                text = f"A clearer version of the task, number {digest}, with each step spelled out."
                # A rewrite request asks for its answer after a marker (middo_ray.prompts): give it one.
                for marker in ("#New Prompt#:", "#Final Rewritten Prompt#:"):
                    if marker in last:
                        text = f"{marker} {text}"
                        break
                self._send(200, {
                    "id": f"chatcmpl-{digest}", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(last.split()), "completion_tokens": 14,
                              "total_tokens": len(last.split()) + 14}})

        return Handler
