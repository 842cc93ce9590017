"""Trainable-token alignment, checked on literal token lists."""

from __future__ import annotations

import pytest

from pipeline.data.chat import ChatRenderer, TemplateError, load_chat_template
from tests import tiny

F, T = False, True


def tokens_and_flags(tokenizer, messages):
    sample = ChatRenderer(tokenizer).render(messages)
    return list(zip(tokenizer.convert_ids_to_tokens(sample.input_ids), sample.trainable)), sample


def trainable_runs(tokenizer, sample):
    """The decoded text of each maximal run of trainable tokens."""
    runs, start = [], None
    for i, flag in enumerate([*sample.trainable, False]):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            runs.append(tokenizer.decode(sample.input_ids[start:i]))
            start = None
    return runs


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
    assert trainable_runs(tokenizer, sample) == ["Hello!<|im_end|>", "<think>\n\n</think>\n\nParis.<|im_end|>"]


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


def long_conversation(turns: int, system: bool = False) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(turns // 2):
        messages += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    return messages


def test_span_finding_renders_a_number_of_messages_linear_in_the_turns():
    """Each assistant turn is located by rendering a few messages around it, not its whole prefix."""
    tokenizer = tiny.build_tokenizer()
    rendered: list[int] = []
    render = tokenizer.apply_chat_template

    def counting(messages, **options):
        rendered.append(len(messages))
        return render(messages, **options)

    tokenizer.apply_chat_template = counting
    for turns in (2_000, 20):
        rendered.clear()
        messages = long_conversation(turns)
        sample = ChatRenderer(tokenizer).render(messages)
        assert trainable_runs(tokenizer, sample) == [f"Answer {i}.<|im_end|>" for i in range(turns // 2)]
        assert sum(rendered) <= 20 * len(messages) and len(rendered) <= 10 * (turns // 2)


MISTRAL_LIKE_TEMPLATE = (  # the system prompt goes into the LAST user message: earlier prefixes render differently
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{{- '<|endoftext|>' -}}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if system is defined and loop.index0 == ns.last_user -%}{{ '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else -%}{{ '[INST] ' + m['content'] + '[/INST]' }}{%- endif -%}"
    "{%- else -%}{{ m['content'] + '<|im_end|>' }}{%- endif -%}"
    "{%- endfor -%}"
)
DEFAULT_SYSTEM_TEMPLATE = (  # like Qwen2.5: a default system prompt when the conversation has none
    "{%- if messages[0]['role'] != 'system' -%}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif -%}"
    + tiny.CHATML_TEMPLATE
)
STARTS_WITH_USER_TEMPLATE = (  # refuses a conversation that opens with an assistant message
    "{%- if messages[0]['role'] == 'assistant' -%}{{ raise_exception('start with a user message') }}{%- endif -%}"
    + tiny.CHATML_TEMPLATE
)
PREFIX_MERGE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.mark.parametrize("template", [tiny.CHATML_TEMPLATE, REASONING_TEMPLATE, MISTRAL_LIKE_TEMPLATE,
                                      DEFAULT_SYSTEM_TEMPLATE, PREFIX_MERGE_TEMPLATE, STARTS_WITH_USER_TEMPLATE])
def test_located_turns_equal_the_whole_prefix_renderings(template):
    """The windows give the spans that rendering each turn's whole prefix gives (the definition)."""
    tokenizer = tiny.build_tokenizer(chat_template=template)
    renderer = ChatRenderer(tokenizer)
    messages = long_conversation(12, system=True)
    messages[5:5] = [{"role": "assistant", "content": "And more."}]  # two assistant messages in a row
    text = renderer._text(messages, generation_prompt=False)
    assert renderer.assistant_spans(messages, text) == renderer._prefix_spans(messages, text)


def test_reasoning_template_keeps_its_block_on_the_last_turn_of_a_long_conversation():
    tokenizer = tiny.build_tokenizer(chat_template=REASONING_TEMPLATE)
    sample = ChatRenderer(tokenizer).render(long_conversation(10))
    assert trainable_runs(tokenizer, sample) == [
        *(f"Answer {i}.<|im_end|>" for i in range(4)), "<think>\n\n</think>\n\nAnswer 4.<|im_end|>"
    ]


def bos_tokenizer(chat_template=tiny.CHATML_TEMPLATE):
    tokenizer = tiny.build_tokenizer(chat_template=chat_template)
    tokenizer.bos_token = "<|endoftext|>"
    return tokenizer


def test_add_bos_prepends_the_bos_token_as_a_context_token():
    tokenizer = bos_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris."}]
    plain = ChatRenderer(tokenizer).render(messages)
    with_bos = ChatRenderer(tokenizer, add_bos=True).render(messages)
    assert with_bos.input_ids == [tokenizer.bos_token_id, *plain.input_ids]
    assert with_bos.trainable == [False, *plain.trainable]
    assert tokenizer.convert_ids_to_tokens(with_bos.input_ids[:2]) == ["<|endoftext|>", "<|im_start|>"]


def test_add_bos_never_doubles_a_bos_the_template_writes_and_frees_position_zero():
    tokenizer = bos_tokenizer("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    sample = ChatRenderer(tokenizer, add_bos=True).render([{"role": "assistant", "content": "Paris is nice."}])
    assert sample.input_ids.count(tokenizer.bos_token_id) == 1
    content_only = bos_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    sample = ChatRenderer(content_only, add_bos=True).render([{"role": "assistant", "content": "Paris is nice."}])
    assert sample.trainable[0] is False and all(sample.trainable[1:])  # the first word is now a target


def test_add_bos_without_a_bos_token_is_a_clear_error():
    tokenizer = tiny.build_tokenizer()
    tokenizer.bos_token = None
    with pytest.raises(TemplateError, match="has no BOS token"):
        ChatRenderer(tokenizer, add_bos=True)


def test_render_marking_flags_the_trainable_tokens_over_content_spans(tokenizer):
    messages = [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": "Paris is nice."},
                {"role": "user", "content": "Paris is?"}, {"role": "assistant", "content": "The capital."}]
    renderer = ChatRenderer(tokenizer)
    sample, marked = renderer.render_marking(messages, [(1, 4, 11), (0, 0, 5)])
    assert sample == renderer.render(messages)
    assert [tokenizer.decode([i]) for i, flag in zip(sample.input_ids, marked) if flag] == ["Pa", "ris", " capital"]
    assert all(sample.trainable[i] for i, flag in enumerate(marked) if flag)  # the user's "Paris" is not flagged


def test_render_marking_finds_the_content_after_a_templates_own_markup():
    tokenizer = tiny.build_tokenizer(chat_template=REASONING_TEMPLATE)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    sample, marked = ChatRenderer(tokenizer).render_marking(messages, [(1, 0, 5)])
    assert "".join(tokenizer.decode([i]) for i, flag in zip(sample.input_ids, marked) if flag) == "Paris"


def test_render_marking_refuses_a_span_outside_the_contents(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris."}]
    for span in [(1, 0, 2), (0, 2, 9), (0, 3, 3), (-1, 0, 1)]:
        with pytest.raises(TemplateError, match="outside"):
            ChatRenderer(tokenizer).render_marking(messages, [span])
