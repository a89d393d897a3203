"""Engines of the refiner/judge app: chat messages in, generated text out, behind one interface.

- :class:`TransformersEngine` (``serve.engines.transformers``): a Hugging Face causal LM in the replica
  (CPU or GPU). It also gives token probabilities, so it supports the probability-weighted judge.
- :class:`VLLMEngine` (``serve.engines.vllm``): Ray Serve LLM's vLLM deployment, composed into the app.
- :class:`OpenAIEngine` (``serve.engines.openai``): an external OpenAI-compatible endpoint (a hosted API,
  a vLLM server, or another copy of this app), called with the official ``openai`` client. Generate-only.

What they share (the row types, the :class:`Engine` protocol, prompt rendering) is in
``serve.engines.base``. :func:`make_engine` imports only the module of the engine it builds; the
engine classes and the vLLM helpers are also importable from here, loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from serve.engines.base import (DEFAULT_MAX_BATCH, Engine, GenOut, GenRow, cut_at_stop, describe, model_fingerprint,
                                plain_render, render_chat, row_seed)

# Names defined by one engine's module: imported from it when first asked for (PEP 562).
_LAZY = {
    "TransformersEngine": "serve.engines.transformers",
    "VLLMEngine": "serve.engines.vllm",
    "VLLM_SERVED_ID": "serve.engines.vllm",
    "prompt_token_ids": "serve.engines.vllm",
    "vllm_deployment": "serve.engines.vllm",
    "vllm_max_model_len": "serve.engines.vllm",
    "OpenAIEngine": "serve.engines.openai",
}

__all__ = ["DEFAULT_MAX_BATCH", "Engine", "GenOut", "GenRow", "cut_at_stop", "describe", "make_engine",
           "model_fingerprint", "plain_render", "render_chat", "row_seed", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def make_engine(engine: str, model: str, dtype: str = "auto", openai_base_url: str | None = None,
                openai_api_key: str | None = None, openai_prefill: bool = False, openai_max_parallel: int = 8,
                openai_timeout_s: float = 120.0, openai_retries: int = 3, max_batch: int = DEFAULT_MAX_BATCH,
                llm_handle=None, max_model_len: int | None = None) -> Engine:
    """Builds the engine named by ``engine`` ('transformers', 'vllm' or 'openai').

    'vllm' needs ``llm_handle`` (the handle of the app's LLMServer deployment) and ``max_model_len``.
    """
    if engine == "transformers":
        from serve.engines.transformers import TransformersEngine

        return TransformersEngine(model, dtype=dtype, max_batch=max_batch)
    if engine == "vllm":
        if llm_handle is None or not max_model_len:
            raise ValueError("engine 'vllm' needs the handle of its LLMServer deployment and the context length")
        from serve.engines.vllm import VLLMEngine

        return VLLMEngine(model, llm_handle, max_model_len)
    if engine == "openai":
        if not openai_base_url:
            raise ValueError("engine 'openai' needs openai_base_url (the endpoint's base URL, e.g. https://host/v1)")
        if not openai_api_key:
            raise ValueError("engine 'openai' got no API key; set the environment variable named by openai_api_key_env")
        from serve.engines.openai import OpenAIEngine

        return OpenAIEngine(openai_base_url, model, openai_api_key, prefill=openai_prefill,
                            max_parallel=openai_max_parallel, timeout_s=openai_timeout_s,
                            retries=openai_retries)
    raise ValueError(f"unknown engine '{engine}'; use 'transformers', 'vllm' or 'openai'")
