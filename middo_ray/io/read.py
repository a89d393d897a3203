"""Reading SFT data: alpaca JSON/JSONL, chat messages (OpenAI or ShareGPT), Parquet.

Every input row becomes either a canonical row (see :mod:`middo_ray.schema`) or a reject that says which
row it was and why it was refused, so one bad line never stops a run and nothing is dropped silently.

A file is read in *chunks* so that many workers can parse one large file: :func:`plan_reading` finds the
format and splits the file (JSONL at line boundaries, Parquet at row groups; a JSON list is one chunk,
since it cannot be split without parsing all of it), and :func:`read_chunk` parses one chunk. Row numbers
in rejects are 1-based: the physical line number for JSONL (so an editor jumps to it) and the position in
the list or table for JSON and Parquet. :func:`read_dataset` reads a whole file in this process (tests,
the audit); the loop's data stage runs the same two steps on Ray (``middo_ray.data``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq

from middo_ray.schema import make_row, prompt_text
from middo_ray.wire import MAX_TEXT_CHARS

FORMATS = ("alpaca", "messages", "parquet")
STYLES = ("alpaca", "openai", "sharegpt")
_EXTENSIONS = (".json", ".jsonl", ".parquet")

# Role names of each chat style, mapped to the canonical ones. ShareGPT files in the wild also use
# the OpenAI names, so those are accepted there too.
_OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_TO_CANON = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                      "assistant": "assistant"}
CANON_TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


class RowError(ValueError):
    """A single input row cannot become a canonical row; the message is the reject reason."""


@dataclass
class ReadResult:
    """What :func:`read_dataset` found in a file.

    Attributes:
        rows: Canonical rows (``schema.make_row``, origin "seed", round 0), in file order.
        rejects: ``{"file", "line", "reason", "raw"}`` for every input row that was refused.
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
class ReadPlan:
    """How a file is read: its format, the row layout to parse with, and its chunks.

    Attributes:
        path: The file.
        format: "alpaca" | "messages" | "parquet" (what the run reports and writes back).
        layout: "alpaca" | "messages" (how each row is parsed).
        chunks: JSON-able dicts, each read by :func:`read_chunk` on its own: ``{"kind": "jsonl", "start",
            "end", "first_line"}`` (byte range), ``{"kind": "json"}`` or ``{"kind": "parquet",
            "row_groups", "first_row"}``.
    """

    path: str
    format: str
    layout: str
    chunks: list[dict]


@dataclass
class _Record:
    """One input row before parsing: its number, its raw text, and its decoded value or why not."""

    line: int
    raw: str
    value: Any = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# Paths and format detection


def check_data_file(path: str | Path, key: str = "data.path") -> Path:
    """The path of an existing data file with a supported extension.

    Raises:
        FileNotFoundError: The file does not exist; the message names it, the config key and the fix.
        ValueError: Unsupported extension.
    """
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"data file '{path}' not found (resolved to {resolved.resolve()}); set {key} to "
                                "an existing .json/.jsonl/.parquet file, or data.path to 'demo' for the bundled "
                                "demo set")
    _extension(resolved)
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


def _first_object(records: Iterable[_Record]) -> dict | None:
    """The first input row that decoded to a JSON object (rows before it may be broken)."""
    for rec in records:
        if rec.error is None and isinstance(rec.value, dict):
            return rec.value
    return None


def detect_format(path: str | Path) -> str:
    """Detects the format of a data file from its extension and its first valid row.

    Returns:
        "parquet" for .parquet files, otherwise "alpaca" or "messages".

    Raises:
        ValueError: Unsupported extension, no valid row, or keys of no supported format.
    """
    path = Path(path)
    if _extension(path) == ".parquet":
        return "parquet"
    first = _first_object(_iter_records(path))
    if first is None:
        raise ValueError(f"cannot tell the format of '{path}': it has no row that is a JSON object")
    layout = _layout_of_keys(first)
    if layout is None:
        raise _unknown_layout_error(path, first.keys())
    return layout


# ---------------------------------------------------------------------------------------------
# Raw records


def count_lines(data: bytes) -> int:
    """Line ends as Python's universal newlines count them (\\n, \\r\\n and a lone \\r each end a line)."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def lines_in(data: bytes) -> int:
    """Lines in a byte range that starts a line: its line ends, plus a last line without one."""
    return count_lines(data) + (0 if not data or data.endswith((b"\n", b"\r")) else 1)


def _jsonl_records(data: bytes, first_line: int, at_file_start: bool) -> list[_Record]:
    """One record per non-blank line of a byte range; a line that is not UTF-8 or not JSON is an error."""
    if at_file_start and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]                      # the UTF-8 byte-order mark, as the utf-8-sig codec drops it
    records: list[_Record] = []
    for number, raw in enumerate(data.splitlines(), start=first_line):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            records.append(_Record(number, raw.decode("utf-8", errors="replace"),
                                   error=f"invalid UTF-8 at byte {err.start} of the line"))
            continue
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


def _json_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"'{path}' is not UTF-8 text (byte {err.start}); a .json file must be UTF-8, or write the "
                         "rows as .jsonl, where a bad line is rejected on its own") from err


def _json_list_records(path: Path) -> list[_Record] | None:
    """Records of a .json file that holds a list of rows; None when it holds JSON lines instead."""
    text = _json_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if _looks_like_jsonl(text):
            return None
        # A broken JSON list cannot be split into rows, so the whole file is refused.
        raise ValueError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"a .json file must hold a list of rows (use .jsonl for one row per line)") from err
    if isinstance(data, dict):
        raise ValueError(f"'{path}' holds one JSON object, not a list of rows; "
                         f"wrap the rows in a list or write them as .jsonl")
    if not isinstance(data, list):
        raise ValueError(f"'{path}' must hold a JSON list of rows, found {type(data).__name__}")
    return [_Record(i, json.dumps(v, ensure_ascii=False), v) for i, v in enumerate(data, start=1)]


def _parquet_records(pf: pq.ParquetFile, row_groups: list[int], first_row: int) -> list[_Record]:
    rows = pf.read_row_groups(row_groups).to_pylist() if row_groups else []
    return [_Record(i, json.dumps(v, ensure_ascii=False, default=str), v) for i, v in enumerate(rows, start=first_row)]


def _iter_records(path: Path) -> Iterable[_Record]:
    """Records of a whole file, lazily for JSONL (format detection stops at the first good row)."""
    ext = _extension(path)
    if ext == ".parquet":
        pf = pq.ParquetFile(path)
        return _parquet_records(pf, list(range(pf.num_row_groups)), 1)
    if ext == ".json":
        recs = _json_list_records(path)
        if recs is not None:
            return recs
    return _jsonl_lazy(path)


def _jsonl_lazy(path: Path) -> Iterable[_Record]:
    with open(path, "rb") as fh:
        line = 1
        for i, raw in enumerate(fh):          # byte lines end at b"\n"; a lone b"\r" inside also ends one
            yield from _jsonl_records(raw, line, i == 0)
            line += lines_in(raw)


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


def _check_sizes(row: dict) -> None:
    """Refuses a row that some later step could not carry: the refine and judge requests take at most
    :data:`~middo_ray.wire.MAX_TEXT_CHARS` characters per text field, and a rewrite's prompt (a synthesis hint
    is another row's prompt) is the instruction and the input together."""
    prompt = len(prompt_text(row))
    if prompt > MAX_TEXT_CHARS:
        raise RowError(f"prompt (instruction and input) is {prompt:,} characters, over the {MAX_TEXT_CHARS:,} "
                       "that a refine request carries per text; shorten or split the row")
    for key in ("output", "system"):
        if len(row[key]) > MAX_TEXT_CHARS:
            raise RowError(f"{key} is {len(row[key]):,} characters, over the {MAX_TEXT_CHARS:,} that a refine "
                           "request carries per text; shorten or split the row")


def _parse_record(rec: _Record, layout: str) -> tuple[dict, str]:
    """Canonical row and style of one record, or RowError with the reject reason."""
    if rec.error is not None:
        raise RowError(rec.error)
    if not isinstance(rec.value, dict):
        raise RowError(f"not an object (a JSON {type(rec.value).__name__})")
    if layout == "messages":
        if "messages" not in rec.value and "conversations" not in rec.value:
            other = " (an alpaca row: this file was read as messages, from its first row or data.format; keep " \
                    "one format per file)" if _layout_of_keys(rec.value) == "alpaca" else ""
            raise RowError(f"no 'messages' or 'conversations' key (keys: {sorted(rec.value)}){other}")
        row, style = _parse_messages(rec.value)
    else:
        if _layout_of_keys(rec.value) == "messages" and "instruction" not in rec.value:
            key = "messages" if "messages" in rec.value else "conversations"
            raise RowError(f"a chat row ('{key}') in a file read as alpaca (from its first row or data.format); "
                           "keep one format per file, or convert the row to instruction/input/output")
        row, style = _parse_alpaca(rec.value), "alpaca"
    _check_sizes(row)
    return row, style


# ---------------------------------------------------------------------------------------------
# Planning and reading chunks


def resolve_layout(path: Path, fmt: str, first: dict | None) -> tuple[str, str]:
    """(format to report, row layout to parse with) for a requested format and the file's first object."""
    if fmt not in ("auto",) + FORMATS:
        raise ValueError(f"unknown data format '{fmt}'; use auto, {', '.join(FORMATS)}")
    is_parquet = _extension(path) == ".parquet"
    if fmt == "parquet" and not is_parquet:
        raise ValueError(f"format 'parquet' was requested but '{path}' is not a .parquet file")
    if fmt in ("alpaca", "messages"):
        return ("parquet" if is_parquet else fmt), fmt
    if first is None:
        # Nothing valid to look at: every row will be rejected anyway, so any layout will do.
        return ("parquet" if is_parquet else "alpaca"), "alpaca"
    layout = _layout_of_keys(first)
    if layout is None:
        raise _unknown_layout_error(path, first.keys())
    return ("parquet" if is_parquet else layout), layout


def _jsonl_chunks(path: Path, rows_per_chunk: int) -> list[dict]:
    """Byte ranges of about ``rows_per_chunk`` lines each, cut after a newline."""
    chunks: list[dict] = []
    start = pos = 0
    line = first_line = 1
    lines_in_chunk = 0
    with open(path, "rb") as fh:
        for raw in fh:                       # bytes lines end at b"\n" (the only cut point we use)
            pos += len(raw)
            n = lines_in(raw)
            line += n
            lines_in_chunk += n
            if lines_in_chunk >= rows_per_chunk:
                chunks.append({"kind": "jsonl", "start": start, "end": pos, "first_line": first_line})
                start, first_line, lines_in_chunk = pos, line, 0
    if pos > start or not chunks:
        chunks.append({"kind": "jsonl", "start": start, "end": pos, "first_line": first_line})
    return chunks


def _parquet_chunks(path: Path, rows_per_chunk: int) -> list[dict]:
    meta = pq.ParquetFile(path).metadata
    chunks: list[dict] = []
    groups: list[int] = []
    first_row = row = 1
    for g in range(meta.num_row_groups):
        groups.append(g)
        row += meta.row_group(g).num_rows
        if row - first_row >= rows_per_chunk:
            chunks.append({"kind": "parquet", "row_groups": groups, "first_row": first_row})
            groups, first_row = [], row
    if groups or not chunks:
        chunks.append({"kind": "parquet", "row_groups": groups, "first_row": first_row})
    return chunks


def plan_reading(path: str | Path, format: str = "auto", rows_per_chunk: int = 2048) -> ReadPlan:
    """The format, row layout and chunks of a data file (reads only as far as its first valid row).

    Raises:
        FileNotFoundError / ValueError: As :func:`check_data_file`; an unknown format; a broken JSON list.
    """
    src = check_data_file(path)
    ext = _extension(src)
    is_json_list = ext == ".json" and _json_list_records(src) is not None
    fmt, layout = resolve_layout(src, format, _first_object(_iter_records(src)))
    if ext == ".parquet":
        chunks = _parquet_chunks(src, rows_per_chunk)
    elif is_json_list:
        chunks = [{"kind": "json"}]
    else:
        chunks = _jsonl_chunks(src, rows_per_chunk)
    return ReadPlan(str(src), fmt, layout, chunks)


def _chunk_records(path: Path, chunk: dict) -> list[_Record]:
    if chunk["kind"] == "json":
        return _json_list_records(path) or []
    if chunk["kind"] == "parquet":
        return _parquet_records(pq.ParquetFile(path), chunk["row_groups"], chunk["first_row"])
    with open(path, "rb") as fh:
        fh.seek(chunk["start"])
        data = fh.read(chunk["end"] - chunk["start"])
    return _jsonl_records(data, chunk["first_line"], chunk["start"] == 0)


def reject(line: int, reason: str, raw: str, file: str | Path | None = None) -> dict:
    """A reject record: the input file, the row's line (1-based), why it was refused, its raw text."""
    return {"file": str(file) if file is not None else None, "line": line, "reason": reason, "raw": raw}


def read_chunk(plan: ReadPlan, chunk: dict) -> tuple[list[tuple[int, dict, str]], list[dict], str, int]:
    """Parses one chunk of a planned file.

    Returns:
        ``(rows, rejects, style, n_input)``: ``(line, canonical row, raw text)`` triples in file order, the
        rejects of rows that could not be parsed (duplicates are found across chunks, by the caller), the
        chat style of the first parsed row ("" when none), and the number of input rows in the chunk.
    """
    records = _chunk_records(Path(plan.path), chunk)
    rows: list[tuple[int, dict, str]] = []
    rejects: list[dict] = []
    style = ""
    for rec in records:
        try:
            row, row_style = _parse_record(rec, plan.layout)
        except RowError as err:
            rejects.append(reject(rec.line, str(err), rec.raw, plan.path))
            continue
        style = style or row_style
        rows.append((rec.line, row, rec.raw))
    return rows, rejects, style, len(records)


# ---------------------------------------------------------------------------------------------
# read_dataset


def _write_rejects(rejects: list[dict], path: str | Path) -> None:
    """Rejects as JSONL; the file is always created so that 'no rejects' is visible too."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for rej in rejects:
            fh.write(json.dumps(rej, ensure_ascii=False) + "\n")


def duplicate_reason(first_line: int, sid: str) -> str:
    return f"exact duplicate of row {first_line} (sample_id {sid})"


def read_dataset(path: str | Path, format: str = "auto", rejects_path: str | Path | None = None) -> ReadResult:
    """Reads a whole SFT data file into canonical rows in this process; every input row is a row or a reject.

    Args:
        path: A .json (list), .jsonl or .parquet file.
        format: "auto" (extension + first valid row's keys), "alpaca", "messages" or "parquet".
        rejects_path: Where to write the rejects as JSONL (created even when there are none).

    Returns:
        A :class:`ReadResult`. Exact duplicates (same ``sample_id``) keep the first occurrence; the
        later ones are rejected with the row number of the first.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unsupported extension, unreadable .json list, or an unknown row layout.
    """
    plan = plan_reading(path, format, rows_per_chunk=1 << 62)
    result = ReadResult(format=plan.format, style="alpaca" if plan.layout == "alpaca" else "")
    first_seen: dict[str, int] = {}
    pending: list[tuple[int, dict | None, Any]] = []
    for chunk in plan.chunks:
        rows, rejects, style, n = read_chunk(plan, chunk)
        result.n_input += n
        result.style = result.style or style
        pending += [(line, row, raw) for line, row, raw in rows] + [(r["line"], None, r) for r in rejects]
    for line, row, raw in sorted(pending, key=lambda t: t[0]):
        if row is None:
            result.rejects.append(raw)
        elif row["sample_id"] in first_seen:
            result.rejects.append(reject(line, duplicate_reason(first_seen[row["sample_id"]], row["sample_id"]), raw,
                                         plan.path))
        else:
            first_seen[row["sample_id"]] = line
            result.rows.append(row)
    # A messages file with no valid row still needs a style for writers; OpenAI is the common one.
    result.style = result.style or "openai"
    if result.n_input != len(result.rows) + len(result.rejects):
        raise AssertionError(f"row accounting is broken: {result.n_input} input rows, "
                             f"{len(result.rows)} rows + {len(result.rejects)} rejects")
    if rejects_path is not None:
        _write_rejects(result.rejects, rejects_path)
    return result
