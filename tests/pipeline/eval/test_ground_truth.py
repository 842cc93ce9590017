import json

import pytest

from pipeline.eval.ground_truth import CORRUPTION_KINDS, generate_task, read_jsonl
from pipeline.runtime.errors import UserError
from pipeline.eval.worked_problems import extract_answer
from tests.task_factories import write_task


def _assistant(row, turn):
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"][turn]


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    names = ("train.jsonl", "heldout.jsonl", "clean_reference.jsonl", "task.json")
    first = write_task(generate_task(5, 60, 12), tmp_path / "a").folder
    second = write_task(generate_task(5, 60, 12), tmp_path / "b").folder
    other = write_task(generate_task(6, 60, 12), tmp_path / "c").folder
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "train.jsonl").read_bytes() != (other / "train.jsonl").read_bytes()
    assert sorted(p.name for p in first.iterdir()) == sorted(names)  # no temporary file left


def test_a_known_fraction_is_corrupted_in_equal_shares_of_each_kind():
    task = generate_task(1, 100, 0, corrupt_fraction=0.3)
    corrupted = [row for row in task.train if row["corruption"]]
    assert len(corrupted) == 30
    kinds = [row["corruption"][0]["kind"] for row in corrupted]
    assert {kind: kinds.count(kind) for kind in CORRUPTION_KINDS} == {kind: 6 for kind in CORRUPTION_KINDS}
    assert task.counts["corrupted_conversations"] == 30
    assert sum(1 for row in task.train if len(row["messages"]) == 4) == 25  # two_turn_fraction 0.25
    assert generate_task(1, 10, 0, corrupt_fraction=0.0).counts["corrupted_conversations"] == 0
    assert all(row["corruption"] for row in generate_task(1, 10, 0, corrupt_fraction=1.0).train)


def test_corruption_spans_point_at_what_each_kind_put_there():
    task = generate_task(2, 200, 0, corrupt_fraction=1.0)
    clean = {row["id"]: row for row in generate_task(2, 200, 0, corrupt_fraction=0.0).train}
    for row in task.train:
        spans = row["corruption"]
        turn = spans[0]["turn"]
        content = _assistant(row, turn)
        truth = _assistant(clean[row["id"]], turn)
        prompt = [m["content"] for m in row["messages"] if m["role"] == "user"][turn]
        marked = [content[s["start"]:s["end"]] for s in spans]
        assert all(0 <= s["start"] < s["end"] <= len(content) and s["turn"] == turn for s in spans)
        kind = spans[0]["kind"]
        if kind == "prompt_copy":
            assert marked == [prompt]
            assert content.replace(prompt + " ", "", 1) == truth
        elif kind == "filler":
            assert marked[0] not in truth and content.replace(marked[0] + " ", "", 1) == truth
        elif kind == "shuffled":
            (span,) = spans  # the same words in another order, where the sentence was
            original = truth[span["start"]:span["end"]]
            assert marked[0] != original and sorted(marked[0].split(" ")) == sorted(original.split(" "))
            assert content[span["end"]:] == truth[span["end"]:]
        elif kind == "random_tokens":
            (span,) = spans  # noise words in place of a working sentence, as many as it had
            original = truth[span["start"]:].split(". ")[0] + "."
            assert content[span["end"]:] == truth[span["start"] + len(original):]
            assert len(marked[0].split(" ")) == len(original.split(" "))
            assert all(word.isalnum() and word == word.lower() for word in marked[0].split(" "))
        else:
            assert kind == "wrong_result" and all(m.isdigit() for m in marked)
            assert extract_answer(content) != extract_answer(truth) and len(marked) >= 2  # shown, then carried
        # outside the marked spans, the corrupted answer keeps the clean one's text
        if kind in ("shuffled", "random_tokens"):
            (span,) = spans
            assert content[: span["start"]] == truth[: span["start"]]
        # the other turn, if any, is untouched
        for other in range(len(row["messages"]) // 2):
            if other != turn:
                assert _assistant(row, other) == _assistant(clean[row["id"]], other)


def test_heldout_problems_are_clean_answered_and_never_trained_on():
    task = generate_task(3, 300, 60)
    train_prompts = {m["content"] for row in task.train for m in row["messages"] if m["role"] == "user"}
    for row in task.heldout:
        user, assistant = row["messages"]
        assert user["content"] not in train_prompts
        assert extract_answer(assistant["content"]) == row["answer"]
    assert {row["source"] for row in task.heldout} == {"arithmetic", "unit_conversion", "sorting"}
    # the held-out problems do not depend on how many training rows were asked for
    assert generate_task(3, 10, 60).heldout == task.heldout


def test_the_reference_set_is_clean_problems_of_its_own_disjoint_from_train_and_heldout():
    task = generate_task(4, 50, 12, corrupt_fraction=1.0)
    assert len(task.clean_reference) == 10 and task.counts["clean_reference"] == 10
    prompts = {name: {m["content"] for row in rows for m in row["messages"] if m["role"] == "user"}
               for name, rows in (("train", task.train), ("heldout", task.heldout), ("reference", task.clean_reference))}
    assert not prompts["reference"] & prompts["train"] and not prompts["reference"] & prompts["heldout"]
    assert not {row["id"] for row in task.clean_reference} & {row["id"] for row in task.train}
    for row in task.clean_reference:
        assert "corruption" not in row
        for user, assistant in zip(row["messages"][::2], row["messages"][1::2]):  # a worked answer, uncorrupted
            assert extract_answer(assistant["content"]) is not None and user["role"] == "user"
    assert {row["source"] for row in task.clean_reference} == {"arithmetic", "unit_conversion", "sorting"}
    # the training rows do not depend on the reference set's size
    assert generate_task(4, 50, 12, corrupt_fraction=1.0, reference_fraction=0.5).train == task.train


def test_read_jsonl_round_trips_and_names_a_bad_line(tmp_path):
    files = write_task(generate_task(0, 5, 2), tmp_path)
    assert read_jsonl(files.train) == generate_task(0, 5, 2).train
    assert json.loads(files.task.read_text())["counts"]["train"] == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match="bad.jsonl line 2 is list"):
        read_jsonl(bad)
    bad.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(UserError, match="bad.jsonl line 2 is not JSON"):
        read_jsonl(bad)
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("settings, message", [
    (dict(n_train=0), "n_train is 0"),
    (dict(n_heldout=-1), "n_heldout is -1"),
    (dict(corrupt_fraction=1.5), "corrupt_fraction is 1.5"),
    (dict(reference_fraction=-0.1), "reference_fraction is -0.1"),
    (dict(kinds=("algebra",)), "unknown problem kind 'algebra'"),
    (dict(corruptions=()), "no corruption kind chosen"),
])
def test_bad_settings_are_refused_with_the_setting_named(settings, message):
    arguments = dict(seed=0, n_train=5, n_heldout=2) | settings
    with pytest.raises(UserError, match=message):
        generate_task(**arguments)
