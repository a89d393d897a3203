"""The accept gate's text checks (middo_ray.refine.gate) and how the refine client applies them with the judge."""

import pytest

from middo_ray.config import build_config
from middo_ray.refine.gate import content_words, gate_reasons, meta_text, topic_overlap
from middo_ray.refine.teacher import _new_stats, apply_text_gate, gate_check

pytestmark = pytest.mark.unit

DEMO_PROMPT = "What is 4 + 6 × 5? This is the final rewritten prompt that a weak open model can learn from."
DEMO_ANSWER = "I'm sorry for your loss, but as an AI, I don't have the ability to rewrite documents."


def test_meta_text_catches_the_demo_runs_accepted_rewrite_and_spares_plain_answers():
    """The prompt and the answer that a SmolLM2 judge accepted in a demo run are both caught; ordinary
    Alpaca-style prompts and answers (steps, apologies in passing, the word 'prompt') are not."""
    assert meta_text(DEMO_PROMPT) == "final rewritten prompt"
    assert meta_text("What is 4 + 6 × 5?", DEMO_ANSWER) is not None
    assert meta_text("Here is the rewritten version of your question: why is the sky blue?") is not None
    for fine in ("Step 1: preheat the oven. Step 2: mix the flour.", "Write a prompt for an image generator.",
                 "Sorry is a song by Justin Bieber.", "The AI model was trained on text.",
                 "Explain how rainbows form."):
        assert meta_text(fine) is None, fine


def test_topic_overlap_is_the_share_of_the_originals_content_words_kept():
    """A rewrite that restates the task keeps all of its content words; another task keeps none; function
    words and instruction verbs do not count; an original without content words gives None (not checked)."""
    assert topic_overlap("Give three tips for staying healthy.", "Task: Give three tips for staying healthy.") == 1.0
    assert topic_overlap("Give three tips for staying healthy.", "Classify these animals: cat, shark.") == 0.0
    assert 0 < topic_overlap("Describe the water cycle in detail.", "Explain the water cycle simply.") < 1
    assert content_words("Give the list of what it is") == set()
    assert topic_overlap("Give it to me.", "anything") is None


def test_gate_reasons_apply_topic_only_to_the_configured_operations():
    """The meta check runs on every operation; the topic check only on accept_topic_operations (improve by
    default: simplify may change the scenario), and only when its threshold is above 0."""
    job = {"operation": "improve", "instruction": "Give three tips for staying healthy.", "input": ""}
    off = {"instruction": "Name the capital of France.", "input": "", "output": "Paris."}
    assert gate_reasons(job, off, True, 0.0, ["improve"]) == []
    why = gate_reasons(job, off, True, 0.3, ["improve"])
    assert len(why) == 1 and "accept_min_topic_overlap" in why[0] and "0.00" in why[0]
    assert gate_reasons(dict(job, operation="simplify"), off, True, 0.3, ["improve"]) == []
    meta = {"instruction": DEMO_PROMPT, "input": "", "output": DEMO_ANSWER}
    assert "accept_meta_check" in gate_reasons(job, meta, True, 0.0, ["improve"])[0]
    assert gate_reasons(job, meta, False, 0.0, ["improve"]) == []


def test_the_text_gate_turns_rejected_rewrites_into_failures_and_counts_each_cause():
    """Without a judge (refine.accept='none') the text checks still apply: a caught rewrite becomes a failure
    that keeps the original and names the setting; the counts add up per cause; failed items stay as they are."""
    cfg = build_config({"refine": {"accept": "none", "accept_min_topic_overlap": 0.3}}).refine
    jobs = [{"sample_id": f"s{i}", "operation": "improve", "instruction": "Give three tips for staying healthy.",
             "input": "", "output": "x"} for i in range(4)]
    results = [{"sample_id": "s0", "status": "ok", "instruction": "Task: Give three tips for staying healthy.",
                "input": "", "output": "Eat well, sleep, move."},
               {"sample_id": "s1", "status": "ok", "instruction": DEMO_PROMPT, "input": "", "output": DEMO_ANSWER},
               {"sample_id": "s2", "status": "ok", "instruction": "Name the capital of France.", "input": "",
                "output": "Paris."},
               {"sample_id": "s3", "status": "failed", "reason": "marker missing", "instruction": "", "input": "",
                "output": ""}]
    stats = _new_stats()
    apply_text_gate(jobs, results, cfg, stats)
    assert [r["status"] for r in results] == ["ok", "failed", "failed", "failed"]
    assert results[1]["reason"].startswith("rejected by the accept gate") and "accept_meta_check" in results[1]["reason"]
    assert "original kept" in results[2]["reason"] and results[2]["instruction"] == ""
    assert results[3]["reason"] == "marker missing"
    # s1 fails both checks: counted once in 'rejected', once per cause.
    assert stats["rejected"] == 2 and stats["rejected_meta"] == 1 and stats["rejected_topic"] == 2
    assert stats["rejected_judge"] == 0
    assert gate_check(build_config({}).refine, jobs[0], {"instruction": DEMO_PROMPT, "output": "ok"})


def test_gate_defaults():
    """Defaults: the meta check on, the topic check off (0), and when turned on it checks 'improve' only."""
    cfg = build_config({}).refine
    assert cfg.accept_meta_check is True and cfg.accept_min_topic_overlap == 0.0
    assert cfg.accept_topic_operations == ["improve"]


def test_answer_relevance_rejects_an_answer_that_mentions_nothing_of_its_prompt_when_turned_on():
    """Off by default; with refine.accept_min_answer_relevance > 0 an answer sharing no content word with its new
    prompt (another sample's answer) is rejected, and one that mentions the task passes."""
    from middo_ray.refine.gate import answer_relevance

    job = {"operation": "improve", "instruction": "Give three tips for staying healthy.", "input": ""}
    right = {"instruction": "Task: Give three tips for staying healthy.", "output": "Stay healthy: sleep, eat well."}
    other = {"instruction": "Task: Give three tips for staying healthy.", "output": "Paris is the capital of France."}
    assert answer_relevance(right["instruction"], right["output"]) > 0
    assert answer_relevance(other["instruction"], other["output"]) == 0.0
    assert gate_reasons(job, other, True, 0.0, ["improve"]) == []
    why = gate_reasons(job, other, True, 0.0, ["improve"], min_answer_relevance=0.01)
    assert len(why) == 1 and "accept_min_answer_relevance" in why[0]
    assert gate_reasons(job, right, True, 0.0, ["improve"], min_answer_relevance=0.01) == []
    assert build_config({}).refine.accept_min_answer_relevance == 0.0


def test_the_ifd_check_rejects_only_above_its_threshold_and_only_when_set():
    """refine.accept_max_ifd: off by default; on, a rewrite whose IFD is above it is rejected with a reason that
    names the setting, one at or below it passes, and an undefined IFD (None) is not held against it."""
    from middo_ray.refine.teacher import ifd_check

    off = build_config({}).refine
    assert off.accept_max_ifd is None and ifd_check(off, 5.0) is None
    on = build_config({"refine": {"accept_max_ifd": 1.0}}).refine
    why = ifd_check(on, 1.07)
    assert why is not None and "refine.accept_max_ifd 1" in why and "1.07" in why
    assert ifd_check(on, 1.0) is None and ifd_check(on, 0.4) is None and ifd_check(on, None) is None


@pytest.mark.parametrize("refine, fix", [
    ({"accept": "none"}, "refine.accept to 'not_worse'"),
    ({"judge": "teacher", "engine": "openai", "openai_base_url": "http://127.0.0.1:9/v1"}, "engine 'openai'"),
])
def test_the_ifd_check_needs_a_judge_that_gives_token_losses(refine, fix):
    """The IFD check runs in the re-judge on an engine with logits: a config that turns the re-judge off, or judges
    with an engine that gives no token losses, is refused before any work, naming the fix."""
    from middo_ray.config import ConfigError

    with pytest.raises(ConfigError, match="accept_max_ifd") as exc:
        build_config({"refine": {"accept_max_ifd": 1.0, **refine}})
    assert fix in str(exc.value)
    for fine in ({"judge": "teacher"}, {"judge_engine": "vllm"}, {"engine": "openai", "openai_base_url": "http://h/v1"}):
        assert build_config({"refine": {"accept_max_ifd": 1.0, **fine}}).refine.accept_max_ifd == 1.0
