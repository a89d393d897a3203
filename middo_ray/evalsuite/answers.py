"""Final-answer extraction and normalisation for the math benchmarks (pure functions, no model).

GSM8K: the answer is a number. :func:`extract_gsm8k_answer` takes, in order of preference, the number
after the first ``####`` (the data's own answer format, which the few-shot examples teach), the number
after the last "answer is", or else the last number in the text. :func:`normalize_number` drops ``$``,
thousands commas, a trailing ``.``, a ``%`` sign and the unicode minus, and writes the value in canonical
decimal form, so ``"$1,000.00"`` and ``"1000"`` are the same answer.

MATH: the answer is a LaTeX expression. :func:`extract_boxed` returns the content of the *last*
``\\boxed{...}`` (or ``\\fbox{...}``) with nested braces matched; without one, the text after the last
"final answer is" counts. :func:`normalize_math_answer` removes what does not change the value:
``$``, ``\\left``/``\\right``, spacing commands, ``\\text{}``/``\\mbox{}`` wrappers, degree and percent
signs, a trailing unit word from a fixed list (cm, inches, dollars, degrees, ...), a leading ``x =``,
thousands separators, spaces, and it canonicalises ``\\dfrac``/``\\tfrac`` to ``\\frac``, ``\\frac12`` to
``\\frac{1}{2}``, ``\\sqrt2`` to ``\\sqrt{2}``, ``a/b`` to ``\\frac{a}{b}`` and plain numbers to canonical
decimals. :func:`math_answers_equal` compares the normal forms, and also the numeric values when both
sides are numbers or simple fractions. There is no symbolic algebra: ``\\frac{\\sqrt{2}}{2}`` and
``\\frac{1}{\\sqrt{2}}`` differ.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# ---------------------------------------------------------------------------------------------
# GSM8K.

_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_HASHES_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer is[:\s]*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER_RE = re.compile(_NUMBER)


def normalize_number(text: str | None) -> str | None:
    """Canonical decimal string of a number written with ``$``, commas, ``%``, a trailing ``.``; None if none."""
    if text is None:
        return None
    s = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace("%", "").strip()
    s = s.rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == 0:
        return "0"
    out = format(value.normalize(), "f")
    return out


def extract_gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K solution, normalised (see the module docstring for the order)."""
    text = (text or "").replace("\u2212", "-")
    m = _HASHES_RE.search(text)
    if m:
        return normalize_number(m.group(1))
    hits = _ANSWER_IS_RE.findall(text)
    if hits:
        return normalize_number(hits[-1])
    numbers = _ANY_NUMBER_RE.findall(text)
    for candidate in reversed(numbers):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K ``answer`` field (the text after ``####``).

    Raises:
        ValueError: When the field has no ``#### <number>`` line (not a GSM8K answer).
    """
    m = _HASHES_RE.search(answer or "")
    value = normalize_number(m.group(1)) if m else None
    if value is None:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}")
    return value


def score_gsm8k(output: str, gold: str) -> tuple[float, str | None]:
    """1.0 when the output's final number equals the gold number (already normalised), with the extraction."""
    pred = extract_gsm8k_answer(output)
    return float(pred is not None and pred == normalize_number(gold)), pred


def strip_calculator_annotations(answer: str) -> str:
    """Removes GSM8K's ``<<48/2=24>>`` calculator annotations (noise in a few-shot example)."""
    return re.sub(r"<<[^<>]*>>", "", answer)


# ---------------------------------------------------------------------------------------------
# MATH.

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with nested braces, or of ``\\boxed 5``."""
    text = text or ""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        i = start
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
            continue   # unbalanced: try an earlier box
        if i > start:  # "\boxed 5": up to the next space, "$" or end
            m = re.match(r"[^\s$]+", text[i:])
            if m:
                return m.group(0)
    return None


_FINAL_RE = re.compile(r"final answer is[:\s]*(.+)", re.IGNORECASE)


def extract_math_answer(text: str) -> str | None:
    """The final answer of a MATH solution: the last box, else the text after "final answer is"."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    hits = _FINAL_RE.findall(text or "")
    if not hits:
        return None
    ans = hits[-1].split("\n")[0]
    ans = re.split(r"\.\s+I hope", ans)[0].strip()
    ans = ans.strip().rstrip(".").strip()
    if ans.startswith("$") and ans.count("$") >= 2:
        ans = ans[1:ans.index("$", 1)]
    return ans.strip("$ ") or None


_UNITS = ("cm", "mm", "km", "meters", "meter", "metres", "inches", "inch", "feet", "foot", "ft",
          "yards", "yard", "miles", "mile", "mph", "units", "unit", "degrees", "degree", "cents", "cent",
          "dollars", "dollar", "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day",
          "weeks", "week", "years", "year", "pounds", "pound", "ounces", "ounce", "liters", "liter",
          "gallons", "gallon", "grams", "gram", "kg", "students", "people", "ways")
_UNIT_TAIL_RE = re.compile(r"(?<=[\d}.])\s*(?:\\\s|~|\\,)*(?:(?:square|sq|cubic)\s+)?(?:" + "|".join(_UNITS)
                           + r")(?:\^\{?[23]\}?)?\s*$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm|textnormal)\s*\{([^{}]*)\}")


def _strip_outer_braces(s: str) -> str:
    while s.startswith("{") and s.endswith("}"):
        depth = 0
        for i, ch in enumerate(s):
            depth += ch == "{"
            depth -= ch == "}"
            if depth == 0 and i < len(s) - 1:
                return s   # the first brace closes early: "{a}+{b}"
        s = s[1:-1]
    return s


def normalize_math_answer(answer: str | None) -> str | None:
    """Normal form of a LaTeX final answer (rules in the module docstring); None for no answer."""
    if answer is None:
        return None
    s = answer.strip().replace("\n", " ")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("{,}", "")
    for _ in range(3):   # nested \text{\text{...}}
        s = _TEXT_RE.sub(r"\1", s)
    s = _UNIT_TAIL_RE.sub("", s.strip())
    s = re.sub(r"\\[!,;: ]|~", "", s)
    s = s.strip()
    m = re.fullmatch(r"[a-zA-Z]\s*=\s*(.+)", s)
    if m:
        s = m.group(1)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = _strip_outer_braces(s)
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", s):
        s = normalize_number(s) or s
    return s


def _numeric_value(s: str) -> Decimal | None:
    """Value of a plain number or a simple (signed) fraction in normal form, else None."""
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return Decimal(s)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", s)
    if m and Decimal(m.group(3)) != 0:
        value = Decimal(m.group(2)) / Decimal(m.group(3))
        return -value if m.group(1) else value
    return None


def math_answers_equal(pred: str | None, gold: str | None) -> bool:
    """Equal normal forms, or equal numeric values (relative tolerance 1e-6) for numbers and fractions."""
    a, b = normalize_math_answer(pred), normalize_math_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    va, vb = _numeric_value(a), _numeric_value(b)
    if va is None or vb is None:
        return False
    return abs(va - vb) <= Decimal("1e-6") * max(Decimal(1), abs(vb))


def score_math(output: str, gold: str) -> tuple[float, str | None]:
    """1.0 when the output's final answer matches the gold answer, with the extracted answer."""
    pred = extract_math_answer(output)
    return float(math_answers_equal(pred, gold)), pred
