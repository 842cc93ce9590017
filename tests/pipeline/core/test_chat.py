"""Trainable-token alignment, checked on literal token lists."""

from __future__ import annotations

import pytest

from pipeline.core.chat import ChatRenderer, TemplateError, load_chat_template
from tests import tiny

F, T = False, True


def tokens_and_flags(tokenizer, messages):
    sample = ChatRenderer(tokenizer).render(messages)
    return list(zip(tokenizer.convert_ids_to_tokens(sample.input_ids), sample.trainable)), sample


def test_single_turn_marks_response_and_end_of_turn_only(tokenizer):
    pairs, sample = tokens_and_flags(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris."}]
    )
    assert pairs == [
        ("<|im_start|>", F), ("user", F), ("Ċ", F), ("H", F), ("i", F), ("<|im_end|>", F), ("Ċ", F),
        ("<|im_start|>", F), ("a", F), ("ss", F), ("istan", F), ("t", F), ("Ċ", F),
        ("Pa", T), ("ris", T), (".", T), ("<|im_end|>", T),  # first response token and end-of-turn are targets
        ("Ċ", F),  # layout after <|im_end|>: never generated, not trained
    ]
    assert sample.n_turns == 1


def test_multi_turn_marks_every_assistant_turn_and_no_prompt_token(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    pairs, sample = tokens_and_flags(tokenizer, messages)
    trainable_tokens = [token for token, flag in pairs if flag]
    assert trainable_tokens == ["H", "el", "lo", "!", "<|im_end|>", "Pa", "ris", ".", "<|im_end|>"]
    assert sample.n_turns == 2
    # The earlier assistant turn starts right after its "assistant\n" header, at a literal position.
    assert sample.trainable.index(True) == 28
    assert pairs[27] == ("Ċ", F) and pairs[28] == ("H", T)


def test_ids_equal_the_templates_own_tokenization(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    sample = ChatRenderer(tokenizer).render(messages)
    assert sample.input_ids == list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def test_position_zero_is_never_a_target():
    tokenizer = tiny.build_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    sample = ChatRenderer(tokenizer).render([{"role": "assistant", "content": "Paris is nice."}])
    assert sample.trainable[0] is False
    assert all(sample.trainable[1:])


def test_prefix_that_is_not_a_token_prefix_is_handled():
    """'assistant: ' + 'France' tokenizes as '...:', 'ĠFrance': the prefix's last token 'Ġ' is merged away."""
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tokenizer = tiny.build_tokenizer(chat_template=template)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "France"}]
    prefix = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert full[: len(prefix)] != prefix  # the case under test really occurs
    pairs, _ = tokens_and_flags(tokenizer, messages)
    assert [token for token, flag in pairs if flag] == ["ĠFrance", "<|im_end|>"]


REASONING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{{ m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_template_that_renders_earlier_turns_differently():
    """Like Qwen3: only turns after the last user message carry the reasoning block."""
    tokenizer = tiny.build_tokenizer(chat_template=REASONING_TEMPLATE)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    sample = ChatRenderer(tokenizer).render(messages)
    runs, start = [], None
    for i, flag in enumerate([*sample.trainable, False]):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            runs.append(tokenizer.decode(sample.input_ids[start:i]))
            start = None
    assert runs == ["Hello!<|im_end|>", "<think>\n\n</think>\n\nParis.<|im_end|>"]


def test_missing_template_is_a_clear_error(tmp_path):
    tokenizer = tiny.build_tokenizer(chat_template=None)
    with pytest.raises(TemplateError, match="has no chat template; pass --chat-template"):
        load_chat_template(tokenizer, None, "my-tokenizer")
    with pytest.raises(TemplateError, match="does not exist"):
        load_chat_template(tokenizer, tmp_path / "nope.jinja", "my-tokenizer")
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(tiny.CHATML_TEMPLATE)
    load_chat_template(tokenizer, template_file, "my-tokenizer")
    assert tokenizer.chat_template == tiny.CHATML_TEMPLATE


def test_template_that_raises_becomes_template_error():
    tokenizer = tiny.build_tokenizer(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        ChatRenderer(tokenizer).render([{"role": "assistant", "content": "x"}])
