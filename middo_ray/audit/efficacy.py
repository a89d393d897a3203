"""Does the loop improve the data with a good teacher, and does its gate keep wrong rewrites out?

A known-answer benchmark of one round of the real loop (``benchmarks/efficacy.py``; docs/audit.md):

1. clean Alpaca rows are split into a seed set and a clean held-out set; the audit's injector
   (:func:`middo_ray.audit.inject.inject_defects`) makes a fraction of the seed rows defective;
2. a *known-answer teacher* (:class:`KnownAnswerTeacher`, an OpenAI-compatible HTTP server on loopback,
   reached through ``refine.engine=openai``) answers the refiner: for a sample whose clean original it knows it
   returns that original as the rewrite, otherwise the sample unchanged (which the refiner rejects as an echo: a
   failed rewrite); for a fixed share of the samples it returns a fluent but wrong rewrite instead;
3. every arm runs the real loop (:func:`middo_ray.loop.run_loop`, one round: diagnosis, selection, refine with
   the judge's accept gate, merge, Ray Train, evaluation on the held-out split). The arms share round 0 (D_0,
   M_0) and round 1's diagnosis, which are the same for all of them: their stage records are copied into each
   arm's run directory, so the loop resumes after them and runs select onwards with the arm's selection;
4. D_1 of every arm is checked against the known originals (:func:`account`), and the gate's decisions on the
   known-good and known-wrong rewrites are tallied (:func:`gate_study`).

The refiner's contract makes the rewrite a *new* prompt (one that only echoes the input is refused), so the
teacher returns the original prompt behind a fixed lead-in, :data:`RESTORE_PREFIX` ("Task: "): "replaced by its
original" means the child row is exactly ``RESTORE_PREFIX + prompt`` with the original answer
(:func:`restored_form`). Near-duplicates are left out of the default kinds: the loop has no delete operation,
and a near-duplicate restored to its source is an exact duplicate, which merge drops (the defect stays).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

from middo_ray.prompts import IMPROVE_MARKER, SIMPLIFY_MARKER, SYNTH_MARKER, answer_prompt, own_query
from middo_ray.schema import make_row

log = logging.getLogger("middo.efficacy")

RESTORE_PREFIX = "Task: "
OFF_TOPIC_PREFIX = "Question: "
META_SUFFIX = " This is the final rewritten prompt that a weak open model can learn from."
META_ANSWER = "I'm sorry, but as an AI, I don't have the ability to rewrite documents."
WRONG_KINDS = ("other_answer", "off_topic", "meta")
EFFICACY_KINDS = ("mismatched", "truncated", "shuffled", "repeated", "non_answer", "garbled")
# In the order they run: the oracle early, so that a run cut short still has the gain's denominator.
ARMS = ("middo", "oracle", "random", "rank_quality", "rank_complexity", "rank_ifd", "rank_diversity",
        "middo_improve")
TEACHER_KEY_ENV = "MIDDO_EFFICACY_TEACHER_KEY"

# The refiner's answer call is the answer instruction, then the new prompt (middo_ray.prompts.answer_prompt).
_ANSWER_LEADS = tuple(answer_prompt(op, "") for op in ("simplify", "improve"))


def restored_form(clean: dict) -> tuple[str, str]:
    """(prompt, output) of a correct rewrite of ``clean``: what the known-answer teacher returns for it."""
    return RESTORE_PREFIX + own_query(clean), clean["output"]


def _content(row: dict) -> tuple[str, str]:
    return own_query(row), row["output"]


def _unit(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``key`` and ``salt``."""
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12


# ---------------------------------------------------------------------------------------------
# The known-answer teacher.

class KnownAnswerTeacher:
    """An OpenAI-compatible ``/v1/chat/completions`` server on 127.0.0.1 that knows the clean originals.

    It reads the refiner's two calls per sample (serve/logic.py): the rewrite call (the operation's teacher
    prompt, with the sample's prompt after ``#Prompt#:`` or ``#Core Prompt#:``) and the answer call (the answer
    instruction, then the new prompt). For the rewrite call of a sample's prompt ``p``:

    - with probability ``wrong_share`` (fixed per ``p`` by a hash with ``salt``) a wrong rewrite, its kind
      chosen by a second hash: ``other_answer`` (``RESTORE_PREFIX + p``, later answered with another sample's
      answer), ``off_topic`` (another sample's prompt and answer) or ``meta`` (``p`` with :data:`META_SUFFIX`,
      answered with :data:`META_ANSWER`);
    - else, when ``p`` is the prompt of a defective sample: its clean original (:func:`restored_form`);
    - else ``p`` unchanged (the refiner rejects it as an echo: a failed rewrite).

    Every decision is recorded in :attr:`decisions` (prompt -> kind) for the accounting.

    Args:
        known: Prompt text of each defective sample -> its clean original row.
        donors: Clean rows whose prompts and answers the wrong rewrites borrow.
        wrong_share: Share of prompts that get a wrong rewrite, in [0, 1].
        salt: Seed of the hashes.
    """

    def __init__(self, known: dict[str, dict], donors: list[dict], wrong_share: float = 0.0, salt: str = "0"):
        if not 0.0 <= wrong_share <= 1.0:
            raise ValueError(f"wrong_share must be in [0, 1] (got {wrong_share})")
        if wrong_share > 0 and len(donors) < 2:
            raise ValueError("wrong rewrites need at least 2 donor rows")
        self.known, self.donors, self.wrong_share, self.salt = known, donors, wrong_share, salt
        self.decisions: dict[str, str] = {}
        self.calls = 0
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "KnownAnswerTeacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- the answers ----------------------------------------------------------------------

    def decide(self, prompt: str) -> str:
        """The kind of rewrite ``prompt`` gets: restore, unchanged or one of :data:`WRONG_KINDS`."""
        if self.wrong_share > 0 and _unit(prompt, self.salt) < self.wrong_share:
            return WRONG_KINDS[int(_unit(prompt, self.salt + ":kind") * len(WRONG_KINDS))]
        return "restore" if prompt in self.known else "unchanged"

    def _donor(self, prompt: str, avoid: str) -> dict:
        start = int(_unit(prompt, self.salt + ":donor") * len(self.donors))
        for k in range(len(self.donors)):
            d = self.donors[(start + k) % len(self.donors)]
            if own_query(d) != prompt and d["output"].strip() != avoid.strip():
                return d
        raise ValueError("no donor row differs from the sample")

    def rewrite(self, prompt: str) -> str:
        """The new prompt for the sample whose prompt is ``prompt`` (its answer is remembered for the answer call)."""
        kind = self.decide(prompt)
        clean = self.known.get(prompt)
        if kind == "restore":
            new, answer = restored_form(clean)                          # type: ignore[arg-type]
        elif kind == "unchanged":
            new, answer = prompt, ""
        elif kind == "other_answer":
            new = RESTORE_PREFIX + prompt
            answer = self._donor(prompt, clean["output"] if clean else "")["output"]
        elif kind == "off_topic":
            d = self._donor(prompt, "")
            new, answer = OFF_TOPIC_PREFIX + own_query(d), d["output"]
        else:
            new, answer = RESTORE_PREFIX + prompt + META_SUFFIX, META_ANSWER
        with self._lock:
            self.decisions[prompt] = kind
            if answer:
                self._answers[new] = answer
        return new

    def answer(self, new_prompt: str) -> str:
        with self._lock:
            return self._answers.get(new_prompt, "")

    def reply(self, content: str) -> str:
        """The completion for one user message of the refiner."""
        for lead in _ANSWER_LEADS:
            if content.startswith(lead):
                return self.answer(content[len(lead):])
        for tag, marker in (("#Core Prompt#:\n", SYNTH_MARKER), ("#Prompt#:\n", SIMPLIFY_MARKER)):
            pos = content.rfind(tag)
            if pos >= 0:
                prompt = content[pos + len(tag):]
                prompt = prompt[:-1] if prompt.endswith("\n") else prompt
                return f"{marker if tag.startswith('#Core') else IMPROVE_MARKER}\n{self.rewrite(prompt)}"
        return "I can only rewrite prompts."

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "known-answer", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                msgs = body.get("messages") or [{}]
                last = next((m.get("content", "") for m in reversed(msgs) if m.get("role") == "user"), "")
                with owner._lock:
                    owner.calls += 1
                text = owner.reply(last)
                self._send(200, {
                    "id": "chatcmpl-known", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(last.split()), "completion_tokens": len(text.split()),
                              "total_tokens": len(last.split()) + len(text.split())}})

        return Handler


# ---------------------------------------------------------------------------------------------
# The data.

@dataclass
class EfficacyData:
    """One seed's data: the clean rows, the seed set with defects, the held-out rows and the labels."""

    clean: list[dict]
    seed_rows: list[dict]
    heldout: list[dict]
    labels: list[dict]
    clean_of: dict[str, dict] = field(default_factory=dict)     # defective sample_id -> clean original row

    @property
    def defect_ids(self) -> list[str]:
        return [lab["sample_id"] for lab in self.labels if lab["kind"] is not None]


def pick_rows(path: str | Path, n_train: int, n_heldout: int, seed: int, max_chars: int = 700) -> tuple[list, list]:
    """``n_train`` seed rows and ``n_heldout`` held-out rows from an Alpaca JSON file, drawn by a hash of the
    seed (rows longer than ``max_chars`` characters are left out, so a short cutoff never truncates)."""
    raw = json.loads(Path(path).read_text())
    rows, seen = [], set()
    for r in raw:
        row = make_row(r.get("instruction") or "", r.get("output") or "", input=r.get("input") or "")
        text = own_query(row) + row["output"]
        if not row["instruction"].strip() or not row["output"].strip() or len(text) > max_chars:
            continue
        if row["sample_id"] in seen or own_query(row) in seen:
            continue
        seen.update((row["sample_id"], own_query(row)))
        rows.append(row)
    rows.sort(key=lambda r: _unit(r["sample_id"], f"pick:{seed}"))
    if len(rows) < n_train + n_heldout:
        raise ValueError(f"{path} has only {len(rows)} usable rows; ask for fewer")
    return rows[:n_train], rows[n_train:n_train + n_heldout]


def build_data(path: str | Path, n_train: int, n_heldout: int, fraction: float, seed: int,
               kinds: Sequence[str] = EFFICACY_KINDS) -> EfficacyData:
    """Clean rows, the seed set with ``fraction`` of it defective (the audit's injector), held-out rows."""
    from middo_ray.audit.inject import inject_defects

    clean, heldout = pick_rows(path, n_train, n_heldout, seed)
    seed_rows, labels = inject_defects(clean, fraction, seed, kinds)
    by_id = {r["sample_id"]: r for r in clean}
    clean_of = {lab["sample_id"]: by_id[lab["source_id"]] for lab in labels if lab["kind"] is not None}
    return EfficacyData(clean, seed_rows, heldout, labels, clean_of)


def write_alpaca(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
                                for r in rows], ensure_ascii=False, indent=0))


# ---------------------------------------------------------------------------------------------
# The arms.

def arm_select(arm: str, count: int, ids_path: str, middo_ids_path: str = "") -> dict:
    """The ``select`` section of an arm (``middo`` keeps the run's own; ``middo_improve`` takes the samples Middo
    flagged on any axis, all sent to 'improve' like the other arms, so selection is compared apart from the
    operations)."""
    if arm == "middo":
        return {}
    if arm == "middo_improve":
        return {"method": "ids", "ids_path": middo_ids_path, "flag_as": "quality"}
    if arm == "random":
        return {"method": "random", "count": count, "flag_as": "quality"}
    if arm.startswith("rank_"):
        return {"method": "rank", "rank_by": arm[len("rank_"):], "count": count, "flag_as": "quality"}
    if arm == "oracle":
        return {"method": "ids", "ids_path": ids_path, "flag_as": "quality"}
    raise ValueError(f"unknown arm '{arm}'; use one of {', '.join(ARMS)}")


def _merge(tree: dict, extra: dict) -> dict:
    out = dict(tree)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


SHARED_STAGES = (("round_0", "data"), ("round_0", "train"), ("round_0", "eval"), ("round_1", "diagnose"))


def seed_from(base_root: Path, arm_root: Path) -> None:
    """Copies the stage records of round 0 and of round 1's diagnosis from the first arm's run into another's.

    The records name their files by absolute path (in the first arm's directory), so the loop in the new run
    directory loads D_0, M_0, its metrics and the diagnosis from there and runs the rest itself.
    """
    from middo_ray.rundir import MARKER, RECORD

    for rnd, stage in SHARED_STAGES:
        src, dst = base_root / rnd / stage, arm_root / rnd / stage
        if not (src / MARKER).exists():
            raise RuntimeError(f"{src} is not finished; run the first arm to the end first")
        dst.mkdir(parents=True, exist_ok=True)
        for name in (RECORD, MARKER):
            shutil.copyfile(src / name, dst / name)


def _read_shards(root: Path, stage: str, sub: str) -> list[dict]:
    from middo_ray import storage
    from middo_ray.storage import ShardSet

    info = json.loads((root / "round_1" / stage / "stage.json").read_text())
    shards = ShardSet.from_json(info["shards"][sub])
    return [r for p in shards.paths() for r in storage.read_table(p).to_pylist()]


def refine_records(root: Path) -> list[dict]:
    """Every refine job of round 1 with the teacher's rewrite (before the gate) and the gate's verdict."""
    from middo_ray import storage

    stage = root / "round_1" / "refine"
    results = _read_shards(root, "refine", "results")
    rewrites = [r for p in sorted((stage / "rewrites").glob("part-*.parquet"))
                for r in storage.read_table(str(p)).to_pylist()]
    if len(rewrites) != len(results):
        raise RuntimeError(f"{stage}: {len(rewrites)} rewrites but {len(results)} results")
    out = []
    for rw, res in zip(rewrites, results):
        if (rw["sample_id"], rw["operation"]) != (res["sample_id"], res["operation"]):
            raise RuntimeError(f"{stage}: rewrites and results are not aligned at {rw['sample_id']}")
        out.append({"sample_id": rw["sample_id"], "operation": rw["operation"],
                    "original_prompt": own_query({"instruction": rw["before_instruction"],
                                                  "input": rw["before_input"]}),
                    "teacher_status": rw["status"], "new_prompt": own_query(rw) if rw["status"] == "ok" else "",
                    "new_instruction": rw["instruction"], "new_input": rw["input"],
                    "new_output": rw["output"], "status": res["status"], "reason": res["reason"],
                    "quality_before": res["quality_before"], "quality_after": res["quality_after"],
                    "ifd_after": res.get("ifd_after")})
    return out


def account(data: EfficacyData, d1: list[dict], records: list[dict], decisions: dict[str, str],
            stage_counts: dict | None = None) -> dict:
    """Where every injected defect went, and what the refine stage did; raises when anything does not add up.

    Returns counts: ``defects`` (injected), ``remaining`` (the defective row is still in D_1), ``restored``
    (replaced by its original, :func:`restored_form`), ``replaced_wrong`` (replaced by a wrong rewrite that the
    gate let in), ``clean_damaged`` (clean rows replaced by a rewrite), ``added`` (new samples), and the
    rewrites ``sent`` / ``teacher_failed`` / ``judged`` / ``accepted`` / ``rejected`` with ``accepted_wrong``.
    ``stage_counts`` (the refine stage's own counters, ``counts`` of its stage.json) must agree with the records.
    """
    ids = {r["sample_id"] for r in d1}
    children: dict[str, list[dict]] = {}
    for r in d1:
        if r.get("parent_id"):
            children.setdefault(r["parent_id"], []).append(r)
    defects = set(data.defect_ids)
    out = {"defects": len(defects), "remaining": 0, "restored": 0, "replaced_wrong": 0, "clean_damaged": 0,
           "added": sum(1 for r in d1 if r.get("origin") == "diversity"), "d1_rows": len(d1)}
    remaining_by_kind: dict[str, int] = {}
    kinds = {lab["sample_id"]: lab["kind"] for lab in data.labels}
    for sid in sorted(defects):
        kids = [c for c in children.get(sid, []) if c.get("origin") in ("complexity", "quality")]
        if sid in ids:
            if kids:
                raise AssertionError(f"defect {sid} is both still present and replaced")
            out["remaining"] += 1
            remaining_by_kind[kinds[sid]] = remaining_by_kind.get(kinds[sid], 0) + 1
        elif kids and all(_content(c) == restored_form(data.clean_of[sid]) for c in kids):
            out["restored"] += 1
        elif kids:
            out["replaced_wrong"] += 1
        else:
            raise AssertionError(f"defect {sid} vanished from D_1 with no replacement")
    clean_ids = {r["sample_id"] for r in data.seed_rows} - defects
    for sid in clean_ids - ids:
        kids = [c for c in children.get(sid, []) if c.get("origin") in ("complexity", "quality")]
        if not kids:
            raise AssertionError(f"clean row {sid} vanished from D_1 with no replacement")
        out["clean_damaged"] += 1
    out["remaining_by_kind"] = remaining_by_kind
    # The refine stage's rewrites.
    label = [decisions.get(r["original_prompt"], "unknown") for r in records]
    ok = [r["status"] == "ok" for r in records]
    teacher_ok = [r["teacher_status"] == "ok" for r in records]
    rejected = [t and not o for t, o in zip(teacher_ok, ok)]
    out.update(sent=len(records), teacher_failed=sum(not t for t in teacher_ok), judged=sum(teacher_ok),
               accepted=sum(ok), rejected=sum(rejected),
               rejected_by_judge=sum(1 for r, x in zip(records, rejected) if x and "re-judge" in r["reason"]),
               accepted_wrong=sum(1 for o, k in zip(ok, label) if o and k in WRONG_KINDS),
               accepted_correct=sum(1 for o, k in zip(ok, label) if o and k == "restore"),
               sent_wrong=sum(1 for t, k in zip(teacher_ok, label) if t and k in WRONG_KINDS),
               sent_correct=sum(1 for t, k in zip(teacher_ok, label) if t and k == "restore"))
    if out["remaining"] + out["restored"] + out["replaced_wrong"] != out["defects"]:
        raise AssertionError(f"defect accounting does not add up: {out}")
    if out["sent"] != out["teacher_failed"] + out["accepted"] + out["rejected"]:
        raise AssertionError(f"rewrite counts do not add up: {out}")
    if stage_counts is not None:
        mine = {"jobs": out["sent"], "ok": out["accepted"], "rejected": out["rejected"]}
        theirs = {k: stage_counts.get(k) for k in mine}
        if mine != theirs:
            raise AssertionError(f"the refine stage counted {theirs}, its records say {mine}")
    return out


# ---------------------------------------------------------------------------------------------
# The gate.

def gate_study(records: list[dict], decisions: dict[str, str], refine_cfg, topic_thresholds=(0.2, 0.3, 0.5),
               embed: dict[tuple[str, str], float] | None = None,
               ifd: dict[tuple[str, str], float | None] | None = None) -> dict:
    """What each part of the gate lets through, on every judged rewrite whose truth the teacher knows.

    A rewrite is *correct* when the teacher restored the original, *wrong* when it gave a wrong kind. Each
    variant is a rule recomputed from the record (the judge's two scores under ``refine.accept`` and the text
    checks of :mod:`middo_ray.refine.gate`); ``configured`` is what the run's gate decided. Pairs judged in
    several arms count once (the same M_0 judges them the same way). ``embed`` maps (original prompt, new
    prompt) to their prompt-embedding similarity, ``ifd`` (new prompt, new answer) to the rewrite's IFD under
    the judge (:func:`rewrite_ifds`; what ``refine.accept_max_ifd`` checks).
    """
    from middo_ray.refine.gate import answer_relevance, meta_text, topic_overlap
    from middo_ray.refine.teacher import accept_rewrite

    seen, pairs = set(), []
    for r in records:
        kind = decisions.get(r["original_prompt"])
        if r["teacher_status"] != "ok" or kind is None or kind == "unchanged":
            continue
        key = (r["original_prompt"], r["operation"], r["new_prompt"])
        if key in seen:
            continue
        seen.add(key)
        pairs.append((r, kind))

    def judge_ok(r):
        return accept_rewrite(refine_cfg, r["quality_before"], r["quality_after"]) is None

    def meta_ok(r):
        return meta_text(r["new_prompt"], r["new_output"]) is None

    def topic_ok(r, t, every_operation=False):
        if not every_operation and r["operation"] not in refine_cfg.accept_topic_operations:
            return True
        share = topic_overlap(r["original_prompt"], r["new_prompt"])
        return share is None or share >= t

    t0 = refine_cfg.accept_min_topic_overlap or topic_thresholds[0]
    rules = {"judge": judge_ok, "meta": meta_ok, "topic": lambda r: topic_ok(r, t0),
             "judge+meta": lambda r: judge_ok(r) and meta_ok(r),
             "judge+meta+topic": lambda r: judge_ok(r) and meta_ok(r) and topic_ok(r, t0),
             "configured": lambda r: r["status"] == "ok"}
    for t in topic_thresholds:
        rules[f"judge+meta+topic>={t:g}"] = (lambda t: lambda r: judge_ok(r) and meta_ok(r) and topic_ok(r, t))(t)
    for tol in (0.25, 0.5, 1.0):
        loose = refine_cfg.model_copy(update={"accept": "not_worse", "accept_tolerance": tol})
        rules[f"judge(tol {tol:g})+meta+topic>={t0:g}"] = (lambda c: lambda r: accept_rewrite(
            c, r["quality_before"], r["quality_after"]) is None and meta_ok(r) and topic_ok(r, t0))(loose)
    rules["meta+topic"] = lambda r: meta_ok(r) and topic_ok(r, t0)
    rules[f"judge+meta+topic>={t0:g}(all ops)"] = lambda r: judge_ok(r) and meta_ok(r) and topic_ok(r, t0, True)

    def answer_ok(r):
        share = answer_relevance(r["new_prompt"], r["new_output"])
        return share is None or share > 0
    rules[f"judge+meta+topic>={t0:g}+answer>0"] = lambda r: judge_ok(r) and meta_ok(r) and topic_ok(r, t0) and \
        answer_ok(r)
    rules[f"meta+topic>={t0:g}+answer>0"] = lambda r: meta_ok(r) and topic_ok(r, t0) and answer_ok(r)
    if ifd:
        def ifd_ok(r, t):
            v = ifd.get((r["new_prompt"], r["new_output"]))
            return v is None or v <= t
        for t in (0.9, 1.0, 1.1):
            rules[f"judge+meta+ifd<={t:g}"] = (lambda t: lambda r: judge_ok(r) and meta_ok(r) and ifd_ok(r, t))(t)
        rules[f"judge+meta+topic>={t0:g}+ifd<=1"] = lambda r: judge_ok(r) and meta_ok(r) and topic_ok(r, t0) and \
            ifd_ok(r, 1.0)
        rules[f"meta+topic>={t0:g}+ifd<=1"] = lambda r: meta_ok(r) and topic_ok(r, t0) and ifd_ok(r, 1.0)
        for t in topic_thresholds:
            rules[f"judge+meta+topic>={t:g}(all ops)+ifd<=1"] = (lambda t: lambda r: judge_ok(r) and meta_ok(r) and
                                                                 topic_ok(r, t, True) and ifd_ok(r, 1.0))(t)
        for tol in (0.05, 0.1, 0.15, 0.25):
            loose = refine_cfg.model_copy(update={"accept": "not_worse", "accept_tolerance": tol})
            rules[f"judge(tol {tol:g})+meta+topic>=0.3(all ops)+ifd<=1"] = (lambda c: lambda r: accept_rewrite(
                c, r["quality_before"], r["quality_after"]) is None and meta_ok(r) and topic_ok(r, 0.3, True) and
                ifd_ok(r, 1.0))(loose)
        # The gate chosen on seeds 0-2 (docs/audit.md), to be checked on other seeds: the judge loosened by 0.1 and
        # IFD held to 0.95 (every correct rewrite there had IFD <= 0.934, the answers to other questions >= 0.923).
        strict = refine_cfg.model_copy(update={"accept": "not_worse", "accept_tolerance": 0.1})
        rules["judge(tol 0.1)+meta+topic>=0.3(all ops)+ifd<=0.95"] = lambda r: accept_rewrite(
            strict, r["quality_before"], r["quality_after"]) is None and meta_ok(r) and topic_ok(r, 0.3, True) and \
            ifd_ok(r, 0.95)
    if embed:
        for t in (0.5, 0.7, 0.8, 0.9):
            rules[f"judge+meta+emb>={t:g}"] = (lambda t: lambda r: judge_ok(r) and meta_ok(r) and (
                embed.get((r["original_prompt"], r["new_prompt"]), 1.0) >= t))(t)
    out: dict[str, Any] = {"correct": sum(k == "restore" for _, k in pairs),
                           "wrong": {k: sum(kk == k for _, kk in pairs) for k in WRONG_KINDS},
                           "topic_threshold": t0, "variants": {}}
    for name, rule in rules.items():
        acc_c = sum(1 for r, k in pairs if k == "restore" and rule(r))
        let = {k: sum(1 for r, kk in pairs if kk == k and rule(r)) for k in WRONG_KINDS}
        n_w = sum(out["wrong"].values())
        out["variants"][name] = {
            "correct_accepted": acc_c, "correct_rate": acc_c / out["correct"] if out["correct"] else None,
            "wrong_let_through": let, "wrong_rate": sum(let.values()) / n_w if n_w else None}
    if embed:
        sims = {"correct": [embed[(r["original_prompt"], r["new_prompt"])] for r, k in pairs if k == "restore"
                            and (r["original_prompt"], r["new_prompt"]) in embed]}
        for k in WRONG_KINDS:
            sims[k] = [embed[(r["original_prompt"], r["new_prompt"])] for r, kk in pairs if kk == k
                       and (r["original_prompt"], r["new_prompt"]) in embed]
        out["embedding_similarity"] = {k: _summary(v) for k, v in sims.items()}
    if ifd:
        values = {"correct": [ifd.get((r["new_prompt"], r["new_output"])) for r, k in pairs if k == "restore"]}
        for k in WRONG_KINDS:
            values[k] = [ifd.get((r["new_prompt"], r["new_output"])) for r, kk in pairs if kk == k]
        out["ifd"] = {k: _summary([x for x in v if x is not None]) for k, v in values.items()}
    return out


def _summary(xs: list[float]) -> dict | None:
    if not xs:
        return None
    xs = sorted(xs)
    return {"n": len(xs), "min": xs[0], "median": xs[len(xs) // 2], "max": xs[-1]}


def rewrite_ifds(m, tok, records: list[dict], template: str = "default",
                 cutoff_len: int = 256) -> dict[tuple[str, str], float | None]:
    """IFD of each judged rewrite (its new prompt and answer) under model ``m`` (tokenizer ``tok``), encoded as
    the diagnosis and the judge's ``refine.accept_max_ifd`` check encode it; keyed by (new prompt, new answer)."""
    import math

    from middo_ray.scoring import ifd_scores

    rows, keys, seen = [], [], set()
    for r in records:
        key = (r["new_prompt"], r["new_output"])
        if r["teacher_status"] != "ok" or key in seen:
            continue
        seen.add(key)
        keys.append(key)
        rows.append({"instruction": r["new_instruction"], "input": r["new_input"] or "", "output": r["new_output"]})
    if not rows:
        return {}
    values = ifd_scores(m, tok, rows, template, cutoff_len)
    return {k: (float(v) if math.isfinite(v) else None) for k, v in zip(keys, values)}


def prompt_similarities(m, tok, pairs: list[tuple[str, str]]) -> dict:
    """Cosine similarity of mask-aware mean-pooled last hidden states (the diagnosis' embedding, over the raw
    prompt text) of each (original prompt, new prompt) pair, under model ``m`` (tokenizer ``tok``)."""
    import torch

    texts = sorted({t for p in pairs for t in p})
    vecs: dict[str, Any] = {}
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            part = texts[start:start + 16]
            enc = tok(part, return_tensors="pt", padding=True, truncation=True, max_length=256)
            hidden = m(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            for t, v in zip(part, torch.nn.functional.normalize(pooled, dim=-1)):
                vecs[t] = v
    return {(a, b): float(vecs[a] @ vecs[b]) for a, b in pairs}


# ---------------------------------------------------------------------------------------------
# One seed, every arm.

def base_config(work: Path, seed: int, teacher_url: str, model: str, port: int, mc_path: str | None,
                mc_limit: int, train: dict | None = None, extra: dict | None = None) -> dict:
    """The config tree every arm shares (the arm adds its ``select`` and ``run_id``)."""
    tree = {
        "run": {"output_dir": str(work / "runs"), "seed": seed},
        "data": {"path": str(work / "seed.json"), "heldout_path": str(work / "heldout.json"), "cutoff_len": 256},
        "model": {"base": model, "dtype": "bfloat16" if model == "smollm2" else "auto"},
        "refine": {"engine": "openai", "openai_base_url": teacher_url, "model": "known-answer",
                   "openai_api_key_env": TEACHER_KEY_ENV, "openai_retries": 1, "batch_size": 8,
                   "max_concurrency": 2, "max_new_tokens": 256, "max_retries": 0, "http_port": port,
                   "max_consecutive_failures": 3},
        "train": {"learning_rate": 5e-5, "batch_size": 8, "checkpoint_every_steps": 0, **(train or {})},
        "eval": {"mc_path": mc_path, "mc_limit": mc_limit, "metric": "heldout_loss"},
        "converge": {"max_rounds": 1},
        "ray": {"num_cpus": 4},
    }
    return _merge(tree, extra or {})


def _metrics(root: Path, rnd: int) -> dict:
    return json.loads((root / f"round_{rnd}" / "eval" / "stage.json").read_text())


def run_seed(rows_path: str | Path, work: Path, seed: int, n_train: int, n_heldout: int, fraction: float,
             wrong_share: float, arms: Sequence[str] = ARMS, model: str = "smollm2", port: int = 8000,
             mc_path: str | None = None, mc_limit: int = 100, train: dict | None = None,
             extra: dict | None = None, kinds: Sequence[str] = EFFICACY_KINDS, embed: bool = False,
             progress: str | Path | None = None, ifd: bool = False) -> dict:
    """One seed of the benchmark: the data, the teacher, every arm through the real loop; returns the results.

    The first arm must be ``middo``: it runs round 0 and round 1's diagnosis, and its number of selected
    samples is the count of the random and ranked arms. With ``progress``, the results so far are written
    there after every arm. With the same ``work`` directory a rerun resumes the finished stages.
    """
    from middo_ray.config import build_config
    from middo_ray.loop import run_loop

    arms = list(arms)
    if not arms or arms[0] != "middo":
        raise ValueError("the first arm must be 'middo' (it runs round 0 and the diagnosis for all)")
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(rows_path, n_train, n_heldout, fraction, seed, kinds)
    write_alpaca(work / "seed.json", data.seed_rows)
    write_alpaca(work / "heldout.json", data.heldout)
    ids_path = work / "oracle_ids.json"
    ids_path.write_text(json.dumps(data.defect_ids))
    known = {own_query(r): data.clean_of[r["sample_id"]] for r in data.seed_rows if r["sample_id"] in data.clean_of}
    os.environ.setdefault(TEACHER_KEY_ENV, "known-answer")
    out: dict[str, Any] = {"seed": seed, "rows": {"seed": len(data.seed_rows), "heldout": len(data.heldout),
                                                  "defects": len(data.defect_ids)},
                           "injected": {k: sum(1 for lab in data.labels if lab["kind"] == k) for k in kinds},
                           "arms": {}}
    all_records: list[dict] = []
    with KnownAnswerTeacher(known, data.clean, wrong_share, salt=str(seed)) as teacher:
        tree = base_config(work, seed, teacher.base_url, model, port, mc_path, mc_limit, train, extra)
        count = None
        base_root = work / "runs" / f"s{seed}-middo"
        for arm in arms:
            t0 = time.time()
            run_id = f"s{seed}-{arm}"
            root = work / "runs" / run_id
            if arm != "middo":
                seed_from(base_root, root)
            cfg = build_config(_merge(tree, {"run": {"run_id": run_id},
                                             "select": arm_select(arm, count or 0, str(ids_path),
                                                                  str(work / "middo_ids.json"))}))
            log.info("efficacy: seed %d, arm %s", seed, arm)
            run_loop(cfg)
            sel = json.loads((root / "round_1" / "select" / "stage.json").read_text())["counts"]
            flags = _read_shards(root, "select", "flags")
            chosen = [f["sample_id"] for f in flags if f["complexity"] or f["diversity"] or f["quality"]]
            if arm == "middo":
                count = sel["any"]["flagged"]
                (work / "middo_ids.json").write_text(json.dumps(chosen))
                if count == 0:
                    log.warning("efficacy: Middo's rules flagged nothing; the other arms choose 0 samples too")
            d1 = _read_shards(root, "merge", "dataset")
            records = refine_records(root)
            all_records.extend(records)
            # The teacher's decision is a function of the prompt: recomputed, so a resumed arm (whose refine stage
            # finished in an earlier process and asks nothing now) is labelled as well as a fresh one.
            decisions = {r["original_prompt"]: teacher.decide(r["original_prompt"]) for r in all_records}
            stage = json.loads((root / "round_1" / "refine" / "stage.json").read_text())["counts"]
            acct = account(data, d1, records, decisions, stage)
            out["arms"][arm] = {"selected": sel["any"]["flagged"],
                                "defects_selected": len(set(chosen) & set(data.defect_ids)),
                                "flags": {a: sel[a]["flagged"] for a in ("complexity", "diversity", "quality")},
                                **acct, "metrics": _metrics(root, 1), "seconds": round(time.time() - t0, 1)}
            out["d0"] = {"metrics": _metrics(base_root, 0), "defects": len(data.defect_ids),
                         "remaining": len(data.defect_ids)}
            if progress is not None:              # what is done so far, for a run that is cut short
                done = dict(out, gain=oracle_gain(out), gate=gate_study(all_records, decisions, cfg.refine))
                Path(progress).write_text(json.dumps(done, indent=1, default=str))
        sims = ifds = None
        if (embed or ifd) and all_records:      # under M_0, the judge of round 1, loaded once for both
            from middo_ray.models import load_model

            m0 = load_model(json.loads((base_root / "round_0" / "train" / "stage.json").read_text())["model_dir"],
                            dtype="float32")
            if embed:
                sims = prompt_similarities(*m0, sorted({(r["original_prompt"], r["new_prompt"]) for r in all_records
                                                        if r["teacher_status"] == "ok"}))
            if ifd:
                ifds = rewrite_ifds(*m0, all_records, cfg.data.template, cfg.data.cutoff_len)
        decisions = {r["original_prompt"]: teacher.decide(r["original_prompt"]) for r in all_records}
        out["gate"] = gate_study(all_records, decisions, cfg.refine, embed=sims, ifd=ifds)
        out["teacher"] = {"calls": teacher.calls, "decisions": {k: sum(v == k for v in teacher.decisions.values())
                                                                for k in ("restore", "unchanged", *WRONG_KINDS)}}
    out["gain"] = oracle_gain(out)
    if progress is not None:                      # the seed's finished results, the gate's IFD variants included
        Path(progress).write_text(json.dumps(out, indent=1, default=str))
    return out


def oracle_gain(seed_result: dict) -> dict:
    """Per arm the fraction of the oracle's gain over M_0 it recovers, for held-out loss and MC accuracy."""
    d0 = seed_result["d0"]["metrics"]
    oracle = seed_result["arms"].get("oracle", {}).get("metrics")
    out = {}
    for arm, res in seed_result["arms"].items():
        m = res["metrics"]
        out[arm] = {}
        for key, sign in (("heldout_loss", -1.0), ("mc_accuracy", 1.0)):
            if oracle is None or d0.get(key) is None or m.get(key) is None or oracle.get(key) is None:
                out[arm][key] = None
                continue
            full = sign * (oracle[key] - d0[key])
            out[arm][key] = (sign * (m[key] - d0[key]) / full) if abs(full) > 1e-12 else None
    return out


# ---------------------------------------------------------------------------------------------
# The report.

def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    mu = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mu, sd


def _fmt(mu, sd, digits=3) -> str:
    if mu is None:
        return "-"
    return f"{mu:.{digits}f}" + (f"±{sd:.{digits}f}" if sd else "")


def summarize(seeds: list[dict]) -> dict:
    """Mean and spread over seeds per arm (and D_0), and the gate pooled over seeds."""
    arms = ["d0"] + [a for a in ARMS if all(a in s["arms"] for s in seeds)]
    table = {}
    for arm in arms:
        get = (lambda s, k: s["d0"]["metrics"].get(k)) if arm == "d0" else (lambda s, k: s["arms"][arm]["metrics"].get(k))
        row = {k: _mean_sd([get(s, k) for s in seeds]) for k in ("heldout_loss", "mc_accuracy")}
        if arm == "d0":
            row.update(remaining=_mean_sd([s["d0"]["remaining"] for s in seeds]))
            row.update({k: (None, None) for k in ("selected", "defects_selected", "sent", "accepted", "rejected",
                                                  "accepted_wrong", "restored", "clean_damaged")})
            row["gain_loss"] = _mean_sd([0.0 for _ in seeds])
            row["gain_mc"] = _mean_sd([0.0 for _ in seeds])
        else:
            for k in ("selected", "defects_selected", "remaining", "restored", "replaced_wrong", "clean_damaged", "sent", "accepted",
                      "rejected", "rejected_by_judge", "accepted_wrong", "teacher_failed"):
                row[k] = _mean_sd([s["arms"][arm].get(k) for s in seeds])
            row["gain_loss"] = _mean_sd([s["gain"][arm]["heldout_loss"] for s in seeds])
            row["gain_mc"] = _mean_sd([s["gain"][arm]["mc_accuracy"] for s in seeds])
        row["per_seed_loss"] = [get(s, "heldout_loss") for s in seeds]
        table[arm] = row
    gate = _pool_gate([s["gate"] for s in seeds])
    return {"arms": table, "gate": gate, "seeds": [s["seed"] for s in seeds], "verdict": verdict(seeds, gate)}


# The gate goal: at most this share of the wrong rewrites let through, at least this share of the correct
# ones accepted.
GATE_MAX_WRONG = 0.05
GATE_MIN_CORRECT = 0.90


def _paired(seeds: list[dict], fn) -> tuple[list[float], float | None, float | None]:
    xs = [x for x in (fn(s) for s in seeds) if x is not None]
    mu, sd = _mean_sd(xs)
    return xs, mu, sd


def _clear(xs: list[float], mu: float | None, sd: float | None) -> bool:
    """A paired difference is *clear* when it is positive on every seed (three at least) and its mean is more
    than twice its standard error: a deliberately plain rule, since three to six seeds allow no finer test."""
    return len(xs) >= 3 and all(x > 0 for x in xs) and mu is not None and mu > 2 * (sd or 0.0) / math.sqrt(len(xs))


def verdict(seeds: list[dict], gate: dict) -> dict:
    """What the run shows about the issue's three questions, in words and as booleans (None: not measured).

    - data: does Middo's selection hold more injected defects than random selection of as many samples, and
      leave fewer in D_1 (paired per seed)?
    - model: is the oracle's own gain over M_0 (held-out loss) clear, and does Middo's M_1 beat random's by a
      clear paired margin? When the oracle's gain is not clear, the "oracle gain" ratios divide by noise and
      the model-side goal is not shown, whatever they say.
    - gate: which gate variants meet the goal (<= 5% of the wrong let through, >= 90% of the correct accepted).
    """
    out: dict[str, Any] = {"lines": []}
    say = out["lines"].append
    both = [s for s in seeds if "middo" in s["arms"] and "random" in s["arms"]]
    if both:
        sel, mu, sd = _paired(both, lambda s: s["arms"]["middo"]["defects_selected"]
                              - s["arms"]["random"]["defects_selected"])
        left, mu_l, sd_l = _paired(both, lambda s: s["arms"]["random"]["remaining"] - s["arms"]["middo"]["remaining"])
        out["data"] = _clear(sel, mu, sd) and _clear(left, mu_l, sd_l)
        say(f"data: Middo's samples hold {_fmt(mu, sd, 1)} more injected defects than random's (per seed "
            f"{', '.join(f'{x:+g}' for x in sel)}) and leave {_fmt(mu_l, sd_l, 1)} fewer in D_1: "
            + ("clearly more" if out["data"] else "not clearly more (a clear lead: ahead on every seed, mean > 2 SE)"))
    else:
        out["data"] = None
    with_oracle = [s for s in seeds if "oracle" in s["arms"] and s["d0"]["metrics"].get("heldout_loss") is not None
                   and s["arms"]["oracle"]["metrics"].get("heldout_loss") is not None]
    g, mu_g, sd_g = _paired(with_oracle, lambda s: s["d0"]["metrics"]["heldout_loss"]
                            - s["arms"]["oracle"]["metrics"]["heldout_loss"])
    oracle_clear = _clear(g, mu_g, sd_g)
    if g:
        say(f"model: the oracle lowers M_0's held-out loss by {_fmt(mu_g, sd_g, 4)} (per seed "
            f"{', '.join(f'{x:+.4f}' for x in g)}): " + ("a clear gain" if oracle_clear else
            "not a clear gain, so the 'oracle gain' ratios divide by noise"))
    pair = [s for s in both if s["arms"]["middo"]["metrics"].get("heldout_loss") is not None
            and s["arms"]["random"]["metrics"].get("heldout_loss") is not None]
    d, mu_d, sd_d = _paired(pair, lambda s: s["arms"]["random"]["metrics"]["heldout_loss"]
                            - s["arms"]["middo"]["metrics"]["heldout_loss"])
    if d:
        middo_ahead = _clear(d, mu_d, sd_d)
        out["model"] = bool(oracle_clear and middo_ahead)
        say(f"model: Middo's M_1 has a held-out loss {_fmt(mu_d, sd_d, 4)} below random's (per seed "
            f"{', '.join(f'{x:+.4f}' for x in d)}): " + (
                "Middo recovers clearly more of the oracle's gain than random" if out["model"] else
                "not shown: " + ("the oracle's own gain is not clear" if not oracle_clear else
                                 "Middo's lead over random is not clear")))
    else:
        out["model"] = None
    n_wrong = sum(gate["wrong"].values())
    meets = [name for name, v in gate["variants"].items() if v["wrong_rate"] is not None and v["correct_rate"]
             is not None and v["wrong_rate"] <= GATE_MAX_WRONG and v["correct_rate"] >= GATE_MIN_CORRECT]
    out["gate"] = {"meets_goal": meets, "configured_meets": "configured" in meets} if n_wrong and gate["correct"] \
        else None
    if out["gate"] is not None:
        say(f"gate (goal: <= {GATE_MAX_WRONG:.0%} of {n_wrong} wrong let through, >= {GATE_MIN_CORRECT:.0%} of "
            f"{gate['correct']} correct accepted): " + (("met by " + "; ".join(meets)
                                                          + ("" if "configured" in meets else
                                                             "; not by the run's configured gate"))
                                                         if meets else "met by no variant"))
    return out


def _pool_gate(gates: list[dict]) -> dict:
    out = {"correct": sum(g["correct"] for g in gates),
           "wrong": {k: sum(g["wrong"][k] for g in gates) for k in WRONG_KINDS}, "variants": {}}
    n_w = sum(out["wrong"].values())
    for name in gates[0]["variants"]:
        if not all(name in g["variants"] for g in gates):
            continue
        acc = sum(g["variants"][name]["correct_accepted"] for g in gates)
        let = {k: sum(g["variants"][name]["wrong_let_through"][k] for g in gates) for k in WRONG_KINDS}
        out["variants"][name] = {"correct_accepted": acc, "correct_rate": acc / out["correct"] if out["correct"] else None,
                                 "wrong_let_through": let, "wrong_rate": sum(let.values()) / n_w if n_w else None}
    if all(g.get("ifd") for g in gates):
        out["ifd_per_seed"] = [g["ifd"] for g in gates]
    return out


def format_table(summary: dict) -> str:
    """The arms table and the gate table, as printed."""
    lines = ["arm               selected  defects in it  sent  accepted  rejected(judge)  wrong in  restored  "
             "defects left  clean damaged  held-out loss   MC acc        oracle gain (loss)  (MC)"]
    for arm, r in summary["arms"].items():
        lines.append(
            f"{arm:<17} {_fmt(*r['selected'], 1):>8} {_fmt(*r['defects_selected'], 1):>14} {_fmt(*r['sent'], 1):>5} {_fmt(*r['accepted'], 1):>9} "
            f"{_fmt(*r['rejected'], 1):>8}({_fmt(*r.get('rejected_by_judge', (None, None)), 1)}) "
            f"{_fmt(*r['accepted_wrong'], 1):>8} {_fmt(*r['restored'], 1):>9} {_fmt(*r['remaining'], 1):>13} "
            f"{_fmt(*r['clean_damaged'], 1):>14} {_fmt(*r['heldout_loss'], 4):>15} {_fmt(*r['mc_accuracy'], 3):>13} "
            f"{_fmt(*r['gain_loss'], 2):>19} {_fmt(*r['gain_mc'], 2):>6}")
    g = summary["gate"]
    lines += ["", f"accept gate on the known rewrites: {g['correct']} correct, "
                  + ", ".join(f"{v} {k}" for k, v in g["wrong"].items()) + " wrong",
              f"{'gate variant':<44} correct accepted   wrong let through   "
              + "   ".join(f"{k:>12}" for k in WRONG_KINDS)]
    for name, v in g["variants"].items():
        cr = "-" if v["correct_rate"] is None else f"{v['correct_rate']:.2f}"
        wr = "-" if v["wrong_rate"] is None else f"{v['wrong_rate']:.2f}"
        lines.append(f"{name:<44} {v['correct_accepted']:>6} ({cr:>4})   {sum(v['wrong_let_through'].values()):>6} "
                     f"({wr:>4})      " + "   ".join(f"{v['wrong_let_through'][k]:>12}" for k in WRONG_KINDS))
    for i, summ in enumerate(g.get("ifd_per_seed") or []):
        lines.append(f"IFD of the rewrites under M_0 (seed {summary['seeds'][i]}; min / median / max): " + ", ".join(
            f"{k} {v['min']:.2f} / {v['median']:.2f} / {v['max']:.2f}" for k, v in summ.items() if v))
    if summary.get("verdict", {}).get("lines"):
        lines += ["", "verdict:"] + ["- " + x for x in summary["verdict"]["lines"]]
    return "\n".join(lines)
