"""The external engine: an OpenAI-compatible endpoint (a hosted API, a vLLM server, or another copy of
this app), called with the official ``openai`` client. Generate-only.

Failures, in one place (the HTTP client itself retries nothing, so no retry multiplies another):

- transient (HTTP 408, 409, 429, 5xx; a refused, dropped or timed-out connection): the call is retried up to
  ``retries`` times after a bounded backoff (0.5, 1, 2, ... s, at most 8 s; the endpoint's ``Retry-After``
  up to 30 s). While the endpoint is failing, one row of the call probes it and the others wait, so an
  endpoint that is down costs about ``retries`` calls per request, not ``rows x retries``. When the retries
  are spent the call raises :class:`~middo_ray.wire.TeacherUnavailable` naming the endpoint and the status;
- the endpoint refuses the app itself (401, 403, 404: key, permissions, model or URL): at once, the same;
- the endpoint refuses one row (another 4xx, e.g. a prompt over its context): that row ends with
  ``finish_reason="error"`` and the reason; the others go on.

The calls are asyncio tasks on the replica's event loop (:meth:`OpenAIEngine.agenerate_rows`): when the caller
goes away the task is cancelled and so is its HTTP request (the connection is closed, so the endpoint stops
generating too), and a row's deadline bounds each attempt and each wait.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

from middo_ray.wire import TeacherUnavailable
from serve.engines.base import GenOut, GenRow

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 30.0
_TRANSIENT_STATUS = {408, 409, 429}
_FATAL_STATUS = {401: "the endpoint refused the API key (check the environment variable named by "
                      "refine.openai_api_key_env)",
                 403: "the endpoint refused access with this API key",
                 404: "the endpoint has no such model or route (check refine.openai_base_url, which ends in /v1, "
                      "and refine.model)"}


_TRANSIENT_WORDS = {408: "request timeout", 409: "conflict", 429: "rate limited"}


class _Transient(Exception):
    """One attempt failed for a reason that may pass: its status (None: the connection) and description."""

    def __init__(self, status: int | None, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.status, self.what, self.retry_after = status, what, retry_after


def _retry_after(response: Any) -> float | None:
    try:
        value = float(response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None
    return max(0.0, min(value, RETRY_AFTER_MAX_S))


def backoff_s(failures: int) -> float:
    """Wait before the retry that follows ``failures`` failed rounds (1, 2, ...)."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 1))


class OpenAIEngine:
    """Generation through an OpenAI-compatible ``/chat/completions`` endpoint.

    Rows are sent as parallel requests (at most ``max_parallel`` at once per replica); the endpoint does its
    own batching. The API key is read from the environment variable named by ``api_key_env`` by the caller
    (never a command-line value) and handed in as ``api_key``.

    Args:
        base_url: The endpoint's base URL, e.g. ``https://host/v1``.
        model: Model name to request.
        api_key: The key (from the environment); sent as ``Authorization: Bearer``.
        prefill: Send assistant prefixes with ``continue_final_message`` (vLLM and this app support
            it; the hosted OpenAI API does not). Without it the refiner asks without a prefill.
        max_parallel: Requests in flight at once.
        timeout_s: Timeout of one attempt (a row's deadline may cut it shorter).
        retries: Retries of a call after a transient failure (see the module docstring).
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str, prefill: bool = False, max_parallel: int = 8,
                 timeout_s: float = 120.0, retries: int = 3) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError("the 'openai' engine needs the openai package: pip install openai") from exc
        self._openai = openai
        self._base_url, self._api_key = base_url, api_key
        self._model = model
        self._prefill = bool(prefill)
        self._max_parallel = max(1, int(max_parallel))
        self._timeout_s, self._retries = float(timeout_s), int(retries)
        self._clients: dict[int, tuple[Any, asyncio.Semaphore]] = {}   # per event loop (an httpx pool is bound to one)
        self.calls = {"sent": 0, "ok": 0, "transient": 0, "refused": 0, "gave_up": 0}

    @property
    def model_id(self) -> str:
        return self._model

    @property
    def revision(self) -> str:
        """The endpoint and model name: an external model's weights cannot be fingerprinted from here."""
        return hashlib.sha256(f"{self._base_url}|{self._model}".encode()).hexdigest()[:16]

    @property
    def supports_prob_judge(self) -> bool:
        return False

    @property
    def supports_prefill(self) -> bool:
        return self._prefill

    @property
    def max_new_tokens_limit(self) -> int | None:
        return None

    def _client(self) -> tuple[Any, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        got = self._clients.get(id(loop))
        if got is None:
            client = self._openai.AsyncOpenAI(base_url=self._base_url, api_key=self._api_key, timeout=self._timeout_s,
                                              max_retries=0)
            got = self._clients[id(loop)] = (client, asyncio.Semaphore(self._max_parallel))
        return got

    def _unavailable(self, why: str, status: int | None, tries: int) -> TeacherUnavailable:
        self.calls["gave_up"] += 1
        said = f"HTTP {status}" if status is not None else "no HTTP answer"
        return TeacherUnavailable(
            f"the teacher endpoint {self._base_url} failed: {why} ({said}, {tries} tr{'ies' if tries != 1 else 'y'}); "
            "check that it runs and answers POST /chat/completions, and refine.openai_base_url / refine.model",
            self._base_url, status)

    async def _attempt(self, row: GenRow) -> GenOut:
        """One call for one row: its output, a row refusal (finish_reason 'error'), or raises _Transient /
        TeacherUnavailable."""
        openai = self._openai
        client, gate = self._client()
        extra: dict[str, Any] = {}
        if row.continue_final:
            if not self._prefill:
                raise ValueError("this OpenAI-compatible engine was configured without prefill support; "
                                 "send no assistant prefix or set openai_prefill=true")
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        timeout = self._timeout_s
        if row.deadline is not None:
            timeout = max(0.01, min(timeout, row.deadline - time.monotonic()))
        async with gate:
            self.calls["sent"] += 1
            try:
                resp = await client.chat.completions.create(
                    model=self._model, messages=row.messages, max_tokens=int(row.max_new_tokens),
                    temperature=float(row.temperature), top_p=float(row.top_p), seed=int(row.seed),
                    stop=list(row.stop) or None, n=1, extra_body=extra or None, timeout=timeout)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in _TRANSIENT_STATUS or status >= 500:
                    self.calls["transient"] += 1
                    what = _TRANSIENT_WORDS.get(status, "server error")    # the status itself follows in the message
                    raise _Transient(status, what, _retry_after(exc.response)) from None
                if status in _FATAL_STATUS:
                    raise self._unavailable(_FATAL_STATUS[status], status, 1) from None
                self.calls["refused"] += 1
                return GenOut(text="", finish_reason="error", error=f"the endpoint refused the row: HTTP {status}: "
                                                                    f"{str(exc.message)[:300]}")
            except openai.APITimeoutError:
                self.calls["transient"] += 1
                raise _Transient(None, f"no answer within {timeout:.3g}s") from None
            except openai.APIConnectionError as exc:
                self.calls["transient"] += 1
                cause = exc.__cause__ or exc
                raise _Transient(None, f"connection failed ({type(cause).__name__})") from None
        self.calls["ok"] += 1
        choice = resp.choices[0]
        usage = resp.usage
        return GenOut(text=(choice.message.content or "").strip(),
                      prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                      completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                      finish_reason="length" if choice.finish_reason == "length" else "stop")

    async def agenerate_rows(self, rows: list[GenRow]) -> list[GenOut]:
        """Every row as one chat completion, in parallel; outputs in input order (see the module docstring).

        Raises:
            TeacherUnavailable: The endpoint kept failing after ``retries`` retries, or refused the app.
        """
        outs: list[GenOut | None] = [None] * len(rows)
        todo = list(range(len(rows)))
        failures = 0
        while todo:
            now = time.monotonic()
            for i in list(todo):
                ended = rows[i].ended(now)
                if ended:
                    outs[i] = GenOut(text="", finish_reason=ended)
                    todo.remove(i)
            if not todo:
                break
            batch = list(todo) if failures == 0 else todo[:1]    # while failing, one row probes the endpoint
            got = await asyncio.gather(*(self._attempt(rows[i]) for i in batch), return_exceptions=True)
            transient: list[_Transient] = []
            for i, res in zip(batch, got):
                if isinstance(res, _Transient):
                    transient.append(res)
                elif isinstance(res, BaseException):
                    raise res
                else:
                    outs[i] = res
                    todo.remove(i)
            if not transient:
                failures = 0
                continue
            failures += 1
            last = transient[-1]
            if failures > self._retries:
                raise self._unavailable(last.what, last.status, failures)
            wait = last.retry_after if last.retry_after is not None else backoff_s(failures)
            logger.warning("teacher endpoint %s: %s; retry %d of %d in %.1fs", self._base_url, last.what, failures,
                           self._retries, wait)
            await self._wait(wait, [rows[i] for i in todo])
        return outs  # type: ignore[return-value]

    @staticmethod
    async def _wait(seconds: float, rows: list[GenRow]) -> None:
        """Sleeps ``seconds``, or less when every row's deadline passes or its caller goes away first."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if all(r.ended(time.monotonic()) for r in rows):
                return
            await asyncio.sleep(min(left, 0.1))

    def generate_rows(self, rows: list[GenRow]) -> list[GenOut]:
        """:meth:`agenerate_rows` for a caller without an event loop (the engine protocol)."""

        async def once() -> list[GenOut]:
            try:
                return await self.agenerate_rows(rows)
            finally:                                  # this loop ends here: so does its client
                client, _ = self._clients.pop(id(asyncio.get_running_loop()), (None, None))
                if client is not None:
                    await client.close()

        return asyncio.run(once())
