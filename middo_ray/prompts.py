"""Every prompt the system sends to a model, and the parsers of what comes back.

All texts are written for this project, following the structure the Middo reference uses
(reference doc §2-4): a four-step rewrite with a final marker for simplify/improve, a two-hint
synthesis with a ``#New Prompt#:`` marker, and a 0-10 self-judgement per dimension that asks for the
number first. Pure functions; no model or tokenizer imports.
"""

from __future__ import annotations

import json
import re

# ---------------------------------------------------------------------------------------------
# Training / scoring template.
#
# 'default' is LLaMA-Factory's default template, which the reference trains and scores with:
#   [system + "\n"] ["Human: u\nAssistant:" a <eos> "\n"]*  "Human: {instruction}\n{input}\nAssistant:"
# and the response (followed by EOS) is what the loss is computed on.


def own_query(row: dict) -> str:
    """The sample's own prompt text: its instruction and input, as its last user turn carries them."""
    inp = row.get("input") or ""
    return f"{row['instruction']}\n{inp}" if inp else row["instruction"]


def default_prompt(row: dict, eos_token: str = "") -> str:
    """Renders everything before the response with the 'default' template."""
    parts: list[str] = []
    if row.get("system"):
        parts.append(row["system"] + "\n")
    history = row.get("history") or ""
    for user, assistant in (json.loads(history) if history else []):
        parts.append(f"Human: {user}\nAssistant:{assistant}{eos_token}\n")
    parts.append(f"Human: {own_query(row)}\nAssistant:")
    return "".join(parts)


def chat_messages(row: dict, with_response: bool = False) -> list[dict]:
    """The sample as OpenAI-style messages (for chat templates and messages export)."""
    msgs: list[dict] = []
    if row.get("system"):
        msgs.append({"role": "system", "content": row["system"]})
    history = row.get("history") or ""
    for user, assistant in (json.loads(history) if history else []):
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": assistant})
    msgs.append({"role": "user", "content": own_query(row)})
    if with_response:
        msgs.append({"role": "assistant", "content": row.get("output", "")})
    return msgs


# ---------------------------------------------------------------------------------------------
# Self-judge prompts (quality axis). Each judgement is a shared *body* (task + the sample) followed
# by a short *tail* that names the dimension and ends with "Score:". The three judgements of one
# target share the body, so the judge computes the body once and the three tails against its cache;
# the tail is the same for every sample. The number comes right after "Score:": the
# probability-weighted judge reads the distribution of that token, a generating judge writes it first.

_DIM_TEXT = {
    "factuality": "factuality (is it accurate and grounded in reliable facts?)",
    "clarity": "clarity (is the language clear and concise, and is it well structured?)",
    "completeness": "completeness (does it give enough information and detail?)",
}


def judge_body(row: dict, target: str) -> str:
    """The part of a judge prompt shared by the three dimensions: the task and the sample."""
    if target not in ("prompt", "response"):
        raise ValueError(f"judge target must be 'prompt' or 'response', got '{target}'")
    inp = row.get("input") or ""
    body = f"Prompt:\n{row['instruction']}\n{inp}" if inp else f"Prompt:\n{row['instruction']}"
    if target == "response":
        body += f"\n\nResponse:\n{row.get('output', '')}"
    return ("Give feedback on a sample from an instruction-tuning dataset. Rate it from 0 to 10, where "
            "higher is better, and try to avoid scoring a full 10. Write the number first, then a short "
            f"explanation.\n\n{body}")


def judge_tail(dimension: str, target: str) -> str:
    """The dimension-specific end of a judge prompt (identical for every sample)."""
    if dimension not in _DIM_TEXT:
        raise ValueError(f"unknown judge dimension '{dimension}'; use one of {sorted(_DIM_TEXT)}")
    return f"\n\nRate the {_DIM_TEXT[dimension]} of the {target} only.\nScore:"


def judge_prompt(row: dict, dimension: str, target: str) -> str:
    """Full self-judge question for one dimension of the prompt ('prompt') or the response ('response')."""
    return judge_body(row, target) + judge_tail(dimension, target)


_SCORE_RE = re.compile(r"^\s*\**\s*(10(?:\.0+)?|\d(?:\.\d+)?)(?!\d)")


def parse_score(text: str) -> float | None:
    """Reads a 0-10 score that the judge wrote first. None when there is none (never 0).

    Unlike the reference's first-number regex, only a number at the start of the answer counts, so
    "1. The prompt ..." lists or "out of 10, I give 7" are not misread as scores.
    """
    m = _SCORE_RE.match(text or "")
    if not m:
        return None
    # "1." followed by a space or letter is a list marker, not a score.
    rest = text[m.end():m.end() + 2] if text else ""
    if m.group(1) == "1" and rest.startswith(".") and not rest[1:].isdigit():
        return None
    value = float(m.group(1))
    return value if 0.0 <= value <= 10.0 else None


# ---------------------------------------------------------------------------------------------
# Refiner prompts (teacher LLM). Markers are what parse_marked() looks for.

SIMPLIFY_MARKER = "#Final Rewritten Prompt#:"
IMPROVE_MARKER = "#Final Rewritten Prompt#:"
SYNTH_MARKER = "#New Prompt#:"

_SIMPLIFY = (
    "You are an expert at rewriting prompts. Rewrite the #Prompt# below so that a weaker open model "
    "(a small LLaMA or Qwen) can handle it and learn from it.\n"
    "Step 1: list ways to make the #Prompt# simpler.\n"
    "Step 2: make a plan from that list.\n"
    "Step 3: rewrite the prompt following the plan; you may change its scenario or context so the "
    "model learns the skill rather than memorising the item.\n"
    "Step 4: review the rewrite and give only the final prompt after the line '#Final Rewritten Prompt#:'.\n\n"
    "#Prompt#:\n{prompt}\n"
)

_IMPROVE = (
    "You are an expert at rewriting prompts. The #Prompt# below is of poor quality.\n"
    "Step 1: find why the #Prompt# is poor and list ways to improve it.\n"
    "Step 2: make a plan from that list.\n"
    "Step 3: rewrite it into a clear, accurate, complete prompt that a weaker open model can learn from.\n"
    "Step 4: review the rewrite and give only the final prompt after the line '#Final Rewritten Prompt#:'.\n\n"
    "#Prompt#:\n{prompt}\n"
)

_SYNTHESIZE = (
    "You are a creative prompt writer. Write one completely new, original prompt for training a weaker "
    "open model. Use the two #Hint Prompt#s as examples of the style and level, and take inspiration "
    "from the #Core Prompt#, but do not copy any of them. Give only the new prompt after the line "
    "'#New Prompt#:'.\n\n"
    "#Hint Prompt 1#:\n{hint1}\n\n#Hint Prompt 2#:\n{hint2}\n\n#Core Prompt#:\n{core}\n"
)

_ANSWER = "Give a comprehensive and accurate response to the following prompt.\n\n{prompt}"
_ANSWER_HQ = "Give a comprehensive, accurate and high-quality response to the following prompt.\n\n{prompt}"


def rewrite_prompt(operation: str, prompt: str, hints: list[str] | None = None) -> tuple[str, str]:
    """Teacher instruction for step 1 of an operation and the marker its answer must contain."""
    if operation == "simplify":
        return _SIMPLIFY.format(prompt=prompt), SIMPLIFY_MARKER
    if operation == "improve":
        return _IMPROVE.format(prompt=prompt), IMPROVE_MARKER
    if operation == "synthesize":
        h = list(hints or [])
        if len(h) < 2:
            raise ValueError("synthesize needs two hint prompts (the sample's 2 nearest neighbours)")
        return _SYNTHESIZE.format(hint1=h[0], hint2=h[1], core=prompt), SYNTH_MARKER
    raise ValueError(f"unknown operation '{operation}'; use simplify, improve or synthesize")


def answer_prompt(operation: str, prompt: str) -> str:
    """Teacher instruction for step 2: a fresh answer to the (new) prompt."""
    return (_ANSWER_HQ if operation == "improve" else _ANSWER).format(prompt=prompt)


def parse_marked(text: str, marker: str) -> str | None:
    """Text after the first marker, trimmed and unquoted; None when the marker is missing or it is empty."""
    if not text:
        return None
    pos = text.find(marker)
    if pos < 0:
        return None
    out = text[pos + len(marker):].strip()
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'":
        out = out[1:-1].strip()
    return out or None


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def validate_rewrite(new: str | None, original: str, min_chars: int = 8, max_chars: int = 4000) -> str | None:
    """Why a rewritten prompt is unusable, or None when it is fine."""
    if new is None:
        return "marker missing or empty output"
    if len(new.strip()) < min_chars:
        return f"output shorter than {min_chars} characters"
    if len(new) > max_chars:
        return f"output longer than {max_chars} characters"
    if _norm(new) == _norm(original):
        return "output echoes the input"
    for marker in (SIMPLIFY_MARKER, SYNTH_MARKER, "#Prompt#", "#Hint Prompt", "#Core Prompt#"):
        if marker in new:
            return f"output still contains the template marker '{marker}'"
    return None


def validate_answer(answer: str | None, prompt: str, min_chars: int = 2, max_chars: int = 8000) -> str | None:
    """Why a generated answer is unusable, or None when it is fine."""
    if answer is None or len(answer.strip()) < min_chars:
        return "empty answer"
    if len(answer) > max_chars:
        return f"answer longer than {max_chars} characters"
    if _norm(answer) == _norm(prompt):
        return "answer echoes the prompt"
    return None
