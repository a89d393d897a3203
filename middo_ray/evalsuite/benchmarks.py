"""Benchmark files to evaluation items, and the scorer of each benchmark.

An *item* is a JSON-able dict that one evaluation actor can answer without looking anything up:

``suite``, ``uid``, ``kind`` (``"gen"``: generate an answer; ``"mc"``: score the options),
``row`` (the question as a canonical row, asked with the training template), ``shots`` (solved
examples as ``[question, answer]`` turns shown before it; the actor keeps as many as fit the prompt
budget), and per kind ``max_new_tokens`` and ``gold``, or ``choices`` and ``gold`` (the index), plus
``problem`` for code benchmarks (what the tests need).

Subsets are deterministic: ``limit`` items drawn without replacement by a generator seeded with
``(eval.seed, suite name)``, in file order. Few-shot examples come from the benchmark's train or dev
split where the data has one (GSM8K train, MMLU dev of the same subject, MBPP's prompt split of task
ids 1-10, with 2, 3, 4 first as is customary), else from the head of the file; those rows are never
scored.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from middo_ray.evalsuite.answers import (extract_boxed, gsm8k_gold, score_gsm8k, score_math,
                                         strip_calculator_annotations)
from middo_ray.evalsuite.code import humaneval_program, mbpp_program, run_program

# ---------------------------------------------------------------------------------------------
# Reading.


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file (gzipped when it ends in .gz), each checked for the ``required`` keys.

    Raises:
        ValueError: Naming the file and line of the first row that is not JSON or lacks a key.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    rows: list[dict] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object "
                                 "per line") from exc
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing {missing}; this benchmark needs rows with keys "
                                 f"{list(required)} (is eval.suites.<name>.path the right file?)")
            rows.append(row)
    return rows


def pick_subset(n: int, limit: int | None, seed: int, name: str) -> list[int]:
    """Indices of ``limit`` of ``n`` items, the same for the same (seed, name) everywhere, in order."""
    if limit is None or limit >= n:
        return list(range(n))
    digest = hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()
    rng = np.random.default_rng(int(digest[:16], 16))
    return sorted(int(i) for i in rng.choice(n, size=limit, replace=False))


# ---------------------------------------------------------------------------------------------
# Question texts (asked as the instruction of the training template).

def gsm8k_question(question: str) -> str:
    return (f"{question}\nSolve it step by step, then write the final answer on its own line as "
            "\"#### <number>\".")


def math_question(problem: str) -> str:
    return f"{problem}\nSolve it step by step and put the final answer in \\boxed{{}}."


def mmlu_question(subject: str, question: str, options: list[str]) -> str:
    lines = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", options))
    return (f"The following is a multiple choice question about {subject.replace('_', ' ')}.\n\n"
            f"{question}\n{lines}\nAnswer with the letter of the correct option.")


def humaneval_question(prompt: str) -> str:
    return ("Complete the following Python function. Reply with the whole function in one Python code "
            f"block.\n```python\n{prompt}```")


def mbpp_question(text: str, tests: list[str]) -> str:
    return f"{text}\nYour code must pass these tests:\n" + "\n".join(tests) + \
        "\nReply with the Python code in one code block."


def _fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


# ---------------------------------------------------------------------------------------------
# Loaders: (file, shots file or None, shots wanted) -> (pool of items, shared shots).
# An item's "shots" key, when set by the loader (MMLU), overrides the shared shots.

Pool = tuple[list[dict], list[list[str]]]


def _head_shots(rows: list[dict], k: int, shot: Callable[[dict], list[str]]) -> tuple[list[dict], list[list[str]]]:
    return rows[k:], [shot(r) for r in rows[:k]]


def load_gsm8k(path: Path, shots_path: Path | None, k: int) -> Pool:
    def shot(r: dict) -> list[str]:
        return [gsm8k_question(r["question"]), strip_calculator_annotations(r["answer"])]

    rows = read_jsonl(path, ("question", "answer"))
    if shots_path is not None and k:
        shots = [shot(r) for r in read_jsonl(shots_path, ("question", "answer"))[:k]]
    else:
        rows, shots = _head_shots(rows, k, shot)
    items = [{"kind": "gen", "row": {"instruction": gsm8k_question(r["question"])}, "gold": gsm8k_gold(r["answer"])}
             for r in rows]
    return items, shots


def _math_gold(row: dict) -> str:
    if isinstance(row.get("answer"), str):
        return row["answer"]
    boxed = extract_boxed(row["solution"])
    if boxed is None:
        raise ValueError("MATH row without 'answer' and without a \\boxed{} in its solution: "
                         f"{row['problem'][:60]!r}")
    return boxed


def load_math(path: Path, shots_path: Path | None, k: int) -> Pool:
    def shot(r: dict) -> list[str]:
        return [math_question(r["problem"]), r["solution"]]

    rows = read_jsonl(path, ("problem", "solution"))
    if shots_path is not None and k:
        shots = [shot(r) for r in read_jsonl(shots_path, ("problem", "solution"))[:k]]
    else:
        rows, shots = _head_shots(rows, k, shot)
    items = [{"kind": "gen", "row": {"instruction": math_question(r["problem"])}, "gold": _math_gold(r)} for r in rows]
    return items, shots


def load_arc(path: Path, shots_path: Path | None, k: int) -> Pool:
    def shot(r: dict) -> list[str]:
        return [r["query"], str(r["choices"][r["gold"]])]

    rows = read_jsonl(path, ("query", "choices", "gold"))
    for lineno, r in enumerate(rows, 1):
        choices, gold = r["choices"], r["gold"]
        if not isinstance(choices, list) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f"{path}: row {lineno}: 'gold' must index into 'choices'")
    if shots_path is not None and k:
        shots = [shot(r) for r in read_jsonl(shots_path, ("query", "choices", "gold"))[:k]]
    else:
        rows, shots = _head_shots(rows, k, shot)
    items = [{"kind": "mc", "row": {"instruction": r["query"]}, "choices": [str(c) for c in r["choices"]],
              "gold": r["gold"]} for r in rows]
    return items, shots


def _mmlu_split(zf: zipfile.ZipFile, split: str) -> dict[str, list[list[str]]]:
    """subject -> rows [question, A, B, C, D, answer] of one split of the MMLU zip."""
    out: dict[str, list[list[str]]] = {}
    suffix = f"_{split}.csv"
    for name in sorted(zf.namelist()):
        base = name.rsplit("/", 1)[-1]
        if f"/{split}/" not in f"/{name}" or not base.endswith(suffix):
            continue
        text = zf.read(name).decode("utf-8")
        rows = [r for r in csv.reader(io.StringIO(text)) if r]
        for r in rows:
            if len(r) != 6 or r[5].strip() not in ("A", "B", "C", "D"):
                raise ValueError(f"{name} in the MMLU zip: expected rows question,A,B,C,D,answer-letter; "
                                 f"got {r[:1]}...")
        out[base[: -len(suffix)]] = rows
    return out


def load_mmlu(path: Path, shots_path: Path | None, k: int) -> Pool:
    try:
        with zipfile.ZipFile(path) as zf:
            test = _mmlu_split(zf, "test")
            dev = _mmlu_split(zf, "dev") if shots_path is None else {}
        if shots_path is not None:
            with zipfile.ZipFile(shots_path) as zf:
                dev = _mmlu_split(zf, "dev")
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not a zip file; MMLU is read from a zip of "
                         "data/{dev,test}/<subject>_<split>.csv") from exc
    if not test:
        raise ValueError(f"{path}: no data/test/<subject>_test.csv files; is this the MMLU zip?")
    items: list[dict] = []
    for subject, rows in test.items():
        shots = [[mmlu_question(subject, r[0], r[1:5]), r[5].strip()] for r in dev.get(subject, [])[:k]]
        for r in rows:
            items.append({"kind": "mc", "row": {"instruction": mmlu_question(subject, r[0], r[1:5])},
                          "choices": ["A", "B", "C", "D"], "gold": "ABCD".index(r[5].strip()), "shots": shots,
                          "subject": subject})
    return items, []


def load_humaneval(path: Path, shots_path: Path | None, k: int) -> Pool:
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

    def shot(r: dict) -> list[str]:
        return [humaneval_question(r["prompt"]), _fenced(r["prompt"] + r["canonical_solution"])]

    rows = read_jsonl(path, keys)
    if shots_path is not None and k:
        shots = [shot(r) for r in read_jsonl(shots_path, keys)[:k]]
    else:
        rows, shots = _head_shots(rows, k, shot)
    items = [{"kind": "gen", "row": {"instruction": humaneval_question(r["prompt"])}, "gold": r["canonical_solution"],
              "problem": {"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]},
              "task_id": r["task_id"]} for r in rows]
    return items, shots


MBPP_PROMPT_IDS = (2, 3, 4, 1, 5, 6, 7, 8, 9, 10)   # the prompt split; 2-4 are the customary 3 shots
MBPP_TEST_IDS = range(11, 511)


def load_mbpp(path: Path, shots_path: Path | None, k: int) -> Pool:
    keys = ("text", "code", "task_id", "test_list")

    def shot(r: dict) -> list[str]:
        return [mbpp_question(r["text"], r["test_list"]), _fenced(r["code"])]

    rows = read_jsonl(path, keys)
    by_id = {r["task_id"]: r for r in rows}
    if shots_path is not None and k:
        shots = [shot(r) for r in read_jsonl(shots_path, keys)[:k]]
    elif all(i in by_id for i in MBPP_PROMPT_IDS) and any(i in by_id for i in MBPP_TEST_IDS):
        # The full MBPP file: score the test split, take shots from the prompt split.
        shots = [shot(by_id[i]) for i in MBPP_PROMPT_IDS[:k]]
        rows = [r for r in rows if r["task_id"] in MBPP_TEST_IDS]
    else:
        rows, shots = _head_shots(rows, k, shot)
    items = [{"kind": "gen", "row": {"instruction": mbpp_question(r["text"], r["test_list"])}, "gold": r["code"],
              "problem": {"test_list": r["test_list"], "test_setup_code": r.get("test_setup_code") or ""},
              "task_id": r["task_id"]} for r in rows]
    return items, shots


# ---------------------------------------------------------------------------------------------
# Scorers of answered items: (item with "output" or "scores", exec options) -> (score, extracted, detail).

def _score_gsm8k(rec: dict, **_: Any) -> tuple[float, str | None, str | None]:
    score, pred = score_gsm8k(rec.get("output") or "", rec["gold"])
    return score, pred, None


def _score_math(rec: dict, **_: Any) -> tuple[float, str | None, str | None]:
    score, pred = score_math(rec.get("output") or "", rec["gold"])
    return score, pred, None


def score_mc(scores: list[float], gold: int) -> tuple[float, int]:
    """1.0 when the highest option log-likelihood is the gold option's (first on ties), with the argmax."""
    pred = int(np.argmax(np.asarray(scores, dtype=np.float64)))
    return float(pred == gold), pred


def _score_mc(rec: dict, **_: Any) -> tuple[float, str | None, str | None]:
    score, pred = score_mc(rec["scores"], rec["gold"])
    return score, str(pred), None


def _score_code(program_of: Callable[[dict, str], str]):
    def score(rec: dict, timeout_s: float = 10.0, memory_mb: int = 1024,
              **_: Any) -> tuple[float, str | None, str | None]:
        result = run_program(program_of(rec["problem"], rec.get("output") or ""), timeout_s, memory_mb)
        detail = "timeout" if result.timed_out else (None if result.passed else result.output_tail[-600:])
        return float(result.passed), None, detail
    return score


@dataclass(frozen=True)
class Benchmark:
    """What the harness needs to know about one benchmark."""

    name: str
    kind: str                 # "gen" or "mc"
    few_shot: int             # default number of shots
    max_new_tokens: int       # default generation cap (gen)
    load: Callable[[Path, Path | None, int], Pool]
    score: Callable[..., tuple[float, str | None, str | None]]
    runs_code: bool = False


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("gsm8k", "gen", 4, 256, load_gsm8k, _score_gsm8k),
    "math500": Benchmark("math500", "gen", 4, 384, load_math, _score_math),
    "math": Benchmark("math", "gen", 4, 384, load_math, _score_math),
    "arc_challenge": Benchmark("arc_challenge", "mc", 0, 0, load_arc, _score_mc),
    "arc_easy": Benchmark("arc_easy", "mc", 0, 0, load_arc, _score_mc),
    "mmlu": Benchmark("mmlu", "mc", 0, 0, load_mmlu, _score_mc),
    "humaneval": Benchmark("humaneval", "gen", 0, 384, load_humaneval,
                           _score_code(lambda p, out: humaneval_program(p, out)), runs_code=True),
    "mbpp": Benchmark("mbpp", "gen", 3, 384, load_mbpp, _score_code(lambda p, out: mbpp_program(p, out)),
                      runs_code=True),
}
# The demo / custom multiple-choice set of eval.mc_path (reported as mc_accuracy).
LEGACY_MC = "mc"


def suite_items(name: str, path: Path, shots_path: Path | None, few_shot: int | None, max_new_tokens: int | None,
                limit: int | None, seed: int) -> list[dict]:
    """The scored items of one suite: its subset, with shots and generation settings attached."""
    bench = BENCHMARKS[name]
    k = bench.few_shot if few_shot is None else few_shot
    pool, shots = bench.load(path, shots_path, k)
    out = []
    for i in pick_subset(len(pool), limit, seed, name):
        item = dict(pool[i])
        item.setdefault("shots", shots)
        item["suite"] = name
        # The task id where the data has one, else the position in the scored pool: stable across limits.
        item["uid"] = f"{name}/{item.get('task_id', i)}"
        if bench.kind == "gen":
            item["max_new_tokens"] = max_new_tokens or bench.max_new_tokens
        out.append(item)
    return out


def score_item(rec: dict, timeout_s: float = 10.0, memory_mb: int = 1024) -> tuple[float, str | None, str | None]:
    """Score of one answered item with its benchmark's scorer (``mc`` for the legacy MC set)."""
    if rec["suite"] == LEGACY_MC:
        return _score_mc(rec)
    return BENCHMARKS[rec["suite"]].score(rec, timeout_s=timeout_s, memory_mb=memory_mb)
