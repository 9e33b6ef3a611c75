"""Tokenizers and tokenized examples: prompt formatting, truncation, a correct token boundary.

The response's tokens are what the model must produce after the prompt's tokens. Where the
joint tokenization of prompt + response keeps the prompt's own tokens as a prefix, the rest
of it is the response; where a template merges tokens across the boundary, the response is
tokenized on its own, so labels never cover a token that straddles prompt and response.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

IGNORE_INDEX = -100
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def chat_template_for(prompt_template: str) -> str:
    """A Jinja chat template that renders a user turn with prompt_template ({prompt} inside)."""
    before, after = prompt_template.split("{prompt}", 1)
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}" + before + "{{ message['content'] }}" + after + "{% endif %}"
        "{% if message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, prompt_template: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on texts, as a transformers fast tokenizer with a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = chat_template_for(prompt_template)
    return fast


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, prompt_template: str) -> tuple[str, str]:
    """The model's prompt text and the separator its response follows.

    The tokenizer's chat template when it has one, else prompt_template. The response
    follows a space unless the prompt text ends in whitespace (a chat template's newline).
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    else:
        text = prompt_template.format(prompt=prompt)
    return text, "" if text[-1:].isspace() else " "


@dataclass(frozen=True)
class Encoded:
    """One prompt + response, token ids and labels (-100 on the prompt)."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    response_length: int
    truncated: bool


class PromptTooLongError(ValueError):
    """The prompt alone exceeds max_prompt_length."""


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt_text: str, max_prompt_length: int) -> list[int]:
    """The prompt's ids (with the tokenizer's own leading special tokens); PromptTooLongError past the limit."""
    ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    if len(ids) > max_prompt_length:
        raise PromptTooLongError(f"prompt has {len(ids)} tokens > max_prompt_length {max_prompt_length}")
    return list(ids)


def encode_response(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, prompt_ids: list[int], separator: str, response: str
) -> list[int]:
    """The response's ids as the model must produce them after prompt_ids, ending with EOS."""
    joint = tokenizer(prompt_text + separator + response, add_special_tokens=True)["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids:
        ids = list(joint[len(prompt_ids) :])
    else:  # the template merges tokens across the boundary: tokenize the response alone
        ids = list(tokenizer(separator + response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


def encode(
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    separator: str,
    response: str,
    max_length: int,
    max_prompt_length: int,
) -> Encoded:
    """Prompt + response ids with labels; keeps the prompt start and cuts the response end."""
    prompt_ids = encode_prompt(tokenizer, prompt_text, max_prompt_length)
    response_ids = encode_response(tokenizer, prompt_text, prompt_ids, separator, response)
    room = max_length - len(prompt_ids)
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return Encoded(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        prompt_length=len(prompt_ids),
        response_length=len(response_ids),
        truncated=truncated,
    )
