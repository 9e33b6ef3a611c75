"""Batched generation with a KV cache and left padding (transformers' generate), and the
log-probabilities of the answers under the distribution that sampled them.

Sampling at temperature T draws every token from softmax(logits / T) and nothing else: the
model's own generation_config.json (a top_p, a repetition_penalty) is set aside while
generating, so that `response_logps(..., temperature=T)` is the exact log-probability of each
sampled answer (docs/method.md, "Evaluation protocol": kl_to_sft).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


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
    responses = generate_ids(
        model, tokenizer, prompt_ids, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
        batch_size=batch_size,
    )  # fmt: skip
    return [text.strip() for text in tokenizer.batch_decode(responses, skip_special_tokens=True)]


def left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows padded on the left, as generation needs: every row's
    last token sits in the last column, where the next token is predicted."""
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (longest - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    *,
    temperature: float | None,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
    samples_per_prompt: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Response token ids (up to and including EOS, without padding): samples_per_prompt
    responses per prompt, prompt by prompt (prompt i's are at i*n ... i*n + n - 1).
    progress(answers, tokens) is called after each batch with what it generated."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    per_batch = max(1, batch_size // samples_per_prompt)
    out: list[list[int]] = []
    for index, start in enumerate(range(0, len(prompt_ids), per_batch)):
        batch = prompt_ids[start : start + per_batch]
        ids, mask = left_padded(batch, pad, model.device)
        longest = ids.shape[1]
        torch.manual_seed(seed + index)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
        with _plain_generation(model):
            tokens = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                num_return_sequences=samples_per_prompt,
                # one process generates; a model trained under fsdp (its modules still marked as
                # FSDP-managed) would otherwise wait at each token for ranks that have returned
                synced_gpus=False,
                **({"do_sample": False} if not temperature else sampling),
            )
        made = [row[: row.index(eos) + 1] if eos in row else row for row in tokens[:, longest:].tolist()]
        out += made
        if progress is not None:
            progress(len(made), sum(len(row) for row in made))
    return out


@contextmanager
def _plain_generation(model: PreTrainedModel) -> Iterator[None]:
    """generate() fills every setting it is not given from model.generation_config (a shipped
    top_p 0.9 or repetition_penalty 1.2): an empty one leaves only transformers' neutral defaults
    and what the call sets."""
    kept = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = kept


@torch.no_grad()
def response_logps(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    batch_size: int = 64,
    temperature: float = 1.0,
) -> list[float]:
    """log pi_T(response | prompt) of each (prompt, response), summed over the response tokens,
    where pi_T draws each token from softmax(logits / temperature): the distribution that
    `generate_ids(..., temperature=T)` samples from (T = 1: the model itself)."""
    model.eval()
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, responses = prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
        rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
        longest = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows], device=model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logps = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
        picked = logps[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # log p of token t+1 given <= t
        for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            out.append(float(picked[row, len(p) - 1 : len(p) - 1 + len(r)].sum()))
    return out
