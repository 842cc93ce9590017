import pyarrow.parquet as pq
import pytest

from pipeline.data.chat import ChatRenderer
from pipeline.data.prepare_config import PrepareConfig
from pipeline.data.prepare_stage import run_prepare
from pipeline.eval.ground_truth import generate_task, read_jsonl
from pipeline.eval.ground_truth_labels import corrupted_flags, corrupted_token_mask
from pipeline.runtime.files import ArtifactError
from tests import tiny
from tests.task_factories import write_task

QUESTION = {"role": "user", "content": "What is 2 + 3?"}
ANSWER = "First, 2 + 3 = 6. So the answer is 6."  # the two 6s (characters 14 and 34) are wrong


def _row(messages, corruption):
    return {"id": "s0", "messages": messages, "corruption": corruption}


def _marked(tokenizer, rendered_ids, flags):
    return [tokenizer.decode([i]) for i, flag in zip(rendered_ids, flags) if flag]


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return ChatRenderer(tokenizer)


def test_only_the_tokens_over_a_corrupted_span_are_flagged(tokenizer, renderer):
    messages = [QUESTION, {"role": "assistant", "content": ANSWER}]
    rendered = renderer.render(messages)
    spans = [{"turn": 0, "start": 14, "end": 15, "kind": "wrong_result"},
             {"turn": 0, "start": 34, "end": 35, "kind": "wrong_result"}]
    flags = corrupted_flags(renderer, _row(messages, spans), rendered.input_ids, rendered.trainable)
    assert len(flags) == len(rendered.input_ids)
    tokens = [tokenizer.decode([i]) for i in rendered.input_ids]
    assert tokens[18:] == ["F", "i", "r", "st", ",", " 2", " +", " 3", " ", "=", " 6", ".", " ", "S", "o", " the",
                           " an", "s", "w", "er", " is", " 6", ".", "<|im_end|>", "\n"]
    assert _marked(tokenizer, rendered.input_ids, flags) == [" 6", " 6"]  # the space shares the number's token
    assert [i for i, f in enumerate(flags) if f] == [28, 39]
    # the user asked about 2 + 3 too, but context tokens are never flagged
    assert corrupted_flags(renderer, _row(messages, []), rendered.input_ids, rendered.trainable) == [False] * len(flags)


def test_a_span_in_the_second_turn_flags_only_that_turn(tokenizer, renderer):
    messages = [QUESTION, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And 1 + 1?"},
                {"role": "assistant", "content": "1 + 1 = 2. So the answer is 2."}]
    rendered = renderer.render(messages)
    flags = corrupted_flags(renderer, _row(messages, [{"turn": 1, "start": 0, "end": 9}]),
                            rendered.input_ids, rendered.trainable)
    assert _marked(tokenizer, rendered.input_ids, flags) == ["1", " +", " 1", " ", "=", " 2"]
    assert all(rendered.trainable[i] for i, f in enumerate(flags) if f)


def test_a_truncated_sample_gets_the_prefix_of_its_flags(renderer):
    messages = [QUESTION, {"role": "assistant", "content": ANSWER}]
    rendered = renderer.render(messages)
    spans = [{"turn": 0, "start": 14, "end": 15}, {"turn": 0, "start": 34, "end": 35}]
    full = corrupted_flags(renderer, _row(messages, spans), rendered.input_ids, rendered.trainable)
    cut = corrupted_flags(renderer, _row(messages, spans), rendered.input_ids[:30], rendered.trainable[:30])
    assert cut == full[:30] and sum(cut) == 1


PLAIN_TEMPLATE = (  # a template that starts with no BOS, so add_bos puts one in front
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_with_a_bos_token_the_flags_move_with_the_tokens():
    renderer = ChatRenderer(tiny.build_tokenizer(chat_template=PLAIN_TEMPLATE), add_bos=True)
    messages = [QUESTION, {"role": "assistant", "content": ANSWER}]
    rendered = renderer.render(messages)
    assert rendered.input_ids[0] == renderer.tokenizer.bos_token_id
    flags = corrupted_flags(renderer, _row(messages, [{"turn": 0, "start": 14, "end": 15}]),
                            rendered.input_ids, rendered.trainable)
    assert _marked(renderer.tokenizer, rendered.input_ids, flags) == [" 6"]
    assert len(flags) == len(rendered.input_ids) and flags[0] is False


@pytest.mark.parametrize("corruption, message", [
    ([{"turn": 1, "start": 0, "end": 2}], "outside the conversation's assistant contents"),
    ([{"turn": 0, "start": 30, "end": 99}], "outside"),
    ([{"turn": 0, "start": 3, "end": 3}], "outside"),
    ([{"turn": 0, "start": 1}], "needs 'turn', 'start' and 'end'"),
    ([{"turn": 0, "start": "1", "end": 2}], "non-integer"),
    ({"turn": 0}, "expected a list of spans"),
])
def test_malformed_spans_are_refused_naming_the_row(renderer, corruption, message):
    messages = [QUESTION, {"role": "assistant", "content": ANSWER}]
    rendered = renderer.render(messages)
    with pytest.raises(ArtifactError, match=f"task row 's0'.*{message}"):
        corrupted_flags(renderer, _row(messages, corruption), rendered.input_ids, rendered.trainable)


def test_tokens_that_are_not_the_rows_rendering_are_refused(renderer):
    messages = [QUESTION, {"role": "assistant", "content": ANSWER}]
    other = renderer.render([QUESTION, {"role": "assistant", "content": "So the answer is 5."}])
    with pytest.raises(ArtifactError, match="does not render to the stored tokens"):
        corrupted_flags(renderer, _row(messages, []), other.input_ids, other.trainable)


@pytest.fixture(scope="module")
def prepared_task(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("task")
    files = write_task(generate_task(0, 40, 0, corrupt_fraction=0.5), folder / "task")
    run_prepare(PrepareConfig(input=[files.train], tokenizer=str(tokenizer_dir), output=folder / "tokenized",
                              max_length=90))
    return files, folder / "tokenized"


def test_the_labels_of_a_prepared_task_align_with_its_shards(prepared_task, tokenizer):
    files, tokenized = prepared_task
    labels = corrupted_token_mask(tokenized, files.train)
    shard = pq.read_table(tokenized / "part-00000.parquet").to_pylist()
    rows = {row["id"]: row for row in read_jsonl(files.train)}
    assert labels["sample_id"].to_list() == [s["sample_id"] for s in shard] and len(shard) == 40
    assert any(s["truncated"] for s in shard)  # max_length 90 cuts some two-turn samples
    for sample, flags in zip(shard, labels["corrupted"].to_list()):
        assert len(flags) == sample["n_tokens"]
        assert all(sample["trainable"][i] for i, f in enumerate(flags) if f)
        row = rows[sample["sample_id"]]
        if not row["corruption"]:
            assert not any(flags)
            continue
        flagged = "".join(tokenizer.decode([t]) for t, f in zip(sample["input_ids"], flags) if f)
        contents = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        for span in row["corruption"]:
            text = contents[span["turn"]][span["start"]:span["end"]]
            if not sample["truncated"]:
                assert text.replace(" ", "") in flagged.replace(" ", "")
    assert 0 < sum(map(sum, labels["corrupted"].to_list())) < sum(s["n_trainable"] for s in shard)


def test_labels_refuse_another_tokenizer_and_rows_that_are_not_the_corpus(prepared_task, tmp_path):
    files, tokenized = prepared_task
    other = tiny.build_tokenizer(vocab_size=300)
    with pytest.raises(ArtifactError, match="tokenizer or chat template differs"):
        corrupted_token_mask(tokenized, files.train, tokenizer=other)
    fewer = tmp_path / "train.jsonl"
    fewer.write_text("".join(line + "\n" for line in files.train.read_text().splitlines()[1:]))
    with pytest.raises(ArtifactError, match="sample 'train-000000' .* has no row in"):
        corrupted_token_mask(tokenized, fewer)
    twice = tmp_path / "twice.jsonl"
    twice.write_text(files.train.read_text() + files.train.read_text().splitlines()[0] + "\n")
    with pytest.raises(ArtifactError, match="holds id 'train-000000' twice"):
        corrupted_token_mask(tokenized, twice)
