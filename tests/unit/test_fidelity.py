"""Fidelity of the scoring pass against plain transformers, on real Alpaca rows and SmolLM2.

The batched pass (length-sorted, right-padded, LM head only on response positions, embedding pooled
from the same pass) must give what a direct, one-sample transformers computation gives, whatever the
batch a sample lands in.
"""

import json

import numpy as np
import pytest
import torch

from middo_ray.encode import empty_prompt_variant, encode_row, render_prompt
from middo_ray.models import load_model
from middo_ray.schema import make_row
from middo_ray.scoring import forward_scores, ifd_scores

pytestmark = pytest.mark.unit


def _alpaca(shared_data, n=32):
    raw = json.loads((shared_data / "sft" / "alpaca_5000.json").read_text())
    # a mix of rows with and without input, short and long
    pick = raw[:n // 2] + [r for r in raw if r["input"]][: n - n // 2]
    return [make_row(r["instruction"], r["output"], input=r["input"]) for r in pick]


def _direct_loss(model, enc) -> float:
    ids = torch.tensor([enc.input_ids])
    labels = ids.clone()
    labels[0, : enc.prompt_len] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def _direct_prompt_embedding(model, enc) -> np.ndarray:
    ids = torch.tensor([enc.input_ids[: enc.prompt_len]])
    with torch.no_grad():
        h = model.get_decoder()(input_ids=ids).last_hidden_state[0]
    return h.float().mean(0).numpy()


@pytest.mark.parametrize("spec", ["tiny", "smollm2"])
def test_loss_and_embedding_match_transformers_at_batch_1_and_32(spec, shared_data, tiny_model):
    model, tok = load_model(spec, "float32")
    rows = _alpaca(shared_data)
    enc = [encode_row(r, tok, "default", 1024) for r in rows]
    big = forward_scores(model, enc, tok.pad_token_id, batch_tokens=1 << 20, want_embedding=True)
    one = [forward_scores(model, [e], tok.pad_token_id, want_embedding=True) for e in enc]
    assert len({len(e.input_ids) for e in enc}) > 10        # real padding inside the 32-row batch
    for i, e in enumerate(enc):
        want = _direct_loss(model, e)
        assert big.loss[i] == pytest.approx(want, abs=1e-4), i
        assert one[i].loss[0] == pytest.approx(want, abs=1e-4), i
        assert big.n_tokens[i] == e.response_len
        np.testing.assert_allclose(big.embedding[i], one[i].embedding[0], atol=1e-4)
    # the embedding pooled from the full sequence equals a prompt-only pass (causal attention)
    for i in (0, 5, 20):
        np.testing.assert_allclose(big.embedding[i], _direct_prompt_embedding(model, enc[i]), atol=1e-4)


def test_ifd_denominator_is_the_response_after_an_empty_prompt(shared_data, tiny_model):
    model, tok = load_model("tiny", "float32")
    rows = _alpaca(shared_data, 8)
    enc = [encode_row(r, tok, "default", 512) for r in rows]
    empty = [empty_prompt_variant(e, r, tok) for e, r in zip(enc, rows)]
    got = forward_scores(model, enc + empty, tok.pad_token_id).loss
    bare = render_prompt({"instruction": "", "history": "[]"}, tok)
    for i, r in enumerate(rows):
        ids = tok(bare, add_special_tokens=False)["input_ids"]
        seq = ids + tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = torch.tensor([seq])
        labels[0, : len(ids)] = -100
        with torch.no_grad():
            want = model(input_ids=torch.tensor([seq]), labels=labels).loss.item()
        assert got[len(rows) + i] == pytest.approx(want, abs=1e-4)
        assert empty[i].input_ids[empty[i].prompt_len:] == enc[i].input_ids[enc[i].prompt_len:]
    # ifd_scores (the judge's refine.accept_max_ifd check) is the same ratio of the same two passes.
    ifd = ifd_scores(model, tok, rows, "default", 512)
    np.testing.assert_allclose(ifd, got[: len(rows)] / got[len(rows):], rtol=1e-9)


def test_ifd_tells_a_samples_own_answer_from_another_samples_answer_on_smollm2(shared_data):
    """What refine.accept_max_ifd rests on, with a real LM: under SmolLM2 an Alpaca prompt makes its own answer
    easier to predict (IFD at most 1) and another sample's answer not (IFD above 1), for nearly every row."""
    model, tok = load_model("smollm2", "float32")
    rows = _alpaca(shared_data, 24)
    other = [dict(r, output=rows[(i + 7) % len(rows)]["output"]) for i, r in enumerate(rows)]
    own, swapped = ifd_scores(model, tok, rows, "default", 256), ifd_scores(model, tok, other, "default", 256)
    assert np.isfinite(own).all() and np.isfinite(swapped).all()
    assert (own <= 1.0).mean() >= 0.9, own
    assert (swapped > 1.0).mean() >= 0.75, swapped
    assert (swapped > own).mean() >= 0.9


def test_cutoff_rule(tiny_model):
    """Over-long samples: the response keeps max(cutoff - prompt, cutoff // 2) tokens (its start), the
    prompt keeps its last tokens, the total is exactly the cutoff, and the sample is marked."""
    _, tok = load_model("tiny")
    words = " ".join(f"w{i}" for i in range(400))
    long_prompt = make_row("Question: " + words + " END?", "short answer.")
    long_resp = make_row("Short question?", "Answer " + words)
    both = make_row("Q " + words, "A " + words)
    cutoff = 128
    for row in (long_prompt, long_resp, both):
        full_p = tok(render_prompt(row, tok), add_special_tokens=False)["input_ids"]
        full_r = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        e = encode_row(row, tok, "default", cutoff)
        assert e.truncated and len(e.input_ids) == cutoff
        keep_r = min(len(full_r), max(cutoff - len(full_p), cutoff // 2))
        assert e.response_len == keep_r
        assert e.input_ids[e.prompt_len:] == full_r[:keep_r]              # response keeps its start
        assert e.input_ids[: e.prompt_len] == full_p[len(full_p) - e.prompt_len:]   # prompt keeps its end
    e = encode_row(long_prompt, tok, "default", cutoff)
    assert e.response_len == len(tok("short answer.", add_special_tokens=False)["input_ids"]) + 1  # EOS kept
    short = encode_row(make_row("Hi?", "Hello."), tok, "default", cutoff)
    assert not short.truncated


def test_chat_template_pools_the_samples_own_prompt_text(shared_data):
    """Under data.template=chat the embedding pools the tokens of the sample's own instruction and input only
    (the chat template's shared system prompt and role markers left out), batched as one-by-one; rows then
    look less alike than when the whole templated prompt is pooled."""
    model, tok = load_model("smollm2", "float32")
    rows = _alpaca(shared_data, 16)
    enc = [encode_row(r, tok, "chat", 1024) for r in rows]
    for r, e in zip(rows, enc):
        a, b = e.pool
        assert 0 < a < b <= e.prompt_len
        own = f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]
        assert tok.decode(e.input_ids[a:b]).strip() == own.strip()
    big = forward_scores(model, enc, tok.pad_token_id, batch_tokens=1 << 20, want_embedding=True)
    for i in (0, 7, 12):
        ids = torch.tensor([enc[i].input_ids[: enc[i].prompt_len]])
        with torch.no_grad():
            h = model.get_decoder()(input_ids=ids).last_hidden_state[0]
        a, b = enc[i].pool
        np.testing.assert_allclose(big.embedding[i], h[a:b].float().mean(0).numpy(), atol=1e-4)
    whole = [encode_row(r, tok, "chat", 1024) for r in rows]
    for e in whole:
        e.pool = None
    templated = forward_scores(model, whole, tok.pad_token_id, batch_tokens=1 << 20, want_embedding=True)

    def mean_cosine(x: np.ndarray) -> float:
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = u @ u.T
        return float(s[~np.eye(len(x), dtype=bool)].mean())

    assert mean_cosine(big.embedding) < mean_cosine(templated.embedding) - 0.02
