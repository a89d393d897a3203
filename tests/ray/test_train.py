"""Fine-tuning on Ray Train: the label mask, the batch plan, config checks, and real runs of the tiny model
(full DDP and FSDP on 2 workers, LoRA merged and as an adapter, a killed worker, a rerun that resumes)."""

from __future__ import annotations

import json

import pytest

from middo_ray.config import ConfigError, build_config
from middo_ray.encode import encode_row
from middo_ray.train import storage_root
from middo_ray.train.plan import (IGNORE_INDEX, collate, plan_batches, plan_fingerprint, resolve_precision, row_key,
                                  window_token_counts)


def _rows(n: int, start: int = 0) -> list[dict]:
    """Short, regular alpaca rows: a pattern a tiny model can pick up in a few dozen steps. Rows from
    another ``start`` are unseen samples of the same distribution (the pairs repeat only every 391)."""
    rows = []
    for i in range(start, start + n):
        a, b = 3 + i % 17, 5 + (i * 7) % 23
        rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}.",
                     "system": "", "history": ""})
    return rows


TRAIN_ROWS = _rows(64)
HELDOUT_ROWS = _rows(16, start=200)
BASE = ["train.batch_size=8", "train.epochs=3", "train.learning_rate=3e-3", "train.warmup_ratio=0.1",
        "eval.mc_path=null", "data.cutoff_len=64"]


def _cfg(*extra: str):
    return build_config(overrides=BASE + list(extra))


def _close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# Pure pieces.


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


@pytest.mark.unit
def test_shard_order_and_plan_fingerprint():
    """Guards restarts: a shard's content order ignores arrival order, and the plan fingerprint changes
    with the rows or any setting the batch plan depends on (so a mismatched resume is detected)."""
    rows = _rows(6)
    keys = sorted(row_key(r) for r in rows)
    assert keys == sorted(row_key(r) for r in reversed(rows))
    assert len(set(keys)) == 6
    conf = {"batch_size": 8, "grad_accum": 1, "epochs": 1.0, "seed": 0, "template": "default",
            "cutoff_len": 64, "init_model": "tiny"}
    fp = plan_fingerprint(keys, conf, world=2)
    assert fp == plan_fingerprint(list(keys), dict(conf), world=2)
    assert fp != plan_fingerprint(keys[:-1], conf, world=2)
    assert fp != plan_fingerprint(keys, {**conf, "batch_size": 4}, world=2)
    assert fp != plan_fingerprint(keys, conf, world=1)


@pytest.mark.unit
def test_precision_rules():
    """Guards train.precision: auto is bf16 only on bf16 GPUs; bf16 on an old GPU is a clear error."""
    assert resolve_precision("auto", "cuda", True) == "bf16"
    assert resolve_precision("auto", "cuda", False) == "fp32"
    assert resolve_precision("auto", "cpu", True) == "fp32"
    assert resolve_precision("bf16", "cpu", False) == "bf16"
    assert resolve_precision("fp32", "cuda", True) == "fp32"
    with pytest.raises(ValueError, match="train.precision=bf16.*no bf16 support"):
        resolve_precision("bf16", "cuda", False)


@pytest.mark.unit
def test_train_config_combinations_and_storage(tmp_path, monkeypatch):
    """Guards config validation: every bad combination is named with its fix, all at once; and the
    run storage is the train dir by default, a URI as given, a relative path made absolute."""
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["train.lora_save=adapter", "train.strategy=fsdp", "train.num_workers=1"])
    msg = str(err.value)
    assert "train.lora_save=adapter needs train.method=lora" in msg
    assert "train.strategy=fsdp" in msg and "num_workers >= 2" in msg
    with pytest.raises(ConfigError, match="from_previous"):
        build_config(overrides=["train.method=lora", "train.lora_save=adapter", "train.from_previous=true"])
    with pytest.raises(ConfigError, match="lora_target_modules is an empty list"):
        build_config(overrides=["train.method=lora", "train.lora_target_modules=[]"])
    with pytest.raises(ConfigError, match="train.precision"):
        build_config(overrides=["train.precision=fp16"])
    cfg = build_config(overrides=["train.method=lora", "train.lora_target_modules=[q_proj, v_proj]",
                                  "train.strategy=fsdp", "train.num_workers=2"])
    assert cfg.train.lora_target_modules == ["q_proj", "v_proj"]

    assert storage_root(cfg, tmp_path) == str(tmp_path / "ray_train")
    cfg.train.storage_path = "s3://bucket/middo"
    assert storage_root(cfg, tmp_path) == "s3://bucket/middo"
    monkeypatch.chdir(tmp_path)
    cfg.train.storage_path = "store"
    assert storage_root(cfg, tmp_path / "x") == str(tmp_path / "store")


@pytest.mark.unit
def test_crash_hook_format(monkeypatch):
    """Guards the test-only crash hook: a malformed value is an error that shows the expected form."""
    from middo_ray.train import CRASH_ENV, _crash_hook

    monkeypatch.delenv(CRASH_ENV, raising=False)
    assert _crash_hook() is None
    monkeypatch.setenv(CRASH_ENV, "5:/tmp/m")
    assert _crash_hook() == (5, "/tmp/m")
    monkeypatch.setenv(CRASH_ENV, "five")
    with pytest.raises(ValueError, match="STEP:MARKER_FILE"):
        _crash_hook()


@pytest.mark.unit
@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_write_hf_model_lora_merged_and_adapter(tiny_model, tmp_path, save):
    """Guards the LoRA outputs: 'merged' is a plain checkpoint transformers loads with the trained
    adapter's exact function; 'adapter' is a peft directory that middo's loader merges to the same."""
    import torch
    from transformers import AutoModelForCausalLM

    from middo_ray.models import load_model
    from middo_ray.train import apply_lora, write_hf_model

    model, tok = load_model(tiny_model, dtype="float32", device="cpu", train=True)
    conf = {"method": "lora", "lora_save": save, "init_model": tiny_model, "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0, "lora_target_modules": "all-linear"}
    peft_model = apply_lora(model, conf, tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-zero adapters change the function
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.eval()
    ids = tok("Human: Add 3 and 5.\nAssistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = peft_model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
    assert not torch.allclose(want, base, atol=1e-3)

    out = write_hf_model(peft_model, tok, peft_model.state_dict(), conf, tmp_path / "model")
    if save == "merged":
        assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    else:
        assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
        reloaded, _ = load_model(str(out), dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, want, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Real training runs on local Ray (tiny model).


@pytest.fixture(scope="module")
def base_heldout_loss(ray_local):
    from middo_ray.evaluate import evaluate_model

    return evaluate_model("tiny", HELDOUT_ROWS, _cfg())["heldout_loss"]


@pytest.fixture(scope="module")
def ddp_run(ray_local, tmp_path_factory):
    """One uninterrupted full fine-tuning on 2 DDP workers, checkpointing every 2 steps."""
    from middo_ray.train import train_sft

    out = tmp_path_factory.mktemp("ddp")
    cfg = _cfg("train.num_workers=2", "train.checkpoint_every_steps=2")
    return train_sft(TRAIN_ROWS, cfg, out / "train", init_model="tiny")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_ddp_lowers_heldout_loss(ddp_run, base_heldout_loss):
    """Guards the full fine-tuning path (Ray Data shards, 2 DDP workers on gloo, checkpoints, out_dir/model):
    the saved model reloads with from_pretrained and, evaluated as a Ray task, has a lower loss than the
    base on unseen samples of the training distribution."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from middo_ray.evaluate import evaluate_remote

    res = ddp_run
    assert res["samples"] == 64 and res["world_size"] == 2
    assert res["steps"] == 3 * 4  # 32 rows per worker, batch 8, 3 epochs
    assert (res["method"], res["strategy"], res["precision"], res["adapter"]) == ("full", "ddp", "fp32", False)
    assert res["tokens"] > 0 and res["input_tokens"] > res["tokens"] and res["seconds"] > 0
    assert len(res["loss_history"]) == len(res["step_seconds"]) == res["steps"]
    assert res["loss_history"][-1] < res["loss_history"][0] and res["resumed_from"] == []
    model_dir = Path(res["model_dir"])
    AutoModelForCausalLM.from_pretrained(model_dir)  # a plain HF checkpoint
    assert not (model_dir / "adapter_config.json").exists()
    # The intermediate checkpoints are gone once the final model is in place.
    assert not any((model_dir.parent / "ray_train").glob("*/checkpoint_*"))
    assert json.loads((model_dir.parent / "train_result.json").read_text())["steps"] == res["steps"]

    tuned = evaluate_remote(res["model_dir"], HELDOUT_ROWS, _cfg())["heldout_loss"]
    assert tuned < base_heldout_loss - 1.0, (base_heldout_loss, tuned)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_matches_ddp(ddp_run, tmp_path):
    """Guards FSDP2 (sharded parameters over 2 gloo workers): same data and settings give the same
    per-step losses and the same held-out loss as DDP, and the gathered model is a plain checkpoint."""
    from middo_ray.evaluate import evaluate_model
    from middo_ray.train import train_sft

    res = train_sft(TRAIN_ROWS, _cfg("train.num_workers=2", "train.strategy=fsdp"), tmp_path / "train", "tiny")
    assert res["strategy"] == "fsdp" and res["world_size"] == 2
    assert _close(res["loss_history"], ddp_run["loss_history"]), (res["loss_history"], ddp_run["loss_history"])
    fsdp_loss = evaluate_model(res["model_dir"], HELDOUT_ROWS, _cfg())["heldout_loss"]
    ddp_loss = evaluate_model(ddp_run["model_dir"], HELDOUT_ROWS, _cfg())["heldout_loss"]
    assert abs(fsdp_loss - ddp_loss) < 1e-3, (fsdp_loss, ddp_loss)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_workers_and_a_rerun_resume_from_checkpoints(ddp_run, tmp_path, monkeypatch):
    """Guards both ways a training resumes, with real process deaths (rank 0 exits) on 2 DDP workers:
    1. max_failures=0: rank 0 dies before step 5; the run fails for good but keeps its checkpoints.
    2. The same run name again (what the loop does after a crash), max_failures=1: it continues from the
       step-2 or step-4 checkpoint; rank 0 dies again before step 11, and FailureConfig restarts the
       group from the step-8 or step-10 checkpoint.
    The final per-step losses and weights match the uninterrupted run (same batch plan, RNG, optimizer)."""
    import torch
    from safetensors.torch import load_file

    from middo_ray.train import CRASH_ENV, train_sft

    out = tmp_path / "train"
    monkeypatch.setenv(CRASH_ENV, f"5:{tmp_path / 'crash1'}")
    with pytest.raises(RuntimeError, match="same run name resumes"):
        train_sft(TRAIN_ROWS, _cfg("train.num_workers=2", "train.checkpoint_every_steps=2", "train.max_failures=0"),
                  out, "tiny", run_name="round_1")
    assert (tmp_path / "crash1").is_file() and any((out / "ray_train" / "round_1").glob("checkpoint_*"))

    monkeypatch.setenv(CRASH_ENV, f"11:{tmp_path / 'crash2'}")
    cfg = _cfg("train.num_workers=2", "train.checkpoint_every_steps=2", "train.max_failures=1")
    res = train_sft(TRAIN_ROWS, cfg, out, "tiny", run_name="round_1")
    assert (tmp_path / "crash2").is_file()  # the worker really died a second time
    first, second = res["resumed_from"]
    assert first in (2, 4) and second in (8, 10), res["resumed_from"]
    assert res["exact_resume"] and res["steps"] == ddp_run["steps"]
    assert _close(res["loss_history"], ddp_run["loss_history"]), (res["loss_history"], ddp_run["loss_history"])
    got = load_file(f"{res['model_dir']}/model.safetensors")
    ref = load_file(f"{ddp_run['model_dir']}/model.safetensors")
    assert got.keys() == ref.keys()
    assert all(torch.allclose(got[k], ref[k], atol=1e-5) for k in ref)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lora_fsdp_adapter_bf16_to_uri_storage(ray_local, tmp_path, tiny_model, base_heldout_loss, monkeypatch):
    """Guards LoRA through Ray Train with FSDP2 on 2 workers (frozen and trainable parameters in one
    shard group), bf16 autocast on CPU, adapter-only checkpoints restored after a worker death,
    lora_save=adapter and a URI run storage: the directory is a peft adapter naming its base, peft loads
    it, middo's loader merges it (same logits as peft), and its held-out loss beats the base model's."""
    from pathlib import Path

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from middo_ray.evaluate import evaluate_remote
    from middo_ray.models import load_model
    from middo_ray.train import CRASH_ENV, train_sft

    store = tmp_path / "store"
    monkeypatch.setenv(CRASH_ENV, f"9:{tmp_path / 'crashed'}")
    cfg = _cfg("train.method=lora", "train.lora_save=adapter", "train.learning_rate=2e-2", "train.lora_r=8",
               "train.precision=bf16", "train.strategy=fsdp", "train.num_workers=2",
               "train.checkpoint_every_steps=4", "train.max_failures=1", f"train.storage_path=file://{store}")
    res = train_sft(TRAIN_ROWS, cfg, tmp_path / "train", init_model="tiny")
    model_dir = Path(res["model_dir"])
    assert (res["method"], res["strategy"], res["precision"], res["adapter"]) == ("lora", "fsdp", "bf16", True)
    assert res["resumed_from"] in ([4], [8]) and res["exact_resume"] and len(res["loss_history"]) == 12
    assert not (tmp_path / "train" / "ray_train").exists() and store.is_dir()  # Ray used the URI
    assert (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").exists()
    adapter_cfg = json.loads((model_dir / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]) == Path(tiny_model)

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(model_dir)).eval()
    merged, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    ids = tok("Human: Add 3 and 5.\nAssistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-4)
    tuned = evaluate_remote(str(model_dir), HELDOUT_ROWS, _cfg())["heldout_loss"]
    assert tuned < base_heldout_loss - 0.2, (base_heldout_loss, tuned)
