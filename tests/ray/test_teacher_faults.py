"""A failing teacher is a row error, then a clean stop, then a rerun that continues: the real loop on local Ray
with ``refine.engine=openai`` pointed at a real OpenAI-compatible server on loopback (tests/teacher_server.py)
that starts failing part-way through round 1's refine stage."""

from __future__ import annotations

import json
import socket

import pytest

from middo_ray.cli import stop_message
from middo_ray.config import build_config
from middo_ray.loop import run_loop
from tests.teacher_server import TeacherServer

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_teacher_that_fails_stops_the_stage_cleanly_and_the_rerun_continues(ray_local, tiny_model, tmp_path,
                                                                              monkeypatch):
    """1. The teacher answers its first 8 calls (two requests of 2 samples x 2 steps), then HTTP 500 forever:
    the stage stops after refine.max_consecutive_failures=2 requests that failed so, with one line naming the
    endpoint and the status; the teacher was called a bounded number of times (per failed request: its rows,
    then one probe per retry); the answered requests are in the LLM-call cache.
    2. The teacher is well again: the same command resumes, no request that had been answered is asked again
    (only the request in flight when the teacher failed), and the run finishes."""
    monkeypatch.setenv("MIDDO_TEST_TEACHER_KEY", "k")
    teacher = TeacherServer()
    try:
        teacher.mode, teacher.ok_calls = "fail_after", 8
        port = _free_port()
        cfg = lambda: build_config({  # noqa: E731 - a fresh config per run (run_loop fills in defaults)
            "run": {"run_id": "tf", "output_dir": str(tmp_path)},
            "data": {"path": "demo", "max_samples": 48, "cutoff_len": 96},
            "model": {"base": "tiny"},
            "refine": {"engine": "openai", "openai_base_url": teacher.base_url, "model": "teacher",
                       "openai_api_key_env": "MIDDO_TEST_TEACHER_KEY", "openai_retries": 1, "batch_size": 2,
                       "max_concurrency": 1, "max_new_tokens": 16, "max_retries": 0, "max_consecutive_failures": 2,
                       "http_port": port},
            "select": {"mode": "budget", "budget_fraction": 0.25},
            "train": {"learning_rate": 1e-3, "max_steps": 2},
            "eval": {"mc_limit": 5},
            "converge": {"max_rounds": 1},
        })
        with pytest.raises(Exception) as err:
            run_loop(cfg())
        message = stop_message(err.value)
        assert message is not None, f"not a clean stop: {err.value!r}"
        assert teacher.base_url in message and "HTTP 500" in message and "\n" not in message
        assert "max_consecutive_failures=2" in message and "run the same command again" in message
        first = teacher.statuses()
        assert first[:8] == [200] * 8
        # Each failed request: its 2 rows, then 1 probe (openai_retries=1); 2 such requests.
        assert len(first) - 8 <= 2 * (2 + 1), first
        run = tmp_path / "tf"
        assert not (run / "round_1" / "refine" / "_SUCCESS").exists()
        cached = list((run / "cache" / "llm").rglob("*.json"))
        assert len(cached) == 2                      # the two requests answered whole

        teacher.mode = "ok"
        summary = run_loop(cfg())
        assert summary["rounds"] == 1
        info = json.loads((run / "round_1" / "refine" / "stage.json").read_text())["counts"]
        assert info["cache_hits"] >= 2 and info["teacher_errors"] == 0
        # Repeated: only the rows of the request in flight when the teacher failed (answered in step 1, then
        # its step 2 failed); nothing of the two requests answered whole.
        assert len(teacher.answered_twice()) <= 2, teacher.answered_twice()
    finally:
        teacher.close()


def test_over_http_a_failing_endpoint_is_a_502_naming_it(ray_local, monkeypatch):
    """The refiner app with engine 'openai' in front of a failing endpoint: chat and refine are answered at
    once with 502 JSON naming the endpoint and its status (not a 500 'internal error'); when the endpoint is
    well again, the same requests are answered."""
    import httpx
    from ray import serve

    from serve.app import build_app

    monkeypatch.setenv("MIDDO_TEST_TEACHER_KEY", "k")
    teacher = TeacherServer()
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": "teacher", "engine": "openai", "openai_base_url": teacher.base_url,
                             "openai_api_key_env": "MIDDO_TEST_TEACHER_KEY", "openai_retries": 1,
                             "num_cpus": 0.1}), name="tf-http", route_prefix="/tf")
        base = f"http://127.0.0.1:{port}/tf"
        chat = {"model": "teacher", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
        refine = {"operation": "improve", "samples": [{"instruction": "Name a prime.", "output": "Seven."}],
                  "sampling": {"max_new_tokens": 8, "seed": 1}, "max_retries": 0}
        teacher.mode = "http500"
        for path, body in (("/v1/chat/completions", chat), ("/v1/refine", refine)):
            resp = httpx.post(f"{base}{path}", json=body, timeout=120)
            assert resp.status_code == 502, (path, resp.text)
            message = resp.json()["error"]["message"]
            assert teacher.base_url in message and "HTTP 500" in message, message
            assert resp.headers.get("retry-after")
        teacher.mode = "ok"
        assert httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120).status_code == 200
        got = httpx.post(f"{base}/v1/refine", json=refine, timeout=120)
        assert got.status_code == 200 and got.json()["results"][0]["status"] in ("ok", "failed")
    finally:
        serve.delete("tf-http")
        if not serve.status().applications:
            serve.shutdown()
        teacher.close()
