"""Wire models of the OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A text-only subset of the Chat Completions API, enough for the official ``openai`` client and for
another copy of this app's external engine: messages (string or text-part content), ``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``top_p``, ``n``, ``seed``, ``stop``. Unknown fields are
ignored (clients send many optional ones); ``stream`` must be false (the schema says so). vLLM's
``continue_final_message`` is supported: the answer continues the last (assistant) message.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from middo_ray.wire import MAX_SEED, MAX_TEXT_CHARS, MAX_WIRE_TOKENS, Int, Text, bounded_int

MAX_MESSAGES = 256
MAX_CHOICES = 8


def _only_bool(value):
    # Literal[False] alone would take 0 (0 == False in Python).
    if not isinstance(value, bool):
        raise ValueError("Input should be a valid boolean")
    return value


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_In):
    type: Literal["text"] = Field(..., description="Only text parts are supported.")
    text: Text = Field(..., max_length=MAX_TEXT_CHARS)


class ChatMessage(_In):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Text, Field(max_length=MAX_TEXT_CHARS)] | list[TextPart] | None = Field(
        None, description="Text, or a list of text parts.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_In):
    model: Text = Field(..., max_length=512, description="Served model id (see GET /v1/models).")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_tokens: bounded_int(1, MAX_WIRE_TOKENS) | None = Field(None, description="Token cap of the answer.")
    max_completion_tokens: bounded_int(1, MAX_WIRE_TOKENS) | None = Field(
        None, description="Alias of max_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate (each with its own seed).")
    seed: bounded_int(-MAX_SEED, MAX_SEED) | None = None
    stop: Annotated[Text, Field(max_length=256)] | Annotated[list[Annotated[Text, Field(max_length=256)]],
                                                              Field(max_length=4)] | None = Field(
        None, description="Up to 4 strings of at most 256 characters that end the answer.")
    stream: Annotated[Literal[False], BeforeValidator(_only_bool)] = Field(
        False, description="Streaming is not supported; must be false.")
    continue_final_message: bool = Field(False, description="Continue the last message when it is the assistant's "
                                                            "(vLLM extension); ignored otherwise.")
    add_generation_prompt: bool = Field(True, description="Accepted for vLLM compatibility; implied by "
                                                          "continue_final_message.")

    def continues(self) -> bool:
        """Whether the answer continues the last message: asked for, and that message is the assistant's
        (otherwise the flag has nothing to continue and a normal answer is generated)."""
        return bool(self.continue_final_message) and self.messages[-1].role == "assistant"

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def token_cap(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def plain_messages(self) -> list[dict[str, str]]:
        # 'developer' is the newer name of 'system'.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(_Out):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Out):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "middo-ray"


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]
