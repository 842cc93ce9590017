from __future__ import annotations

import pytest

from pipeline.data.conversation import RowError, content_id, normalise_messages, row_id


def test_three_shapes_become_messages():
    assert normalise_messages({"prompt": "Q", "response": "A"}) == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
    ]
    assert normalise_messages({"prompt": "Q", "completion": "A", "system": "S"})[0] == {"role": "system", "content": "S"}
    assert normalise_messages({"instruction": "Add", "input": "2 and 2", "output": "4"})[0]["content"] == "Add\n\n2 and 2"
    assert normalise_messages({"instruction": "Add", "input": "", "output": "4"})[0]["content"] == "Add"
    multi = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert normalise_messages({"messages": multi}) == multi


@pytest.mark.parametrize(
    "row, reason, message",
    [
        ({"prompt": "x", "respone": "y"}, "missing_fields", "'respone' looks like a misspelling of 'response'"),
        ({"question": "x", "answer": "y"}, "missing_fields", "no recognised row shape"),
        ({"instruction": "x"}, "missing_fields", "needs an 'output' field"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown_role", "unknown role 'bot'"),
        ({"messages": [{"role": "user"}]}, "missing_fields", "message 0 must be an object with 'role' and 'content'"),
        ({"messages": "hello"}, "bad_content", "expected a list"),
        ({"prompt": "", "response": "y"}, "bad_content", "field 'prompt' is empty"),
        ({"prompt": "x", "response": 42}, "bad_content", "field 'response' is int, expected a string"),
        ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
         "bad_content", "content of message 0 (user) is list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn", "no assistant turn"),
    ],
)
def test_bad_rows_name_the_problem(row, reason, message):
    with pytest.raises(RowError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        normalise_messages(row)
    assert caught.value.reason == reason


def test_content_id_is_stable_and_content_sensitive():
    a = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    b = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]
    assert content_id(a) == content_id([dict(m) for m in a])
    assert content_id(a) != content_id(b)
    assert content_id(a).startswith("sha256:")


def test_row_id():
    assert row_id({"id": 7}) == "7"
    assert row_id({"id": " "}) is None
    assert row_id({}) is None
