"""Tokenizers and tokenized examples: prompt formatting, truncation, a correct token boundary.

Two prompt formats (prepare.prompt_format), both explicit, neither chosen behind the user's back:

plain
    The prompt is prompt_template.format(prompt=...); the response follows it after a space
    (none when the prompt text ends in whitespace) and ends with the tokenizer's EOS. Tokenized
    with the tokenizer's own special tokens (a Llama tokenizer's BOS).
chat
    The tokenizer's chat template. The prompt is the rendered conversation [system?, user] with
    the generation prompt; the response is what the template renders after it for an assistant
    message, up to and including its end-of-turn token (ChatML's <|im_end|>, not the newline
    after it), so the model learns to stop. Tokenized as rendered (no special tokens added: the
    template writes its own BOS where it wants one). With no system prompt, a system turn the
    template adds on its own (SmolLM2, Qwen2.5) is left out: see PromptFormat._find_default_system_turn.

The response's tokens are what the model must produce after the prompt's tokens. Where the
joint tokenization of prompt + response keeps the prompt's own tokens as a prefix, the rest
of it is the response; where a template merges tokens across the boundary, the response is
tokenized on its own, so labels never cover a token that straddles prompt and response.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rsa_pl.data.sources import DataError

IGNORE_INDEX = -100
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Stand-ins rendered through a chat template to find its parts (no whitespace: templates may trim).
_SYSTEM_PROBE, _USER_PROBE, _ANSWER_PROBE = "SystemProbe7q1", "UserProbe7q1", "AnswerProbe7q1"


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


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class PromptFormat:
    """How one tokenizer sees prompts and responses, in one of the two formats (module docstring).

    Raises DataError (one line naming the tokenizer) when chat is asked of a tokenizer without a
    chat template, or of a template that leaves out the system prompt or does not render a
    conversation as the prompt followed by the answer.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        kind: Literal["chat", "plain"],
        prompt_template: str,
        system_prompt: str | None,
        name: str,
    ) -> None:
        self.tokenizer, self.kind, self.prompt_template = tokenizer, kind, prompt_template
        self.system_prompt, self.name = system_prompt, name
        self.add_special_tokens = kind == "plain"
        self.end_of_turn: int | None = tokenizer.eos_token_id
        """The response's last token: the template's end-of-turn token, else EOS (appended where missing)."""
        self.default_system_prompt: str | None = None
        """chat: the system prompt the template adds on its own (left out unless system_prompt is given)."""
        self.system_check = "not applicable (plain)"
        """chat: what the search for a system prompt of the template's own found (for the report)."""
        self._own_turn, self._keep = "", ""  # the template's own system turn; the BOS of it that stays
        self._after_end = ""  # what the template writes after the end-of-turn token (not the response's)
        if kind == "plain":
            return
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{name}: the tokenizer has no chat template, which prepare.prompt_format: chat needs; "
                "use prompt_format: plain (prepare.prompt_template)"
            )
        self._find_default_system_turn()
        if system_prompt is not None and system_prompt.strip() not in self.prompt_text(_USER_PROBE):
            raise DataError(f"{name}: its chat template leaves out the system message; set prepare.system_prompt: null")
        self._find_end_of_turn()

    # -- rendering -------------------------------------------------------------------------

    def _apply(self, messages: list[dict[str, str]], generation: bool) -> str:
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        return str(rendered)

    def _render(self, messages: list[dict[str, str]], generation: bool, *, cut: bool | None = None) -> str:
        """The template's text for messages, its own system turn cut (by default: when system_prompt is null)."""
        try:
            text = self._apply(messages, generation)
        except Exception as error:  # a Jinja error or the template's own raise_exception(...)
            raise DataError(f"{self.name}: its chat template cannot render the prompt: {_first_line(error)}") from None
        if self._own_turn and (self.system_prompt is None if cut is None else cut):
            if not text.startswith(self._own_turn):
                raise DataError(
                    f"{self.name}: its chat template's own system prompt is not the same for every prompt; "
                    "set prepare.system_prompt to a string"
                )
            text = self._keep + text[len(self._own_turn) :]
        return text

    def _messages(self, prompt: str, response: str | None = None, system: bool = True) -> list[dict[str, str]]:
        messages = []
        if system and self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return messages

    def prompt_text(self, prompt: str) -> str:
        """The text the model sees before it answers."""
        if self.kind == "plain":
            return self.prompt_template.format(prompt=prompt)
        return self._render(self._messages(prompt), generation=True)

    def response_text(self, prompt: str, prompt_text: str, response: str) -> str:
        """The text that follows prompt_text: the response, and in chat its end of turn."""
        if self.kind == "plain":
            return ("" if prompt_text[-1:].isspace() else " ") + response
        full = self._render(self._messages(prompt, response), generation=False)
        if not full.startswith(prompt_text):
            raise DataError(
                f"{self.name}: its chat template does not render a conversation as the prompt followed by "
                "the answer; use prepare.prompt_format: plain"
            )
        text = full[len(prompt_text) :]
        if self._after_end and text.endswith(self._after_end):
            text = text[: -len(self._after_end)]
        return text

    # -- what the template does ------------------------------------------------------------

    def _find_default_system_turn(self) -> None:
        """Whether the template writes a system turn of its own when the conversation has none
        (SmolLM2, Qwen2.5: "You are ..."), so that it can be left out when system_prompt is null.

        Rendered with a probe system message S, the conversation is A + T, where A is what the
        template renders for [system S] alone. Rendered without one it is T itself (no system
        prompt of its own), or H + T. When H has the shape of A with S replaced by some text D
        (the default prompt, maybe empty), H is the template's own system turn: it is cut from
        every rendering, keeping the BOS it starts with. A template that refuses system messages,
        or renders in another shape, is kept as it renders (system_check says which).
        """
        user = [{"role": "user", "content": _USER_PROBE}]
        probe = {"role": "system", "content": _SYSTEM_PROBE}
        try:
            alone, both = self._apply([probe], generation=False), self._apply([probe, *user], generation=True)
        except Exception:  # e.g. Gemma's "System role not supported": such a template adds none either
            self.system_check = "the template takes no system message; kept as it renders"
            return
        bare = self._render(user, generation=True)
        if _SYSTEM_PROBE not in both:  # the embedded world's template: user and assistant turns only
            self.system_check = "the template leaves out system messages; kept as it renders"
            return
        if _SYSTEM_PROBE not in alone or not both.startswith(alone) or not bare.endswith(both[len(alone) :]):
            self.system_check = "could not tell whether the template adds a system prompt; kept as it renders"
            return
        own = bare[: len(bare) - (len(both) - len(alone))]
        before, after = alone.split(_SYSTEM_PROBE, 1)
        if not (len(own) >= len(before) + len(after) and own.startswith(before) and own.endswith(after)):
            self.system_check = "the template adds no system prompt of its own"
            return
        self.default_system_prompt = own[len(before) : len(own) - len(after)]
        bos = self.tokenizer.bos_token
        self._keep = bos if isinstance(bos, str) and bos and own.startswith(bos) else ""
        self._own_turn = own
        self.system_check = "the template adds a system prompt of its own"

    def _find_end_of_turn(self) -> None:
        """The first special token the template writes after an answer (its end of turn)."""
        prompt_text = self.prompt_text(_USER_PROBE)
        full = self._render(self._messages(_USER_PROBE, _ANSWER_PROBE), generation=False)
        if not full.startswith(prompt_text) or _ANSWER_PROBE not in full[len(prompt_text) :]:
            raise DataError(
                f"{self.name}: its chat template does not render a conversation as the prompt followed by "
                "the answer; use prepare.prompt_format: plain"
            )
        tail = full[len(prompt_text) :].split(_ANSWER_PROBE, 1)[1]
        special = set(self.tokenizer.all_special_ids)
        special |= {i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        for token in self.tokenizer(tail, add_special_tokens=False)["input_ids"]:
            if token in special:
                text = str(self.tokenizer.convert_ids_to_tokens(token))
                if text in tail:
                    self.end_of_turn, self._after_end = token, tail[tail.index(text) + len(text) :]
                return

    # -- measures --------------------------------------------------------------------------

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    def overhead(self) -> int:
        """Tokens the format puts around a prompt (an empty prompt's length)."""
        return len(self.tokens(self.prompt_text("")))

    def system_tokens(self) -> int:
        """Of the overhead, the tokens of the system turn (0 without one)."""
        if self.kind == "plain" or self.system_prompt is None:
            return 0
        bare = self._render(self._messages("", system=False), generation=True, cut=True)
        return self.overhead() - len(self.tokens(bare))

    def dropped_system_tokens(self) -> int:
        """Tokens of the template's own system turn that were left out (0 if none)."""
        if self.kind == "plain" or self.system_prompt is not None or not self._own_turn:
            return 0
        return len(self.tokens(self._render(self._messages(""), generation=True, cut=False))) - self.overhead()

    def describe(self) -> dict[str, object]:
        """The format in report.json."""
        end = self.end_of_turn
        return {
            "prompt_format": self.kind,
            "tokens_around_prompt": self.overhead(),
            "system_prompt_tokens": self.system_tokens(),
            "template_system_prompt": self.default_system_prompt,
            "template_system_prompt_dropped_tokens": self.dropped_system_tokens(),
            "system_check": self.system_check,
            "end_of_turn": None if end is None else str(self.tokenizer.convert_ids_to_tokens(end)),
        }


@dataclass(frozen=True)
class Encoded:
    """One prompt + response, token ids and labels (-100 on the prompt)."""

    prompt_text: str
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    response_length: int
    truncated: bool


class PromptTooLongError(ValueError):
    """The prompt alone exceeds max_prompt_length."""


def encode_prompt(fmt: PromptFormat, prompt: str, max_prompt_length: int) -> tuple[str, list[int]]:
    """The prompt's text and ids; PromptTooLongError past the limit."""
    text = fmt.prompt_text(prompt)
    ids = fmt.tokens(text)
    if len(ids) > max_prompt_length:
        raise PromptTooLongError(f"prompt has {len(ids)} tokens > max_prompt_length {max_prompt_length}")
    return text, ids


def encode_response(
    fmt: PromptFormat, prompt: str, prompt_text: str, prompt_ids: list[int], response: str
) -> list[int]:
    """The response's ids as the model must produce them after prompt_ids, ending with the end of turn."""
    text = fmt.response_text(prompt, prompt_text, response)
    joint = fmt.tokens(prompt_text + text)
    if joint[: len(prompt_ids)] == prompt_ids:
        ids = list(joint[len(prompt_ids) :])
    else:  # the template merges tokens across the boundary: tokenize the response alone
        ids = list(fmt.tokenizer(text, add_special_tokens=False)["input_ids"])
    if fmt.end_of_turn is not None and (not ids or ids[-1] != fmt.end_of_turn):
        ids.append(fmt.end_of_turn)
    return ids


def encode(fmt: PromptFormat, prompt: str, response: str, max_length: int, max_prompt_length: int) -> Encoded:
    """Prompt + response ids with labels; keeps the prompt start and cuts the response end."""
    prompt_text, prompt_ids = encode_prompt(fmt, prompt, max_prompt_length)
    response_ids = encode_response(fmt, prompt, prompt_text, prompt_ids, response)
    room = max_length - len(prompt_ids)
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return Encoded(
        prompt_text=prompt_text,
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        prompt_length=len(prompt_ids),
        response_length=len(response_ids),
        truncated=truncated,
    )
