"""Files for the tools people already train with: LLaMA-Factory, TRL, and a lineage table.

- :func:`export_llamafactory`: ``<name>.json`` (alpaca) and its entry in ``dataset_info.json``; train on it
  with ``dataset_dir: <that dir>`` and ``dataset: <name>``;
- :func:`export_messages_jsonl`: OpenAI-style ``{"messages": [...]}`` lines, which TRL's ``SFTTrainer``
  reads (``load_dataset("json", data_files=...)``);
- :func:`write_lineage`: every canonical and lineage column (plus any scalar extras) as Parquet.

Each takes the rows as an iterable, or as a function returning a fresh iterable where it needs two
passes (the LLaMA-Factory entry must know whether any row has a system prompt or history before the
first record is written), so a large final dataset is streamed shard by shard.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from middo_ray.io.write import CANON_TYPES, _plain, alpaca_record, canon_value, history_pairs, write_dataset, \
    write_json_list
from middo_ray.schema import ROW_COLUMNS

Rows = Iterable[dict] | Callable[[], Iterable[dict]]


def _passes(rows: Rows) -> Callable[[], Iterable[dict]]:
    if callable(rows):
        return rows
    rows = list(rows)
    return lambda: rows


def _llamafactory_entry(file_name: str, with_system: bool, with_history: bool) -> dict:
    """dataset_info.json entry for an alpaca file (LLaMA-Factory's column-mapping names)."""
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    if with_system:
        columns["system"] = "system"
    if with_history:
        columns["history"] = "history"
    return {"file_name": file_name, "formatting": "alpaca", "columns": columns}


def export_llamafactory(rows: Rows, out_dir: str | Path, name: str) -> Path:
    """Writes ``<name>.json`` (alpaca) and its entry in ``dataset_info.json`` for LLaMA-Factory.

    Use it with ``dataset_dir: <out_dir>`` and ``dataset: <name>``. An existing dataset_info.json is
    updated, not replaced, so several exports can share one directory.

    Args:
        rows: Canonical rows, or a function returning them afresh (read twice).
        out_dir: Directory for both files (created if needed).
        name: Dataset name, used as the file stem and the dataset_info.json key.

    Returns:
        The path of the written ``<name>.json``.
    """
    again = _passes(rows)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with_system = with_history = False
    for r in again():
        with_system = with_system or bool(r.get("system"))
        with_history = with_history or bool(r.get("history"))

    def records():
        # Mapped columns are written on every row: a key missing from some rows reads as null there.
        for r in again():
            rec = alpaca_record(r)
            if with_system:
                rec["system"] = r.get("system") or ""
            if with_history:
                rec["history"] = history_pairs(r)
            yield rec

    data_file = write_json_list(records(), root / f"{name}.json")
    info_file = root / "dataset_info.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    info[name] = _llamafactory_entry(data_file.name, with_system, with_history)
    info_file.write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return data_file


def export_messages_jsonl(rows: Rows, path: str | Path) -> Path:
    """Writes OpenAI-style ``{"messages": [...]}`` JSONL, the layout TRL's SFTTrainer reads."""
    return write_dataset(_passes(rows)(), path, "messages", style="openai")


def _is_scalar(value: Any) -> bool:
    """Values a Parquet column can hold directly (numpy scalars included, containers not)."""
    return value is None or isinstance(value, (str, bool, numbers.Number, np.generic))


def _extra_columns(rows: list[dict]) -> list[str]:
    """Non-canonical keys whose values are scalar in every row, in first-seen order."""
    seen: dict[str, bool] = {}
    for row in rows:
        for key, value in row.items():
            if key in CANON_TYPES:
                continue
            seen[key] = seen.get(key, True) and _is_scalar(value)
    return [k for k, ok in seen.items() if ok]


def _extra_array(rows: list[dict], key: str) -> pa.Array:
    values = [_plain(r.get(key)) for r in rows]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        # Mixed types (e.g. numbers and strings) cannot share a column type; keep them as text.
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


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
    arrays = {c: pa.array([canon_value(r, c) for r in rows], type=CANON_TYPES[c]) for c in ROW_COLUMNS}
    for key in _extra_columns(rows):
        arrays[key] = _extra_array(rows, key)
    pq.write_table(pa.table(arrays), out)
    return out
