"""Diagnosis on Ray Data actors with the tiny model: fidelity, batch invariance, joins by id."""

import numpy as np
import pytest
import torch

from middo_ray.config import build_config
from middo_ray.diagnose import run_diagnosis
from middo_ray.judge import JUDGE_COLUMNS
from middo_ray.encode import encode_row
from middo_ray.models import load_model
from middo_ray.schema import make_row

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _rows():
    rows = [make_row(f"Add {i} and {2 * i}.", f"{i} + {2 * i} = {3 * i}." + " ok" * (i % 5)) for i in range(1, 25)]
    rows.append(make_row("Summarize the text.", "A short summary.", input="The quick brown fox jumps."))
    rows.append(make_row("And now?", "Now 2.", system="Be brief.", history=[["Hi", "Hello."]]))
    return rows


def _cfg(**over):
    tree = {"model": {"base": "tiny"}, "data": {"cutoff_len": 64}, "diagnose": over}
    return build_config(tree)


def test_losses_match_transformers_and_do_not_depend_on_batching(ray_local, tiny_model):
    """loss_cur equals a direct transformers loss (prompt masked, EOS scored) within 1e-4, and
    the signals are the same whether actors get 1-row or 32-row blocks."""
    rows = _rows()
    big = run_diagnosis(rows, _cfg(rows_per_block=32), "tiny")
    small = run_diagnosis(rows, _cfg(rows_per_block=1, batch_tokens=64), "tiny")
    np.testing.assert_allclose(big.columns["loss_cur"], small.columns["loss_cur"], atol=1e-5)
    np.testing.assert_allclose(big.embeddings, small.embeddings, atol=1e-5)
    np.testing.assert_allclose(big.columns["quality"], small.columns["quality"], atol=1e-4)
    model, tok = load_model("tiny")
    for i in (0, 7, 24, 25):
        e = encode_row(rows[i], tok, "default", 64)
        ids = torch.tensor([e.input_ids])
        labels = ids.clone()
        labels[0, : e.prompt_len] = -100
        with torch.no_grad():
            want = model(input_ids=ids, labels=labels).loss.item()
        assert big.columns["loss_cur"][i] == pytest.approx(want, abs=1e-4)
    # pre and current model are the same here: one pass gives both losses
    np.testing.assert_array_equal(big.columns["loss_pre"], big.columns["loss_cur"])


def test_a_pre_model_that_is_the_current_one_is_loaded_once_and_not_run_again(tiny_model):
    """Pre model = current model (as in `middo audit`): the actor loads it once and takes loss_pre from the
    loss pass; a different pre model is still loaded and run (test_pre_model_differs...)."""
    from middo_ray.diagnose import DiagnoseShards

    rows = _rows()[:8]
    actor = DiagnoseShards("tiny", "tiny", "float32", "default", 64, 4096, 32, judge=False)
    out = actor._block(rows, {})
    assert actor.pre_is_current and actor.pre_model is None
    np.testing.assert_array_equal(out["loss_pre"], out["loss_cur"])
    assert out["_computed"].all() and np.isfinite(out["loss_pre"]).all()


def test_signals_are_complete_and_aligned_by_id(ray_local, tiny_model):
    """Every sample gets finite signals in its own row; judge scores lie in [0, 10]; the pre-model losses
    of the previous diagnosis of a shard are reused instead of recomputed."""
    rows = _rows()
    d = run_diagnosis(rows, _cfg(), "tiny")
    assert d.sample_ids == [r["sample_id"] for r in rows]
    assert d.counts["pre_loss_computed"] == len(rows)
    for col in ("loss_pre", "loss_cur", "quality", "knn_sim", "ifd", "loss_empty", *JUDGE_COLUMNS):
        v = d.columns[col]
        assert v.shape == (len(rows),) and np.isfinite(v).all(), col
    q = np.stack([d.columns[c] for c in JUDGE_COLUMNS])
    assert (q >= 0).all() and (q <= 10).all()
    assert d.embeddings.shape[0] == len(rows)
    np.testing.assert_allclose(d.columns["ifd"], d.columns["loss_cur"] / d.columns["loss_empty"], rtol=1e-9)
    assert d.counts["knn"]["method"] == "exact" and d.counts["judge"]["missing_judgements"] == 0
    again = run_diagnosis(rows[:5], _cfg(), "tiny", previous=d.output)
    assert again.counts["pre_loss_computed"] == 0 and again.counts["pre_loss_cached"] == 5
    np.testing.assert_allclose(again.columns["loss_pre"], d.columns["loss_pre"][:5])


def test_pre_model_differs_and_is_scored_only_for_new_rows(ray_local, tiny_model, tmp_path):
    """With a pre model different from the current one, loss_pre comes from the pre model, and only
    rows the shard's previous diagnosis did not score are scored with it (one pass over the data)."""
    from middo_ray.models import load_model as _load

    model, tok = _load("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    other = tmp_path / "scaled"
    model.save_pretrained(other)
    tok.save_pretrained(other)
    rows = _rows()[:10]
    cfg = build_config({"model": {"base": "tiny", "pre": str(other)}, "data": {"cutoff_len": 64},
                        "diagnose": {"judge": False, "ifd": False}, "select": {"axes": ["complexity", "diversity"]}})
    first = run_diagnosis(rows[:4], cfg, "tiny")
    d = run_diagnosis(rows, cfg, "tiny", previous=first.output)
    assert d.counts["pre_loss_computed"] == 6 and d.counts["pre_loss_cached"] == 4
    np.testing.assert_array_equal(d.columns["loss_pre"][:4], first.columns["loss_pre"])
    assert np.all(np.abs(d.columns["loss_pre"] - d.columns["loss_cur"]) > 1e-3)
    enc = encode_row(rows[3], tok, "default", 64)
    ids = torch.tensor([enc.input_ids])
    labels = ids.clone()
    labels[0, : enc.prompt_len] = -100
    scaled, _ = _load(str(other))
    with torch.no_grad():
        want = scaled(input_ids=ids, labels=labels).loss.item()
    assert d.columns["loss_pre"][3] == pytest.approx(want, abs=1e-4)
    assert np.isnan(d.columns["quality"]).all() and np.isnan(d.columns["ifd"]).all()


def test_generate_judge_mode_records_failures_as_missing(ray_local, tiny_model):
    """The random tiny model never writes a score: every judgement is missing (NaN, never 0), the
    quality is NaN, and the counts say so."""
    rows = _rows()[:6]
    d = run_diagnosis(rows, _cfg(judge_mode="generate", judge_max_new_tokens=4), "tiny")
    q = np.stack([d.columns[c] for c in JUDGE_COLUMNS])
    assert d.counts["judge"]["mode"] == "generate"
    assert d.counts["judge"]["missing_judgements"] == int(np.isnan(q).sum())
    assert not (q == 0).any()
    parsed = q[np.isfinite(q)]
    assert ((parsed >= 0) & (parsed <= 10)).all()


@pytest.mark.slow
def test_generate_judge_parses_smollm2_scores():
    """The generate mode parses the scores SmolLM2 writes into [0, 10] and records every other answer as
    missing (NaN, never 0); the probability-weighted mode gives a score for every judgement.

    SmolLM2-135M writes a leading number for only a minority of judge prompts at temperature 0.1, which
    is why the probability-weighted mode is the default (docs/diagnosis.md)."""
    from middo_ray.judge import judge_generate, judge_scores

    model, tok = load_model("smollm2", "float32")
    rows = [make_row("What is the capital of France?", "The capital of France is Paris."),
            make_row("What is the capital of France?", "banana banana purple the the"),
            make_row("Name a primary colour.", "Red is a primary colour."),
            make_row("asdf qwer zxcv?", "I like turtles.")]
    gen = judge_generate(model, tok, rows, "default", 512, 4096, temperature=0.1, max_new_tokens=6, seed=0)
    ok = gen[np.isfinite(gen)]
    assert ok.size >= 1, gen
    assert ((ok >= 0) & (ok <= 10)).all()
    prob = judge_scores(model, tok, rows, "default", 512, 4096)
    assert np.isfinite(prob).all() and ((prob >= 0) & (prob <= 10)).all()


def test_shared_prefix_judge_equals_full_prompts(tiny_model):
    """The KV-cache judge (body once, three tails) gives the same expected scores as scoring each
    full judge prompt on its own, for batches of mixed lengths."""
    from middo_ray.judge import judge_scores, score_tokens
    from middo_ray.encode import render_prompt
    from middo_ray.prompts import judge_prompt
    from middo_ray.signals.quality import expected_score

    model, tok = load_model("tiny")
    rows = _rows()[:9]
    got = judge_scores(model, tok, rows, "default", 256, batch_tokens=400)
    st = score_tokens(tok)
    for i, row in enumerate(rows):
        for j, (target, dim) in enumerate([(t, d) for t in ("prompt", "response")
                                           for d in ("factuality", "clarity", "completeness")]):
            text = render_prompt({"instruction": judge_prompt(row, dim, target)}, tok, "default")
            ids = tok(text, add_special_tokens=False)["input_ids"]
            seq = ids + ([st.digits[1]] if st.two_step_ten else [])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq])).logits[0].float()
            pos = len(ids) - 1
            p = torch.softmax(logits[pos], -1)
            first = p[st.digits].numpy()[None]
            z = torch.softmax(logits[pos + 1], -1)[st.digits[0]].numpy()[None] if st.two_step_ten else None
            ten = p[st.ten].numpy()[None] if st.ten is not None else None
            want = expected_score(first, z, ten)[0]
            assert got[i, j] == pytest.approx(want, abs=1e-4), (i, target, dim)


def test_sharded_knn_equals_the_one_task_search(ray_local, tiny_model):
    """The exact search spread over groups of shards (each task holding only its group, the other shards
    streamed past it) finds the same neighbours and similarities as the one-task exact search."""
    rows = _rows()
    tree = {"model": {"base": "tiny"}, "data": {"cutoff_len": 64}, "select": {"axes": ["complexity", "diversity"]},
            "diagnose": {"judge": False, "ifd": False}}
    one = run_diagnosis(rows, build_config(tree), "tiny")
    tree["data"]["rows_per_shard"] = 5
    tree["diagnose"].update(knn_method="sharded", knn_task_memory_gb=1e-6)
    sharded = run_diagnosis(rows, build_config(tree), "tiny")
    assert sharded.counts["knn"]["method"] == "sharded" and sharded.counts["knn"]["groups"] == 6
    np.testing.assert_array_equal(sharded.columns["nbr_idx"], one.columns["nbr_idx"])
    np.testing.assert_allclose(sharded.columns["knn_sim"], one.columns["knn_sim"], atol=1e-6)


@pytest.mark.unit
def test_knn_choice_follows_size_and_memory():
    """auto: exact up to knn_exact_max_n, FAISS above; the sharded exact search when one task would not fit;
    an explicit FAISS that cannot fit is refused with the fix."""
    from middo_ray.neighbors import choose

    gib = 2**30
    assert choose("auto", 1000, 64, 50_000, gib) == "exact"
    assert choose("auto", 100_000, 64, 50_000, gib) == "faiss"
    assert choose("auto", 1_000_000, 4096, 50_000, 8 * gib) == "sharded"
    assert choose("exact", 1_000_000, 4096, 2_000_000, 8 * gib) == "sharded"
    with pytest.raises(ValueError, match="knn_method=auto or sharded"):
        choose("faiss", 1_000_000, 4096, 50_000, 8 * gib)
