"""What every engine shares: the row types, the :class:`Engine` protocol, prompt rendering, identity.

Everything about what to ask and how to check the answer lives in ``serve.logic`` (and
``middo_ray.prompts``); an engine only turns :class:`GenRow` s into :class:`GenOut` s. Another
engine (vLLM in-process) has to offer the same :class:`Engine` protocol.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

# Prompts per forward batch. Bounded so one call with 256 rows does not build one huge padded
# tensor; within a call the prompts are length-sorted, so chunks have little padding.
DEFAULT_MAX_BATCH = 16
# Row seeds stay below 2**31 so they pass unchanged through APIs with 32-bit seeds (the external engine).
_SEED_MOD = 2**31 - 1


def row_seed(seed: int, index: int) -> int:
    """Seed of row ``index`` of a call seeded with ``seed`` (distinct rows get distinct streams)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _SEED_MOD


@dataclass
class GenRow:
    """One generation: a chat, its sampling parameters and seed.

    Attributes:
        messages: OpenAI-style ``{"role", "content"}`` messages.
        max_new_tokens: Cap on generated tokens.
        temperature: 0 = greedy; above 0, sampling at that temperature.
        top_p: Nucleus mass (ignored when greedy).
        seed: Seed of this row's sampling stream.
        continue_final: The last message is an assistant prefix that the answer continues; the
            returned text does not repeat it.
        stop: Strings that end the text (the text is cut before the first one).
        deadline: ``time.monotonic()`` after which the row stops where it is (finish_reason 'timeout');
            None: no deadline. Honoured by the transformers engine between tokens; the app also bounds
            every request as a whole.
        cancelled: Set when the caller has gone; the row then stops at its next token
            (finish_reason 'cancelled').
    """

    messages: list[dict[str, str]]
    max_new_tokens: int = 160
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    continue_final: bool = False
    stop: list[str] = field(default_factory=list)
    deadline: float | None = None
    cancelled: threading.Event | None = None

    def ended(self, now: float) -> str | None:
        """'cancelled' or 'timeout' when the row must stop now, else None."""
        if self.cancelled is not None and self.cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "timeout"
        return None


@dataclass
class GenOut:
    """What one row produced: the new text and its token counts."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # "stop" (EOS or a stop string), "length" (hit max_new_tokens), "timeout" (the row's deadline passed),
    # "cancelled" (its caller went away), the last two keep the text generated so far; or "error" (an external
    # engine refused this row: ``error`` says why, and there is no text).
    finish_reason: str = "stop"
    error: str | None = None


@runtime_checkable
class Engine(Protocol):
    """What the refine/judge/chat logic needs from an engine."""

    name: str

    @property
    def model_id(self) -> str: ...

    @property
    def revision(self) -> str: ...

    @property
    def supports_prob_judge(self) -> bool: ...

    @property
    def supports_prefill(self) -> bool: ...

    @property
    def max_new_tokens_limit(self) -> int | None: ...

    def generate_rows(self, rows: list[GenRow]) -> list[GenOut]: ...


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def plain_render(messages: list[dict[str, str]], continue_final: bool) -> str:
    """A chat as plain text, for tokenizers without a chat template (the tiny test model).

    A single user message is sent as it is (a bare prompt); longer chats use the training
    template's ``Human:``/``Assistant:`` turns.
    """
    if len(messages) == 1 and messages[0]["role"] == "user" and not continue_final:
        return messages[0]["content"]
    parts = []
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system":
            parts.append(m["content"] + "\n")
        elif m["role"] == "user":
            parts.append(f"Human: {m['content']}\n")
        elif last and continue_final:
            parts.append(f"Assistant:{m['content']}")
        else:
            parts.append(f"Assistant:{m['content']}\n")
    if not continue_final:
        parts.append("Assistant:")
    return "".join(parts)


def render_chat(tok, use_template: bool, messages: list[dict[str, str]] | str, continue_final: bool = False) -> str:
    """The exact text fed to the model for one chat (a bare string is one user message).

    Through the tokenizer's chat template when ``use_template`` (an instruct model), else
    :func:`plain_render`. With ``continue_final`` the last (assistant) message is appended raw after
    the generation prompt of the chat before it, so the model continues that text. Every engine that
    runs a local model renders with this function, so they all see the same prompt text.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not use_template:
        return plain_render(messages, continue_final)
    head = messages[:-1] if continue_final else messages
    if not head:  # only an assistant prefix: nothing to template
        return messages[-1]["content"]
    text = tok.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
    return text + (messages[-1]["content"] if continue_final else "")


def _score_tokens_or_none(tok, model: str):
    """The score tokens of the probability-weighted judge, or None when a digit is several tokens."""
    from middo_ray.judge import score_tokens

    try:
        return score_tokens(tok)
    except ValueError:
        logger.warning("model %s splits digits into several tokens: judge mode 'prob' is off", model)
        return None


def _judge_rows(rows: list[dict]) -> list[dict]:
    """Wire samples as the diagnosis' row layout (single turn: no system prompt, no history)."""
    return [{"instruction": r.get("instruction", ""), "input": r.get("input") or "", "output": r.get("output") or "",
             "system": "", "history": ""} for r in rows]


def model_fingerprint(path: str) -> str:
    """A short content fingerprint of a checkpoint (for cache keys): a local directory, or a hub id's cached snapshot.

    Hashes config.json and, per weight file, its size and three 1 MiB windows (start, middle,
    end): retrained checkpoints of the same shape differ there, and a 16 GB model is not read whole.
    """
    p = Path(path)
    if not p.is_dir():
        try:  # a hub id: fingerprint the cached snapshot (its directory name is the commit)
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache: the id is all we know
            return hashlib.sha256(path.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for off in sorted({0, max(0, size // 2 - 2**19), max(0, size - 2**20)}):
                    fh.seek(off)
                    h.update(fh.read(2**20))
    return h.hexdigest()[:16]


class _LocalModel:
    """What the engines that know the model's tokenizer share (transformers and vLLM): identity,
    prompt rendering, the context length and the score tokens of the probability judge."""

    def _init_local(self, model: str, tok, max_len: int) -> None:
        from middo_ray.models import resolve_model

        self._spec = model
        self._tok = tok
        self._use_template = bool(getattr(tok, "chat_template", None))
        self._revision = model_fingerprint(resolve_model(model))
        self._max_len = int(max_len or 0)            # 0 = unknown
        self._score_tokens = _score_tokens_or_none(tok, model)

    @property
    def model_id(self) -> str:
        """The model spec this engine was built from (what responses report as 'model')."""
        return self._spec

    @property
    def revision(self) -> str:
        """Content fingerprint of the loaded checkpoint."""
        return self._revision

    @property
    def supports_prob_judge(self) -> bool:
        """Whether judge mode 'prob' works (every digit is one token)."""
        return self._score_tokens is not None

    @property
    def supports_prefill(self) -> bool:
        return True

    @property
    def max_new_tokens_limit(self) -> int | None:
        """Most tokens one row may generate and still leave room for a prompt of 64 tokens."""
        return max(1, self._max_len - 64) if self._max_len else None

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        return self._use_template

    def render(self, messages: list[dict[str, str]] | str, continue_final: bool = False) -> str:
        """The exact text fed to the model for one chat (see :func:`render_chat`)."""
        return render_chat(self._tok, self._use_template, messages, continue_final)

    def _judge_setup(self, template: str, cutoff_len: int) -> tuple[str, int]:
        """The judge's template ('auto' resolved) and a cutoff that stays inside the context."""
        if template == "auto":
            template = "chat" if self._use_template else "default"
        if self._max_len:
            cutoff_len = min(int(cutoff_len), self._max_len - 16)
        return template, int(cutoff_len)


def describe(engine: Engine) -> dict[str, Any]:
    """Identity of an engine for cache keys and /healthz."""
    return {"engine": engine.name, "model": engine.model_id, "revision": engine.revision,
            "judge_modes": ["prob", "generate"] if engine.supports_prob_judge else ["generate"],
            "prefill": engine.supports_prefill, "ifd": bool(getattr(engine, "supports_ifd", False))}
