"""A corpus of bad input rows, each with the reject reason it must get.

:func:`write_bad_alpaca` writes an alpaca JSONL file whose every line is a row that the reader must refuse,
one kind per line (the kinds a new user's file really has: bytes that are not UTF-8, broken JSON, rows of
the other format, missing or wrong fields, rows over a limit of a later stage, exact duplicates), and
returns ``{line: reason fragment}``. The file is written, not committed, because it holds bytes that are not
text and rows of hundreds of kilobytes; the rows are fixed, so every call writes the same bytes.

Append it to a file of good rows with ``first_line``: the duplicate kinds repeat ``good_row`` (which the
caller's file must hold before the corpus) and the corpus's own first row.
"""

from __future__ import annotations

import json
from pathlib import Path

from middo_ray.wire import MAX_TEXT_CHARS

# One row per kind: (raw line as bytes, fragment the reject reason must contain).
def _kinds(good_row: dict) -> list[tuple[bytes, str]]:
    big = "x" * (MAX_TEXT_CHARS + 100_000)
    first = {"instruction": "Name a prime number.", "input": "", "output": "Seven is prime."}
    rows: list[tuple[object, str]] = [
        (first, ""),                                                           # valid: the corpus's own first row
        (b'{"instruction": "Translate: caf\xe9", "output": "coffee"}', "invalid UTF-8 at byte"),
        (b'{"instruction": "cut off", "output": ', "invalid JSON line"),
        (b'{"instruction": "Q", "output": "A"} trailing', "invalid JSON line"),
        (["a", "list"], "not an object"),
        ("just a string", "not an object"),
        ({"output": "an answer without a question"}, "missing instruction"),
        ({"instruction": "a question without an answer"}, "missing output"),
        ({"instruction": "   ", "output": "blank"}, "empty instruction"),
        ({"instruction": "Q", "output": 42}, "non-string field 'output'"),
        ({"instruction": "Q", "output": "A", "history": "not json"}, "history is a string but not JSON"),
        ({"instruction": "Q", "output": "A", "history": [["only one"]]}, "history item 0"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
         "a chat row ('messages') in a file read as alpaca"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
         "a chat row ('conversations') in a file read as alpaca"),
        ({"instruction": "Summarise this.", "output": big}, f"output is {len(big):,} characters"),
        ({"instruction": big, "output": "Too long a question."}, "prompt (instruction and input) is"),
        ({"instruction": "Q" * (MAX_TEXT_CHARS // 2), "input": "I" * (MAX_TEXT_CHARS // 2), "output": "A"},
         "prompt (instruction and input) is"),
        ({"instruction": "Q", "output": "A", "system": big}, "system is"),
        (good_row, "exact duplicate of row"),
        (first, "exact duplicate of row"),
    ]
    out = []
    for value, reason in rows:
        raw = value if isinstance(value, bytes) else json.dumps(value, ensure_ascii=False).encode("utf-8")
        out.append((raw, reason))
    return out


def write_bad_alpaca(path: Path, good_row: dict, first_line: int = 1, append: bool = False) -> dict[int, str]:
    """Writes (or appends) the corpus at ``path``; returns ``{line: reason fragment}`` of the rows that must be
    rejected (the corpus's first row is valid and is not in it). ``first_line`` is the line the corpus starts
    on in the file."""
    kinds = _kinds(good_row)
    with open(path, "ab" if append else "wb") as f:
        for raw, _ in kinds:
            f.write(raw + b"\n")
    return {first_line + i: reason for i, (_, reason) in enumerate(kinds) if reason}
