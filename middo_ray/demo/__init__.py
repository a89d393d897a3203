"""The bundled demo data: a small seed SFT set with known defects and a multiple-choice eval set.

The files under ``data/`` are written by ``python -m middo_ray.demo.generate`` (deterministic) and
shipped as package data, so ``data.path: demo`` works from an installed package.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

_FILES = {
    "seed": "seed.jsonl",
    "mc": "mc.jsonl",
    "defects": "defects.json",
    "seed_with_invalid": "seed_with_invalid.jsonl",
}


def demo_path(name: str) -> Path:
    """Path of a demo data file.

    Args:
        name: "seed" (alpaca JSONL), "mc" (multiple-choice JSONL), "defects" ({sample_id: kind}),
            or "seed_with_invalid" (a few good rows plus invalid ones, for tests of rejects).

    Returns:
        The file's path inside the package (it may be missing if the data was never generated).

    Raises:
        ValueError: Unknown name.
    """
    if name not in _FILES:
        raise ValueError(f"unknown demo file '{name}'; use one of {sorted(_FILES)}")
    return DATA_DIR / _FILES[name]


def resolve(spec: str, name: str = "seed") -> str:
    """A data path from the config: ``"demo"`` is the packaged file ``name``, anything else is returned as is.

    Raises:
        FileNotFoundError: ``"demo"`` was asked for but the packaged file is missing.
    """
    if str(spec) != "demo":
        return str(spec)
    path = demo_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"the packaged demo file {path} is missing; regenerate it with "
                                "`python -m middo_ray.demo.generate`")
    return str(path)


__all__ = ["DATA_DIR", "demo_path", "resolve"]
