"""The eval's tiny task model: its tokenizer and chat template, its recipe's fingerprint, a deterministic cached build."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.chat import ChatRenderer
from pipeline.eval import task_model
from pipeline.eval.ground_truth import generate_task
from pipeline.eval.task_model import TaskModelRecipe, ensure_task_model, folder_name, task_tokenizer
from pipeline.runtime import model_zoo

# One layer, 8 steps: a build of about a second.
TINY = TaskModelRecipe(layers=1, hidden=32, heads=2, intermediate=64, conversations=128, batch_size=16)


@pytest.fixture(scope="module")
def tokenizer():
    return task_tokenizer()


def test_chat_template_marks_the_assistant_turn_and_its_end(tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2 + 13?"}, {"role": "assistant", "content": "So 15."}]
    rendered = ChatRenderer(tokenizer).render(messages)
    tokens = tokenizer.convert_ids_to_tokens(rendered.input_ids)
    assert tokens == ["<|user|>", "What", " is", " 2", " +", " 1", "3", "?", "<|end|>",
                      "<|assistant|>", "So", " 1", "5", ".", "<|end|>"]
    assert rendered.trainable == [False] * 10 + [True] * 5


def test_fast_rendering_equals_the_chat_renderer(tokenizer) -> None:
    """The pretraining data's direct rendering gives the tokens and targets `pipeline.data.chat` gives."""
    renderer = ChatRenderer(tokenizer)
    conversations = task_model.pretraining_conversations(TINY, 20)
    assert any(len(messages) == 4 for messages in conversations)  # two-turn ones included
    for messages, (ids, trainable) in zip(conversations, task_model.tokenized_samples(conversations, tokenizer)):
        assert task_model.render_text(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
        rendered = renderer.render(messages)
        assert rendered.input_ids == ids.tolist() and rendered.trainable == trainable.tolist()


def test_every_task_text_round_trips_without_unknown_tokens(tokenizer) -> None:
    """Worked answers, every corruption (random letters included) and prompts encode losslessly."""
    task = generate_task(0, 60, 6, corrupt_fraction=0.5)
    texts = [m["content"] for row in task.train + task.heldout for m in row["messages"]]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) < 1024  # a small vocabulary


def test_corrupted_tokens_are_marked_inside_the_assistant_turns(tokenizer) -> None:
    renderer = ChatRenderer(tokenizer)
    task = generate_task(1, 40, 2, corrupt_fraction=0.5)
    marked_any = 0
    for row in task.train:
        spans = [(s["turn"], s["start"], s["end"]) for s in row["corruption"]]
        rendered, marked = renderer.render_marking(row["messages"], spans)
        assert all(t for t, m in zip(rendered.trainable, marked) if m)
        assert any(marked) == bool(spans)
        marked_any += any(marked)
    assert marked_any == 20


def test_the_fingerprint_follows_the_recipe() -> None:
    assert folder_name(TINY) == folder_name(replace(TINY))
    assert folder_name(TINY) != folder_name(replace(TINY, pretrain_kinds=("sum",)))
    assert folder_name(TINY) != folder_name(replace(TINY, lr=1e-3))
    assert folder_name() == folder_name(task_model.DEFAULT_RECIPE)
    with pytest.raises(ValueError, match="pretrain_kinds"):
        TaskModelRecipe(pretrain_kinds=("calculus",))


def test_model_zoo_knows_the_task_model_by_name(tmp_path: Path) -> None:
    assert "task-llama" in model_zoo.known_models()
    assert model_zoo.model_dir("task-llama", tmp_path) == tmp_path / "models" / folder_name()
    assert not (tmp_path / "models").exists()  # naming the folder builds nothing


def test_the_build_is_deterministic_and_a_second_call_is_a_cache_hit(tmp_path: Path, monkeypatch) -> None:
    first = ensure_task_model(TINY, cache_dir=tmp_path / "a")
    second = ensure_task_model(TINY, cache_dir=tmp_path / "b")
    assert first.name == second.name == folder_name(TINY)
    assert model_zoo.is_complete(first)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    source = json.loads((first / "SOURCE.json").read_text())
    assert source["fingerprint"] == TINY.fingerprint() and source["recipe"] == TINY.as_dict()
    assert source["pretrain"]["steps"] == 8
    assert not [p for p in first.parent.iterdir() if p.name.startswith(f".{first.name}.tmp")]

    def refuse(*args, **kwargs):
        raise AssertionError("a cached model was built again")

    monkeypatch.setattr(task_model, "build", refuse)
    assert ensure_task_model(TINY, cache_dir=tmp_path / "a") == first


def test_the_built_model_loads_and_answers_through_the_eval_measures(tmp_path: Path) -> None:
    from pipeline.eval.measures import exact_match, heldout_nll
    from pipeline.runtime.checkpoints import load_model

    folder = ensure_task_model(TINY, cache_dir=tmp_path)
    model = load_model(folder)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == len(task_tokenizer())
    heldout = generate_task(0, 4, 3).heldout
    nll = heldout_nll(folder, heldout)
    assert np.isfinite(nll) and 0 < nll < np.log(model.config.vocab_size) + 1
    assert 0.0 <= exact_match(folder, heldout, max_new_tokens=4) <= 1.0
