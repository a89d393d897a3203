"""Text generation with a Hugging Face causal LM: the refiner's transformers engine.

The engine is deliberately small: prompts in, new text out. Everything about what to ask and how to
judge the answer lives in ``serve.app`` (and ``middo_ray.prompts``), so another engine (vLLM, an
OpenAI-compatible endpoint) only has to offer the same ``generate`` method.
"""

from __future__ import annotations

import logging
from typing import Any

from middo_ray.models import load_model

logger = logging.getLogger(__name__)

# Prompts per forward batch. Bounded so one request of 256 samples does not build one huge
# padded tensor; within a call the prompts are length-sorted, so chunks have little padding.
DEFAULT_MAX_BATCH = 16


class TransformersEngine:
    """A causal LM and its tokenizer, loaded once, generating for batches of prompts.

    Each prompt is sent as a single user message through the tokenizer's chat template when the
    tokenizer has one (the teacher is an instruct model), and as raw text otherwise (the tiny test
    model has no template). Batches are left-padded so every prompt ends where generation starts.

    Args:
        model: Model spec understood by ``middo_ray.models.resolve_model``: 'smollm2', 'tiny',
            a local checkpoint directory or a Hugging Face id.
        dtype: 'auto' (bfloat16 on GPU, float32 on CPU), 'float32', 'bfloat16' or 'float16'.
        max_batch: Most prompts in one forward batch.
    """

    def __init__(self, model: str, dtype: str = "auto", max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self._spec = model
        self._model, self._tok = load_model(model, dtype=dtype)
        # Left padding: generation appends after the last position, which must be a real token.
        self._tok.padding_side = "left"
        self._max_batch = max(1, int(max_batch))
        self._device = next(self._model.parameters()).device
        self._use_template = bool(getattr(self._tok, "chat_template", None))
        self._eos_ids = self._stop_ids()
        self._max_positions = int(getattr(self._model.config, "max_position_embeddings", 0) or 0)

    @property
    def model_id(self) -> str:
        """The model spec this engine was built from (what responses report as 'model')."""
        return self._spec

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        return self._use_template

    def _stop_ids(self) -> list[int]:
        """EOS ids of the tokenizer and of the model's generation config, without duplicates."""
        ids: list[int] = []
        for source in (self._tok.eos_token_id, getattr(self._model.generation_config, "eos_token_id", None)):
            for value in source if isinstance(source, (list, tuple)) else [source]:
                if value is not None and int(value) not in ids:
                    ids.append(int(value))
        return ids

    def render(self, prompt: str) -> str:
        """The exact text fed to the model for one prompt (chat-templated when possible)."""
        if not self._use_template:
            return prompt
        return self._tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def _encode(self, texts: list[str], max_new_tokens: int) -> dict[str, Any]:
        """Tokenizes a chunk with left padding, keeping the end of over-long prompts.

        When prompt plus generation would exceed the model's positions, the start of the prompt is
        cut: the end holds the generation prompt (and, in our prompts, the text to rewrite), without
        which the model cannot answer at all.
        """
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
        # The chat template already wrote BOS and role tokens; adding specials again would double them.
        kwargs["add_special_tokens"] = not self._use_template
        if self._max_positions:
            budget = self._max_positions - max_new_tokens
            if budget < 8:
                raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a model "
                                 f"with {self._max_positions} positions; lower max_new_tokens")
            self._tok.truncation_side = "left"
            kwargs.update(truncation=True, max_length=budget)
        enc = self._tok(texts, **kwargs)
        return {k: v.to(self._device) for k, v in enc.items()}

    def generate(self, prompts: list[str], max_new_tokens: int = 160, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, prefills: list[str] | None = None) -> list[str]:
        """Generates one completion per prompt and returns only the new text.

        Args:
            prompts: Plain prompts; each becomes one user message.
            max_new_tokens: Cap on generated tokens per prompt.
            temperature: 0 means greedy decoding; above 0, sampling at that temperature.
            top_p: Nucleus sampling mass (ignored when greedy).
            seed: Seeds torch's generator once per call, so the same prompts, parameters and seed give
                the same outputs.
            prefills: Optional text per prompt that the answer starts with (after the chat template's
                generation prompt); it is not repeated in the returned text.

        Returns:
            The generated continuations, special tokens stripped, in the order of ``prompts``.
        """
        import torch

        if not prompts:
            return []
        torch.manual_seed(int(seed))
        texts = [self.render(p) + (prefills[i] if prefills else "") for i, p in enumerate(prompts)]
        # Length-sorted chunks waste less compute on padding; results are put back in input order.
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        outputs: list[str] = [""] * len(texts)
        sampling: dict[str, Any]
        if temperature <= 0:
            sampling = {"do_sample": False}
        else:
            sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
        for start in range(0, len(order), self._max_batch):
            idx = order[start:start + self._max_batch]
            enc = self._encode([texts[i] for i in idx], max_new_tokens)
            with torch.inference_mode():
                out = self._model.generate(
                    **enc, max_new_tokens=int(max_new_tokens), eos_token_id=self._eos_ids or None,
                    pad_token_id=self._tok.pad_token_id, **sampling)
            # With left padding every row's prompt ends at the same column, so new tokens start there.
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(idx, self._tok.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text.strip()
        return outputs
