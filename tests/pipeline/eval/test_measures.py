import numpy as np
import pytest
import torch

from pipeline.data.prepare_config import PrepareConfig
from pipeline.data.prepare_stage import run_prepare
from pipeline.eval.ground_truth import generate_task
from pipeline.eval.measures import Generation, exact_match, greedy_answers, heldout_nll, longest_answer_tokens
from pipeline.runtime.errors import UserError
from tests import tiny
from tests.task_factories import write_task


# --- held-out NLL ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout_task(tmp_path_factory):
    return write_task(generate_task(0, 3, 4), tmp_path_factory.mktemp("task"))


def _reference_nll(model_dir, tokenizer, rows):
    """Mean response-token NLL from full logits, one conversation at a time (no batching)."""
    from pipeline.data.chat import ChatRenderer
    from pipeline.runtime.checkpoints import load_model

    model, values = load_model(model_dir), []
    for row in rows:
        sample = ChatRenderer(tokenizer).render(row["messages"])
        ids = torch.tensor([sample.input_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        for i, target in enumerate(sample.trainable):
            if target:
                values.append(-logprobs[i - 1, sample.input_ids[i]].item())
    return float(np.mean(values))


def test_heldout_nll_is_the_token_weighted_mean_over_response_tokens(llama_dir, tokenizer, heldout_task, tmp_path):
    from pipeline.eval.ground_truth import read_jsonl

    rows = read_jsonl(heldout_task.heldout)
    expected = _reference_nll(llama_dir, tokenizer, rows)
    assert heldout_nll(llama_dir, heldout_task.heldout) == pytest.approx(expected, rel=1e-4)
    assert heldout_nll(llama_dir, rows) == pytest.approx(expected, rel=1e-4)
    run_prepare(PrepareConfig(input=[heldout_task.heldout], tokenizer=str(llama_dir), output=tmp_path / "tok"))
    assert heldout_nll(llama_dir, tmp_path / "tok") == pytest.approx(expected, rel=1e-4)
    with pytest.raises(UserError, match="is empty"):
        heldout_nll(llama_dir, [])
    with pytest.raises(UserError, match="row 'x' is not a conversation: .*no recognised row shape"):
        heldout_nll(llama_dir, [{"id": "x", "text": "hello"}])


def test_heldout_nll_refuses_a_folder_tokenized_with_another_tokenizer(llama_dir, heldout_task, tmp_path):
    other = tiny.save_tokenizer(tmp_path / "other")
    (tmp_path / "other" / "tokenizer.json").write_text(
        tiny.build_tokenizer(vocab_size=300).backend_tokenizer.to_str())
    run_prepare(PrepareConfig(input=[heldout_task.heldout], tokenizer=str(other), output=tmp_path / "tok"))
    with pytest.raises(UserError, match="tokenized with another tokenizer"):
        heldout_nll(llama_dir, tmp_path / "tok")


# --- greedy generation and exact match -----------------------------------------------------


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(llama_dir, heldout_task):
    from pipeline.eval.ground_truth import read_jsonl

    rows = read_jsonl(heldout_task.heldout)
    assert len({len(r["messages"][0]["content"]) for r in rows}) > 1  # prompts of several lengths: padding happens
    batched = greedy_answers(llama_dir, rows, max_new_tokens=6)
    alone = [greedy_answers(llama_dir, [row], max_new_tokens=6)[0] for row in rows]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert [g.id for g in batched] == [r["id"] for r in rows]


def test_generation_is_the_argmax_continuation(llama_dir, tokenizer, heldout_task):
    from pipeline.eval.ground_truth import read_jsonl
    from pipeline.runtime.checkpoints import load_model

    row = read_jsonl(heldout_task.heldout)[0]
    text = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model, new = load_model(llama_dir), []
    with torch.no_grad():
        for _ in range(6):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    (generation,) = greedy_answers(llama_dir, [row], max_new_tokens=6)
    assert generation.text == tokenizer.decode(new, skip_special_tokens=True)


STEPS = 30


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory, tokenizer):
    """A tiny Llama trained until it answers one question in the task's format."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.data.chat import ChatRenderer

    settings = dict(tiny.TINY_CONFIGS["llama"]) | dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    config = AutoConfig.for_model(settings.pop("model_type"), vocab_size=len(tokenizer), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "So the answer is 5."}]
    ids = torch.tensor([ChatRenderer(tokenizer).render(messages).input_ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("answering")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder, messages


def test_exact_match_reads_the_answer_of_the_generation(answering_model):
    folder, messages = answering_model
    right = {"id": "q", "messages": messages, "answer": "5"}
    wrong = {"id": "r", "messages": messages, "answer": "6"}
    (generation,) = greedy_answers(folder, [right], max_new_tokens=12)
    assert generation.text == "So the answer is 5." and generation.answer == "5" and generation.correct
    assert exact_match(folder, [right, wrong, right], max_new_tokens=12) == pytest.approx(2 / 3)
    assert exact_match(folder, [right, wrong], max_new_tokens=12, dtype="bfloat16") == 0.5  # bf16 matmuls keep the answer


def test_generation_comparison_and_bad_held_out_rows(llama_dir):
    assert Generation("a", "x", "1, 2", " 1,  2 ").correct
    assert not Generation("a", "x", None, "1").correct
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "So the answer is 1."}]
    with pytest.raises(UserError, match="row 'q' has no 'answer'"):
        greedy_answers(llama_dir, [{"id": "q", "messages": messages}])
    with pytest.raises(UserError, match="max_new_tokens is 0"):
        exact_match(llama_dir, [{"id": "q", "messages": messages, "answer": "1"}], max_new_tokens=0)


def test_exact_match_has_room_for_the_longest_held_out_answer(tokenizer, llama_dir, heldout_task):
    from pipeline.eval.ground_truth import read_jsonl

    rows = read_jsonl(heldout_task.heldout)
    answers = [len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert longest_answer_tokens(llama_dir, rows) == max(answers) > 20  # a worked answer, not a fixed 40 or 48
    two_turn = {"id": "t", "messages": [*rows[0]["messages"], {"role": "user", "content": "And?"},
                                        {"role": "assistant", "content": "Yes."}], "answer": "x"}
    # The answer generated is the conversation's last assistant message.
    assert longest_answer_tokens(llama_dir, [two_turn]) == len(tokenizer("Yes.", add_special_tokens=False)["input_ids"])
