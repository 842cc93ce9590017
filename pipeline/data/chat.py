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
closed with the template's own end-of-turn text. Long conversations render a few messages around
each turn instead of its whole prefix, so the work grows linearly with the number of turns.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.conversation import Message
from pipeline.runtime.errors import UserError


class TemplateError(UserError):
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
    """Turns messages into (input_ids, trainable) with one tokenizer and its chat template.

    With `add_bos`, the tokenizer's BOS token is put in front of every rendering that does not
    already start with it (for templates that leave it out); it is context, never a target.
    """

    def __init__(self, tokenizer: Any, add_bos: bool = False):
        self.tokenizer = tokenizer
        self._special_ids = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        self._bos_id = tokenizer.bos_token_id if add_bos else None
        if add_bos and self._bos_id is None:
            raise TemplateError(
                f"add_bos is on but tokenizer {getattr(tokenizer, 'name_or_path', '')!s} has no BOS token; turn add_bos off"
            )

    def _text(self, messages: list[Message], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as error:  # jinja raises its own types, and templates raise on purpose
            raise TemplateError(f"the chat template cannot render this conversation: {error}") from error

    def assistant_spans(self, messages: list[Message], full_text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) in `full_text` of each assistant turn, end-of-turn included.

        The spans are those of `_prefix_spans` (the definition), found with work linear in the
        number of turns: from the third assistant turn on, a turn is located by rendering a window
        of messages around it (the previous turn's exchange, its own, and the message after it,
        which some templates look at). The window's text from the end of the previous turn to the
        end of this one must appear at the same place in `full_text`; when it does not (a template
        that renders this stretch differently in the whole conversation), or the template refuses
        the window, the turn's whole prefix is rendered instead.
        """
        turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
        spans: list[tuple[int, int]] = []
        for i, k in enumerate(turns):
            searched_to = spans[-1][1] if spans else 0
            span = self._span_in_window(messages, full_text, turns, i, searched_to) if i >= 2 else None
            spans.append(span or self._prefix_span(messages, full_text, k, searched_to))
        return spans

    def _span_in_window(
        self, messages: list[Message], full_text: str, turns: list[int], i: int, searched_to: int
    ) -> tuple[int, int] | None:
        """Turn `turns[i]` located in a window starting after turn `turns[i - 2]`; None when the window disagrees."""
        first, k = turns[i - 2] + 1, turns[i]
        window = messages[first : k + 2]
        try:
            window_text = self._text(window, generation_prompt=False)
            (_, previous_end), (start, end), *_ = self._prefix_spans(window, window_text)
        except TemplateError:  # a template may refuse a window (say, one opening with an assistant message)
            return None
        stretch = window_text[previous_end:end]
        if start < previous_end or not full_text.startswith(stretch, searched_to):
            return None
        return searched_to + start - previous_end, searched_to + len(stretch)

    def _prefix_spans(self, messages: list[Message], full_text: str) -> list[tuple[int, int]]:
        """Every assistant turn's span, each from renderings of its whole prefix (quadratic in turns)."""
        spans: list[tuple[int, int]] = []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                spans.append(self._prefix_span(messages, full_text, k, spans[-1][1] if spans else 0))
        return spans

    def _prefix_span(self, messages: list[Message], full_text: str, k: int, searched_to: int) -> tuple[int, int]:
        """Turn k's span: it starts where the prefix with a generation prompt ends, and ends where the prefix through it ends."""
        content = messages[k]["content"]
        before = self._text(messages[:k], generation_prompt=True) if k else ""
        if before and full_text.startswith(before) and len(before) >= searched_to:
            start = len(before)
        else:
            start = self._locate_content(full_text, content, searched_to)
        through = self._text(messages[: k + 1], generation_prompt=False)
        if full_text.startswith(through) and len(through) > start:
            end = len(through)
        else:
            end = self._close_turn(full_text, through, content, start)
        return start, end

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
        return self.render_marking(messages, [])[0]

    def render_marking(
        self, messages: list[Message], content_spans: list[tuple[int, int, int]]
    ) -> tuple[RenderedSample, list[bool]]:
        """`render(messages)` and, aligned with its tokens, which trainable tokens overlap `content_spans`.

        Each span is (assistant turn, start, end): characters [start, end), start < end, of the content of the
        turn-th assistant message (0-based, counting assistant messages only). The content is found
        inside its turn's rendering, so this needs a template that renders contents verbatim.
        """
        full_text = self._text(messages, generation_prompt=False)
        spans = self.assistant_spans(messages, full_text)
        encoding = self.tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoding["input_ids"])
        offsets = encoding["offset_mapping"]
        trainable = [False] * len(input_ids)
        for members in _tokens_in_spans(offsets, spans):
            for i in self._trim_after_end_of_turn(members, input_ids, offsets, full_text):
                trainable[i] = True
        marked = [False] * len(input_ids)
        for members in _tokens_in_spans(offsets, self._in_full_text(messages, full_text, spans, content_spans)):
            for i in members:
                marked[i] = trainable[i]
        if self._bos_id is not None and input_ids[:1] != [self._bos_id]:
            input_ids, trainable, marked = [self._bos_id, *input_ids], [False, *trainable], [False, *marked]
        if trainable:
            trainable[0] = marked[0] = False  # position 0 is never a prediction target
        return RenderedSample(input_ids, trainable), marked

    @staticmethod
    def _in_full_text(
        messages: list[Message], full_text: str, turn_spans: list[tuple[int, int]], content_spans: list[tuple[int, int, int]]
    ) -> list[tuple[int, int]]:
        """Content character spans as spans of the whole rendering, in order."""
        contents = [message["content"] for message in messages if message["role"] == "assistant"]
        placed = []
        for turn, start, end in content_spans:
            if not 0 <= turn < len(contents) or not 0 <= start < end <= len(contents[turn]):
                raise TemplateError(
                    f"span {start}:{end} of assistant turn {turn} lies outside the conversation's assistant contents"
                )
            turn_start, turn_end = turn_spans[turn]
            at = full_text.find(contents[turn], turn_start, turn_end)
            if at < 0:
                raise TemplateError(f"the chat template does not render assistant turn {turn}'s content verbatim")
            placed.append((at + start, at + end))
        return sorted(placed)

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


def _tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> Iterator[list[int]]:
    """For each character span (in order), the tokens that overlap it; one pass over both lists.

    A fast tokenizer's offsets for one text are in order, so token ends never decrease.
    """
    ends = [end for _, end in offsets]
    for start, end in spans:
        i = bisect.bisect_right(ends, start)  # the first token that ends after the span starts
        members = []
        while i < len(offsets) and offsets[i][0] < end:
            if offsets[i][1] > offsets[i][0]:
                members.append(i)
            i += 1
        yield members
