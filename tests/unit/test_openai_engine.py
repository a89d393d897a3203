"""The external engine against a real OpenAI-compatible server on loopback (tests/teacher_server.py) that
fails on purpose: bounded retries with one probing row, a clear error naming the endpoint and the status,
row refusals as row errors, and a cancelled call cancelled at the endpoint."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from middo_ray.wire import TeacherUnavailable
from serve.engines.base import GenRow
from serve.engines.openai import OpenAIEngine
from tests.teacher_server import TeacherServer


@pytest.fixture()
def teacher():
    server = TeacherServer()
    yield server
    server.close()


def _engine(server: TeacherServer, retries: int = 2, **kw) -> OpenAIEngine:
    return OpenAIEngine(server.base_url, "teacher", "key", retries=retries, timeout_s=kw.pop("timeout_s", 10.0), **kw)


def _rows(n: int, **kw) -> list[GenRow]:
    return [GenRow(messages=[{"role": "user", "content": f"question {i}"}], max_new_tokens=16, seed=i, **kw)
            for i in range(n)]


def test_answers_every_row_in_order(teacher):
    outs = _engine(teacher).generate_rows(_rows(5))
    assert [o.finish_reason for o in outs] == ["stop"] * 5
    assert len({o.text for o in outs}) == 5 and teacher.statuses() == [200] * 5


@pytest.mark.parametrize("mode,status", [("http500", 500), ("http429", 429)])
def test_a_failing_endpoint_costs_rows_plus_retries_calls_then_names_itself(teacher, mode, status):
    """Guards the bound: 8 rows and 2 retries against an endpoint that always fails are 8 + 2 calls (the
    first round, then one probing row per retry), not 8 x 3, and the error names the URL and the status."""
    teacher.mode = mode
    eng = _engine(teacher, retries=2)
    with pytest.raises(TeacherUnavailable) as err:
        eng.generate_rows(_rows(8))
    assert teacher.statuses() == [status] * 10
    assert teacher.base_url in str(err.value) and f"HTTP {status}" in str(err.value)
    assert err.value.status == status and err.value.endpoint == teacher.base_url
    assert eng.calls["sent"] == 10 and eng.calls["gave_up"] == 1


def test_refused_connections_are_retried_then_reported(teacher):
    teacher.refuse()
    eng = _engine(teacher, retries=1)
    with pytest.raises(TeacherUnavailable) as err:
        eng.generate_rows(_rows(3))
    assert "connection failed" in str(err.value) and "no HTTP answer" in str(err.value)
    assert err.value.status is None and eng.calls["transient"] == 4      # 3 rows, then 1 probe


def test_an_endpoint_that_recovers_answers_every_row(teacher):
    """Guards recovery: the first 2 calls answer, then the endpoint fails; it is back when the probe retries, and
    every row is answered once."""
    teacher.mode, teacher.ok_calls = "fail_after", 2
    eng = _engine(teacher, retries=3)
    threading.Timer(0.2, lambda: setattr(teacher, "mode", "ok")).start()
    outs = eng.generate_rows(_rows(6))
    assert all(o.finish_reason == "stop" and o.text for o in outs)
    assert teacher.statuses().count(200) == 6 and not teacher.answered_twice()


def test_a_refused_row_is_a_row_error_and_a_refused_key_stops_at_once(teacher):
    teacher.mode = "http400"
    outs = _engine(teacher).generate_rows(_rows(2))
    assert [o.finish_reason for o in outs] == ["error", "error"] and "HTTP 400" in outs[0].error
    assert len(teacher.statuses()) == 2                      # a row refusal is not retried
    teacher.mode = "http401"
    with pytest.raises(TeacherUnavailable, match="API key"):
        _engine(teacher).generate_rows(_rows(1))
    assert len(teacher.statuses()) == 3


def test_a_cancelled_call_is_cancelled_at_the_endpoint(teacher):
    """Guards cancellation: the caller's task is cancelled while the endpoint is still working; the HTTP
    connection is closed, so the endpoint sees the caller hang up, and nothing is retried."""
    teacher.mode, teacher.slow_s = "slow", 30.0
    eng = _engine(teacher, timeout_s=60.0)

    async def go():
        task = asyncio.ensure_future(eng.agenerate_rows(_rows(2)))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    deadline = time.monotonic() + 10
    while teacher.hung_up < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert teacher.hung_up == 2 and teacher.statuses() == [499, 499]


def test_a_deadline_bounds_attempts_and_waits(teacher):
    """Guards the deadline: a slow endpoint and a row deadline 1 s away end the row with 'timeout' (no retry
    after it), and the endpoint sees the caller hang up."""
    teacher.mode, teacher.slow_s = "slow", 30.0
    outs = _engine(teacher, retries=3).generate_rows(_rows(1, deadline=time.monotonic() + 1.0))
    assert outs[0].finish_reason == "timeout"
    deadline = time.monotonic() + 10
    while teacher.hung_up < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert teacher.hung_up == 1
