"""Parsers and validators of LLM output (middo_ray.prompts): the edges the reference got wrong."""

from __future__ import annotations

import pytest

from middo_ray.prompts import (
    SIMPLIFY_MARKER,
    SYNTH_MARKER,
    answer_prompt,
    parse_marked,
    parse_score,
    rewrite_prompt,
    validate_answer,
    validate_rewrite,
)

pytestmark = pytest.mark.unit


def test_parse_marked_missing_marker_is_none():
    """A reply without the marker yields None (the reference left the field undefined)."""
    assert parse_marked("Here is a simpler prompt: add two numbers.", SIMPLIFY_MARKER) is None
    assert parse_marked("", SIMPLIFY_MARKER) is None


def test_parse_marked_takes_text_after_first_marker():
    """Only the text after the first marker counts, trimmed; a second marker stays in the text."""
    text = f"Step 1 ...\n{SIMPLIFY_MARKER}\n  Add 2 and 3.  \n"
    assert parse_marked(text, SIMPLIFY_MARKER) == "Add 2 and 3."
    twice = f"{SIMPLIFY_MARKER} first {SIMPLIFY_MARKER} second"
    assert parse_marked(twice, SIMPLIFY_MARKER).startswith("first")


@pytest.mark.parametrize("quoted", ['"Add 2 and 3."', "'Add 2 and 3.'"])
def test_parse_marked_strips_matching_quotes(quoted):
    """Surrounding double or single quotes are removed, as the reference's complexity script does."""
    assert parse_marked(f"{SYNTH_MARKER} {quoted}", SYNTH_MARKER) == "Add 2 and 3."


def test_parse_marked_empty_after_marker_is_none():
    """A marker followed by nothing (or only quotes) is no rewrite."""
    assert parse_marked(f"plan...\n{SIMPLIFY_MARKER}   ", SIMPLIFY_MARKER) is None
    assert parse_marked(f"{SIMPLIFY_MARKER} \"\"", SIMPLIFY_MARKER) is None


def test_validate_rewrite_accepts_a_real_rewrite():
    """A distinct prompt of sane length passes."""
    assert validate_rewrite("Add the numbers 2 and 3.", "Compute the sum of 2 and 3 in base 7.") is None


def test_validate_rewrite_rejects_missing_short_long():
    """None, too short and too long outputs are each rejected with a reason."""
    assert "marker" in validate_rewrite(None, "x")
    assert "shorter" in validate_rewrite("Hi.", "Explain gravity.")
    assert "longer" in validate_rewrite("a" * 5000, "Explain gravity.")


def test_validate_rewrite_rejects_echo_ignoring_case_and_spaces():
    """A rewrite that only repeats the input (modulo case and whitespace) is an echo."""
    assert "echo" in validate_rewrite("  explain   GRAVITY. ", "Explain gravity.")


def test_validate_rewrite_rejects_leftover_template_markers():
    """Text that still carries our template markers is a broken generation, not a prompt."""
    assert "marker" in validate_rewrite("#Prompt#: Explain the tides simply.", "Explain gravity.")


def test_validate_answer_cases():
    """Answers must be non-empty, bounded, and not an echo of the prompt."""
    assert validate_answer("Paris.", "What is the capital of France?") is None
    assert validate_answer(None, "q") == "empty answer"
    assert validate_answer("   ", "q") == "empty answer"
    assert "echo" in validate_answer("What is the capital of France?", "what is the capital of  france?")
    assert "longer" in validate_answer("x" * 9000, "q")


@pytest.mark.parametrize("text,expected", [
    ("10", 10.0), ("7.5 because it is clear", 7.5), (" 8\nThe prompt is clear.", 8.0),
    ("**6** fine", 6.0), ("0", 0.0), ("10.0", 10.0),
])
def test_parse_score_reads_leading_number(text, expected):
    """A number written first is the score, including 10 and decimals."""
    assert parse_score(text) == expected


@pytest.mark.parametrize("text", [
    "1. The prompt is unclear", "The prompt deserves a 7", "out of 10, I give 7", "", "no score here", "11", "42",
])
def test_parse_score_none_when_no_leading_score(text):
    """List markers, numbers not at the start, out-of-range and missing numbers give None, never 0."""
    assert parse_score(text) is None


def test_rewrite_prompt_markers_and_hints():
    """Each operation names its marker; synthesize refuses fewer than two hints."""
    assert rewrite_prompt("simplify", "p")[1] == SIMPLIFY_MARKER
    text, marker = rewrite_prompt("synthesize", "core", ["h1", "h2"])
    assert marker == SYNTH_MARKER and "h1" in text and "h2" in text and "core" in text
    with pytest.raises(ValueError, match="two hint"):
        rewrite_prompt("synthesize", "core", ["only one"])
    with pytest.raises(ValueError, match="unknown operation"):
        rewrite_prompt("paraphrase", "p")
    assert "high-quality" in answer_prompt("improve", "p") and "p" in answer_prompt("simplify", "p")
