"""Where rows live: files under the run directory, on a local path, a shared filesystem or an object store.

Every read and write goes through pyarrow's filesystems (``pyarrow.fs.FileSystem.from_uri``), so a run
directory may be ``runs/x``, ``/mnt/shared/runs/x`` or ``s3://bucket/runs/x``. Writes are commits: on a
local or shared filesystem a file is written under a temporary name beside its target and renamed (atomic
on POSIX), on an object store a single PUT is already all-or-nothing. A reader therefore sees a file whole
or not at all, which is what lets a stage resume from the shards it finished.

A dataset is a :class:`ShardSet`: Parquet shards (``part-00000.parquet``, ...) in one directory, in order,
with their row counts recorded in ``_shards.json`` by the stage that wrote them. Shard files are plain
Parquet: pandas, Hugging Face ``datasets`` and ``ray.data.read_parquet`` read the directory as it is.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SHARDS_FILE = "_shards.json"
META_KEY = b"middo"          # Parquet key-value metadata: a unit's summary, committed with its rows


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int:
    """Shard number of a shard file name (``part-00012.parquet`` -> 12)."""
    stem = posixpath.basename(name).split(".", 1)[0]
    if not stem.startswith("part-") or not stem[5:].isdigit():
        raise ValueError(f"'{name}' is not a shard file name (part-NNNNN.parquet)")
    return int(stem[5:])


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        uri = posixpath.abspath(uri) if not uri.startswith("/") else uri
    return pafs.FileSystem.from_uri(uri)


def is_local(uri: str) -> bool:
    """Whether ``uri`` is on a filesystem the processes of this node can rename in (local or shared)."""
    return isinstance(_fs(uri)[0], pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for paths and URIs alike."""
    return posixpath.join(str(base), *[str(p) for p in parts])


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path, recursive=True)


def listdir(uri: str) -> list[str]:
    """Base names in a directory (empty when it does not exist)."""
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path)))


def remove_tree(uri: str) -> None:
    fs, path = _fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def _commit(uri: str, write) -> None:
    """Runs ``write(stream)`` so that ``uri`` appears whole or not at all."""
    fs, path = _fs(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as out:   # one PUT: all-or-nothing
            write(out)
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as out:
            write(out)
        fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    _commit(uri, lambda out: out.write(data))


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def json_default(o: Any) -> Any:
    """JSON for numpy scalars and arrays, and paths (the types stage records carry)."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def write_table(uri: str, table: pa.Table, summary: dict | None = None) -> None:
    """Commits ``table`` as one Parquet file; ``summary`` travels in its key-value metadata."""
    if summary is not None:
        meta = dict(table.schema.metadata or {})
        meta[META_KEY] = json.dumps(summary, sort_keys=True, default=json_default).encode()
        table = table.replace_schema_metadata(meta)
    _commit(uri, lambda out: pq.write_table(table, out))


def read_table(uri: str, columns: Iterable[str] | None = None, filters=None) -> pa.Table:
    fs, path = _fs(uri)
    return pq.read_table(path, filesystem=fs, columns=list(columns) if columns is not None else None,
                         filters=filters)


def table_summary(uri: str) -> dict | None:
    """The summary committed with a Parquet file (its footer only is read); None when it has none."""
    fs, path = _fs(uri)
    with fs.open_input_file(path) as fh:
        meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
    raw = meta.get(META_KEY)
    return json.loads(raw) if raw else None


def read_schema(uri: str) -> pa.Schema:
    fs, path = _fs(uri)
    with fs.open_input_file(path) as fh:
        return pq.ParquetFile(fh).schema_arrow


def num_rows(uri: str) -> int:
    fs, path = _fs(uri)
    with fs.open_input_file(path) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


@dataclass(frozen=True)
class ShardSet:
    """A dataset as ordered Parquet shards in one directory.

    Attributes:
        root: The directory (path or URI).
        names: Shard file names, in dataset order.
        rows: Rows per shard, aligned with ``names``.
    """

    root: str
    names: tuple[str, ...]
    rows: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.rows)

    def path(self, name: str) -> str:
        return join(self.root, name)

    def paths(self) -> list[str]:
        return [self.path(n) for n in self.names]

    def offsets(self) -> list[int]:
        """Dataset position of each shard's first row."""
        out, at = [], 0
        for n in self.rows:
            out.append(at)
            at += n
        return out

    def to_json(self) -> dict:
        return {"root": self.root, "names": list(self.names), "rows": list(self.rows)}

    @classmethod
    def from_json(cls, obj: dict) -> "ShardSet":
        return cls(str(obj["root"]), tuple(obj["names"]), tuple(int(n) for n in obj["rows"]))

    def save(self) -> "ShardSet":
        """Records the shard list in ``root/_shards.json`` (the set's commit)."""
        write_json(join(self.root, SHARDS_FILE), {"names": list(self.names), "rows": list(self.rows),
                                                  "total": self.total})
        return self

    @classmethod
    def load(cls, root: str) -> "ShardSet":
        obj = read_json(join(root, SHARDS_FILE))
        return cls(str(root), tuple(obj["names"]), tuple(int(n) for n in obj["rows"]))

    @classmethod
    def collect(cls, root: str, names: Iterable[str]) -> "ShardSet":
        """The set of the given committed shards, counting each one's rows from its footer."""
        names = tuple(names)
        return cls(str(root), names, tuple(num_rows(join(root, n)) for n in names))

    def read(self, columns: Iterable[str] | None = None) -> pa.Table:
        """Every shard, concatenated in order (for small sets and tests; stages read shard by shard)."""
        tables = [read_table(p, columns) for p in self.paths()]
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
