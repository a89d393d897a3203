"""No single client can stall the refiner app: slow bodies, long requests, disconnects, bad strings, foreign
Host headers, odd request ids. Real Serve app (gateway + model replica, tiny model) over real HTTP on loopback.

Two keyless apps (loopback only, so the Host check is on): "h" with a short body deadline and interleaving
after 0.2 s of generation; "d" with a generation deadline of 1 s. What the model replica did is read from
its ``stats`` handle method (rows ended by finish reason), never from timings.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

LIMITS = {"max_samples_per_request": 8, "max_new_tokens_limit": 1984, "max_request_tokens": 16_000,
          "batch_wait_s": 0.01, "retry_after_s": 1}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hard(ray_local):
    from ray import serve

    from ray.serve.context import _get_global_client

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    port = int(_get_global_client().http_config.port)   # an already running Serve keeps its own port
    base = f"http://127.0.0.1:{port}"
    serve.run(build_app({"model": "tiny", "num_cpus": 1.0, "body_timeout_s": 2, "slice_s": 0.2, **LIMITS}),
              name="hard-h", route_prefix="/h")
    serve.run(build_app({"model": "tiny", "num_cpus": 0.5, "generation_timeout_s": 1, **LIMITS}),
              name="hard-d", route_prefix="/d")
    try:
        yield {"h": f"{base}/h", "d": f"{base}/d", "port": port,
               "stats_h": serve.get_deployment_handle("Refiner", "hard-h"),
               "stats_d": serve.get_deployment_handle("Refiner", "hard-d")}
    finally:
        for name in ("hard-h", "hard-d"):
            serve.delete(name)
        if not serve.status().applications:
            serve.shutdown()


def _chat(n: int = 1, max_tokens: int = 4, content: str = "hi", temperature: float = 1.0, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "n": n,
            "temperature": temperature, "seed": 1, **extra}


# A long request: greedy, the random tiny model never writes EOS, so all 8 rows run to 1,984 tokens (~5 s
# alone on two cores; sampled, its rows end after 60-700 tokens, too soon to be sure it is still running).
LONG = {"n": 8, "max_tokens": 1984, "temperature": 0.0}


def _finished(handle) -> dict:
    return handle.stats.remote().result(timeout_s=60)["finished"]


# ---------------------------------------------------------------------------------------------
# Bodies.


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_stalled_upload_is_dropped_with_408_while_others_are_served(hard):
    """Clients that declare 1,000 body bytes, send 12 and stall get 408 (JSON) and their connection closed at
    the body deadline; meanwhile /healthz and a chat request from another client are answered."""
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", hard["port"]), timeout=30)
        s.sendall(b"POST /h/v1/refine HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"operation\"")
        socks.append(s)
    try:
        assert httpx.get(f"{hard['h']}/healthz", timeout=30).status_code == 200
        ok = httpx.post(f"{hard['h']}/v1/chat/completions", json=_chat(), timeout=60)
        assert ok.status_code == 200, ok.text
        for s in socks:
            answer = b""
            while True:           # read until the server closes the connection
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), head
            assert b"body_timeout_s" in body and b'"error"' in body
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------------
# Work per request.


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_token_budget_per_request_answers_413_naming_the_limit(hard):
    """Each item within max_new_tokens_limit, but samples x tokens x 2 steps x attempts over max_request_tokens."""
    samples = [{"instruction": f"Question {i}?", "output": "Answer."} for i in range(8)]
    r = httpx.post(f"{hard['h']}/v1/refine", timeout=60, json={
        "operation": "improve", "samples": samples, "max_retries": 2,
        "sampling": {"max_new_tokens": 1000, "temperature": 1.0}})
    assert r.status_code == 413 and "max_request_tokens" in r.json()["error"]["message"], r.text
    chat = httpx.post(f"{hard['h']}/v1/chat/completions", json=_chat(n=8, max_tokens=1984), timeout=60)
    assert chat.status_code == 200   # 8 x 1984 = 15,872 <= 16,000: allowed, but interleaved (below)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_long_request_makes_room_for_a_short_one(hard):
    """A chat of 8 x 1984 tokens is running; a 4-token chat sent after it is answered while it still runs
    (the long one yields after slice_s and continues behind it) and the long one still completes whole."""
    async def scenario():
        async with httpx.AsyncClient(timeout=240) as client:
            long = asyncio.create_task(client.post(f"{hard['h']}/v1/chat/completions",
                                                   json=_chat(content="Tell a long story.", **LONG)))
            await asyncio.sleep(1.0)
            short = await client.post(f"{hard['h']}/v1/chat/completions", json=_chat())
            still_running = not long.done()
            return short, still_running, await long

    short, still_running, long = asyncio.run(scenario())
    assert short.status_code == 200 and long.status_code == 200, (short.text, long.text)
    assert still_running, "the short request waited for the long one to finish"
    body = long.json()
    assert len(body["choices"]) == 8 and body["usage"]["completion_tokens"] > 8


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_client_that_disconnects_cancels_its_rows(hard):
    """The client of a long chat gives up after 0.5 s: its 8 rows stop at their next token (finish reason
    'cancelled' in the replica), instead of generating their 8 x 1984 tokens for nobody."""
    before = _finished(hard["stats_h"])
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{hard['h']}/v1/chat/completions", json=_chat(content="Go on and on.", **LONG),
                   timeout=0.5)

    def delta() -> dict:
        now = _finished(hard["stats_h"])
        return {k: now.get(k, 0) - before.get(k, 0) for k in set(now) | set(before)}

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(delta().values()) < 8:
        time.sleep(0.5)
    ended = delta()
    # Every row ended, cancelled, none ran on to its 1984-token cap.
    assert ended.get("cancelled", 0) == 8 and ended.get("length", 0) == 0, ended


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_generation_stops_at_the_deadline(hard):
    """App "d" has generation_timeout_s=1: a chat asking for 8 x 1984 tokens comes back (200) with what was
    generated by then (finish_reason 'length'); refine items stopped there fail naming
    the deadline, with no attempt after it."""
    before = _finished(hard["stats_d"]).get("timeout", 0)
    r = httpx.post(f"{hard['d']}/v1/chat/completions", json=_chat(content="Tell it all.", **LONG),
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 8
    assert body["usage"]["completion_tokens"] < 8 * 1984
    assert _finished(hard["stats_d"]).get("timeout", 0) == before + 8
    samples = [{"instruction": f"Explain topic {i} in detail.", "output": "Short."} for i in range(2)]
    ref = httpx.post(f"{hard['d']}/v1/refine", timeout=120, json={
        "operation": "improve", "samples": samples, "max_retries": 1, "prefill_marker": False,
        "sampling": {"max_new_tokens": 1984, "temperature": 1.0, "seed": 3}})
    assert ref.status_code == 200, ref.text
    stopped = [x for x in ref.json()["results"] if "deadline" in x["reason"]]
    # The deadline is the last word: no attempt after it (an item may have failed validation once before).
    assert stopped and all(x["status"] == "failed" and x["attempts"] <= 2 for x in stopped), ref.text


# ---------------------------------------------------------------------------------------------
# Strict input.


def _post_raw(url: str, raw: bytes) -> httpx.Response:
    return httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("route,raw,field", [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
                             b'"text": "a\\udfffb"}]}]}', "messages.0.content.0.text"),
    ("/v1/refine", b'{"operation": "synthesize", "samples": [{"instruction": "q", "hints": ["ok", "\\ud83d"]}]}',
     "samples.0.hints.1"),
    ("/v1/refine", b'{"operation": "simplify", "samples": [{"instruction": "q"}], "sampling": {"seed": "3"}}',
     "sampling.seed"),
    ("/v1/refine", b'{"operation": "simplify", "samples": [{"instruction": "q"}], "prefill_marker": 0}',
     "prefill_marker"),
    ("/v1/judge", b'{"samples": [{"instruction": "q", "output": 5}]}', "samples.0.output"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": true}',
     "stream"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 1.5}', "n"),
])
def test_strict_inputs_are_refused_with_422_naming_the_field(hard, route, raw, field):
    """Lone surrogates in nested strings, strings for numbers, numbers for booleans and strings, stream=true:
    422 with the field's path, never a 500."""
    r = _post_raw(f"{hard['h']}{route}", raw)
    assert r.status_code == 422, r.text
    locs = [".".join(d["loc"][1:]) for d in r.json()["detail"]]
    assert field in locs, (locs, r.text)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_openapi_schema_states_this_servers_limits_and_whole_floats_pass(hard):
    """The schema carries the server's own limits (not the wire's hard caps), the served model and no
    unsupported option; an integer sent as 1.0 (a JSON Schema integer) is accepted."""
    schema = httpx.get(f"{hard['h']}/openapi.json", timeout=30).json()
    comps = schema["components"]["schemas"]
    refine = next(v for k, v in comps.items() if k.startswith("RefineRequest"))
    assert refine["properties"]["samples"]["maxItems"] == LIMITS["max_samples_per_request"]
    sampling = next(v for k, v in comps.items() if k.startswith("SamplingParams"))
    assert sampling["properties"]["max_new_tokens"]["maximum"] == LIMITS["max_new_tokens_limit"]
    judge = next(v for k, v in comps.items() if k.startswith("JudgeRequest"))
    assert "chat" not in judge["properties"]["template"]["enum"]          # the tiny model has no chat template
    chat = next(v for k, v in comps.items() if k.startswith("ChatCompletionRequest"))
    assert chat["properties"]["model"]["enum"] == ["tiny"]
    assert chat["properties"]["stream"].get("const") is False or chat["properties"]["stream"].get("enum") == [False]
    assert schema["servers"] == [{"url": "/h"}]
    r = httpx.post(f"{hard['h']}/v1/chat/completions", json=_chat(n=1.0, max_tokens=4.0), timeout=60)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------
# Host, request ids, docs.


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_keyless_server_answers_only_loopback_host_headers(hard):
    """Without a key a request addressed to another name (DNS rebinding) gets 403 naming the fix."""
    url = f"{hard['h']}/v1/chat/completions"
    for host in ("evil.example", "evil.example:80", "10.0.0.1"):
        r = httpx.post(url, json=_chat(), headers={"Host": host}, timeout=60)
        assert r.status_code == 403 and "MIDDO_SERVE_API_KEY" in r.json()["error"]["message"], (host, r.text)
    for host in (f"localhost:{hard['port']}", f"127.0.0.1:{hard['port']}", "[::1]"):
        assert httpx.get(f"{hard['h']}/healthz", headers={"Host": host}, timeout=30).status_code == 200


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_request_ids_are_bounded_and_plain(hard):
    """A plain id comes back as sent; a long or odd one is replaced before Serve's proxy echoes or logs it."""
    ok = httpx.get(f"{hard['h']}/healthz", headers={"x-request-id": "client-42.a_b:c"}, timeout=30)
    assert ok.headers.get_list("x-request-id") == ["client-42.a_b:c"]
    for bad in ("x" * 5000, "bad id with spaces", "<script>", "a\tb"):
        r = httpx.get(f"{hard['h']}/healthz", headers={"x-request-id": bad}, timeout=30)
        ids = r.headers.get_list("x-request-id")
        assert r.status_code == 200 and len(ids) == 1 and bad not in ids[0] and len(ids[0]) <= 128, ids


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_no_docs_page_that_needs_a_cdn(hard):
    """/docs and /redoc (whose scripts FastAPI loads from a CDN) are not served; the schema is."""
    assert httpx.get(f"{hard['h']}/docs", timeout=30).status_code == 404
    assert httpx.get(f"{hard['h']}/redoc", timeout=30).status_code == 404
    text = httpx.get(f"{hard['h']}/openapi.json", timeout=30).text
    assert "cdn." not in text and "unpkg" not in text


# ---------------------------------------------------------------------------------------------
# A model replica that dies.


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_dead_model_replica_gives_json_503_and_the_app_recovers(hard):
    """The model replica is killed under a long request: that request gets a JSON 503 with Retry-After (not a
    plain-text 500), /healthz says unhealthy while no replica answers, and both recover once Serve restarted it."""
    import ray
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({"model": "tiny", "num_cpus": 0.5, **LIMITS}), name="hard-k", route_prefix="/k")
    url = hard["h"].rsplit("/", 1)[0] + "/k"
    try:
        assert httpx.post(f"{url}/v1/chat/completions", json=_chat(), timeout=60).status_code == 200

        async def scenario():
            async with httpx.AsyncClient(timeout=120) as client:
                long = asyncio.create_task(client.post(f"{url}/v1/chat/completions",
                                                       json=_chat(content="On and on.", **LONG)))
                await asyncio.sleep(1.0)
                name = next(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                            if n["name"].startswith("SERVE_REPLICA::hard-k#Refiner#"))
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                answer = await long
                health = await client.get(f"{url}/healthz")
                return answer, health

        answer, health = asyncio.run(scenario())
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1" and "restart" in answer.json()["error"]["message"]
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if httpx.get(f"{url}/healthz", timeout=30).status_code == 200:
                break
            time.sleep(1)
        assert httpx.post(f"{url}/v1/chat/completions", json=_chat(), timeout=60).status_code == 200
    finally:
        serve.delete("hard-k")
