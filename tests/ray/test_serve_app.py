"""The refiner Serve app (serve/app.py) and the loop's refine stage (middo_ray/refine.py).

The Ray tests start the real application with the tiny random model on a free port (through
``start_refiner``, as the loop does, with an API key) and talk to it over real HTTP and through its
deployment handle. The tiny model writes random text: with the marker prefilled some of it passes
validation and some fails, so both paths occur; exact success/retry logic is checked with a scripted
generator (unit tests below), and a slow test runs SmolLM2 for real. The refine stage's cache,
timeout and re-judge are tested through the handle. Auth, limits, judge, the OpenAI-compatible
routes, metrics, the external engine and the fuzz run are in test_serve_http.py.

Synthesize with fewer than two hints is answered per item (status "failed", reason "bad item: ...")
rather than 422, so one bad row never rejects the rest of its batch.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from middo_ray.config import build_config
from middo_ray.prompts import SIMPLIFY_MARKER, SYNTH_MARKER
from middo_ray.wire import RefineRequest, RefineResponse

OPERATIONS = ("simplify", "improve", "synthesize")
KEY_ENV = "MIDDO_TEST_REFINER_KEY"
KEY = "test-refiner-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    """A port the OS just handed out (never assume 8000: other runs may hold it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(n: int, prefix: str = "s", hints: bool = True) -> list[dict]:
    return [{"sample_id": f"{prefix}{i}", "instruction": f"Explain topic number {i} in detail.",
             "input": "with an example" if i % 2 else "", "output": "An answer.",
             "hints": ["Describe photosynthesis.", "List three prime numbers."] if hints else []}
            for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Refine logic with a scripted generator (no Ray, no model).


class ScriptedEngine:
    """Answers each generate call from a script, and records the batches it was given."""

    name = "scripted"
    revision = "r0"
    supports_prob_judge = False
    max_new_tokens_limit = None

    def __init__(self, replies, prefill: bool = True):
        self.replies = replies  # callable(prompt, call_index) -> text
        self.supports_prefill = prefill
        self.calls: list[list[str]] = []
        self.prefills: list = []

    @property
    def model_id(self) -> str:
        return "scripted"

    def generate_rows(self, rows):
        from serve.engines import GenOut

        self.calls.append([r.messages[0]["content"] for r in rows])
        self.prefills.append([r.messages[-1]["content"] for r in rows] if rows[0].continue_final else None)
        return [GenOut(self.replies(r.messages[0]["content"], len(self.calls) - 1)) for r in rows]


def _request(op: str, n: int, temperature: float = 1.0, retries: int = 1, hints: bool = True,
             prefill: bool = False) -> RefineRequest:
    return RefineRequest.model_validate({
        "operation": op, "samples": _samples(n, hints=hints), "max_retries": retries, "prefill_marker": prefill,
        "sampling": {"max_new_tokens": 32, "temperature": temperature, "seed": 7}})


@pytest.mark.unit
def test_run_refine_success_batches_one_call_per_step():
    """Rewrite then answer, each as ONE batched generate call for all samples; ok results carry both texts."""
    from serve.app import run_refine

    def reply(prompt, call):
        return f"plan...\n{SIMPLIFY_MARKER} \"Say what topic {prompt[-40:-20]} is.\"" if call == 0 else "Here is an answer."

    eng = ScriptedEngine(reply)
    resp = run_refine(eng, _request("simplify", 5))
    assert [len(c) for c in eng.calls] == [5, 5]
    assert [r.sample_id for r in resp.results] == [f"s{i}" for i in range(5)]
    assert all(r.status == "ok" and r.output == "Here is an answer." and r.attempts == 2 for r in resp.results)
    assert all(r.instruction.startswith("Say what topic") and r.input == "" for r in resp.results)
    assert resp.model == "scripted"


@pytest.mark.unit
def test_run_refine_prefill_puts_the_marker_in_front():
    """With prefill_marker the rewrite starts with the marker (given to the engine as prefill), so an
    output without its own marker is accepted; the answer step gets no prefill."""
    from serve.app import run_refine

    eng = ScriptedEngine(lambda p, call: "What is two plus two?" if call == 0 else "Four.")
    resp = run_refine(eng, _request("simplify", 2, prefill=True))
    assert eng.prefills[0] == [SIMPLIFY_MARKER + "\n"] * 2 and eng.prefills[1] is None
    assert all(r.status == "ok" and r.instruction == "What is two plus two?" for r in resp.results)


@pytest.mark.unit
def test_run_refine_retries_only_failed_items():
    """A missing marker is retried (only for the items that failed); after max_retries the item fails with a reason."""
    from serve.app import run_refine

    def reply(prompt, call):
        if call == 0:  # first rewrite attempt: only sample 0's prompt gets a marker
            return f"{SIMPLIFY_MARKER} A simpler prompt please." if "number 0 " in prompt else "no marker here"
        if call == 1:  # retry: sample 1 succeeds, sample 2 still has no marker
            return f"{SIMPLIFY_MARKER} Another simple prompt." if "number 1 " in prompt else "still nothing"
        return "An answer."

    eng = ScriptedEngine(reply)
    resp = run_refine(eng, _request("simplify", 3, retries=1))
    assert [len(c) for c in eng.calls] == [3, 2, 2]
    by = {r.sample_id: r for r in resp.results}
    assert by["s0"].status == "ok" and by["s0"].attempts == 2
    assert by["s1"].status == "ok" and by["s1"].attempts == 3
    assert by["s2"].status == "failed" and "rewrite failed after 2 attempts" in by["s2"].reason
    assert by["s2"].instruction == "" and by["s2"].output == ""


@pytest.mark.unit
def test_run_refine_greedy_does_not_retry_and_answer_failures_are_reported():
    """Greedy decoding is not retried (it would repeat itself); an empty answer fails the item."""
    from serve.app import run_refine

    eng = ScriptedEngine(lambda p, call: f"{SIMPLIFY_MARKER} Simple prompt here." if call == 0 else "")
    resp = run_refine(eng, _request("improve", 2, temperature=0.0, retries=3))
    assert len(eng.calls) == 2
    assert all(r.status == "failed" and r.reason.startswith("answer failed after 1 attempt: empty answer")
               for r in resp.results)


@pytest.mark.unit
def test_run_refine_synthesize_rejects_hint_copies_and_missing_hints():
    """A synthesized prompt that copies a hint fails; an item with < 2 hints fails per item, not per request."""
    from serve.app import run_refine

    eng = ScriptedEngine(lambda p, call: f"{SYNTH_MARKER} describe photosynthesis." if call == 0 else "Answer.")
    resp = run_refine(eng, _request("synthesize", 2, retries=0))
    assert all(r.status == "failed" and "copies a hint" in r.reason for r in resp.results)

    eng = ScriptedEngine(lambda p, call: "never called")
    resp = run_refine(eng, _request("synthesize", 2, hints=False))
    assert eng.calls == []
    assert all(r.status == "failed" and "two hint" in r.reason for r in resp.results)


@pytest.mark.unit
def test_build_app_validates_args():
    """build_app coerces `serve run` string args and rejects unknown keys naming them."""
    from pydantic import ValidationError

    from serve.app import DEFAULT_ARGS, build_app

    assert DEFAULT_ARGS["model"] == "smollm2"
    build_app({"model": "tiny", "num_replicas": "2", "num_cpus": "0.5"})
    with pytest.raises(ValidationError, match="replicas"):
        build_app({"model": "tiny", "replicas": 2})


@pytest.mark.unit
def test_run_refine_engine_without_prefill_asks_without_marker():
    """An engine that cannot continue an assistant prefix gets plain prompts even when the request asks
    for a prefilled marker, so an answer without its own marker fails instead of being patched."""
    from serve.app import run_refine

    eng = ScriptedEngine(lambda p, call: "What is two plus two?" if call == 0 else "Four.", prefill=False)
    resp = run_refine(eng, _request("simplify", 2, prefill=True, retries=0))
    assert eng.prefills == [None]
    assert all(r.status == "failed" and "marker missing" in r.reason for r in resp.results)


@pytest.mark.unit
def test_build_app_refuses_public_host_without_key(monkeypatch):
    """Beyond loopback the app will not start without an API key, and the error names the variable to set;
    with the key in that variable it builds."""
    from middo_ray.serve_apps import start_refiner
    from serve.app import build_app

    monkeypatch.delenv("MIDDO_TEST_UNSET_KEY", raising=False)
    for host in ("0.0.0.0", "10.1.2.3", "example.org"):
        with pytest.raises(ValueError, match="MIDDO_TEST_UNSET_KEY"):
            build_app({"model": "tiny", "http_host": host, "api_key_env": "MIDDO_TEST_UNSET_KEY"})
    build_app({"model": "tiny", "http_host": "127.0.0.1", "api_key_env": "MIDDO_TEST_UNSET_KEY"})
    build_app({"model": "tiny", "http_host": "::1", "api_key_env": "MIDDO_TEST_UNSET_KEY"})
    # The loop's entry point refuses before Serve is touched.
    cfg = build_config({"model": {"base": "tiny"}, "refine": {"http_host": "0.0.0.0",
                                                               "api_key_env": "MIDDO_TEST_UNSET_KEY"}})
    with pytest.raises(ValueError, match="MIDDO_TEST_UNSET_KEY"):
        start_refiner(cfg)
    monkeypatch.setenv("MIDDO_TEST_UNSET_KEY", "k")
    build_app({"model": "tiny", "http_host": "0.0.0.0", "api_key_env": "MIDDO_TEST_UNSET_KEY"})


@pytest.mark.unit
def test_build_app_openai_engine_needs_url_and_key_from_env(monkeypatch):
    """The external engine needs its base URL and reads its key only from the named environment variable."""
    from serve.app import build_app

    monkeypatch.delenv("MIDDO_TEST_UPSTREAM", raising=False)
    with pytest.raises(ValueError, match="openai_base_url"):
        build_app({"model": "m", "engine": "openai", "openai_api_key_env": "MIDDO_TEST_UPSTREAM"})
    with pytest.raises(ValueError, match="MIDDO_TEST_UPSTREAM"):
        build_app({"model": "m", "engine": "openai", "openai_base_url": "http://127.0.0.1:1/v1",
                   "openai_api_key_env": "MIDDO_TEST_UPSTREAM"})
    monkeypatch.setenv("MIDDO_TEST_UPSTREAM", "k")
    build_app({"model": "m", "engine": "openai", "openai_base_url": "http://127.0.0.1:1/v1",
               "openai_api_key_env": "MIDDO_TEST_UPSTREAM"})


@pytest.mark.unit
def test_security_helpers():
    """Bearer checks compare digests; loopback detection covers names, v4 and v6."""
    from serve.security import check_bearer, is_loopback, key_digest

    d = key_digest("s3cret")
    assert check_bearer("Bearer s3cret", d) is None
    assert check_bearer("bearer s3cret", d) is None
    assert "invalid" in check_bearer("Bearer nope", d)
    assert "missing" in check_bearer(None, d)
    assert "Bearer <key>" in check_bearer("Basic s3cret", d)
    assert check_bearer(None, None) is None  # no key configured
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.9.9.9")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.2")


@pytest.mark.unit
def test_transformers_engine_rows_do_not_depend_on_their_batch(tiny_model):
    """Each row samples from its own seeded stream: alone, reordered, or batched with others it gives the
    same text; each row stops at its own token cap; stop strings cut the text."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from more, and busy CI cores make them slower
    try:
        _check_engine_rows()
    finally:
        torch.set_num_threads(threads)


def _check_engine_rows() -> None:
    from serve.engines import GenRow
    from serve.engines.transformers import TransformersEngine

    eng = TransformersEngine("tiny")
    rows = [GenRow([{"role": "user", "content": f"Explain topic {i} please"}], max_new_tokens=6 + 3 * i,
                   temperature=1.0 if i % 2 else 0.0, top_p=0.9, seed=100 + i) for i in range(5)]
    together = eng.generate_rows(rows)
    alone = [eng.generate_rows([r])[0] for r in rows]
    reversed_ = eng.generate_rows(rows[::-1])[::-1]
    assert [o.text for o in together] == [o.text for o in alone] == [o.text for o in reversed_]
    for r, o in zip(rows, together):
        assert 0 < o.completion_tokens <= r.max_new_tokens and o.prompt_tokens > 0
    other_seed = eng.generate_rows([GenRow(rows[1].messages, 9, 1.0, 0.9, seed=999)])[0]
    assert other_seed.text != together[1].text
    text = together[3].text
    if len(text) > 3:
        cut = eng.generate_rows([GenRow(rows[3].messages, rows[3].max_new_tokens, 1.0, 0.9, seed=103,
                                        stop=[text[2:4]])])[0]
        assert cut.text == text[:2].strip() and cut.finish_reason == "stop"
    # Generation cut into slices (what the app does when other work waits) gives the same rows: each keeps
    # its tokens and its random generator, and continues from prompt plus text so far.
    long = [GenRow([{"role": "user", "content": f"Tell story {i}"}], max_new_tokens=40 + 7 * i,
                   temperature=1.0 if i % 2 else 0.0, top_p=0.9, seed=200 + i) for i in range(4)]
    whole = eng.generate_rows(long)
    states = eng.start(long)
    calls = 0
    while any(st.out is None for st in states):
        eng.advance(states, lambda seconds, tokens, some_done: tokens >= 5)
        calls += 1
    assert calls > 2
    assert [st.out.text for st in states] == [o.text for o in whole]
    assert [st.out.completion_tokens for st in states] == [o.completion_tokens for o in whole]
    # A row whose caller went away, or whose deadline passed, ends at its next token.
    import threading
    import time as _time

    gone = threading.Event()
    gone.set()
    ended = eng.generate_rows([GenRow(long[0].messages, 40, seed=1, cancelled=gone),
                               GenRow(long[0].messages, 40, seed=1, deadline=_time.monotonic() - 1)])
    assert [o.finish_reason for o in ended] == ["cancelled", "timeout"] and all(o.completion_tokens == 0 for o in ended)


@pytest.mark.unit
def test_accept_rewrite_rules():
    """The re-judge rules: not_worse compares with the original (tolerance allowed), min_score with the
    threshold; an unscored rewrite is rejected; 'none' accepts everything."""
    from middo_ray.refine import accept_rewrite

    cfg = build_config({}).refine
    assert cfg.accept == "not_worse"
    assert accept_rewrite(cfg, 5.0, 5.0) is None
    assert "original's 5.00" in accept_rewrite(cfg, 5.0, 4.9)
    assert accept_rewrite(cfg, None, 1.0) is None          # nothing to compare with
    assert "no score" in accept_rewrite(cfg, 5.0, None)
    tol = build_config({"refine": {"accept_tolerance": 0.5}}).refine
    assert accept_rewrite(tol, 5.0, 4.6) is None and accept_rewrite(tol, 5.0, 4.4) is not None
    ms = build_config({"refine": {"accept": "min_score", "accept_min_score": 6}}).refine
    assert accept_rewrite(ms, 9.0, 6.0) is None and "accept_min_score" in accept_rewrite(ms, 1.0, 5.9)
    none = build_config({"refine": {"accept": "none"}}).refine
    assert accept_rewrite(none, 9.0, None) is None


@pytest.mark.unit
def test_llm_call_cache_keys_and_files(tmp_path):
    """Keys change with the request content, the seed, the model revision and the prompt fingerprint; answers
    round-trip through one JSON file per key; an unreadable file is a miss."""
    from middo_ray.llmcalls import LLMCallCache, call_key

    ident = {"engine": "transformers", "model": "tiny", "revision": "r1", "logic_version": "v1", "prefill": True}
    req = {"operation": "simplify", "samples": [{"instruction": "x"}], "sampling": {"seed": 1, "temperature": 1.0}}
    k = call_key("refine", req, ident)
    assert k == call_key("refine", dict(reversed(list(req.items()))), ident)
    assert k != call_key("refine", {**req, "sampling": {"seed": 2, "temperature": 1.0}}, ident)
    assert k != call_key("refine", {**req, "sampling": {"seed": 1, "temperature": 0.5}}, ident)
    assert k != call_key("refine", req, {**ident, "revision": "r2"})
    assert k != call_key("refine", req, {**ident, "logic_version": "v2"})
    assert k != call_key("judge", req, ident)
    cache = LLMCallCache(tmp_path / "llm")
    assert cache.get(k) is None
    cache.put(k, {"results": [1, 2]})
    assert cache.get(k) == {"results": [1, 2]}
    assert (tmp_path / "llm" / k[:2] / f"{k}.json").is_file()
    (tmp_path / "llm" / k[:2] / f"{k}.json").write_text("{not json")
    assert cache.get(k) is None


# ---------------------------------------------------------------------------------------------
# The real app on Ray with the tiny model.


@pytest.fixture(scope="module")
def refiner(ray_local):
    """The tiny-model refiner, deployed once for the module on a free port with an API key; Serve shut down after."""
    from middo_ray.serve_apps import app_url as refiner_url, start_refiner, stop_apps as stop_refiner

    cfg = build_config({"model": {"base": "tiny"}, "refine": {
        "http_port": _free_port(), "batch_size": 3, "max_concurrency": 2, "max_new_tokens": 16,
        "cpus_per_replica": 1.0, "app_name": "middo-refiner-test", "api_key_env": KEY_ENV, "batch_wait_s": 0.01}})
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, KEY)
        handle = start_refiner(cfg, health_timeout_s=120)
        try:
            yield cfg, handle, refiner_url(cfg)
        finally:
            stop_refiner(cfg)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_healthz(refiner):
    """GET /healthz answers ok and names the served model."""
    _, _, url = refiner
    resp = httpx.get(f"{url}/healthz", timeout=30)
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "model": "tiny"}


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_refine_http_every_operation_accounts_for_every_sample(refiner, operation):
    """POST /v1/refine returns one result per sample, in order, ok or failed-with-reason; nothing dropped."""
    _, _, url = refiner
    body = {"operation": operation, "samples": _samples(4, prefix=operation),
            "sampling": {"max_new_tokens": 16, "temperature": 1.0, "seed": 3}, "max_retries": 1}
    assert httpx.post(f"{url}/v1/refine", json=body, timeout=60).status_code == 401  # no key
    resp = httpx.post(f"{url}/v1/refine", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    parsed = RefineResponse.model_validate(resp.json())
    assert parsed.operation == operation and parsed.model == "tiny"
    assert [r.sample_id for r in parsed.results] == [s["sample_id"] for s in body["samples"]]
    for r in parsed.results:
        assert r.status in ("ok", "failed")
        if r.status == "failed":
            assert r.reason and r.instruction == "" and r.output == "" and r.attempts >= 1
        else:
            assert r.instruction and r.output


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("body,field", [
    ({"operation": "simplify", "samples": []}, "body.samples"),
    ({"operation": "paraphrase", "samples": [{"instruction": "x"}]}, "body.operation"),
    ({"operation": "simplify", "samples": [{"input": "no instruction"}]}, "body.samples.0.instruction"),
    ({"operation": "simplify", "samples": [{"instruction": "x"}], "sampling": {"temperature": -1}},
     "body.sampling.temperature"),
    ({"operation": "simplify", "samples": [{"instruction": "x"}], "unknown_field": 1}, "body.unknown_field"),
])
def test_refine_http_malformed_body_is_422(refiner, body, field):
    """Bodies that break the RefineRequest contract are rejected with 422 before any generation, with a
    message that names the offending field and points at the schema."""
    _, _, url = refiner
    resp = httpx.post(f"{url}/v1/refine", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and "/openapi.json" in err["message"]
    assert f"{field}:" in err["message"], err["message"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_synthesize_without_two_hints_fails_per_item(refiner):
    """Synthesize with < 2 hints: status failed with a reason naming the hints, request still 200."""
    _, _, url = refiner
    body = {"operation": "synthesize", "samples": [
        {"sample_id": "a", "instruction": "Explain tides.", "hints": ["only one"]},
        {"sample_id": "b", "instruction": "Explain wind.", "hints": ["Describe rain.", "Describe snow."]}]}
    resp = httpx.post(f"{url}/v1/refine", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200
    first, second = resp.json()["results"]
    assert first["sample_id"] == "a" and first["status"] == "failed" and "two hint" in first["reason"]
    assert second["sample_id"] == "b" and second["status"] in ("ok", "failed")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_refine_jobs_through_handle_aligns_by_sample_id(refiner):
    """refine_jobs splits > batch_size mixed jobs into requests, keeps several in flight, and
    returns one result per job in job order, with per-operation counts that add up."""
    from middo_ray.refine import refine_jobs

    cfg, handle, _ = refiner
    jobs = []
    for i in range(11):
        op = OPERATIONS[i % 3]
        jobs.append({"sample_id": f"job{i}", "operation": op, "instruction": f"Task {i}: describe item {i}.",
                     "input": "", "output": "old answer",
                     "hints": ["Describe rain.", "Describe snow."] if op == "synthesize" else []})
    outcome = refine_jobs(jobs, handle, cfg.refine, seed=0)
    assert [r["sample_id"] for r in outcome.results] == [j["sample_id"] for j in jobs]
    assert all(r["status"] in ("ok", "failed") for r in outcome.results)
    assert all(r["reason"] for r in outcome.results if r["status"] == "failed")
    c = outcome.counts
    assert c["jobs"] == 11 and c["ok"] + c["failed"] == 11
    # 4 simplify, 4 improve, 3 synthesize at batch_size 3 -> 2 + 2 + 1 requests.
    assert c["requests"] == 5
    assert {op: v["ok"] + v["failed"] for op, v in c["by_operation"].items()} == \
        {"simplify": 4, "improve": 4, "synthesize": 3}
    assert c["seconds"] >= 0


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_handle_and_http_share_logic_and_are_seeded(refiner):
    """The handle method and the HTTP route give the same answer for the same seeded request."""
    _, handle, url = refiner
    body = {"operation": "improve", "samples": _samples(2, prefix="d"),
            "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 11}, "max_retries": 0}
    via_handle = handle.refine.remote(body).result(timeout_s=120)
    via_http = httpx.post(f"{url}/v1/refine", json=body, headers=AUTH, timeout=120).json()
    assert via_handle == via_http


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_refine_jobs_rejects_malformed_jobs(refiner):
    """A job without an operation or id is a caller bug: ValueError before anything is sent."""
    from middo_ray.refine import refine_jobs

    cfg, handle, _ = refiner
    with pytest.raises(ValueError, match="lacks"):
        refine_jobs([{"sample_id": "x", "instruction": "y"}], handle, cfg.refine, seed=0)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_handle_rejects_malformed_requests_without_echoing_text(refiner):
    """A malformed handle call raises ValueError naming the field; the submitted text is not repeated (it
    would end up in logs)."""
    _, handle, _ = refiner
    with pytest.raises(ValueError, match=r"samples\.0\.instruction") as err:
        handle.refine.remote({"operation": "simplify", "samples": [{"input": "PRIVATE SAMPLE TEXT"}]}).result(
            timeout_s=60)
    assert "PRIVATE SAMPLE TEXT" not in str(err.value)
    with pytest.raises(ValueError, match="max_new_tokens_limit"):
        handle.refine.remote({"operation": "simplify", "samples": [{"instruction": "x"}],
                              "sampling": {"max_new_tokens": 4096}}).result(timeout_s=60)


def _jobs(n: int, tag: str) -> list[dict]:
    out = []
    for i in range(n):
        op = OPERATIONS[i % 3]
        out.append({"sample_id": f"{tag}{i}", "operation": op, "instruction": f"Task {i}: describe item {tag}{i}.",
                    "input": "", "output": f"old answer {i}",
                    "hints": ["Describe rain.", "Describe snow."] if op == "synthesize" else []})
    return out


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_refine_jobs_cache_makes_a_rerun_call_nothing(refiner, tmp_path):
    """With a cache directory the second run of the same jobs is answered entirely from the cache (refine
    and re-judge calls alike) and gives identical results; a different seed misses."""
    from middo_ray.refine import refine_jobs

    cfg, handle, _ = refiner
    jobs = _jobs(7, "c")
    first = refine_jobs(jobs, handle, cfg.refine, seed=5, cache_dir=tmp_path / "llm")
    calls = first.counts["requests"] + first.counts["judge_requests"]
    assert first.counts["cache_hits"] == 0 and first.counts["cache_misses"] == calls
    assert len(list((tmp_path / "llm").rglob("*.json"))) == calls
    second = refine_jobs(jobs, handle, cfg.refine, seed=5, cache_dir=tmp_path / "llm")
    assert second.counts["cache_hits"] == calls and second.counts["cache_misses"] == 0
    assert second.results == first.results
    third = refine_jobs(jobs, handle, cfg.refine, seed=6, cache_dir=tmp_path / "llm")
    assert third.counts["cache_hits"] == 0
    off = cfg.refine.model_copy(update={"cache": False})
    assert refine_jobs(jobs, handle, off, seed=5, cache_dir=tmp_path / "llm").counts["cache_hits"] == 0


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_refine_jobs_timeout_fails_items_and_keeps_originals(refiner, tmp_path):
    """A request that does not answer within refine.request_timeout_s fails its items with a reason naming
    the setting (the caller keeps the originals); nothing is cached for it, and the stage does not stop."""
    from middo_ray.refine import refine_jobs

    cfg, handle, _ = refiner
    slow = cfg.refine.model_copy(update={"request_timeout_s": 0.01, "max_new_tokens": 64, "max_retries": 3,
                                         "accept": "none"})
    jobs = _jobs(6, "t")
    out = refine_jobs(jobs, handle, slow, seed=1, cache_dir=tmp_path / "llm")
    assert [r["sample_id"] for r in out.results] == [j["sample_id"] for j in jobs]
    assert all(r["status"] == "failed" and "refine.request_timeout_s" in r["reason"]
               and r["instruction"] == "" for r in out.results)
    assert out.counts["timeouts"] == out.counts["requests"] and out.counts["failed"] == 6
    assert not list((tmp_path / "llm").rglob("*.json"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_refine_jobs_rejudges_rewrites_before_accepting(refiner):
    """Every valid rewrite is judged with its original: with min_score 0 all are kept and carry both scores;
    with min_score 10 (the tiny judge scores about 4.5) every one is rejected, keeping the original."""
    from middo_ray.refine import refine_jobs

    cfg, handle, _ = refiner
    jobs = _jobs(9, "j")
    base = cfg.refine.model_copy(update={"max_retries": 2})
    keep = refine_jobs(jobs, handle, base.model_copy(update={"accept": "min_score", "accept_min_score": 0.0}), seed=3)
    none = refine_jobs(jobs, handle, base.model_copy(update={"accept": "none"}), seed=3)
    ok = [i for i, r in enumerate(none.results) if r["status"] == "ok"]
    assert ok, "the tiny model produced no valid rewrite to judge; pick another seed"
    assert keep.counts["judged"] == len(ok) and keep.counts["rejected"] == 0
    for i, r in enumerate(keep.results):
        if i in ok:
            assert r["status"] == "ok" and r["instruction"] == none.results[i]["instruction"]
            assert 0.0 <= r["quality_before"] <= 10.0 and 0.0 <= r["quality_after"] <= 10.0
        else:
            assert r["status"] == "failed" and r["quality_after"] is None
    strict = refine_jobs(jobs, handle, base.model_copy(update={"accept": "min_score", "accept_min_score": 10.0}),
                         seed=3)
    assert strict.counts["rejected"] == len(ok) and strict.counts["ok"] == 0
    for i in ok:
        r = strict.results[i]
        assert r["status"] == "failed" and r["reason"].startswith("rejected by re-judge")
        assert "accept_min_score" in r["reason"] and r["instruction"] == "" and r["quality_after"] is not None


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_judge_gives_ifd_and_the_gate_rejects_rewrites_above_accept_max_ifd(refiner):
    """POST /v1/judge with "ifd": true gives each sample's IFD, equal to the engine's own computation (the
    diagnosis' encoding); refine_jobs under refine.accept_max_ifd asks for it, records each rewrite's IFD and
    rejects those above the threshold naming the setting (a tiny threshold rejects every rewrite, a huge one
    none); other requests carry no "ifd" and are answered without one."""
    from middo_ray.refine import refine_jobs
    from serve.engines.transformers import TransformersEngine

    cfg, handle, url = refiner
    rows = [{"sample_id": "f1", "instruction": "Name a primary colour.", "output": "Red."},
            {"sample_id": "f2", "instruction": "Add 12 and 30.", "input": "Show the sum.", "output": "42"}]
    resp = httpx.post(f"{url}/v1/judge", json={"samples": rows, "ifd": True, "template": "default",
                                                "cutoff_len": 512}, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    served = [r["ifd"] for r in resp.json()["results"]]
    direct = TransformersEngine("tiny").ifd(rows, "default", 512)
    assert served == pytest.approx(list(direct), abs=1e-5) and all(v > 0 for v in served)
    plain = httpx.post(f"{url}/v1/judge", json={"samples": rows}, headers=AUTH, timeout=120)
    assert plain.status_code == 200 and all(r["ifd"] is None for r in plain.json()["results"])

    jobs = _jobs(9, "fd")
    base = cfg.refine.model_copy(update={"max_retries": 2, "accept": "min_score", "accept_min_score": 0.0})
    loose = refine_jobs(jobs, handle, base.model_copy(update={"accept_max_ifd": 1e6}), seed=3)
    ok = [i for i, r in enumerate(loose.results) if r["status"] == "ok"]
    assert ok, "the tiny model produced no valid rewrite to judge; pick another seed"
    assert loose.counts["rejected_ifd"] == 0 and loose.counts["rejected"] == 0
    rewrites = [{k: loose.results[i][k] for k in ("instruction", "input", "output")} for i in ok]
    want = TransformersEngine("tiny").ifd(rewrites, "auto", 1024)
    assert [loose.results[i]["ifd_after"] for i in ok] == pytest.approx(list(want), abs=1e-5)
    strict = refine_jobs(jobs, handle, base.model_copy(update={"accept_max_ifd": 1e-6}), seed=3)
    assert strict.counts["rejected_ifd"] == len(ok) == strict.counts["rejected"] and strict.counts["ok"] == 0
    for i in ok:
        r = strict.results[i]
        assert r["status"] == "failed" and "refine.accept_max_ifd 1e-06" in r["reason"] and r["instruction"] == ""
        assert r["ifd_after"] == pytest.approx(loose.results[i]["ifd_after"])


# ---------------------------------------------------------------------------------------------
# The judge follows the model being trained (refine.judge='current').


@pytest.fixture(scope="module")
def round_checkpoints(tmp_path_factory, tiny_model):
    """Two distinct checkpoints standing in for M_1 and M_2: the tiny model with different weight noise."""
    import torch

    from middo_ray.models import load_model

    paths = []
    for seed in (1, 2):
        model, tok = load_model(tiny_model, dtype="float32")
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
        out = tmp_path_factory.mktemp(f"m{seed}")
        model.save_pretrained(out)
        tok.save_pretrained(out)
        paths.append(str(out))
    return paths


def _qualities(response: dict) -> list[float | None]:
    return [r["quality"] for r in response["results"]]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_judge_app_serves_the_round_checkpoint_and_follows_it(refiner, round_checkpoints):
    """With refine.judge='current' the loop's judge app serves the checkpoint it is handed: its scores are
    that model's own (equal to a direct engine run, different from the teacher's); moving to the next
    round's checkpoint redeploys it; refine_jobs re-judges rewrites with it (the counts name the judge,
    quality_before is the judge model's score of the original); releasing it leaves the teacher running."""
    from ray import serve as ray_serve

    from middo_ray.serve_apps import ServeApps
    from middo_ray.refine import refine_jobs
    from middo_ray.serve_apps import judge_app_name
    from middo_ray.wire import JudgeRequest
    from serve.engines import model_fingerprint
    from serve.engines.transformers import TransformersEngine
    from serve.logic import run_judge

    cfg, teacher, _ = refiner
    services = ServeApps(cfg)
    services.teacher_up = True           # the module's app is the teacher; only the judge is deployed here
    rows = [{"sample_id": "q1", "instruction": "Name a primary colour.", "output": "Red."},
            {"sample_id": "q2", "instruction": "Add 12 and 30.", "input": "Show the sum.", "output": "42"}]
    request = JudgeRequest.model_validate({"samples": rows, "mode": "prob"})
    teacher_q = _qualities(teacher.judge.remote(request.model_dump()).result(timeout_s=120))
    try:
        handles = []
        for model in round_checkpoints:
            handle = services.handle(services.judge(model))
            handles.append(handle)
            info = handle.info.remote().result(timeout_s=120)
            assert info["model"] == model and info["revision"] == model_fingerprint(model)
            served = _qualities(handle.judge.remote(request.model_dump()).result(timeout_s=120))
            direct = _qualities(run_judge(TransformersEngine(model), request).model_dump())
            assert served == pytest.approx(direct, abs=1e-4)
            assert max(abs(a - b) for a, b in zip(served, teacher_q)) > 1e-3
        services.judge(round_checkpoints[1])
        assert services.judge_deploys == list(round_checkpoints)       # same model again: no redeploy

        jobs = _jobs(9, "jc")
        accept_all = cfg.refine.model_copy(update={"accept": "min_score", "accept_min_score": 0.0, "max_retries": 2})
        out = refine_jobs(jobs, teacher, accept_all, seed=3, judge=lambda: services.handle(services.judge(round_checkpoints[1])))
        ok = [i for i, r in enumerate(out.results) if r["status"] == "ok"]
        assert ok, "the tiny teacher produced no valid rewrite to judge; pick another seed"
        assert out.counts["judge_model"] == round_checkpoints[1] and out.counts["judged"] == len(ok)
        originals = JudgeRequest.model_validate({"samples": [
            {k: jobs[i][k] for k in ("sample_id", "instruction", "input", "output")} for i in ok], "mode": "prob"})
        want = _qualities(run_judge(TransformersEngine(round_checkpoints[1]), originals).model_dump())
        assert [out.results[i]["quality_before"] for i in ok] == pytest.approx(want, abs=1e-4)
    finally:
        services.release_judge()
    assert judge_app_name(cfg) not in ray_serve.status().applications
    assert cfg.refine.app_name in ray_serve.status().applications       # the teacher stays


# ---------------------------------------------------------------------------------------------
# SmolLM2, for real (slow on 2 CPUs).


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_smollm2_simplify_over_http(refiner):
    """Two simplify requests to a SmolLM2 app over HTTP: the shape and accounting are right, and any
    'ok' item really changed the prompt. SmolLM2 is weak, so success itself is not asserted."""
    from ray import serve as ray_serve

    from middo_ray.serve_apps import app_url as refiner_url, start_refiner

    tiny_cfg, _, _ = refiner
    # Serve's HTTP proxy is already up on the tiny app's port; a second app gets its own prefix.
    cfg = build_config({"model": {"base": "smollm2"}, "refine": {
        "http_port": tiny_cfg.refine.http_port, "app_name": "middo-refiner-smol", "route_prefix": "/smol",
        "cpus_per_replica": 2.0}})
    start_refiner(cfg, health_timeout_s=300)
    url = refiner_url(cfg)
    try:
        originals = ["Explain in detail how vaccines train the adaptive immune system, including memory cells.",
                     "Derive the quadratic formula by completing the square and discuss the discriminant."]

        def send(i: int) -> httpx.Response:
            body = {"operation": "simplify",
                    "samples": [{"sample_id": f"smol{i}", "instruction": originals[i]}],
                    "sampling": {"max_new_tokens": 96, "temperature": 0.7, "top_p": 0.9, "seed": i},
                    "max_retries": 0}
            return httpx.post(f"{url}/v1/refine", json=body, headers=AUTH, timeout=900)

        with ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(send, range(2)))
        for i, resp in enumerate(responses):
            assert resp.status_code == 200, resp.text
            parsed = RefineResponse.model_validate(resp.json())
            assert parsed.model == "smollm2" and len(parsed.results) == 1
            r = parsed.results[0]
            assert r.sample_id == f"smol{i}" and r.status in ("ok", "failed")
            if r.status == "ok":
                assert r.instruction.strip() and r.instruction != originals[i] and r.output.strip()
            else:
                assert r.reason
    finally:
        ray_serve.delete(cfg.refine.app_name)
