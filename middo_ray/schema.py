"""The row contract shared by every stage, and the wire models of the refiner HTTP API.

Canonical row (one SFT sample) is the LLaMA-Factory alpaca layout extended with ``system`` and
``history``, which holds both single-turn alpaca rows and multi-turn conversations losslessly:

- ``instruction``: the last user turn; ``input``: optional extra context (alpaca);
- ``output``: the last assistant turn (the response whose loss is measured and trained on);
- ``system``: system prompt or ""; ``history``: JSON list of earlier ``[user, assistant]`` pairs, "" if none.

Every row also carries ``sample_id`` (content hash, stable across runs and machines) and lineage:
``parent_id``, ``origin``, ``round``, ``trigger`` (JSON of the scores that caused a change).
Stages join on ``sample_id``, never on position. The HTTP wire models of the refiner live in
:mod:`middo_ray.wire`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal


TEXT_COLUMNS = ("instruction", "input", "output", "system", "history")
LINEAGE_COLUMNS = ("sample_id", "parent_id", "origin", "round", "trigger")
ROW_COLUMNS = TEXT_COLUMNS + LINEAGE_COLUMNS

# The three axes of the diagnosis, in the order of flag columns, thresholds and reports.
AXES = ("complexity", "diversity", "quality")
Axis = Literal["complexity", "diversity", "quality"]
# What each axis asks the refiner for, and the order of one sample's refine jobs (the two rewrites that
# replace it, then the new sample it seeds).
OPERATION_OF_AXIS = {"complexity": "simplify", "quality": "improve", "diversity": "synthesize"}
AXIS_OF_OPERATION = {op: axis for axis, op in OPERATION_OF_AXIS.items()}
JOB_AXES = ("complexity", "quality", "diversity")
REPLACING_AXES = ("complexity", "quality")
OPERATIONS = ("simplify", "improve", "synthesize")   # the order requests are planned in
ORIGINS = ("seed", "complexity", "quality", "diversity")
Origin = Literal["seed", "complexity", "quality", "diversity"]

# Columns produced by diagnosis (one value per sample).
SIGNAL_COLUMNS = (
    "loss_pre", "loss_cur", "n_response_tokens", "truncated",
    "q_prompt_factuality", "q_prompt_clarity", "q_prompt_completeness",
    "q_response_factuality", "q_response_clarity", "q_response_completeness",
    "quality", "knn_sim",
)
JUDGE_DIMENSIONS = ("factuality", "clarity", "completeness")


def sample_id(instruction: str, input: str = "", output: str = "", system: str = "", history: str = "") -> str:
    """Content hash of a sample: identical samples get identical ids on every machine.

    The fields are hashed as a JSON list so that no concatenation of two fields can collide
    with another split of the same characters.
    """
    payload = json.dumps([system, history, instruction, input, output], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def make_row(instruction: str, output: str, input: str = "", system: str = "", history: list | str | None = None,
             parent_id: str | None = None, origin: str = "seed", round: int = 0,
             trigger: dict | None = None) -> dict[str, Any]:
    """Builds a canonical row with its id and lineage fields filled in."""
    hist = history if isinstance(history, str) else (json.dumps(history, ensure_ascii=False) if history else "")
    return {
        "instruction": instruction, "input": input, "output": output, "system": system, "history": hist,
        "sample_id": sample_id(instruction, input, output, system, hist),
        "parent_id": parent_id, "origin": origin, "round": int(round),
        "trigger": json.dumps(trigger, sort_keys=True) if trigger else "",
    }


def prompt_text(row: dict) -> str:
    """The prompt as the reference embeds and rewrites it: instruction, then input on a new line."""
    inp = row.get("input") or ""
    return f"{row['instruction']}\n{inp}" if inp else row["instruction"]


def missing_columns(columns: list[str] | set[str], required: tuple[str, ...] | list[str]) -> list[str]:
    have = set(columns)
    return [c for c in required if c not in have]


def require_columns(stage: str, columns, required) -> None:
    """Raises a clear error when a stage's input lacks columns it needs."""
    miss = missing_columns(columns, required)
    if miss:
        raise KeyError(f"stage '{stage}' needs columns {miss} but its input has {sorted(columns)}; "
                       f"run the stages in order (diagnose -> select -> refine -> merge)")
