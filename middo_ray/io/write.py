"""Writing canonical rows back out: alpaca JSON/JSONL, chat messages (OpenAI or ShareGPT), Parquet.

Every writer takes an iterable of rows (or of Arrow tables, for Parquet) and streams it to the file, so
the final dataset of a large run is written shard by shard in one worker, never held whole in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from middo_ray.io.read import CANON_TO_SHAREGPT, FORMATS
from middo_ray.prompts import chat_messages
from middo_ray.schema import ROW_COLUMNS, TEXT_COLUMNS

CANON_TYPES: dict[str, pa.DataType] = {**{c: pa.string() for c in TEXT_COLUMNS},
                                       "sample_id": pa.string(), "parent_id": pa.string(),
                                       "origin": pa.string(), "round": pa.int64(), "trigger": pa.string()}
ROW_SCHEMA = pa.schema([(c, CANON_TYPES[c]) for c in ROW_COLUMNS])


def history_pairs(row: dict) -> list[list[str]]:
    history = row.get("history") or ""
    return json.loads(history) if isinstance(history, str) and history else list(history or [])


def alpaca_record(row: dict) -> dict:
    """Alpaca dict of a canonical row; system and history only when they are set."""
    rec: dict[str, Any] = {"instruction": row["instruction"], "input": row.get("input") or "",
                           "output": row["output"]}
    system, history = row.get("system") or "", history_pairs(row)
    if system:
        rec["system"] = system
    if history:
        rec["history"] = history
    return rec


def messages_record(row: dict, style: str) -> dict:
    """OpenAI ``messages`` or ShareGPT ``conversations`` dict of a canonical row."""
    msgs = chat_messages(row, with_response=True)
    if style == "sharegpt":
        return {"conversations": [{"from": CANON_TO_SHAREGPT[m["role"]], "value": m["content"]} for m in msgs]}
    return {"messages": msgs}


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out


def write_json_list(records: Iterable[dict], path: str | Path) -> Path:
    """A JSON list with the layout of ``json.dump(list, indent=2)``, written one record at a time."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        first = True
        for rec in records:
            body = json.dumps(rec, ensure_ascii=False, indent=2).replace("\n", "\n  ")
            fh.write(("[\n  " if first else ",\n  ") + body)
            first = False
        fh.write("[]\n" if first else "\n]\n")
    return out


def _plain(value: Any) -> Any:
    """numpy scalars as Python scalars, so pyarrow infers one type per column."""
    return value.item() if isinstance(value, np.generic) else value


def canon_value(row: dict, col: str) -> Any:
    value = row.get(col)
    if col in TEXT_COLUMNS and value is None:
        return ""
    if col == "history" and isinstance(value, list):
        return json.dumps(value, ensure_ascii=False) if value else ""
    return _plain(value)


def rows_table(rows: list[dict]) -> pa.Table:
    """Arrow table of the canonical and lineage columns, typed (the layout of every dataset shard)."""
    return pa.table({c: pa.array([canon_value(r, c) for r in rows], type=CANON_TYPES[c]) for c in ROW_COLUMNS},
                    schema=ROW_SCHEMA)


def write_parquet_stream(tables: Iterable[pa.Table], path: str | Path, schema: pa.Schema = ROW_SCHEMA) -> Path:
    """Tables of one schema into one Parquet file, a row group per table."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(out, schema) as writer:
        for table in tables:
            writer.write_table(table.select(schema.names).cast(schema))
    return out


def write_dataset(rows: Iterable[dict], path: str | Path, format: str, style: str | None = None) -> Path:
    """Writes canonical rows in one of the input formats.

    Args:
        rows: Canonical rows (any iterable; streamed).
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
    if format == "alpaca":
        records = (alpaca_record(r) for r in rows)
        return write_jsonl(records, out) if out.suffix.lower() == ".jsonl" else write_json_list(records, out)
    if format == "messages":
        return write_jsonl((messages_record(r, style or "openai") for r in rows), out)
    if format == "parquet":
        return write_parquet_stream(_batched_tables(rows), out)
    raise ValueError(f"unknown output format '{format}'; use {', '.join(FORMATS)}")


def _batched_tables(rows: Iterable[dict], size: int = 4096) -> Iterable[pa.Table]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield rows_table(batch)
            batch = []
    if batch:
        yield rows_table(batch)


def write_shards(rows: list[dict], root: str, rows_per_shard: int = 2048):
    """Canonical rows as a shard set under ``root`` (for tests, benchmarks and the audit; the loop's data
    stage writes its shards from worker tasks)."""
    from middo_ray import storage
    from middo_ray.storage import ShardSet, shard_name

    names, counts = [], []
    for i, start in enumerate(range(0, len(rows), rows_per_shard)):
        part = rows[start:start + rows_per_shard]
        storage.write_table(storage.join(root, shard_name(i)), rows_table(part))
        names.append(shard_name(i))
        counts.append(len(part))
    storage.makedirs(root)
    return ShardSet(str(root), tuple(names), tuple(counts)).save()
