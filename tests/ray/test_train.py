"""Fine-tuning on Ray Train: the label mask, the batch plan, and a real run of the tiny model."""

from __future__ import annotations

import pytest

from middo_ray.config import build_config
from middo_ray.encode import Encoded, encode_row
from middo_ray.train import IGNORE_INDEX, collate, plan_batches, window_token_counts


def _rows(n: int) -> list[dict]:
    """Short, regular alpaca rows: a pattern a tiny model can pick up in a few dozen steps."""
    rows = []
    for i in range(n):
        a, b = 3 + i % 17, 5 + (i * 7) % 23
        rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}.",
                     "system": "", "history": ""})
    return rows


@pytest.mark.unit
def test_collate_masks_prompt_and_padding(tiny_model):
    """Guards the response-only loss: prompt and padding positions are -100, response and EOS are kept."""
    from middo_ray.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    short = encode_row({"instruction": "Hi", "output": "Paris."}, tok)
    long = encode_row({"instruction": "Add 12 and 30 please", "output": "12 + 30 = 42."}, tok)
    batch = collate([short, long], tok.pad_token_id)
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    width = max(len(short.input_ids), len(long.input_ids))
    assert ids.shape == att.shape == labels.shape == (2, width)
    for r, enc in enumerate([short, long]):
        n = len(enc.input_ids)
        assert (labels[r, :enc.prompt_len] == IGNORE_INDEX).all()
        assert labels[r, enc.prompt_len:n].tolist() == enc.input_ids[enc.prompt_len:]
        assert labels[r, n - 1].item() == tok.eos_token_id
        assert (labels[r, n:] == IGNORE_INDEX).all()
        assert att[r, :n].sum().item() == n and att[r, n:].sum().item() == 0
        assert (ids[r, n:] == tok.pad_token_id).all()


@pytest.mark.unit
def test_plan_batches_fractional_epochs_and_length_grouping():
    """Guards the schedule: fractional epochs, every sample once per epoch, length-sorted batch-mates."""
    lengths = [(i * 37) % 101 + 1 for i in range(100)]
    plan = plan_batches(lengths, batch_size=8, epochs=1.5, seed=3)
    assert len(plan) == 20  # ceil(1.5 * ceil(100 / 8))
    first_epoch = [i for mb in plan[:13] for i in mb]
    assert sorted(first_epoch) == list(range(100))
    assert plan == plan_batches(lengths, batch_size=8, epochs=1.5, seed=3)
    assert plan != plan_batches(lengths, batch_size=8, epochs=1.5, seed=4)
    # Within a sorted chunk of 64 samples, a batch spans a small slice of the length range.
    spread = sum(max(lengths[i] for i in mb) - min(lengths[i] for i in mb) for mb in plan) / len(plan)
    assert spread < 30
    assert window_token_counts([[0, 1], [2], [3]], [5, 6, 7, 8], grad_accum=2) == [18, 8]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_sft_tiny_lowers_loss(ray_local, tmp_path):
    """Guards the whole training path (Ray Data shards, 2 DDP workers on gloo, checkpoint, out_dir/model):
    the saved model reloads with from_pretrained and, evaluated as a Ray task, has a lower loss than the
    base on the training data."""
    from transformers import AutoModelForCausalLM

    from middo_ray.evaluate import evaluate_model, evaluate_remote
    from middo_ray.train import train_sft

    rows = _rows(64)
    cfg = build_config(overrides=[
        "train.num_workers=2", "train.batch_size=8", "train.epochs=3", "train.learning_rate=3e-3",
        "train.warmup_ratio=0.1", "eval.mc_path=null", "data.cutoff_len=64"])
    res = train_sft(rows, cfg, tmp_path / "round_0", init_model="tiny")

    assert res["samples"] == 64
    assert res["steps"] == 3 * 4  # 32 rows per worker, batch 8, 3 epochs
    assert res["tokens"] > 0 and res["seconds"] > 0
    assert len(res["loss_history"]) == res["steps"]
    assert res["loss_history"][-1] < res["loss_history"][0]
    AutoModelForCausalLM.from_pretrained(res["model_dir"])  # a plain HF checkpoint

    probe = rows[:16]
    base = evaluate_model("tiny", probe, cfg)["heldout_loss"]
    tuned = evaluate_remote(res["model_dir"], probe, cfg)["heldout_loss"]  # as a task on the cluster
    assert tuned < base - 1.0, (base, tuned)
