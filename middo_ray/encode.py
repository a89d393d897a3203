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

from middo_ray.prompts import chat_messages, default_prompt, own_query


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_len: int          # tokens [0, prompt_len) are prompt (masked); the rest is response
    truncated: bool
    # Tokens [start, end) that the prompt embedding pools (diagnosis); None = the whole prompt.
    pool: tuple[int, int] | None = None

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


def _own_span(text: str, offsets: list[tuple[int, int]], row: dict) -> tuple[int, int] | None:
    """The tokens of the rendered prompt ``text`` (with their character ``offsets``) that hold the sample's
    own query, its last occurrence; None when it is not found (then the whole prompt is pooled)."""
    query = own_query(row).strip()
    at = text.rfind(query) if query else -1
    inside = [i for i, (a, b) in enumerate(offsets) if b > at and a < at + len(query)] if at >= 0 else []
    return (inside[0], inside[-1] + 1) if inside else None


def encode_row(row: dict, tokenizer, template: str = "default", cutoff_len: int = 512,
               response: str | None = None) -> Encoded:
    """Encodes one row; ``response`` overrides the row's output (used for empty-prompt passes).

    Under the chat template the prompt embedding pools the sample's own query only (``Encoded.pool``): the
    template's system prompt and role markers are shared by every row and would raise every similarity.
    Under the default template it pools the whole rendered prompt (the template adds ``Human: `` and
    ``\nAssistant:`` only)."""
    text = render_prompt(row, tokenizer, template)
    pool = None
    if template == "chat" and response is None and getattr(tokenizer, "is_fast", False):
        tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        prompt_ids = tokens["input_ids"]
        pool = _own_span(text, tokens["offset_mapping"], row)
    else:
        prompt_ids = _ids(tokenizer, text)
    if template == "default" and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    answer = row.get("output", "") if response is None else response
    resp_ids = _ids(tokenizer, answer) + [tokenizer.eos_token_id]
    enc = _apply_cutoff(prompt_ids, resp_ids, cutoff_len)
    if pool is not None:
        drop = len(prompt_ids) - enc.prompt_len          # prompt tokens cut from the start by the cutoff rule
        start, end = max(pool[0] - drop, 0), max(pool[1] - drop, 0)
        enc.pool = (start, end) if end > start else None
    return enc


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
