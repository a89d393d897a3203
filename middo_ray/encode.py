"""Turns canonical rows into token ids with the response span marked, for scoring and training.

Prompt and response are tokenized separately and concatenated (as LLaMA-Factory does), so the
boundary between masked prompt tokens and scored response tokens is exact. The response is followed
by the EOS token, which is scored and trained on (reference §2).

Cutoff rule (samples longer than ``cutoff_len`` tokens): the response keeps
``max(cutoff_len - prompt_len, cutoff_len // 2)`` tokens at most (its start, EOS dropped if cut) and the
prompt keeps its *last* ``cutoff_len - response_len`` tokens (the question is usually at the end).
Such samples are marked ``truncated``.
"""

from __future__ import annotations

from dataclasses import dataclass

from middo_ray.prompts import chat_messages, default_prompt


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_len: int          # tokens [0, prompt_len) are prompt (masked); the rest is response
    truncated: bool

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def render_prompt(row: dict, tokenizer, template: str = "default") -> str:
    """Text of everything before the response under the chosen template."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.template='chat' but the tokenizer has no chat template; use template='default'")
        return tokenizer.apply_chat_template(chat_messages(row), tokenize=False, add_generation_prompt=True)
    return default_prompt(row, eos_token=tokenizer.eos_token or "")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_row(row: dict, tokenizer, template: str = "default", cutoff_len: int = 512,
               response: str | None = None) -> Encoded:
    """Encodes one row; ``response`` overrides the row's output (used for empty-prompt passes)."""
    prompt_ids = _ids(tokenizer, render_prompt(row, tokenizer, template))
    if template == "default" and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    text = row.get("output", "") if response is None else response
    resp_ids = _ids(tokenizer, text) + [tokenizer.eos_token_id]
    return _apply_cutoff(prompt_ids, resp_ids, cutoff_len)


def _apply_cutoff(prompt_ids: list[int], resp_ids: list[int], cutoff_len: int) -> Encoded:
    total = len(prompt_ids) + len(resp_ids)
    if total <= cutoff_len:
        return Encoded(prompt_ids + resp_ids, len(prompt_ids), False)
    resp_keep = min(len(resp_ids), max(cutoff_len - len(prompt_ids), cutoff_len // 2))
    prompt_keep = cutoff_len - resp_keep
    kept_prompt = prompt_ids[len(prompt_ids) - prompt_keep:] if prompt_keep > 0 else []
    return Encoded(kept_prompt + resp_ids[:resp_keep], len(kept_prompt), True)


def empty_prompt_variant(enc: Encoded, row: dict, tokenizer, template: str = "default") -> Encoded:
    """The same response tokens (as kept by the cutoff rule) after the template with an empty prompt.

    Its loss is the denominator of IFD: how well the model predicts the response without being told
    the instruction. System text and history are dropped too, so only the bare template remains.
    """
    empty = {"instruction": "", "input": "", "output": "", "system": "", "history": "[]"}
    prompt_ids = _ids(tokenizer, render_prompt(empty, tokenizer, template))
    if template == "default" and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    return Encoded(prompt_ids + enc.input_ids[enc.prompt_len:], len(prompt_ids), enc.truncated)


def encode_prompt_only(row: dict, tokenizer, template: str = "default", cutoff_len: int = 512) -> list[int]:
    """Prompt tokens alone (for generation), left-truncated to the cutoff."""
    ids = _ids(tokenizer, render_prompt(row, tokenizer, template))
    return ids[-cutoff_len:]
