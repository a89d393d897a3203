"""Data stage (round 0): the seed file becomes sharded Parquet datasets; every input row is accounted for.

What ``round_0/data/`` holds afterwards::

    train/part-*.parquet      D_0: canonical rows with their lineage columns, in input order
    heldout/part-*.parquet    the held-out rows (data.heldout_fraction, or the file data.heldout_path)
    unused/part-*.parquet     rows beyond data.max_samples
    rejects.jsonl             every refused input row: its file, line, the reason, its raw text
    stage.json                source, format, style, counts and the shard sets

Steps, all on Ray workers (the driver sees chunk descriptions and counts, never a row):

1. plan (a task): format, row layout and chunks of the file (JSONL by lines, Parquet by row groups);
2. parse (a unit per chunk): canonical rows and the parse rejects, into ``_parsed/``;
3. split (a task streaming ``sample_id`` and a key column): exact duplicates across chunks (the first
   occurrence stays), the held-out set (the round(N * fraction) rows with the smallest SHA-256 of
   ``"<seed>:<sample_id>"``, so the same rows go out on every machine), train rows per chunk;
4. write (a unit per chunk): its train / held-out / unused shards and its rejects, then ``rejects.jsonl``.

The split task holds the ids of the rows (to find duplicates) and the held-out keys: about 100 bytes per
row, 1 GB at 10M rows, in one worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
from dataclasses import dataclass

import pyarrow as pa

from middo_ray import demo, storage
from middo_ray.config import DataConfig
from middo_ray.io.read import ReadPlan, duplicate_reason, plan_reading, read_chunk, reject
from middo_ray.io.write import rows_table
from middo_ray.rundir import StageContext, StageResult, read_record
from middo_ray.shardmap import map_shards, nodes_of, run_task
from middo_ray.storage import ShardSet, shard_name

log = logging.getLogger("middo")

SPLIT_COLUMNS = ("line", "split_key")


@dataclass
class DataOutput:
    """The datasets of round 0 and where the rejects are."""

    train: ShardSet
    heldout: ShardSet
    unused: ShardSet
    rejects: str
    format: str
    style: str
    source: str


def split_key(seed: int, sid: str) -> str:
    return hashlib.sha256(f"{seed}:{sid}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Workers.

class ParseChunk:
    """Parses one chunk into canonical rows (with their line and split key) and its parse rejects."""

    def __init__(self, plan: dict, seed: int):
        self.plan = ReadPlan(**plan)
        self.seed = seed

    def process(self, unit: dict) -> dict:
        rows, rejects, style, n_input = read_chunk(self.plan, unit["chunk"])
        table = rows_table([r for _, r, _ in rows])
        table = table.append_column("line", pa.array([line for line, _, _ in rows], pa.int64()))
        table = table.append_column("split_key", pa.array([split_key(self.seed, r["sample_id"]) for _, r, _ in rows],
                                                          pa.string()))
        storage.write_text(unit["rejects"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        summary = {"unit": unit["id"], "rows": len(rows), "rejects": len(rejects), "n_input": n_input,
                   "style": style}
        storage.write_table(unit["commit"], table, summary)
        return summary


class WriteChunk:
    """Writes one chunk's train, held-out and unused shards and its rejects (parse errors and duplicates)."""

    def __init__(self, plan: dict, cutoff: str | None, heldout_only: bool, rows_per_shard: int):
        self.plan = ReadPlan(**plan)
        self.cutoff, self.heldout_only, self.rows_per_shard = cutoff, heldout_only, rows_per_shard

    def process(self, unit: dict) -> dict:
        table = storage.read_table(unit["parsed"])
        dups = {}
        if unit["duplicates"]:
            found = storage.read_table(unit["duplicates"], filters=[("chunk", "==", unit["index"])])
            dups = {int(d["line"]): d for d in found.to_pylist()}
        lines = table.column("line").to_pylist()
        keys = table.column("split_key").to_pylist()
        kinds = []
        kept = 0
        for line, key in zip(lines, keys):
            if line in dups:
                kinds.append("dup")
            elif self.heldout_only or (self.cutoff is not None and key <= self.cutoff):
                kinds.append("heldout")
            elif kept < unit["keep"]:
                kinds.append("train")
                kept += 1
            else:
                kinds.append("unused")
        rows = table.drop_columns(list(SPLIT_COLUMNS))
        counts, train_shards = {}, []
        for kind in ("train", "heldout", "unused"):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            counts[kind] = len(idx)
            if idx and kind == "train":
                # A chunk's train rows are cut into shards of data.rows_per_shard, numbered across chunks.
                for j, start in enumerate(range(0, len(idx), self.rows_per_shard)):
                    part = idx[start:start + self.rows_per_shard]
                    name = shard_name(unit["first_shard"] + j)
                    storage.write_table(storage.join(unit["train"], name), rows.take(pa.array(part, pa.int64())))
                    train_shards.append([name, len(part)])
            elif idx:
                storage.write_table(unit[kind], rows.take(pa.array(idx, pa.int64())))
        storage.write_text(unit["rejects_out"], self._rejects(unit, dups))
        ids = "".join(r for r, k in zip(table.column("sample_id").to_pylist(), kinds) if k == "train")
        summary = {"unit": unit["id"], "rows": len(lines), **counts, "duplicates": len(dups),
                   "train_shards": train_shards, "train_hash": hashlib.sha256(ids.encode()).hexdigest()}
        storage.write_json(unit["commit"], summary)
        return summary

    def _rejects(self, unit: dict, dups: dict[int, dict]) -> str:
        """The chunk's rejects in line order: its parse rejects and its duplicates (with their raw text)."""
        text = storage.read_text(unit["parse_rejects"])
        found = [json.loads(line) for line in text.splitlines() if line.strip()]
        if dups:
            raw = {line: r for line, _, r in read_chunk(self.plan, unit["chunk"])[0]}
            found += [reject(line, duplicate_reason(d["first_line"], d["sample_id"]), raw.get(line, ""), self.plan.path)
                      for line, d in dups.items()]
        found.sort(key=lambda r: r["line"])
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in found)


def _split(parsed: list[str], dup_path: str, fraction: float | None) -> dict:
    """The split task: duplicates across chunks, the held-out cut-off key, train rows per chunk.

    Streams the ``sample_id``, ``line`` and ``split_key`` columns of the parsed chunks twice: first for
    the duplicates (keeping one id per distinct row), then for the held-out keys (keeping the smallest
    ``round(N * fraction)`` in a heap).
    """
    first_seen: dict[str, int] = {}
    dups: list[dict] = []
    for c, path in enumerate(parsed):
        t = storage.read_table(path, ["sample_id", "line"])
        for sid, line in zip(t.column("sample_id").to_pylist(), t.column("line").to_pylist()):
            if sid in first_seen:
                dups.append({"chunk": c, "line": line, "first_line": first_seen[sid], "sample_id": sid})
            else:
                first_seen[sid] = line
    n_unique = len(first_seen)
    del first_seen
    dup_lines = {(d["chunk"], d["line"]) for d in dups}
    if dups:
        storage.write_table(dup_path, pa.Table.from_pylist(dups))

    def unique_keys(c: int):
        t = storage.read_table(parsed[c], ["line", "split_key"])
        for line, key in zip(t.column("line").to_pylist(), t.column("split_key").to_pylist()):
            if (c, line) not in dup_lines:
                yield key

    cutoff = None
    n_out = int(round(n_unique * fraction)) if fraction else 0
    if n_out > 0:
        cutoff = max(heapq.nsmallest(n_out, (k for c in range(len(parsed)) for k in unique_keys(c))))
    train = [sum(1 for k in unique_keys(c) if cutoff is None or k > cutoff) for c in range(len(parsed))]
    return {"duplicates": len(dups), "dup_chunks": sorted({d["chunk"] for d in dups}), "cutoff": cutoff,
            "train_per_chunk": train, "unique": n_unique}


# ---------------------------------------------------------------------------------------------
# The stage.

def _read_file(ctx: StageContext, name: str, path: str, fmt: str, fraction: float | None, heldout_only: bool,
               max_samples: int | None) -> tuple[ReadPlan, list[dict], list[dict], dict]:
    """Plan, parse, split and write one input file; returns its plan, parse and write summaries, split info."""
    rows_per = ctx.cfg.data.rows_per_shard
    plan = run_task(plan_reading, path, fmt, rows_per, what=f"data: planning {path}")
    plan_dict = dataclasses.asdict(plan)
    base = ctx.path("_parsed", name)
    parse_units = [{"id": f"{name}-{c}", "chunk": chunk, "rows": 0, "commit": storage.join(base, shard_name(c)),
                    "rejects": storage.join(base, f"rejects-{c:05d}.jsonl")} for c, chunk in enumerate(plan.chunks)]
    parsed = map_shards(parse_units, ParseChunk, {"plan": plan_dict, "seed": ctx.seed}, what=f"data: parse {name}")
    dup_path = storage.join(base, "duplicates.parquet")
    split = run_task(_split, [u["commit"] for u in parse_units], dup_path, fraction, what="data: split")
    keep, left, first = [], max_samples, [0]
    for n in split["train_per_chunk"]:
        take = n if left is None else min(n, left)
        keep.append(take)
        left = None if left is None else left - take
        first.append(first[-1] + -(-take // rows_per))
    write_units = []
    for c, unit in enumerate(parse_units):
        shard = shard_name(c)
        write_units.append({
            "id": f"{name}-{c}", "index": c, "chunk": unit["chunk"], "parsed": unit["commit"],
            "parse_rejects": unit["rejects"], "duplicates": dup_path if c in split["dup_chunks"] else None,
            "keep": keep[c], "first_shard": first[c], "rows": parsed[c]["rows"],
            "train": ctx.path("train"), "heldout": ctx.path("heldout", shard),
            "unused": ctx.path("unused", shard), "rejects_out": storage.join(base, f"final-rejects-{c:05d}.jsonl"),
            "commit": storage.join(base, f"written-{c:05d}.json")})
    written = map_shards(write_units, WriteChunk, {"plan": plan_dict, "cutoff": split["cutoff"],
                                                   "heldout_only": heldout_only, "rows_per_shard": rows_per},
                         what=f"data: write {name}")
    return plan, parsed, written, {**split, "units": write_units}


def _concat_rejects(parts: list[str], out: str) -> int:
    """The rejects task: the chunks' reject files, in order, as one JSONL file; returns the count."""
    text = "".join(storage.read_text(p) for p in parts)
    storage.write_text(out, text)
    return text.count("\n")


def _shard_set(ctx: StageContext, kind: str, written: list[dict]) -> ShardSet:
    if kind == "train":
        shards = [s for w in written for s in w["train_shards"]]
        return ShardSet(ctx.path(kind), tuple(n for n, _ in shards), tuple(r for _, r in shards)).save()
    names = tuple(shard_name(c) for c, w in enumerate(written) if w[kind])
    rows = tuple(w[kind] for w in written if w[kind])
    return ShardSet(ctx.path(kind), names, rows).save()


def run(ctx: StageContext, cfg: DataConfig, inputs: dict) -> StageResult:
    """Reads ``data.path`` (and ``data.heldout_path``) into shard sets; see the module docstring.

    Raises:
        FileNotFoundError / ValueError: The file is missing or unreadable as a whole (a bad row is a reject).
        ValueError: No usable row is left for training.
    """
    source = demo.resolve(cfg.path)
    split_here = cfg.heldout_path is None
    plan, parsed, written, split = _read_file(ctx, "train", source, cfg.format, cfg.heldout_fraction if split_here
                                              else None, False, cfg.max_samples)
    rejects = ctx.path("rejects.jsonl")
    n_rejected = run_task(_concat_rejects, [u["rejects_out"] for u in split["units"]], rejects, what="data: rejects")
    train = _shard_set(ctx, "train", written)
    unused = _shard_set(ctx, "unused", written)
    heldout = _shard_set(ctx, "heldout", written)
    info_held = {}
    if not split_here:
        _, hparsed, hwritten, hsplit = _read_file(ctx, "heldout", cfg.heldout_path, "auto", None, True, None)
        heldout = ShardSet(ctx.path("heldout"), tuple(shard_name(c) for c, w in enumerate(hwritten) if w["heldout"]),
                           tuple(w["heldout"] for w in hwritten if w["heldout"])).save()
        info_held = {"heldout_rejected": run_task(_concat_rejects, [u["rejects_out"] for u in hsplit["units"]],
                                                  ctx.path("heldout_rejects.jsonl"), what="data: rejects")}
    n_input = sum(p["n_input"] for p in parsed)
    style = next((p["style"] for p in parsed if p["style"]), "") or ("alpaca" if plan.layout == "alpaca" else "openai")
    info = {"source": source, "format": plan.format, "style": style, "rows_in": n_input, "rejected": n_rejected,
            "duplicates": split["duplicates"], "train": train.total, "heldout": heldout.total,
            "unused": unused.total, "chunks": len(plan.chunks), "rejects": rejects, **info_held,
            "nodes": nodes_of(parsed, written),
            "hash": hashlib.sha256("".join(w["train_hash"] for w in written).encode()).hexdigest()[:16],
            "shards": {"train": train.to_json(), "heldout": heldout.to_json(), "unused": unused.to_json()}}
    if n_input != n_rejected + train.total + unused.total + (heldout.total if split_here else 0):
        raise AssertionError(f"row accounting is broken: {info}")
    if train.total == 0:
        raise ValueError(f"no usable rows in {source}: {n_rejected} of {n_input} rejected (see {rejects})")
    log.debug("data: %d rows read from %s (%s), %d rejected, %d train, %d held out, %d shards", n_input, source,
             plan.format, n_rejected, train.total, heldout.total, len(train.names))
    return StageResult(info, _output(info))


def _output(info: dict) -> DataOutput:
    sh = info["shards"]
    return DataOutput(ShardSet.from_json(sh["train"]), ShardSet.from_json(sh["heldout"]),
                      ShardSet.from_json(sh["unused"]), info["rejects"], info["format"], info["style"], info["source"])


def load(stage_dir: str) -> StageResult:
    info = read_record(stage_dir)
    return StageResult(info, _output(info))
