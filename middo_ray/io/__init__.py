"""SFT data in and out: read (any input format, with rejects), write (the input's format), export
(LLaMA-Factory, TRL, lineage). See :mod:`middo_ray.io.read`, :mod:`middo_ray.io.write` and
:mod:`middo_ray.io.export`."""

from middo_ray.io.export import export_llamafactory, export_messages_jsonl, write_lineage
from middo_ray.io.read import (FORMATS, STYLES, ReadPlan, ReadResult, RowError, check_data_file, detect_format,
                               plan_reading, read_chunk, read_dataset)
from middo_ray.io.write import ROW_SCHEMA, rows_table, write_dataset

__all__ = [
    "FORMATS", "ROW_SCHEMA", "STYLES", "ReadPlan", "ReadResult", "RowError", "check_data_file", "detect_format",
    "export_llamafactory", "export_messages_jsonl", "plan_reading", "read_chunk", "read_dataset", "rows_table",
    "write_dataset", "write_lineage",
]
