"""The run's final outputs: the optimized dataset in the input's format, its lineage, and the trainers' exports.

``runs/<id>/final/`` holds::

    optimized.<ext>          the last dataset in the input's format and extension (alpaca JSON/JSONL,
                             messages JSONL in the input's chat style, or Parquet)
    lineage.parquet          sample_id, parent_id, origin (seed/complexity/quality/diversity), round, trigger
    llamafactory/            middo_optimized.json + dataset_info.json (``dataset: middo_optimized``)
    messages.jsonl           OpenAI-style messages, the layout TRL's SFTTrainer reads
    summary.json             stop reason, metric per round, sizes, paths (written by the loop)

One task streams the dataset's shards into every file in turn, so the files are written by a worker and
no step holds more than one shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from middo_ray import storage
from middo_ray.io.export import export_llamafactory, export_messages_jsonl
from middo_ray.io.write import ROW_SCHEMA, write_dataset, write_parquet_stream
from middo_ray.schema import ORIGINS
from middo_ray.shardmap import run_task

# Name of the final dataset in LLaMA-Factory's dataset_info.json (``dataset: middo_optimized``).
LLAMAFACTORY_NAME = "middo_optimized"
DEFAULT_EXT = {"alpaca": ".json", "messages": ".jsonl", "parquet": ".parquet"}


def _rows(paths: list[str]) -> Iterable[dict]:
    for p in paths:
        yield from storage.read_table(p).to_pylist()


def write_exports(rows, final: Path) -> dict[str, str]:
    """Writes the final dataset for the trainers people already use, next to ``optimized.*``.

    Args:
        rows: The rows, or a function returning them afresh (the LLaMA-Factory export reads them twice).
        final: The final directory.

    Returns:
        Paths by export: ``llamafactory_dir``, ``llamafactory_dataset`` (the name), ``llamafactory_file``
        and ``trl_messages``.
    """
    lf_dir = final / "llamafactory"
    lf_file = export_llamafactory(rows, lf_dir, LLAMAFACTORY_NAME)
    trl = export_messages_jsonl(rows, final / "messages.jsonl")
    return {"llamafactory_dir": str(lf_dir), "llamafactory_dataset": LLAMAFACTORY_NAME,
            "llamafactory_file": str(lf_file), "trl_messages": str(trl)}


def _export_task(paths: list[str], final: str, fmt: str, style: str, source: str) -> dict:
    out = Path(final)
    out.mkdir(parents=True, exist_ok=True)
    # Same format and extension as the input, so the user's tools read it as they read the seed.
    ext = Path(source).suffix or DEFAULT_EXT[fmt]
    optimized = write_dataset(_rows(paths), out / f"optimized{ext}", fmt, style)
    lineage = write_parquet_stream((storage.read_table(p) for p in paths), out / "lineage.parquet", ROW_SCHEMA)
    exports = write_exports(lambda: _rows(paths), out)
    origins = {o: 0 for o in ORIGINS}
    for p in paths:
        for o in storage.read_table(p, ["origin"]).column("origin").to_pylist():
            origins[o] = origins.get(o, 0) + 1
    return {"optimized_dataset": str(optimized), "lineage": str(lineage), "exports": exports, "origins": origins}


def write_final(final_dir: str, dataset: storage.ShardSet, fmt: str, style: str, source: str) -> dict:
    """Writes ``final/`` (see the module docstring) from ``dataset`` in one worker task; returns the paths
    and the count of samples per origin."""
    return run_task(_export_task, dataset.paths(), final_dir, fmt, style, source, what="final exports")
