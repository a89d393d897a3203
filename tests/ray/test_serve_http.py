"""The refiner app's HTTP surface, over real HTTP against a running Serve app with the tiny model.

One app ("A", transformers engine, API key, small limits) serves the whole module; a second, model-free
app ("B") uses the external OpenAI-compatible engine pointed at A's ``/v1/chat/completions``. Covered:
auth (401), limits (413 for samples, tokens and body bytes, with and without Content-Length),
schema errors (422), backpressure (503 + Retry-After), ``/v1/judge`` in both modes, the
OpenAI-compatible routes through the official ``openai`` client, metrics scraped from Ray's metrics
endpoint, the external engine, and a schemathesis fuzz run that must find no 5xx.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

KEY_ENV = "MIDDO_TEST_HTTP_KEY"
KEY = "test-http-key"
UPSTREAM_ENV = "MIDDO_TEST_UPSTREAM_KEY"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_samples_per_request": 4, "max_new_tokens_limit": 32, "max_body_bytes": 64 * 1024,
          "batch_wait_s": 0.01}
ROWS = [{"sample_id": "q1", "instruction": "What is the capital of France?", "output": "Paris."},
        {"sample_id": "q2", "instruction": "Add 12 and 30.", "input": "Show the sum.", "output": "42"}]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_port(wanted: int) -> int:
    """The port Serve's proxy really uses (an already running Serve keeps its own options)."""
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except Exception:  # noqa: BLE001
        return wanted


@pytest.fixture(scope="module")
def apps(ray_local):
    """App A (tiny model, key, small limits) at /a and app B (openai engine -> A) at /b."""
    from ray import serve

    from serve.app import build_app

    saved = {k: os.environ.get(k) for k in (KEY_ENV, UPSTREAM_ENV)}
    os.environ[KEY_ENV] = KEY
    os.environ[UPSTREAM_ENV] = KEY  # B authenticates to A with A's key
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    port = _serve_port(port)
    base = f"http://127.0.0.1:{port}"
    a_args = {"model": "tiny", "num_cpus": 1.0, "api_key_env": KEY_ENV, "max_ongoing_requests": 2,
              "max_queued_requests": 2, "retry_after_s": 1, **LIMITS}
    handle_a = serve.run(build_app(a_args), name="http-a", route_prefix="/a")
    b_args = {"model": "tiny", "engine": "openai", "openai_base_url": f"{base}/a/v1", "openai_api_key_env": UPSTREAM_ENV,
              "openai_prefill": True, "openai_max_parallel": 2, "num_cpus": 0.1, "api_key_env": KEY_ENV, **LIMITS}
    handle_b = serve.run(build_app(b_args), name="http-b", route_prefix="/b")
    try:
        yield {"a": f"{base}/a", "b": f"{base}/b", "handle_a": handle_a, "handle_b": handle_b}
    finally:
        for name in ("http-b", "http-a"):
            serve.delete(name)
        if not serve.status().applications:
            serve.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# Auth and limits.


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_auth_is_required_except_for_health_and_schema(apps):
    """Without the key, or with a wrong one, every API route answers 401 with WWW-Authenticate; /healthz
    and /openapi.json stay open."""
    a = apps["a"]
    body = {"operation": "simplify", "samples": [{"instruction": "x"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        for method, path, payload in (("post", "/v1/refine", body), ("post", "/v1/judge", {"samples": ROWS}),
                                      ("get", "/v1/models", None),
                                      ("post", "/v1/chat/completions", {"model": "tiny", "messages": []})):
            resp = httpx.request(method, f"{a}{path}", json=payload, headers=headers, timeout=60)
            assert resp.status_code == 401, (path, headers, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
            assert resp.json()["error"]["type"] == "authentication_error"
            assert KEY_ENV in resp.json()["error"]["message"]
    assert httpx.get(f"{a}/healthz", timeout=30).json() == {"status": "ok", "model": "tiny"}
    schema = httpx.get(f"{a}/openapi.json", timeout=30).json()
    assert {"/v1/refine", "/v1/judge", "/v1/chat/completions", "/v1/models", "/healthz"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_limits_answer_413_naming_the_limit(apps):
    """Too many samples, too many tokens, or too large a body (declared or streamed) -> 413 naming the limit."""
    a = apps["a"]
    many = {"operation": "simplify", "samples": [{"instruction": f"x{i}"} for i in range(5)]}
    resp = httpx.post(f"{a}/v1/refine", json=many, headers=AUTH, timeout=60)
    assert resp.status_code == 413 and "max_samples_per_request" in resp.json()["error"]["message"]
    resp = httpx.post(f"{a}/v1/judge", json={"samples": ROWS * 3}, headers=AUTH, timeout=60)
    assert resp.status_code == 413
    tokens = {"operation": "simplify", "samples": [{"instruction": "x"}], "sampling": {"max_new_tokens": 33}}
    resp = httpx.post(f"{a}/v1/refine", json=tokens, headers=AUTH, timeout=60)
    assert resp.status_code == 413 and "max_new_tokens_limit" in resp.json()["error"]["message"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    assert httpx.post(f"{a}/v1/chat/completions", json=chat, headers=AUTH, timeout=60).status_code == 413
    big = {"operation": "simplify", "samples": [{"instruction": "y" * (70 * 1024)}]}
    resp = httpx.post(f"{a}/v1/refine", json=big, headers=AUTH, timeout=60)
    assert resp.status_code == 413 and "max_body_bytes" in resp.json()["error"]["message"]

    def chunks():  # no Content-Length: the server must count the streamed bytes itself
        yield b'{"operation": "simplify", "samples": [{"instruction": "'
        for _ in range(80):
            yield b"z" * 1024
        yield b'"}]}'

    resp = httpx.post(f"{a}/v1/refine", content=chunks(), headers={**AUTH, "content-type": "application/json"},
                      timeout=60)
    assert resp.status_code == 413


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_backpressure_answers_503_with_retry_after(apps):
    """Beyond max_ongoing_requests (2) + max_queued_requests (2) the app refuses at once with 503 and
    Retry-After instead of queueing; the accepted requests still complete."""
    a = apps["a"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 32,
            "n": 8, "temperature": 1.0}

    def call(_):
        return httpx.post(f"{a}/v1/chat/completions", json=body, headers=AUTH, timeout=120)

    with ThreadPoolExecutor(14) as pool:
        responses = list(pool.map(call, range(14)))
    codes = [r.status_code for r in responses]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    # The documented JSON error, from the gateway (not Serve's plain-text answer).
    assert refused.json()["error"]["type"] == "overloaded_error" and "max_queued_requests" in refused.text


# ---------------------------------------------------------------------------------------------
# Judge.


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_judge_prob_matches_the_diagnosis_judge(apps, tiny_model):
    """Mode 'prob' returns 6 scores in [0, 10] per sample, the same numbers the diagnosis computes with
    judge_scores on the same model and template, and their aggregate as quality."""
    from middo_ray.judge import judge_scores
    from middo_ray.models import load_model
    from middo_ray.signals.quality import aggregate_quality

    body = {"samples": ROWS, "mode": "prob", "template": "default", "cutoff_len": 256}
    resp = httpx.post(f"{apps['a']}/v1/judge", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["mode"] == "prob" and out["model"] == "tiny"
    assert [r["sample_id"] for r in out["results"]] == ["q1", "q2"]
    got = np.asarray([[r[t][d] for t in ("prompt", "response") for d in ("factuality", "clarity", "completeness")]
                      for r in out["results"]])
    assert np.all((got >= 0) & (got <= 10))
    model, tok = load_model("tiny")
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"], "system": "",
             "history": ""} for r in ROWS]
    want = judge_scores(model, tok, rows, "default", 256, 4096)
    np.testing.assert_allclose(got, want, atol=1e-4)
    _, quality = aggregate_quality(want[:, :3], want[:, 3:])
    np.testing.assert_allclose([r["quality"] for r in out["results"]], quality, atol=1e-4)
    assert all(r["missing"] == 0 for r in out["results"])
    # The tiny model has no chat template: asking for it is a clear 422, not a crash.
    resp = httpx.post(f"{apps['a']}/v1/judge", json={**body, "template": "chat"}, headers=AUTH, timeout=60)
    assert resp.status_code == 422 and "chat template" in resp.json()["error"]["message"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_judge_generate_reports_unparseable_scores_as_null(apps):
    """Mode 'generate' parses a leading number; the random tiny model writes none, so every score is null
    (never 0), quality is null and all 6 are counted missing."""
    body = {"samples": ROWS, "mode": "generate", "sampling": {"max_new_tokens": 6, "temperature": 0.1, "seed": 1}}
    resp = httpx.post(f"{apps['a']}/v1/judge", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    for r in resp.json()["results"]:
        scores = [r[t][d] for t in ("prompt", "response") for d in ("factuality", "clarity", "completeness")]
        assert all(s is None or 0 <= s <= 10 for s in scores)
        assert r["missing"] == sum(s is None for s in scores)
        if r["missing"] == 6:
            assert r["quality"] is None


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible routes with the official client.


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_openai_client_chat_completions_and_models(apps):
    """The official openai client lists the model, gets n seeded choices with usage, gets the same text for
    the same seed, continues an assistant prefix, and sees 404/401/422 as its own exception types."""
    import openai

    client = openai.OpenAI(base_url=f"{apps['a']}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=7, n=2,
                                           temperature=1.0)
    assert first.object == "chat.completion" and first.model == "tiny" and len(first.choices) == 2
    assert [c.index for c in first.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") and c.message.role == "assistant" for c in first.choices)
    u = first.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=7, n=2, temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    parts = client.chat.completions.create(
        model="tiny", max_tokens=4, seed=3,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}])
    assert len(parts.choices) == 1
    cont = client.chat.completions.create(
        model="tiny", max_tokens=4, seed=3, extra_body={"continue_final_message": True},
        messages=[{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "one, two,"}])
    assert cont.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        client.chat.completions.create(model="gpt-x", messages=messages, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{apps['a']}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError, match="stream"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True)
    # continue_final_message with nothing of the assistant's to continue: a normal answer (the schema allows it).
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, seed=5)
    flagged = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, seed=5,
                                             extra_body={"continue_final_message": True})
    assert flagged.choices[0].message.content == plain.choices[0].message.content


# ---------------------------------------------------------------------------------------------
# External OpenAI-compatible engine (app B -> app A over HTTP).


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_external_engine_through_our_own_chat_route(apps):
    """App B's refiner runs on A's /v1/chat/completions over HTTP and, since every row keeps its seed and
    prefill end to end, gives exactly A's own answer; B supports only judge mode 'generate', and no IFD, and
    says so."""
    body = {"operation": "improve", "samples": [{"sample_id": f"e{i}", "instruction": f"Explain topic {i} well."}
                                                for i in range(3)],
            "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 21}, "max_retries": 1}
    via_a = httpx.post(f"{apps['a']}/v1/refine", json=body, headers=AUTH, timeout=120)
    via_b = httpx.post(f"{apps['b']}/v1/refine", json=body, headers=AUTH, timeout=300)
    assert via_a.status_code == 200 and via_b.status_code == 200, via_b.text
    assert via_b.json() == via_a.json()
    info = apps["handle_b"].info.remote().result(timeout_s=60)
    assert info["engine"] == "openai" and info["judge_modes"] == ["generate"] and info["prefill"] is True
    resp = httpx.post(f"{apps['b']}/v1/judge", json={"samples": ROWS, "mode": "prob"}, headers=AUTH, timeout=60)
    assert resp.status_code == 422 and "mode 'generate'" in resp.json()["error"]["message"]
    assert info["ifd"] is False
    resp = httpx.post(f"{apps['b']}/v1/judge", json={"samples": ROWS, "mode": "generate", "ifd": True},
                      headers=AUTH, timeout=60)
    assert resp.status_code == 422 and "cannot compute IFD" in resp.json()["error"]["message"]
    resp = httpx.post(f"{apps['b']}/v1/judge", json={"samples": ROWS, "mode": "generate",
                                                   "sampling": {"max_new_tokens": 4, "seed": 2}},
                      headers=AUTH, timeout=300)
    assert resp.status_code == 200 and len(resp.json()["results"]) == 2
    with pytest.raises(ValueError, match="mode 'generate'"):
        apps["handle_b"].judge.remote({"samples": ROWS, "mode": "prob"}).result(timeout_s=60)


# ---------------------------------------------------------------------------------------------
# Metrics and fuzzing.


def _scrape(pattern: str, timeout_s: float = 90.0) -> list[str]:
    """Lines of this node's Ray metrics endpoint matching pattern, polled until some appear."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError:
            text = ""
        lines = [ln for ln in text.splitlines() if re.search(pattern, ln) and not ln.startswith("#")]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(2)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_metrics_reach_rays_prometheus_endpoint(apps):
    """Request counts by route and status, latency, tokens and batch sizes are exported through Ray's
    metrics endpoint (what Prometheus scrapes), tagged with the application."""
    a = apps["a"]
    httpx.post(f"{a}/v1/chat/completions", headers=AUTH, timeout=60,
               json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    httpx.get(f"{a}/v1/models", timeout=30)  # 401
    ok = _scrape(r'ray_middo_serve_requests_total\{.*application="http-a".*code="200".*route="/v1/chat/completions"')
    assert ok and float(ok[0].split()[-1]) >= 1
    assert _scrape(r'ray_middo_serve_requests_total\{.*code="401".*route="/v1/models"')
    assert _scrape(r'ray_middo_serve_request_latency_s_count\{.*route="/v1/chat/completions"')
    tokens = _scrape(r'ray_middo_serve_tokens_total\{.*kind="completion"')
    assert tokens and float(tokens[0].split()[-1]) > 0
    assert _scrape(r"ray_middo_serve_batch_rows_count")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(apps, tmp_path):
    """A schemathesis run over every operation of the OpenAPI schema (examples, coverage and fuzzing
    phases, valid and invalid inputs) with every check: no 5xx, every status and body as documented,
    every schema-invalid input refused, every schema-valid one accepted (or 413 for the per-request
    totals JSON Schema cannot state: see tests/ray/schemathesis.toml)."""
    exe = Path(sys.executable).with_name("schemathesis")
    config = Path(__file__).with_name("schemathesis.toml")
    cmd = [str(exe), "--config-file", str(config), "run", f"{apps['a']}/openapi.json", "--checks", "all",
           "-H", f"Authorization: Bearer {KEY}", "--max-examples", "15", "--workers", "1", "--seed", "1",
           "--phases", "examples,coverage,fuzzing", "--generation-database", "none", "--request-timeout", "120",
           "--no-color", "--max-failures", "5", "--suppress-health-check", "all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # Every operation of the schema was tested (refine, judge, chat, models, healthz), and none failed a check.
    assert re.search(r"Tested:\s+5\b", out) and "No issues found" in out, out[-3000:]
