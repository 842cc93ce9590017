"""Normalise a raw corpus row into chat messages, or say precisely why it cannot be.

Accepted row shapes:
- `messages`: a list of `{role, content}` with roles system, user, assistant (multi-turn allowed);
- `prompt` + `response`, or `prompt` + `completion`;
- Alpaca: `instruction` + optional `input` + `output`.
The prompt/response and Alpaca shapes may carry a `system` field. Optional `id` and `source`
columns are read by the caller.
"""

from __future__ import annotations

import difflib
from typing import Any

from pipeline.runtime.fingerprint import sha256_json

ROLES = ("system", "user", "assistant")
SHAPE_FIELDS = ("messages", "prompt", "response", "completion", "instruction", "input", "output", "system")
EXPECTED_SHAPES = "'messages', 'prompt'+'response', 'prompt'+'completion' or 'instruction'+'output'"

Message = dict[str, str]


class RowError(ValueError):
    """A row that cannot become a training sample; `reason` is a short code, the message explains."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _misspellings(row: dict[str, Any]) -> str:
    hints = []
    for key in row:
        if key in SHAPE_FIELDS:
            continue
        close = difflib.get_close_matches(str(key).lower(), SHAPE_FIELDS, n=1, cutoff=0.75)
        if close:
            hints.append(f"'{key}' looks like a misspelling of '{close[0]}'")
    return f" ({'; '.join(hints)})" if hints else ""


def _missing(row: dict[str, Any], what: str) -> RowError:
    return RowError("missing_fields", f"{what}; found fields {sorted(map(str, row))}{_misspellings(row)}")


def _text(value: Any, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError("bad_content", f"{where} is {type(value).__name__}, expected a string")
    if not allow_empty and not value.strip():
        raise RowError("bad_content", f"{where} is empty")
    return value


def _with_system(row: dict[str, Any], turns: list[Message]) -> list[Message]:
    if row.get("system") is None:
        return turns
    return [{"role": "system", "content": _text(row["system"], "field 'system'")}, *turns]


def _from_messages(value: Any) -> list[Message]:
    if not isinstance(value, list):
        raise RowError("bad_content", f"field 'messages' is {type(value).__name__}, expected a list of {{role, content}}")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError("missing_fields", f"message {index} must be an object with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise RowError("unknown_role", f"message {index} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": _text(message["content"], f"content of message {index} ({role})")})
    return messages


def normalise_messages(row: dict[str, Any]) -> list[Message]:
    """The row as chat messages; raises `RowError` with a reason code and a precise message."""
    if "messages" in row:
        messages = _from_messages(row["messages"])
    elif "prompt" in row:
        answer_field = next((f for f in ("response", "completion") if f in row), None)
        if answer_field is None:
            raise _missing(row, "a 'prompt' row needs a 'response' or 'completion' field")
        messages = _with_system(row, [
            {"role": "user", "content": _text(row["prompt"], "field 'prompt'")},
            {"role": "assistant", "content": _text(row[answer_field], f"field '{answer_field}'")},
        ])
    elif "instruction" in row:
        if "output" not in row:
            raise _missing(row, "an 'instruction' row needs an 'output' field")
        prompt = _text(row["instruction"], "field 'instruction'")
        extra = row.get("input")
        if extra is not None and _text(extra, "field 'input'", allow_empty=True).strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = _with_system(row, [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(row["output"], "field 'output'")},
        ])
    else:
        raise _missing(row, f"no recognised row shape: expected {EXPECTED_SHAPES}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no_assistant_turn", "the conversation has no assistant turn, so nothing to train on")
    return messages


def content_id(messages: list[Message]) -> str:
    """Identity of a sample's content: equal for exact duplicates, stable across runs."""
    return "sha256:" + sha256_json(messages)[:32]


def row_id(row: dict[str, Any]) -> str | None:
    """The row's own id, as a string, when it has one."""
    value = row.get("id")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)
