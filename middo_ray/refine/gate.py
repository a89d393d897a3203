"""The accept gate's text checks: pure functions a rewrite must pass besides the judge's score.

A small judge (the model being trained, 135M parameters in the demo) scores fluent text well, whether or not it
is an answer: in a demo run it accepted "I'm sorry for your loss, but as an AI, I don't have the ability to
rewrite documents" as an improved answer to "What is 4 + 6 x 5?", with a prompt that ended in "This is the final
rewritten prompt that a weak open model can learn from.". Two checks that need no model catch what such a
judge lets through:

- **meta-text** (:func:`meta_text`): the new prompt or answer talks about the rewriting itself, or refuses;
- **topic** (:func:`topic_overlap`): the share of the original prompt's content words the new prompt keeps. An
  'improve' rewrite must keep the task; one that keeps almost none of its words answers another question;
- **answer relevance** (:func:`answer_relevance`, off by default): the share of the new prompt's content words
  that the new answer mentions; another sample's answer mentions none of them (most of the time).

Measured in ``benchmarks/efficacy.py`` (docs/audit.md, "Does the loop improve the data?").
"""

from __future__ import annotations

import re

# Phrases about the rewriting task or about being a model, and refusals. Each is a phrase, never a single
# common word, so that a prompt about prompts or an answer that says "sorry" in passing is not caught; matched
# case-insensitively with any run of spaces.
META_PHRASES = (
    r"rewritten (?:prompt|version|instruction|question)",
    r"final (?:rewritten |new )?prompt",
    r"(?:re)?written prompt",
    r"here is (?:the|a|my) (?:new|rewritten|revised|improved|simplified|final) ",
    r"(?:a )?weak(?:er)? (?:open )?(?:llms?|models?|open models?)",
    r"(?:small|weak(?:er)?) (?:llama|qwen)",
    r"as an ai\b", r"as a language model", r"as an? (?:large )?language model", r"\bai language model",
    r"i(?:'m| am) (?:sorry|unable|not able)", r"i (?:cannot|can't|can not|won't) (?:help|answer|rewrite|assist|provide|do that)",
    r"i (?:don't|do not) have the (?:ability|capability|capacity)",
    r"#[a-z ]*prompt[a-z ]*#",
)
_META = re.compile("|".join("(?:" + p.replace(" ", r"\s+") + ")" for p in META_PHRASES), re.IGNORECASE)

# Function words left out of the topic check: what is left names the task (nouns, verbs, numbers).
STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for with from into onto over under about as is are was were be
been being am do does did doing have has had having it its this that these those there here what which who whom
whose when where why how i you he she we they me him her us them my your his our their mine yours not no nor so
too very can could should would will shall may might must just also only than such each every any some all both
few more most other own same s t give write make provide describe explain list tell use using following below
above please following given one two three following create generate name find identify
""".split())
_WORD = re.compile(r"[a-z0-9]+")


def meta_text(*texts: str) -> str | None:
    """The first meta-text phrase found in any of ``texts`` (as written there), or None."""
    for text in texts:
        m = _META.search(text or "")
        if m:
            return m.group(0)
    return None


def content_words(text: str) -> set[str]:
    """Lower-cased words of 3+ characters (or any number) that are not function words, crudely stemmed."""
    out = set()
    for w in _WORD.findall((text or "").lower()):
        if w in STOPWORDS or (len(w) < 3 and not w.isdigit()):
            continue
        for suffix in ("ing", "ies", "es", "ed", "s"):
            if len(w) > len(suffix) + 3 and w.endswith(suffix):
                w = w[: -len(suffix)]
                break
        out.add(w)
    return out


def topic_overlap(original: str, rewrite: str) -> float | None:
    """Share of the original prompt's content words that the rewritten prompt keeps (None: the original has none)."""
    orig = content_words(original)
    if not orig:
        return None
    return len(orig & content_words(rewrite)) / len(orig)


def answer_relevance(prompt: str, answer: str) -> float | None:
    """Share of the prompt's content words that its answer mentions (None: the prompt has none).

    On Alpaca rows of up to 700 characters, 86% of the answers mention at least one content word of their own
    prompt, and 6% of another sample's answers do: a crude relevance test, off by default
    (``refine.accept_min_answer_relevance``)."""
    words = content_words(prompt)
    if not words:
        return None
    return len(words & content_words(answer)) / len(words)


def gate_reasons(job: dict, result: dict, meta_check: bool, min_topic_overlap: float,
                 topic_operations: list[str] | tuple[str, ...], min_answer_relevance: float = 0.0) -> list[str]:
    """Why the text checks reject an ok rewrite of ``job`` (empty: it passes them).

    Args:
        job: The refine job (``operation``, ``instruction``, ``input``: the original).
        result: The teacher's ok result (``instruction``, ``input``, ``output``: the rewrite).
        meta_check: Run the meta-text check on the new prompt and answer.
        min_topic_overlap: Least :func:`topic_overlap` for operations in ``topic_operations``; 0 = off.
        topic_operations: Operations the topic check applies to.
        min_answer_relevance: Least :func:`answer_relevance` of the new answer to the new prompt; 0 = off.
    """
    why: list[str] = []
    new_prompt = "\n".join(x for x in (result.get("instruction") or "", result.get("input") or "") if x)
    if meta_check:
        found = meta_text(new_prompt, result.get("output") or "")
        if found is not None:
            why.append(f"meta-text '{found[:60]}' in the rewrite (refine.accept_meta_check)")
    if min_topic_overlap > 0 and job.get("operation") in topic_operations:
        original = "\n".join(x for x in (job.get("instruction") or "", job.get("input") or "") if x)
        share = topic_overlap(original, new_prompt)
        if share is not None and share < min_topic_overlap:
            why.append(f"the new prompt keeps {share:.2f} of the original's content words < "
                       f"refine.accept_min_topic_overlap {min_topic_overlap:g} (off topic)")
    if min_answer_relevance > 0:
        share = answer_relevance(new_prompt, result.get("output") or "")
        if share is not None and share < min_answer_relevance:
            why.append(f"the new answer mentions {share:.2f} of the new prompt's content words < "
                       f"refine.accept_min_answer_relevance {min_answer_relevance:g}")
    return why
