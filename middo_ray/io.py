"""Reading and writing SFT data: alpaca JSON/JSONL, chat messages (OpenAI or ShareGPT), Parquet.

Every input row becomes either a canonical row (see :mod:`middo_ray.schema`) or a reject that says
which row it was and why it was refused, so one bad line never stops a run and nothing is dropped
silently. Writers turn canonical rows back into each format, into a lineage Parquet file, and into
files that LLaMA-Factory and TRL read directly.

Row numbers in rejects are 1-based: the physical line number for JSONL (so an editor jumps to it)
and the position in the list or table for JSON and Parquet.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from middo_ray.prompts import chat_messages
from middo_ray.schema import ROW_COLUMNS, TEXT_COLUMNS, make_row

FORMATS = ("alpaca", "messages", "parquet")
STYLES = ("alpaca", "openai", "sharegpt")
_EXTENSIONS = (".json", ".jsonl", ".parquet")

# Role names of each chat style, mapped to the canonical ones. ShareGPT files in the wild also use
# the OpenAI names, so those are accepted there too.
_OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_TO_CANON = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                      "assistant": "assistant"}
_CANON_TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


class RowError(ValueError):
    """A single input row cannot become a canonical row; the message is the reject reason."""


@dataclass
class ReadResult:
    """What :func:`read_dataset` found in a file.

    Attributes:
        rows: Canonical rows (``schema.make_row``, origin "seed", round 0), in file order.
        rejects: ``{"line", "reason", "raw"}`` for every input row that was refused.
        format: "alpaca" | "messages" | "parquet" (the container/layout that was read).
        style: "alpaca" | "openai" | "sharegpt" (how the rows were laid out).
        n_input: Number of input rows seen; always ``len(rows) + len(rejects)``.
    """

    rows: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    format: str = "alpaca"
    style: str = "alpaca"
    n_input: int = 0


@dataclass
class _Record:
    """One input row before parsing: its number, its raw text, and its decoded value or why not."""

    line: int
    raw: str
    value: Any = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# Paths and format detection


def resolve_data_path(path: str | Path) -> Path:
    """Turns a data path from the config into an existing file.

    Args:
        path: "demo" for the packaged demo seed set, or a path to a .json/.jsonl/.parquet file.

    Returns:
        The path of an existing file.

    Raises:
        FileNotFoundError: The file does not exist; the message names it and the fix.
    """
    if str(path) == "demo":
        # Imported here so that io stays importable even if the demo package is being regenerated.
        from middo_ray.demo import demo_path

        resolved = demo_path("seed")
        if not resolved.is_file():
            raise FileNotFoundError(f"the packaged demo seed set {resolved} is missing; "
                                    f"regenerate it with `python -m middo_ray.demo.generate`")
        return resolved
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"data file '{path}' not found (resolved to {resolved.resolve()}); "
                                f"set data.path to an existing .json/.jsonl/.parquet file, or to 'demo' "
                                f"for the bundled demo set")
    return resolved


def _extension(path: Path) -> str:
    """Lower-case extension of a data file, or a ValueError naming the supported ones."""
    ext = path.suffix.lower()
    if ext not in _EXTENSIONS:
        raise ValueError(f"cannot read '{path}': unsupported extension '{ext or '(none)'}'; "
                         f"supported: {', '.join(_EXTENSIONS)}")
    return ext


def _layout_of_keys(keys: Iterable[str]) -> str | None:
    """Row layout ("alpaca" | "messages") implied by a row's keys, or None when neither fits."""
    keys = set(keys)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    return None


def _unknown_layout_error(path: Path, keys: Iterable[str]) -> ValueError:
    return ValueError(
        f"cannot tell the format of '{path}': its first row has keys {sorted(keys)}; supported: "
        f"alpaca (instruction, output, optional input/system/history), "
        f"messages (OpenAI 'messages' with role/content, or ShareGPT 'conversations' with from/value), "
        f"parquet (alpaca columns or a 'messages' column)")


def _first_object(records: list[_Record]) -> dict | None:
    """The first input row that decoded to a JSON object (rows before it may be broken)."""
    for rec in records:
        if rec.error is None and isinstance(rec.value, dict):
            return rec.value
    return None


def detect_format(path: str | Path) -> str:
    """Detects the format of a data file from its extension and its first valid row.

    Args:
        path: A .json (list of rows), .jsonl or .parquet file.

    Returns:
        "parquet" for .parquet files, otherwise "alpaca" or "messages".

    Raises:
        ValueError: Unsupported extension, no valid row, or keys of no supported format.
    """
    path = Path(path)
    if _extension(path) == ".parquet":
        return "parquet"
    first = _first_object(_load_records(path))
    if first is None:
        raise ValueError(f"cannot tell the format of '{path}': it has no row that is a JSON object")
    layout = _layout_of_keys(first)
    if layout is None:
        raise _unknown_layout_error(path, first.keys())
    return layout


# ---------------------------------------------------------------------------------------------
# Loading raw records


def _load_jsonl(path: Path) -> list[_Record]:
    """One record per non-blank line; a line that is not JSON becomes a record with an error."""
    records: list[_Record] = []
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue  # blank lines are layout, not rows
            try:
                records.append(_Record(number, text, json.loads(text)))
            except json.JSONDecodeError as err:
                records.append(_Record(number, text, error=f"invalid JSON line: {err.msg} at column {err.colno}"))
    return records


def _looks_like_jsonl(text: str) -> bool:
    """True when the first non-blank line is a complete JSON value (a .json file holding JSONL)."""
    for line in text.splitlines():
        if line.strip():
            try:
                json.loads(line)
                return True
            except json.JSONDecodeError:
                return False
    return False


def _load_json(path: Path) -> list[_Record]:
    """Records of a .json file that holds a list of rows (or, tolerated, JSON lines)."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if _looks_like_jsonl(text):
            return _load_jsonl(path)
        # A broken JSON list cannot be split into rows, so the whole file is refused.
        raise ValueError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"a .json file must hold a list of rows (use .jsonl for one row per line)") from err
    if isinstance(data, dict):
        raise ValueError(f"'{path}' holds one JSON object, not a list of rows; "
                         f"wrap the rows in a list or write them as .jsonl")
    if not isinstance(data, list):
        raise ValueError(f"'{path}' must hold a JSON list of rows, found {type(data).__name__}")
    return [_Record(i, json.dumps(v, ensure_ascii=False), v) for i, v in enumerate(data, start=1)]


def _load_parquet(path: Path) -> list[_Record]:
    """Records of a Parquet file, one per table row."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    return [_Record(i, json.dumps(v, ensure_ascii=False, default=str), v) for i, v in enumerate(rows, start=1)]


def _load_records(path: Path) -> list[_Record]:
    ext = _extension(path)
    if ext == ".jsonl":
        return _load_jsonl(path)
    if ext == ".json":
        return _load_json(path)
    return _load_parquet(path)


# ---------------------------------------------------------------------------------------------
# Parsing one row


def _optional_text(obj: dict, key: str) -> str:
    """An optional text field: missing or null is "", anything other than a string is an error."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"non-string field '{key}' ({type(value).__name__})")
    return value


def _required_text(obj: dict, key: str) -> str:
    """A required text field that must be a non-blank string."""
    if key not in obj or obj[key] is None:
        raise RowError(f"missing {key}")
    value = obj[key]
    if not isinstance(value, str):
        raise RowError(f"non-string field '{key}' ({type(value).__name__})")
    if not value.strip():
        raise RowError(f"empty {key}")
    return value


def _parse_history(value: Any) -> list[list[str]]:
    """History as a list of [user, assistant] string pairs, from a list or its JSON string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError(f"history is a string but not JSON ({err.msg})") from err
    if not isinstance(value, (list, tuple)):
        raise RowError(f"history must be a list of [user, assistant] pairs, got {type(value).__name__}")
    pairs: list[list[str]] = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError(f"history item {i} must be a [user, assistant] pair")
        if not all(isinstance(t, str) for t in pair):
            raise RowError(f"non-string fields in history item {i}")
        pairs.append([pair[0], pair[1]])
    return pairs


def _parse_alpaca(obj: dict) -> dict:
    """Canonical row from an alpaca row (LLaMA-Factory style: optional system and history)."""
    instruction = _required_text(obj, "instruction")
    output = _required_text(obj, "output")
    return make_row(instruction=instruction, output=output, input=_optional_text(obj, "input"),
                    system=_optional_text(obj, "system"), history=_parse_history(obj.get("history")),
                    origin="seed", round=0)


def _chat_turns(obj: dict) -> tuple[list[tuple[str, str]], str]:
    """(role, content) turns with canonical roles, and the style ("openai" | "sharegpt") they came in."""
    if "messages" in obj:
        key, style, role_key, text_key, roles = "messages", "openai", "role", "content", _OPENAI_ROLES
    else:
        key, style, role_key, text_key, roles = "conversations", "sharegpt", "from", "value", _SHAREGPT_TO_CANON
    turns = obj[key]
    if not isinstance(turns, (list, tuple)) or not all(isinstance(t, dict) for t in turns):
        raise RowError(f"'{key}' must be a list of {{{role_key}, {text_key}}} objects")
    out: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        role = turn.get(role_key)
        if role not in roles:
            raise RowError(f"unknown role {role!r} in {key}[{i}]; expected one of {sorted(roles)}")
        text = turn.get(text_key)
        if not isinstance(text, str):
            raise RowError(f"non-string field '{text_key}' in {key}[{i}] ({type(text).__name__})")
        out.append((roles[role], text))
    return out, style


def _split_system(turns: list[tuple[str, str]], top_level: str) -> tuple[str, list[tuple[str, str]]]:
    """Takes the system prompt off the front; a system turn anywhere else is an error."""
    system, rest = top_level, turns
    if turns and turns[0][0] == "system":
        if top_level:
            raise RowError("both a top-level 'system' and a system message")
        system, rest = turns[0][1], turns[1:]
    if any(role == "system" for role, _ in rest):
        raise RowError("a system message is only allowed as the first message")
    return system, rest


def _check_alternation(turns: list[tuple[str, str]]) -> None:
    """Conversation must have a user turn, alternate user/assistant, and end with the assistant."""
    if not any(role == "user" for role, _ in turns):
        raise RowError("messages with no user turn")
    if turns[-1][0] != "assistant":
        raise RowError("conversation does not end with an assistant turn")
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RowError(f"turns must alternate user/assistant starting with user; turn {i} is {role}")


def _parse_messages(obj: dict) -> tuple[dict, str]:
    """Canonical row and style from an OpenAI ``messages`` or ShareGPT ``conversations`` row."""
    turns, style = _chat_turns(obj)
    system, turns = _split_system(turns, _optional_text(obj, "system"))
    _check_alternation(turns)
    history = [[turns[i][1], turns[i + 1][1]] for i in range(0, len(turns) - 2, 2)]
    last_user, last_assistant = turns[-2][1], turns[-1][1]
    if not last_user.strip():
        raise RowError("empty instruction (last user turn)")
    if not last_assistant.strip():
        raise RowError("empty output (last assistant turn)")
    row = make_row(instruction=last_user, output=last_assistant, system=system, history=history,
                   origin="seed", round=0)
    return row, style


def _parse_record(rec: _Record, layout: str) -> tuple[dict, str]:
    """Canonical row and style of one record, or RowError with the reject reason."""
    if rec.error is not None:
        raise RowError(rec.error)
    if not isinstance(rec.value, dict):
        raise RowError(f"not an object (a JSON {type(rec.value).__name__})")
    if layout == "messages":
        if "messages" not in rec.value and "conversations" not in rec.value:
            raise RowError(f"no 'messages' or 'conversations' key (keys: {sorted(rec.value)})")
        return _parse_messages(rec.value)
    return _parse_alpaca(rec.value), "alpaca"


# ---------------------------------------------------------------------------------------------
# read_dataset


def _resolve_layout(path: Path, fmt: str, records: list[_Record]) -> tuple[str, str]:
    """(format to report, row layout to parse with) for a requested format and the file's content."""
    if fmt not in ("auto",) + FORMATS:
        raise ValueError(f"unknown data format '{fmt}'; use auto, {', '.join(FORMATS)}")
    is_parquet = _extension(path) == ".parquet"
    if fmt == "parquet" and not is_parquet:
        raise ValueError(f"format 'parquet' was requested but '{path}' is not a .parquet file")
    if fmt in ("alpaca", "messages"):
        return ("parquet" if is_parquet else fmt), fmt
    first = _first_object(records)
    if first is None:
        # Nothing valid to look at: every row will be rejected anyway, so any layout will do.
        return ("parquet" if is_parquet else "alpaca"), "alpaca"
    layout = _layout_of_keys(first)
    if layout is None:
        raise _unknown_layout_error(path, first.keys())
    return ("parquet" if is_parquet else layout), layout


def _reject(rec: _Record, reason: str) -> dict:
    return {"line": rec.line, "reason": reason, "raw": rec.raw}


def _write_rejects(rejects: list[dict], path: str | Path) -> None:
    """Rejects as JSONL; the file is always created so that 'no rejects' is visible too."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for rej in rejects:
            fh.write(json.dumps(rej, ensure_ascii=False) + "\n")


def read_dataset(path: str | Path, format: str = "auto", rejects_path: str | Path | None = None) -> ReadResult:
    """Reads an SFT data file into canonical rows; every input row becomes a row or a reject.

    Args:
        path: "demo" or a .json (list), .jsonl or .parquet file.
        format: "auto" (extension + first valid row's keys), "alpaca", "messages" or "parquet".
        rejects_path: Where to write the rejects as JSONL (created even when there are none).

    Returns:
        A :class:`ReadResult`. Exact duplicates (same ``sample_id``) keep the first occurrence; the
        later ones are rejected with the row number of the first.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unsupported extension, unreadable .json list, or an unknown row layout.
    """
    src = resolve_data_path(path)
    records = _load_records(src)
    fmt, layout = _resolve_layout(src, format, records)
    result = ReadResult(format=fmt, style="alpaca" if layout == "alpaca" else "", n_input=len(records))
    first_seen: dict[str, int] = {}
    for rec in records:
        try:
            row, style = _parse_record(rec, layout)
        except RowError as err:
            result.rejects.append(_reject(rec, str(err)))
            continue
        sid = row["sample_id"]
        if sid in first_seen:
            result.rejects.append(_reject(rec, f"exact duplicate of row {first_seen[sid]} (sample_id {sid})"))
            continue
        first_seen[sid] = rec.line
        result.style = result.style or style
        result.rows.append(row)
    # A messages file with no valid row still needs a style for writers; OpenAI is the common one.
    result.style = result.style or "openai"
    if result.n_input != len(result.rows) + len(result.rejects):
        raise AssertionError(f"row accounting is broken: {result.n_input} input rows, "
                             f"{len(result.rows)} rows + {len(result.rejects)} rejects")
    if rejects_path is not None:
        _write_rejects(result.rejects, rejects_path)
    return result


# ---------------------------------------------------------------------------------------------
# Writers


def _history_pairs(row: dict) -> list[list[str]]:
    history = row.get("history") or ""
    return json.loads(history) if isinstance(history, str) and history else list(history or [])


def _alpaca_record(row: dict) -> dict:
    """Alpaca dict of a canonical row; system and history only when they are set."""
    rec: dict[str, Any] = {"instruction": row["instruction"], "input": row.get("input") or "",
                           "output": row["output"]}
    system, history = row.get("system") or "", _history_pairs(row)
    if system:
        rec["system"] = system
    if history:
        rec["history"] = history
    return rec


def _messages_record(row: dict, style: str) -> dict:
    """OpenAI ``messages`` or ShareGPT ``conversations`` dict of a canonical row."""
    msgs = chat_messages(row, with_response=True)
    if style == "sharegpt":
        return {"conversations": [{"from": _CANON_TO_SHAREGPT[m["role"]], "value": m["content"]} for m in msgs]}
    return {"messages": msgs}


def _write_jsonl(records: Iterable[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _write_json_list(records: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        json.dump(records, fh, ensure_ascii=False, indent=2)
        fh.write("\n")


def write_dataset(rows: list[dict], path: str | Path, format: str, style: str | None = None) -> Path:
    """Writes canonical rows in one of the input formats.

    Args:
        rows: Canonical rows.
        path: Output file; for alpaca a ``.jsonl`` suffix gives JSON lines, anything else a JSON list.
        format: "alpaca", "messages" (JSONL) or "parquet" (canonical + lineage columns).
        style: For "messages": "sharegpt" writes ``conversations`` with from/value; otherwise OpenAI
            ``messages``. Ignored by the other formats.

    Returns:
        The path written.

    Note:
        Chat formats have no separate ``input`` field, so a row with ``input`` is written with it
        appended to the user turn (exactly as the training template renders it); reading that file
        back gives the same text but a different ``sample_id``.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "alpaca":
        records = [_alpaca_record(r) for r in rows]
        if out.suffix.lower() == ".jsonl":
            _write_jsonl(records, out)
        else:
            _write_json_list(records, out)
    elif format == "messages":
        _write_jsonl((_messages_record(r, style or "openai") for r in rows), out)
    elif format == "parquet":
        pq.write_table(_rows_table(rows, extra=False), out)
    else:
        raise ValueError(f"unknown output format '{format}'; use {', '.join(FORMATS)}")
    return out


# ---------------------------------------------------------------------------------------------
# Lineage Parquet

_CANON_TYPES: dict[str, pa.DataType] = {**{c: pa.string() for c in TEXT_COLUMNS},
                                        "sample_id": pa.string(), "parent_id": pa.string(),
                                        "origin": pa.string(), "round": pa.int64(), "trigger": pa.string()}


def _is_scalar(value: Any) -> bool:
    """Values a Parquet column can hold directly (numpy scalars included, containers not)."""
    return value is None or isinstance(value, (str, bool, numbers.Number, np.generic))


def _extra_columns(rows: list[dict]) -> list[str]:
    """Non-canonical keys whose values are scalar in every row, in first-seen order."""
    seen: dict[str, bool] = {}
    for row in rows:
        for key, value in row.items():
            if key in _CANON_TYPES:
                continue
            seen[key] = seen.get(key, True) and _is_scalar(value)
    return [k for k, ok in seen.items() if ok]


def _plain(value: Any) -> Any:
    """numpy scalars as Python scalars, so pyarrow infers one type per column."""
    return value.item() if isinstance(value, np.generic) else value


def _extra_array(rows: list[dict], key: str) -> pa.Array:
    values = [_plain(r.get(key)) for r in rows]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        # Mixed types (e.g. numbers and strings) cannot share a column type; keep them as text.
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _canon_value(row: dict, col: str) -> Any:
    value = row.get(col)
    if col in TEXT_COLUMNS and value is None:
        return ""
    if col == "history" and isinstance(value, list):
        return json.dumps(value, ensure_ascii=False) if value else ""
    return _plain(value)


def _rows_table(rows: list[dict], extra: bool) -> pa.Table:
    """Arrow table of the canonical columns (typed), plus the extra scalar columns if asked."""
    arrays = {c: pa.array([_canon_value(r, c) for r in rows], type=_CANON_TYPES[c]) for c in ROW_COLUMNS}
    if extra:
        for key in _extra_columns(rows):
            arrays[key] = _extra_array(rows, key)
    return pa.table(arrays)


def write_lineage(rows: list[dict], path: str | Path) -> Path:
    """Writes rows to Parquet with every canonical and lineage column and any extra scalar columns.

    Args:
        rows: Canonical rows, possibly carrying scores or flags (scalar values only are kept;
            a column holding lists or dicts in any row is left out).
        path: Output .parquet file.

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_rows_table(rows, extra=True), out)
    return out


# ---------------------------------------------------------------------------------------------
# Exports for trainers


def _llamafactory_entry(file_name: str, with_system: bool, with_history: bool) -> dict:
    """dataset_info.json entry for an alpaca file (LLaMA-Factory's column-mapping names)."""
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    if with_system:
        columns["system"] = "system"
    if with_history:
        columns["history"] = "history"
    return {"file_name": file_name, "formatting": "alpaca", "columns": columns}


def export_llamafactory(rows: list[dict], out_dir: str | Path, name: str) -> Path:
    """Writes ``<name>.json`` (alpaca) and its entry in ``dataset_info.json`` for LLaMA-Factory.

    Use it with ``dataset_dir: <out_dir>`` and ``dataset: <name>``. An existing dataset_info.json is
    updated, not replaced, so several exports can share one directory.

    Args:
        rows: Canonical rows.
        out_dir: Directory for both files (created if needed).
        name: Dataset name, used as the file stem and the dataset_info.json key.

    Returns:
        The path of the written ``<name>.json``.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with_system = any(r.get("system") for r in rows)
    with_history = any(r.get("history") for r in rows)
    # Mapped columns are written on every row: a key missing from some rows reads as null there.
    records = []
    for r in rows:
        rec = _alpaca_record(r)
        if with_system:
            rec["system"] = r.get("system") or ""
        if with_history:
            rec["history"] = _history_pairs(r)
        records.append(rec)
    data_file = root / f"{name}.json"
    _write_json_list(records, data_file)
    info_file = root / "dataset_info.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    info[name] = _llamafactory_entry(data_file.name, with_system, with_history)
    info_file.write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return data_file


def export_messages_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Writes OpenAI-style ``{"messages": [...]}`` JSONL, the layout TRL's SFTTrainer reads.

    Args:
        rows: Canonical rows.
        path: Output .jsonl file.

    Returns:
        The path written.
    """
    return write_dataset(rows, path, "messages", style="openai")


__all__ = [
    "FORMATS", "STYLES", "ReadResult", "RowError", "detect_format", "export_llamafactory",
    "export_messages_jsonl", "read_dataset", "resolve_data_path", "write_dataset", "write_lineage",
]
