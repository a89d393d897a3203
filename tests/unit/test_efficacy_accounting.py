"""The known-answer benchmark's pieces without Ray: the teacher over real HTTP (the official openai client), the
data it is built on, and the accounting that checks D_1 against the known originals."""

import pytest

from middo_ray.audit.efficacy import (META_ANSWER, RESTORE_PREFIX, WRONG_KINDS, KnownAnswerTeacher, account,
                                      build_data, gate_study, restored_form)
from middo_ray.config import build_config
from middo_ray.prompts import answer_prompt, own_query, parse_marked, rewrite_prompt, validate_rewrite
from middo_ray.schema import make_row

pytestmark = pytest.mark.unit


def _rows(n):
    return [make_row(f"Describe item number {i} of the catalogue in plain words.",
                     f"Item {i} is a sturdy wooden chair with four legs and a curved back rest.") for i in range(n)]


def _data(n=40, fraction=0.25):
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in _rows(n + 10)], f)
    return build_data(f.name, n, 10, fraction, seed=0)


def _ask(client, content):
    out = client.chat.completions.create(model="known-answer", messages=[{"role": "user", "content": content}])
    return out.choices[0].message.content


def test_the_teacher_restores_known_samples_echoes_others_and_answers_over_http():
    """Over real HTTP with the openai client: a defective sample's rewrite is its clean original behind the fixed
    lead-in and passes the refiner's validation, and the answer call returns the original answer; a clean
    sample comes back unchanged, which the refiner's validation rejects as an echo."""
    import openai

    data = _data()
    known = {own_query(r): data.clean_of[r["sample_id"]] for r in data.seed_rows if r["sample_id"] in data.clean_of}
    with KnownAnswerTeacher(known, data.clean, 0.0) as teacher:
        client = openai.OpenAI(base_url=teacher.base_url, api_key="k", max_retries=0)
        bad = next(r for r in data.seed_rows if r["sample_id"] in data.clean_of)
        text, marker = rewrite_prompt("improve", own_query(bad))
        new = parse_marked(_ask(client, text), marker)
        assert validate_rewrite(new, own_query(bad)) is None
        assert (new, _ask(client, answer_prompt("improve", new))) == restored_form(data.clean_of[bad["sample_id"]])
        assert new.startswith(RESTORE_PREFIX)
        good = next(r for r in data.seed_rows if r["sample_id"] not in data.clean_of)
        text, marker = rewrite_prompt("simplify", own_query(good))
        assert "echo" in validate_rewrite(parse_marked(_ask(client, text), marker), own_query(good))
        assert teacher.decisions == {own_query(bad): "restore", own_query(good): "unchanged"}
        assert teacher.calls == 3


def test_wrong_rewrites_take_a_fixed_share_of_prompts_and_every_kind():
    """With wrong_share 0.3 about 30% of prompts get a wrong rewrite, of all three kinds, decided by the prompt
    alone (the same prompt always gets the same kind); a meta rewrite is answered with the refusal."""
    data = _data(200, 0.1)
    teacher = KnownAnswerTeacher({}, data.clean, 0.3, salt="s")
    try:
        kinds = [teacher.decide(own_query(r)) for r in data.clean]
        share = sum(k in WRONG_KINDS for k in kinds) / len(kinds)
        assert 0.2 < share < 0.4 and set(kinds) == {"unchanged", *WRONG_KINDS}
        assert kinds == [teacher.decide(own_query(r)) for r in data.clean]
        meta = next(r for r, k in zip(data.clean, kinds) if k == "meta")
        assert teacher.answer(teacher.rewrite(own_query(meta))) == META_ANSWER
    finally:
        teacher.close()


def _record(sid, prompt, new_prompt, new_output, status, reason="", before=5.0, after=5.0, teacher_status="ok"):
    return {"sample_id": sid, "operation": "improve", "original_prompt": prompt, "teacher_status": teacher_status,
            "new_prompt": new_prompt, "new_output": new_output, "status": status, "reason": reason,
            "quality_before": before, "quality_after": after}


def test_account_tracks_every_defect_and_refuses_books_that_do_not_balance():
    """A D_1 where one defect is restored, one replaced by a wrong rewrite and the rest left: the counts say so
    and add up; a D_1 that lost a defect without a replacement, or a refine stage whose own counters disagree
    with its records, is an error."""
    data = _data()
    d_ids = data.defect_ids
    restored_id, wrong_id = d_ids[0], d_ids[1]
    rp, ro = restored_form(data.clean_of[restored_id])
    d1 = [r for r in data.seed_rows if r["sample_id"] not in (restored_id, wrong_id)]
    d1 += [make_row(rp, ro, parent_id=restored_id, origin="quality", round=1),
           make_row("Question: something else", "An answer.", parent_id=wrong_id, origin="quality", round=1)]
    by_id = {r["sample_id"]: r for r in data.seed_rows}
    records = [_record(restored_id, own_query(by_id[restored_id]), rp, ro, "ok"),
               _record(wrong_id, own_query(by_id[wrong_id]), "Question: something else", "An answer.", "ok"),
               _record(d_ids[2], own_query(by_id[d_ids[2]]), "", "", "failed", "rejected by re-judge: lower",
                       after=1.0),
               _record("c", "a clean prompt", "", "", "failed", "echo", teacher_status="failed")]
    decisions = {own_query(by_id[restored_id]): "restore", own_query(by_id[wrong_id]): "off_topic",
                 own_query(by_id[d_ids[2]]): "restore", "a clean prompt": "unchanged"}
    out = account(data, d1, records, decisions)
    assert (out["defects"], out["restored"], out["replaced_wrong"], out["remaining"]) == (len(d_ids), 1, 1, len(d_ids) - 2)
    assert (out["sent"], out["teacher_failed"], out["accepted"], out["rejected"], out["rejected_by_judge"]) == (4, 1, 2, 1, 1)
    assert out["accepted_wrong"] == 1 and out["accepted_correct"] == 1 and out["clean_damaged"] == 0
    with pytest.raises(AssertionError, match="vanished"):
        account(data, d1[:-1], records, decisions)
    assert account(data, d1, records, decisions, {"jobs": 4, "ok": 2, "rejected": 1})["sent"] == 4
    with pytest.raises(AssertionError, match="the refine stage counted"):
        account(data, d1, records, decisions, {"jobs": 4, "ok": 2, "rejected": 0})

    gate = gate_study(records, decisions, build_config({}).refine)
    assert gate["correct"] == 2 and gate["wrong"]["off_topic"] == 1
    assert gate["variants"]["judge"]["correct_accepted"] == 1          # the 1.0 < 5.0 rewrite is rejected
    assert gate["variants"]["judge+meta+topic>=0.2"]["wrong_let_through"]["off_topic"] == 0
    assert gate["variants"]["configured"]["wrong_rate"] == 1.0


def _seed(seed, d0, arms):
    """A seed's results as run_seed returns them, reduced to what the verdict reads."""
    return {"seed": seed, "d0": {"metrics": {"heldout_loss": d0}},
            "arms": {a: {"defects_selected": sel, "remaining": left, "metrics": {"heldout_loss": loss}}
                     for a, (sel, left, loss) in arms.items()}}


def _gate(correct, wrong, variants):
    return {"correct": correct, "wrong": dict(zip(WRONG_KINDS, wrong)),
            "variants": {name: {"correct_rate": c / correct, "wrong_rate": w / sum(wrong)}
                         for name, (c, w) in variants.items()}}


def test_the_verdict_calls_a_lead_clear_only_when_every_seed_shows_it():
    from middo_ray.audit.efficacy import verdict

    gate = _gate(60, (20, 20, 20), {"configured": (50, 9), "strict": (55, 3), "loose": (60, 12)})
    # Middo ahead of random on every seed, on the data and the model; the oracle's gain clear.
    clear = [_seed(k, 2.0, {"middo": (12 + k, 8 - k, 1.95 - 0.01 * k), "random": (6, 13, 1.99),
                            "oracle": (19, 4, 1.90)}) for k in range(3)]
    v = verdict(clear, gate)
    assert v["data"] is True and v["model"] is True
    assert v["gate"] == {"meets_goal": ["strict"], "configured_meets": False}
    assert any("clearly more of the oracle's gain" in line for line in v["lines"])
    assert v["lines"][-1].endswith("met by strict; not by the run's configured gate")
    none = verdict(clear, _gate(60, (20, 20, 20), {"configured": (50, 9)}))
    assert none["gate"]["meets_goal"] == [] and none["lines"][-1].endswith("met by no variant")
    # The same data lead, but the oracle's gain changes sign across seeds: the model-side goal is not shown.
    noisy = [_seed(k, 2.0, {"middo": (12, 8, 1.95), "random": (6, 13, 1.99),
                            "oracle": (19, 4, 1.99 if k else 2.02)}) for k in range(3)]
    v = verdict(noisy, gate)
    assert v["data"] is True and v["model"] is False
    assert any("not shown: the oracle's own gain is not clear" in line for line in v["lines"])
    # Middo behind random on one seed: no clear lead on the data; one seed alone never makes one.
    mixed = [_seed(k, 2.0, {"middo": (5 if k == 1 else 12, 8, 1.95), "random": (6, 13, 1.99),
                            "oracle": (19, 4, 1.90)}) for k in range(3)]
    assert verdict(mixed, gate)["data"] is False
    assert verdict(clear[:1], gate)["data"] is False and verdict(clear[:1], gate)["model"] is False
    # No arm beside Middo and the oracle: nothing to say about the data or the model.
    alone = [{"seed": 0, "d0": {"metrics": {"heldout_loss": 2.0}},
              "arms": {"middo": {"defects_selected": 3, "remaining": 1, "metrics": {"heldout_loss": 1.9}}}}]
    assert verdict(alone, gate)["data"] is None and verdict(alone, gate)["model"] is None
