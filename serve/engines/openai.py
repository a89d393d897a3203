"""The external engine: an OpenAI-compatible endpoint (a hosted API, a vLLM server, or another copy of
this app), called with the official ``openai`` client. Generate-only.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from serve.engines.base import GenOut, GenRow


class OpenAIEngine:
    """Generation through an OpenAI-compatible ``/chat/completions`` endpoint.

    Rows are sent as parallel requests (at most ``max_parallel`` at once); the endpoint does its own
    batching. The API key is read from the environment variable named by ``api_key_env`` by the
    caller (never a command-line value) and handed in as ``api_key``.

    Args:
        base_url: The endpoint's base URL, e.g. ``https://host/v1``.
        model: Model name to request.
        api_key: The key (from the environment); sent as ``Authorization: Bearer``.
        prefill: Send assistant prefixes with ``continue_final_message`` (vLLM and this app support
            it; the hosted OpenAI API does not). Without it the refiner asks without a prefill.
        max_parallel: Requests in flight at once.
        timeout_s: Timeout of one request.
        max_retries: Retries of the client on connection errors, 429 and 5xx.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str, prefill: bool = False, max_parallel: int = 8,
                 timeout_s: float = 120.0, max_retries: int = 2) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError("the 'openai' engine needs the openai package: pip install openai") from exc
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
        self._model = model
        self._base_url = base_url
        self._prefill = bool(prefill)
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(max_parallel)), thread_name_prefix="openai-engine")

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

    def _one(self, row: GenRow) -> GenOut:
        extra: dict[str, Any] = {}
        if row.continue_final:
            if not self._prefill:
                raise ValueError("this OpenAI-compatible engine was configured without prefill support; "
                                 "send no assistant prefix or set openai_prefill=true")
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        resp = self._client.chat.completions.create(
            model=self._model, messages=row.messages, max_tokens=int(row.max_new_tokens),
            temperature=float(row.temperature), top_p=float(row.top_p), seed=int(row.seed),
            stop=list(row.stop) or None, n=1, extra_body=extra or None)
        choice = resp.choices[0]
        usage = resp.usage
        return GenOut(text=(choice.message.content or "").strip(),
                      prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                      completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                      finish_reason="length" if choice.finish_reason == "length" else "stop")

    def generate_rows(self, rows: list[GenRow]) -> list[GenOut]:
        """Sends every row as one chat completion, in parallel; returns outputs in input order."""
        return list(self._pool.map(self._one, rows))
