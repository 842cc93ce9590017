"""Render chat messages with a tokenizer's chat template and mark the trainable tokens.

Trainable = every token of every assistant turn, including the turn's end-of-turn token(s).
Spans come from the template itself, never from searching the text for role strings: for each
assistant turn k, the template renders the conversation up to turn k with a generation prompt
(where the answer starts) and up to and including turn k (where the turn ends). Those prefix
renders locate the turn in the full rendering by character offset, and the tokenizer's offset
mapping turns character spans into token flags. Working in characters (not token ids) keeps this
right when the tokenizer merges across a boundary, so that a prefix's tokens are not a prefix of
the whole; when a template renders a turn differently once later turns follow (some strip
reasoning from earlier turns), the turn is located by its content after the previous turn and
closed with the template's own end-of-turn text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.conversation import Message
from pipeline.core.errors import UserError


class TemplateError(UserError, ValueError):
    """No usable chat template, or a template that cannot render a conversation."""


def count_turns(trainable: list[bool]) -> int:
    """Assistant turns: maximal runs of trainable tokens."""
    return sum(1 for i, flag in enumerate(trainable) if flag and (i == 0 or not trainable[i - 1]))


@dataclass(frozen=True)
class RenderedSample:
    """Token ids and, aligned with them, whether token i is a training target."""

    input_ids: list[int]
    trainable: list[bool]

    @property
    def n_turns(self) -> int:
        return count_turns(self.trainable)


def load_chat_template(tokenizer: Any, template_file: Path | None, tokenizer_name: str) -> None:
    """Install `template_file` on the tokenizer, or check that it already has a template."""
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise TemplateError(f"chat template file {path} does not exist")
        tokenizer.chat_template = path.read_text()
    if not tokenizer.chat_template:
        raise TemplateError(
            f"tokenizer {tokenizer_name} has no chat template; pass --chat-template FILE with a Jinja template"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"tokenizer {tokenizer_name} is not a fast tokenizer; character offsets are needed")


class ChatRenderer:
    """Turns messages into (input_ids, trainable) with one tokenizer and its chat template."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._special_ids = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())

    def _text(self, messages: list[Message], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as error:  # jinja raises its own types, and templates raise on purpose
            raise TemplateError(f"the chat template cannot render this conversation: {error}") from error

    def assistant_spans(self, messages: list[Message], full_text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) in `full_text` of each assistant turn, end-of-turn included."""
        spans: list[tuple[int, int]] = []
        searched_to = 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._text(messages[:k], generation_prompt=True) if k else ""
            if before and full_text.startswith(before) and len(before) >= searched_to:
                start = len(before)
            else:
                start = self._locate_content(full_text, message["content"], searched_to)
            through = self._text(messages[: k + 1], generation_prompt=False)
            if full_text.startswith(through) and len(through) > start:
                end = len(through)
            else:
                end = self._close_turn(full_text, through, message["content"], start)
            spans.append((start, end))
            searched_to = end
        return spans

    @staticmethod
    def _locate_content(full_text: str, content: str, searched_to: int) -> int:
        """Start of a turn whose generation-prompt prefix is not a prefix of the whole: its content, after the previous turn."""
        found = full_text.find(content, searched_to)
        if found < 0:
            raise TemplateError("the chat template does not reproduce an assistant message's content")
        return found

    @staticmethod
    def _close_turn(full_text: str, through: str, content: str, start: int) -> int:
        """End of a turn whose standalone rendering differs: its content, then the template's end-of-turn text."""
        content_end = full_text.find(content, start)
        if content_end < 0:
            raise TemplateError("the chat template does not reproduce an assistant message's content")
        end = content_end + len(content)
        closing = through[through.rfind(content) + len(content) :]
        matched = 0
        while matched < len(closing) and end + matched < len(full_text) and full_text[end + matched] == closing[matched]:
            matched += 1
        return end + matched

    def render(self, messages: list[Message]) -> RenderedSample:
        full_text = self._text(messages, generation_prompt=False)
        spans = self.assistant_spans(messages, full_text)
        encoding = self.tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoding["input_ids"])
        offsets = encoding["offset_mapping"]
        trainable = [False] * len(input_ids)
        for start, end in spans:
            members = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            for i in self._trim_after_end_of_turn(members, input_ids, offsets, full_text):
                trainable[i] = True
        if trainable:
            trainable[0] = False  # position 0 is never a prediction target
        return RenderedSample(input_ids, trainable)

    def _trim_after_end_of_turn(
        self, members: list[int], input_ids: list[int], offsets: list[tuple[int, int]], text: str
    ) -> list[int]:
        """Drop whitespace-only template markup after the turn's last special (end-of-turn) token.

        ChatML renders `<|im_end|>\\n`: the end-of-turn token is a target, the newline after it is
        layout the model never generates (generation stops at `<|im_end|>`).
        """
        special = [position for position, i in enumerate(members) if input_ids[i] in self._special_ids]
        if not special:
            return members
        last = special[-1]
        tail = members[last + 1 :]
        if all(not text[offsets[i][0] : offsets[i][1]].strip() for i in tail):
            return members[: last + 1]
        return members
