"""What is checked before any work starts: the files and folders a run needs, so that a typo fails in a second
with every problem listed, not minutes later after Ray and the Serve apps have started.

:func:`check_inputs` looks at what the config names on disk (the config itself is checked by
:func:`middo_ray.config.build_config`): the data file (exists, has a supported extension, is not empty, its
format can be read), the held-out file, the multiple-choice file, and that the run folder can be written.
Each problem names the config key and the fix. Object-store paths are left to the stages that read them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from middo_ray.config import MiddoConfig

# A .json file is one list that must be parsed whole to see its first row: beyond this size the data stage
# (on a worker, not the driver) is the first to read it.
JSON_CHECK_MAX_BYTES = 256 * 2**20


def _data_file_problems(spec: str, key: str, fmt: str = "auto") -> list[str]:
    """Problems of one data file: missing, wrong extension, empty, or a format that cannot be read."""
    from middo_ray import demo
    from middo_ray.io.read import resolve_layout, check_data_file, detect_format

    try:
        path = check_data_file(demo.resolve(spec), key)
    except (FileNotFoundError, ValueError) as exc:
        return [f"{key}: {exc}"]
    if not os.access(path, os.R_OK):
        return [f"{key}: data file '{path}' cannot be read (permission denied); make it readable by this user"]
    size = path.stat().st_size
    if size == 0 or (size < 1 << 20 and path.suffix.lower() != ".parquet" and not path.read_bytes().strip()):
        return [f"{key}: data file '{path}' is empty (no rows); point {key} at the file with your rows"]
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            if pq.ParquetFile(path).metadata.num_rows == 0:
                return [f"{key}: data file '{path}' is empty (a Parquet file with no rows); point {key} at the "
                        "file with your rows"]
        if fmt != "auto":
            resolve_layout(path, fmt, None)          # a format that does not fit the file
        elif path.suffix.lower() != ".json" or size < JSON_CHECK_MAX_BYTES:
            detect_format(path)                       # JSONL: up to its first good row; .json: the whole list
    except Exception as exc:  # noqa: BLE001 - any reason the file cannot be read is reported, with its type
        reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        return [f"{key}: {reason}"]
    return []


def _writable_folder_problems(folder: str, key: str) -> list[str]:
    """Whether the run folder can be made and written (by writing and removing a probe file)."""
    if "://" in folder:
        return []                                     # an object store: its stages report their own errors
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".middo-write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        return [f"{key}: cannot write to '{path}' ({exc.strerror or exc}); set {key} to a folder this user can "
                "write"]
    return []


def check_inputs(cfg: MiddoConfig | Any) -> list[str]:
    """Every problem with the files and folders the run needs (empty when it may start).

    ``cfg`` is a :class:`MiddoConfig`, or any object with its ``data``, ``run`` and ``eval`` sections where a
    section may be None (invalid): its checks are then skipped.
    """
    problems: list[str] = []
    data, run, ev = getattr(cfg, "data", None), getattr(cfg, "run", None), getattr(cfg, "eval", None)
    if data is not None:
        problems += _data_file_problems(data.path, "data.path", data.format)
        if data.heldout_path is not None:
            problems += _data_file_problems(data.heldout_path, "data.heldout_path")
    mc = ev.mc_path if ev is not None else None
    if mc not in (None, "demo") and not Path(mc).expanduser().is_file():
        problems.append(f"eval.mc_path: multiple-choice file '{mc}' does not exist; point it at a JSONL file of "
                        "{query, choices, gold} rows, use 'demo', or null for no accuracy metric")
    if run is not None:
        problems += _writable_folder_problems(run.output_dir, "run.output_dir")
        existing = os.path.join(run.output_dir, run.run_id) if run.run_id and "://" not in run.output_dir else None
        if not problems and existing and os.path.isdir(existing):
            problems += _writable_folder_problems(existing, "run.run_id")   # a run directory to resume
    return problems


class InputError(ValueError):
    """Problems with the run's files and folders, found before any work started."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("cannot start the run:\n" + "\n".join(f"  - {p}" for p in problems))


def require_inputs(cfg: MiddoConfig) -> None:
    """Raises :class:`InputError` listing every problem of :func:`check_inputs`."""
    problems = check_inputs(cfg)
    if problems:
        raise InputError(problems)
