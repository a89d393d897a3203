"""The scoring primitives of evaluation: held-out response loss and multiple-choice option log-likelihood.

- **Held-out loss**: token-weighted mean NLL over the response tokens (EOS included) of held-out rows,
  with the same encoding as training and diagnosis, so the numbers are comparable across rounds.
- **Multiple choice**: each item ``{"query", "choices", "gold"}`` (the ARC format of llm-foundry) is
  asked with the training template; every choice is scored as the summed log-probability of its tokens
  as the response, without the EOS (the EOS would charge each choice for "stopping here", which says
  nothing about which answer is right), and the prediction is the argmax.

The choice is scored without a leading space: training tokenizes the response on its own, right after
``Assistant:``, so that is the position the fine-tuned model has learned to start answers from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from middo_ray.demo import demo_path
from middo_ray.encode import Encoded, encode_row


def resolve_mc_path(mc_path: str | None) -> Path | None:
    """Turns ``eval.mc_path`` into a file path: None skips, 'demo' is the bundled set.

    Raises:
        FileNotFoundError: When the named file (or the bundled demo set) does not exist.
    """
    if mc_path is None:
        return None
    path = demo_path("mc") if mc_path == "demo" else Path(mc_path).expanduser()
    if not path.is_file():
        what = "the bundled demo multiple-choice set" if mc_path == "demo" else "the multiple-choice file"
        raise FileNotFoundError(f"{what} '{path}' does not exist; set eval.mc_path to a JSONL file of "
                                "{query, choices, gold} rows, or to null to skip multiple-choice accuracy")
    return path


def load_mc_items(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Reads up to ``limit`` multiple-choice items (the first ones) and checks each.

    Raises:
        ValueError: Naming the line of the first malformed item.
    """
    items: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            item = json.loads(line)
            choices, gold = item.get("choices"), item.get("gold")
            if not isinstance(item.get("query"), str) or not isinstance(choices, list) or not choices \
                    or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise ValueError(f"{path}:{lineno}: expected {{'query': str, 'choices': [str, ...], "
                                 f"'gold': index into choices}}, got keys {sorted(item)}")
            items.append({"query": item["query"], "choices": [str(c) for c in choices], "gold": gold})
    return items


def encode_choice(query: str, choice: str, tokenizer, template: str, cutoff_len: int,
                  history: str | None = None) -> Encoded:
    """Query as the prompt and the choice as the response, with the EOS removed from the span.

    ``history`` (a JSON list of ``[question, answer]`` turns, the row format) puts few-shot examples
    before the query as earlier turns.
    """
    row = {"instruction": query, "input": "", "output": choice, "history": history or ""}
    enc = encode_row(row, tokenizer, template, cutoff_len)
    n_choice = len(tokenizer(choice, add_special_tokens=False)["input_ids"])
    if enc.response_len > n_choice:
        # The response span still ends with the EOS that encode_row appends (the cutoff, when it bites
        # the response, drops the EOS first).
        return Encoded(enc.input_ids[:-1], enc.prompt_len, enc.truncated)
    return enc


def mc_choice_scores(model, tokenizer, items: list[dict[str, Any]], template: str = "default",
                     cutoff_len: int = 512, batch_tokens: int = 4096) -> list[np.ndarray]:
    """Summed log-probability of every choice of every item (one array per item; optional ``history``)."""
    from middo_ray.scoring import forward_scores

    encoded: list[Encoded] = []
    owners: list[int] = []
    for k, item in enumerate(items):
        for choice in item["choices"]:
            encoded.append(encode_choice(item["query"], choice, tokenizer, template, cutoff_len,
                                         item.get("history")))
            owners.append(k)
    fs = forward_scores(model, encoded, tokenizer.pad_token_id, batch_tokens=batch_tokens)
    # Mean NLL times token count is the summed NLL; a choice with no tokens scores -inf (never chosen).
    logp = np.where(fs.n_tokens > 0, -np.nan_to_num(fs.loss) * fs.n_tokens, -np.inf)
    owner_arr = np.asarray(owners)
    return [logp[owner_arr == k] for k in range(len(items))]


def mc_accuracy(scores: list[np.ndarray], golds: list[int]) -> float | None:
    """Fraction of items whose highest-scoring choice is the gold one (None when there are none)."""
    if not scores:
        return None
    hits = [int(np.argmax(s)) == g for s, g in zip(scores, golds)]
    return float(np.mean(hits))


def heldout_loss(model, tokenizer, rows: list[dict], template: str = "default", cutoff_len: int = 512,
                 batch_tokens: int = 4096) -> tuple[float | None, int]:
    """Token-weighted mean response NLL of ``rows`` and the number of tokens it averages."""
    from middo_ray.scoring import forward_scores

    if not rows:
        return None, 0
    encoded = [encode_row(r, tokenizer, template, cutoff_len) for r in rows]
    fs = forward_scores(model, encoded, tokenizer.pad_token_id, batch_tokens=batch_tokens)
    ok = fs.n_tokens > 0
    tokens = int(fs.n_tokens[ok].sum())
    if tokens == 0:
        return None, 0
    return float((fs.loss[ok] * fs.n_tokens[ok]).sum() / tokens), tokens
