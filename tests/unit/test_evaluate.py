"""Evaluation: multiple-choice scoring by option log-likelihood, held-out loss, and the MC file contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from middo_ray.config import build_config
from middo_ray.evalsuite.scoring import (encode_choice, heldout_loss, load_mc_items, mc_accuracy, mc_choice_scores,
                                         resolve_mc_path)
from middo_ray.evaluate import evaluate_model

pytestmark = pytest.mark.unit

QUERY = "Question: What is the capital of France?"


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from middo_ray.models import load_model

    return load_model(tiny_model, device="cpu")


def _greedy_choice(model, tok, query: str, n_tokens: int = 6) -> str:
    """The model's own greedy answer to ``query`` under the training template, as text."""
    import torch

    ids = encode_choice(query, "", tok, "default", 512).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    return tok.decode(out[0, len(ids):].tolist())


def test_choice_score_is_sum_logprob_of_choice_tokens_without_eos(tiny):
    """Guards the continuation span: the score is the summed log-prob of exactly the choice tokens, no EOS."""
    import torch

    model, tok = tiny
    choice = "Paris is the capital."
    enc = encode_choice(QUERY, choice, tok, "default", 512)
    n_choice = len(tok(choice, add_special_tokens=False)["input_ids"])
    assert enc.response_len == n_choice and enc.input_ids[-1] != tok.eos_token_id
    with torch.inference_mode():
        logp = model(torch.tensor([enc.input_ids])).logits[0].float().log_softmax(-1)
    expected = sum(logp[t - 1, enc.input_ids[t]].item() for t in range(enc.prompt_len, len(enc.input_ids)))
    (scores,) = mc_choice_scores(model, tok, [{"query": QUERY, "choices": [choice], "gold": 0}])
    assert scores[0] == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_mc_picks_the_models_likeliest_answer_and_wrong_gold_scores_zero(tiny):
    """Guards argmax scoring: the model's own greedy answer wins; with the gold elsewhere accuracy is 0."""
    model, tok = tiny
    greedy = _greedy_choice(model, tok, QUERY)
    choices = [greedy, "zebra quilt vortex", "The quick brown fox"]
    items = [{"query": QUERY, "choices": choices, "gold": 0}]
    scores = mc_choice_scores(model, tok, items)
    assert int(np.argmax(scores[0])) == 0, (greedy, scores)
    assert mc_accuracy(scores, [0]) == 1.0
    assert mc_accuracy(scores, [2]) == 0.0
    assert mc_accuracy([], []) is None


def test_heldout_loss_is_token_weighted(tiny):
    """Guards the held-out metric: the mean over response tokens, not over samples."""
    from middo_ray.encode import encode_row
    from middo_ray.scoring import forward_scores

    model, tok = tiny
    rows = [{"instruction": "Hi", "output": "Hello."},
            {"instruction": "Write a haiku about rain.", "output": "Soft rain on the roof, the garden drinks."}]
    loss, tokens = heldout_loss(model, tok, rows)
    fs = forward_scores(model, [encode_row(r, tok) for r in rows], tok.pad_token_id)
    assert tokens == int(fs.n_tokens.sum())
    assert loss == pytest.approx(float((fs.loss * fs.n_tokens).sum() / fs.n_tokens.sum()))
    assert heldout_loss(model, tok, []) == (None, 0)


def test_mc_file_contract(tmp_path):
    """Guards eval.mc_path handling: null skips, a missing file is a clear error, malformed rows name their line."""
    assert resolve_mc_path(None) is None
    with pytest.raises(FileNotFoundError, match="eval.mc_path"):
        resolve_mc_path(str(tmp_path / "missing.jsonl"))
    good = {"query": "Q?", "choices": ["a", "b"], "gold": 1}
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(good) for _ in range(5)) + "\n")
    assert len(load_mc_items(path, limit=3)) == 3
    path.write_text(json.dumps(good) + "\n" + json.dumps({"query": "Q?", "choices": ["a"], "gold": 4}) + "\n")
    with pytest.raises(ValueError, match=":2:"):
        load_mc_items(path)


def test_evaluate_model_on_real_arc_items(tiny_model, shared_data):
    """Guards evaluate_model end to end on real ARC-Easy items: counts, an accuracy in [0, 1], a finite loss."""
    cfg = build_config(overrides=[f"eval.mc_path={shared_data / 'eval' / 'arc_easy_test.jsonl'}",
                                  "eval.mc_limit=8"])
    rows = [{"instruction": "Name a primary colour.", "input": "", "output": "Red."},
            {"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    res = evaluate_model(tiny_model, rows, cfg)
    assert res["mc_n"] == 8 and res["heldout_n"] == 2
    assert 0.0 <= res["mc_accuracy"] <= 1.0
    assert np.isfinite(res["heldout_loss"]) and res["seconds"] > 0
    skipped = evaluate_model(tiny_model, rows, build_config(overrides=["eval.mc_path=null"]))
    assert skipped["mc_accuracy"] is None and skipped["mc_n"] == 0


def test_few_shot_history_comes_before_the_query_and_changes_scores(tiny):
    """Guards few-shot MC: shots are earlier turns of the training template and do change the scores."""
    model, tok = tiny
    shots = json.dumps([["Question: What is 2 + 2?", "4"], ["Question: Capital of Italy?", "Rome"]])
    enc = encode_choice(QUERY, "Paris", tok, "default", 512, history=shots)
    text = tok.decode(enc.input_ids[: enc.prompt_len])
    assert text.index("Capital of Italy?") < text.index("capital of France?") and text.rstrip().endswith("Assistant:")
    item = {"query": QUERY, "choices": ["Paris", "Rome"], "gold": 0}
    plain = mc_choice_scores(model, tok, [item])[0]
    with_shots = mc_choice_scores(model, tok, [{**item, "history": shots}])[0]
    assert not np.allclose(plain, with_shots)


def test_fit_shots_drops_the_last_shots_to_fit_the_budget(tiny):
    """Guards the prompt budget: whole shots are dropped from the end; a lone prompt keeps its last tokens."""
    from middo_ray.evalsuite.runner import fit_shots, prompt_ids

    _, tok = tiny
    row = {"instruction": "Add 12 and 30."}
    shots = [[f"Add {i} and {i}.", f"{2 * i}"] for i in range(1, 5)]
    lens = [len(prompt_ids({**row, "history": json.dumps(shots[:k])} if k else row, tok, "default")) for k in range(5)]
    assert lens == sorted(lens) and len(set(lens)) == 5
    fitted, ids, k = fit_shots(row, shots, tok, "default", budget=lens[2])
    assert k == 2 and len(ids) == lens[2] and json.loads(fitted["history"]) == shots[:2]
    _, ids, k = fit_shots(row, shots, tok, "default", budget=lens[0] - 3)
    assert k == 0 and ids == prompt_ids(row, tok, "default")[3:]


def test_greedy_generation_does_not_depend_on_left_padding():
    """Guards batched generation with a real LM: a prompt generated alone and left-padded next to a longer
    one gives the same text, cut at the template's stop string."""
    from middo_ray.evalsuite.runner import generate_greedy, prompt_ids, stop_strings
    from middo_ray.models import load_model

    model, tok = load_model("smollm2", device="cpu")
    rows = [{"instruction": "What is 12 times 7?"},
            {"instruction": "Write a Python function that returns the square of a number, in one code block."}]
    prompts = [prompt_ids(r, tok, "default") for r in rows]
    assert len(prompts[0]) < len(prompts[1])
    alone = generate_greedy(model, tok, prompts[:1], 8, stop_strings("default"))
    batched = generate_greedy(model, tok, prompts, 8, stop_strings("default"))
    assert batched[0] == alone[0] and alone[0].strip()
    assert "Human:" not in batched[1]
