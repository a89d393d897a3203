"""The refiner Serve app (serve/app.py) and the loop's refine stage (middo_ray/refine.py).

The Ray tests start the real application with the tiny random model on a free port and talk to it
over real HTTP and through its deployment handle. The tiny model never writes the rewrite marker,
so its items fail: that is the failure path (status "failed", a reason, nothing dropped). The
success path and the retry logic are checked with a scripted generator (unit tests below), and a
slow test runs SmolLM2 for real.

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
from middo_ray.schema import RefineRequest, RefineResponse

OPERATIONS = ("simplify", "improve", "synthesize")


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

    def __init__(self, replies):
        self.replies = replies  # callable(prompt, call_index) -> text
        self.calls: list[list[str]] = []
        self.prefills: list = []

    @property
    def model_id(self) -> str:
        return "scripted"

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, prefills=None):
        self.calls.append(list(prompts))
        self.prefills.append(prefills)
        return [self.replies(p, len(self.calls) - 1) for p in prompts]


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


# ---------------------------------------------------------------------------------------------
# The real app on Ray with the tiny model.


@pytest.fixture(scope="module")
def refiner(ray_local):
    """The tiny-model refiner, deployed once for the module on a free port; Serve shut down after."""
    from middo_ray.refine import refiner_url, start_refiner, stop_refiner

    cfg = build_config({"model": {"base": "tiny"}, "refine": {
        "http_port": _free_port(), "batch_size": 3, "max_concurrency": 2, "max_new_tokens": 16,
        "cpus_per_replica": 1.0, "app_name": "middo-refiner-test"}})
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
    resp = httpx.post(f"{url}/v1/refine", json=body, timeout=120)
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
@pytest.mark.parametrize("body", [
    {"operation": "simplify", "samples": []},
    {"operation": "paraphrase", "samples": [{"instruction": "x"}]},
    {"operation": "simplify", "samples": [{"input": "no instruction"}]},
    {"operation": "simplify", "samples": [{"instruction": "x"}], "sampling": {"temperature": -1}},
    {"operation": "simplify", "samples": [{"instruction": "x"}], "unknown_field": 1},
])
def test_refine_http_malformed_body_is_422(refiner, body):
    """Bodies that break the RefineRequest contract are rejected with 422 before any generation."""
    _, _, url = refiner
    assert httpx.post(f"{url}/v1/refine", json=body, timeout=60).status_code == 422


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_synthesize_without_two_hints_fails_per_item(refiner):
    """Synthesize with < 2 hints: status failed with a reason naming the hints, request still 200."""
    _, _, url = refiner
    body = {"operation": "synthesize", "samples": [
        {"sample_id": "a", "instruction": "Explain tides.", "hints": ["only one"]},
        {"sample_id": "b", "instruction": "Explain wind.", "hints": ["Describe rain.", "Describe snow."]}]}
    resp = httpx.post(f"{url}/v1/refine", json=body, timeout=120)
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
    via_http = httpx.post(f"{url}/v1/refine", json=body, timeout=120).json()
    assert via_handle == via_http


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_refine_jobs_rejects_malformed_jobs(refiner):
    """A job without an operation or id is a caller bug: ValueError before anything is sent."""
    from middo_ray.refine import refine_jobs

    cfg, handle, _ = refiner
    with pytest.raises(ValueError, match="lacks"):
        refine_jobs([{"sample_id": "x", "instruction": "y"}], handle, cfg.refine, seed=0)


# ---------------------------------------------------------------------------------------------
# SmolLM2, for real (slow on 2 CPUs).


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_smollm2_simplify_over_http(refiner):
    """Two simplify requests to a SmolLM2 app over HTTP: the shape and accounting are right, and any
    'ok' item really changed the prompt. SmolLM2 is weak, so success itself is not asserted."""
    from ray import serve as ray_serve

    from middo_ray.refine import refiner_url, start_refiner

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
            return httpx.post(f"{url}/v1/refine", json=body, timeout=900)

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
