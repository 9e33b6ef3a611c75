"""Batched generation with a KV cache and left padding (transformers' generate)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    *,
    temperature: float | None,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
) -> list[str]:
    """Responses to tokenized prompts: sampled at `temperature`, or greedy when it is None.

    Each batch is seeded with seed + its index, so results do not depend on what ran before.
    Decoding stops at EOS or after max_new_tokens; special tokens are dropped from the text.
    """
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for index, start in enumerate(range(0, len(prompt_ids), batch_size)):
        batch = prompt_ids[start : start + batch_size]
        longest = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in batch], device=model.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch], device=model.device)
        torch.manual_seed(seed + index)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
        tokens = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
            **({"do_sample": False} if not temperature else sampling),
        )
        out += tokenizer.batch_decode(tokens[:, longest:], skip_special_tokens=True)
    return [text.strip() for text in out]
