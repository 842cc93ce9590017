"""A training corpus whose harmful tokens are known: worked problems, a known share of them corrupted.

`generate_task(seed, ...)` draws worked problems (`worked_problems`) and corrupts the responses
of a chosen fraction of the training conversations, one corruption each, recording the corrupted
characters of that assistant message:

- `wrong_result`: one step's result replaced by a wrong number, carried through the later steps
  and the final answer (every differing number is marked);
- `random_tokens`: one working sentence replaced by random letter-and-digit strings;
- `shuffled`: the words of one working sentence shuffled;
- `filler`: an off-topic sentence inserted between two sentences;
- `prompt_copy`: the user's question copied into the answer between two sentences.

Beside the training rows it makes held-out clean problems with their answers (for held-out NLL and
exact match) and the clean reference set: `reference_fraction` (20%) as many clean conversations
as training ones, made of their own problems (no prompt of it is in the training or held-out
rows), for the reference model of the rho1 baseline (a reference fine-tuned on clean data of the
same kind; trained on clean twins of training conversations it would know which of their tokens
are clean, and leak the answer). Every prompt of the three sets is distinct. Everything comes
from `seed` alone: the same seed makes the same rows.
"""

from __future__ import annotations

import json
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.eval.worked_problems import (
    MAKERS,
    PROBLEM_KINDS,
    Problem,
    answer_of,
    differing_spans,
    render,
    wrong_value,
)
from pipeline.runtime.errors import UserError

CORRUPTION_KINDS = ("wrong_result", "random_tokens", "shuffled", "filler", "prompt_copy")

_FILLER = (
    "The weather in spring is often mild and pleasant.",
    "Many people enjoy a cup of tea in the afternoon.",
    "Penguins live mostly in the southern hemisphere.",
    "The library closes early on public holidays.",
    "A good pair of shoes can last for many years.",
    "Some rivers flow north instead of south.",
    "Jazz music became popular in the early twentieth century.",
    "Fresh bread smells wonderful in the morning.",
    "The museum has a new exhibit about ancient ships.",
    "Cats often sleep for more than twelve hours a day.",
    "Mountains can create their own local weather.",
    "Gardening is a relaxing hobby for many people.",
)
FILLER_SENTENCES = _FILLER  # the task model's vocabulary covers them (pipeline.eval.task_model)
_NOISE_ALPHABET = string.ascii_lowercase + string.digits

Span = tuple[int, int]


@dataclass(frozen=True)
class GroundTruthTask:
    """The rows of the three files and the settings and counts that `task.json` records."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    clean_reference: list[dict[str, Any]]
    settings: dict[str, Any]
    counts: dict[str, Any] = field(default_factory=dict)


# --- corruptions: (problem, rng) -> (content, corrupted character spans) ---------------------


def _with_sentence(sentences: list[str], index: int, replacement: str, insert: bool) -> tuple[str, list[Span]]:
    """The answer with sentence `index` replaced (or `replacement` inserted before it), and its span."""
    changed = sentences[:index] + [replacement] + sentences[index + (0 if insert else 1) :]
    start = sum(len(s) + 1 for s in changed[:index])
    return " ".join(changed), [(start, start + len(replacement))]


def _wrong_result(problem: Problem, rng: random.Random) -> tuple[str, list[Span]]:
    name = rng.choice(problem.results)
    overrides = {name: wrong_value(rng, problem.values()[name])}
    return render(problem, overrides).text, differing_spans(problem, overrides)


def _working_sentence(problem: Problem, rng: random.Random) -> tuple[list[str], int]:
    sentences = list(render(problem).sentences)
    return sentences, rng.randrange(len(sentences) - 1)  # never the answer sentence itself


def _random_tokens(problem: Problem, rng: random.Random) -> tuple[str, list[Span]]:
    sentences, index = _working_sentence(problem, rng)
    noise = " ".join(
        "".join(rng.choice(_NOISE_ALPHABET) for _ in range(rng.randint(2, 7)))
        for _ in sentences[index].split(" ")
    )
    return _with_sentence(sentences, index, noise, insert=False)


def _shuffled(problem: Problem, rng: random.Random) -> tuple[str, list[Span]]:
    sentences, index = _working_sentence(problem, rng)
    words = sentences[index].split(" ")
    shuffled = words[:]
    for _ in range(100):  # every working sentence has several distinct words, so this ends at once
        rng.shuffle(shuffled)
        if shuffled != words:
            break
    return _with_sentence(sentences, index, " ".join(shuffled), insert=False)


def _filler(problem: Problem, rng: random.Random) -> tuple[str, list[Span]]:
    sentences = list(render(problem).sentences)
    return _with_sentence(sentences, rng.randrange(len(sentences)), rng.choice(_FILLER), insert=True)


def _prompt_copy(problem: Problem, rng: random.Random) -> tuple[str, list[Span]]:
    sentences = list(render(problem).sentences)
    return _with_sentence(sentences, rng.randrange(len(sentences)), problem.prompt, insert=True)


CORRUPTERS = {
    "wrong_result": _wrong_result,
    "random_tokens": _random_tokens,
    "shuffled": _shuffled,
    "filler": _filler,
    "prompt_copy": _prompt_copy,
}

# --- the task ---------------------------------------------------------------------------


def _check(n_train: int, n_heldout: int, fractions: dict[str, float], kinds: tuple[str, ...],
           corruptions: tuple[str, ...]) -> None:
    if n_train < 1:
        raise UserError(f"n_train is {n_train}; a task needs at least 1 training conversation")
    if n_heldout < 0:
        raise UserError(f"n_heldout is {n_heldout}; it must be 0 or more")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{name} is {value}; it must lie in [0, 1]")
    for what, chosen, known in (("problem kind", kinds, PROBLEM_KINDS), ("corruption kind", corruptions, CORRUPTION_KINDS)):
        if not chosen:
            raise UserError(f"no {what} chosen; pick from {', '.join(known)}")
        unknown = [k for k in chosen if k not in known]
        if unknown:
            raise UserError(f"unknown {what} {unknown[0]!r}; expected one of {', '.join(known)}")


class _Problems:
    """Draws problems whose prompts were not drawn before, so no held-out prompt is trained on."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def draw(self, kind: str, rng: random.Random) -> Problem:
        for _ in range(1000):
            problem = MAKERS[kind](rng)
            if problem.prompt not in self.seen:
                self.seen.add(problem.prompt)
                return problem
        raise UserError(f"ran out of distinct {kind} problems after {len(self.seen)}; ask for fewer rows")


def _rng(seed: int, purpose: str) -> random.Random:
    """One stream per purpose, so (say) the held-out problems do not change with n_train."""
    return random.Random(f"sstoken-ground-truth:{seed}:{purpose}")


def generate_task(
    seed: int,
    n_train: int,
    n_heldout: int,
    corrupt_fraction: float = 0.3,
    *,
    kinds: tuple[str, ...] = PROBLEM_KINDS,
    corruptions: tuple[str, ...] = CORRUPTION_KINDS,
    reference_fraction: float = 0.2,
    two_turn_fraction: float = 0.25,
) -> GroundTruthTask:
    """The task for `seed`; see the module docstring. Kinds and corruptions are used in equal shares.

    Exactly round(corrupt_fraction * n_train) training conversations carry one corruption each,
    in one of their assistant turns; round(two_turn_fraction * n_train) have two exchanges.
    """
    kinds, corruptions = tuple(kinds), tuple(corruptions)
    _check(n_train, n_heldout, {"corrupt_fraction": corrupt_fraction, "reference_fraction": reference_fraction,
                                "two_turn_fraction": two_turn_fraction}, kinds, corruptions)
    problems = _Problems()
    draw = _rng(seed, "heldout")
    heldout = []
    for i in range(n_heldout):
        problem = problems.draw(kinds[i % len(kinds)], draw)
        heldout.append({
            "id": f"heldout-{i:06d}", "source": problem.kind,
            "messages": [{"role": "user", "content": problem.prompt},
                         {"role": "assistant", "content": render(problem).text}],
            "answer": answer_of(problem),
        })

    # Separate streams: the conversations are the same for every corrupt_fraction, so a task at
    # fraction f is the clean task with corruptions applied.
    corrupted = _rng(seed, "corrupted").sample(range(n_train), round(corrupt_fraction * n_train))
    corruption_of = {index: corruptions[j % len(corruptions)] for j, index in enumerate(corrupted)}
    corrupt = _rng(seed, "corrupt")
    train = []
    for i, turns in enumerate(_conversations(problems, kinds, seed, "train", n_train, two_turn_fraction)):
        contents = [render(problem).text for problem in turns]
        spans: list[dict[str, Any]] = []
        if i in corruption_of:
            turn = corrupt.randrange(len(turns))
            contents[turn], where = CORRUPTERS[corruption_of[i]](turns[turn], corrupt)
            spans = [{"turn": turn, "start": start, "end": end, "kind": corruption_of[i]} for start, end in where]
        train.append({"id": f"train-{i:06d}", "source": turns[0].kind, "messages": _conversation(turns, contents),
                      "corruption": spans})
    # Drawn after the training rows from the same pool of unseen prompts, so it changes none of them.
    clean_reference = [
        {"id": f"reference-{i:06d}", "source": turns[0].kind,
         "messages": _conversation(turns, [render(problem).text for problem in turns])}
        for i, turns in enumerate(_conversations(problems, kinds, seed, "reference", round(reference_fraction * n_train),
                                                 two_turn_fraction))
    ]
    settings = {"seed": seed, "n_train": n_train, "n_heldout": n_heldout, "corrupt_fraction": corrupt_fraction,
                "kinds": list(kinds), "corruptions": list(corruptions), "reference_fraction": reference_fraction,
                "two_turn_fraction": two_turn_fraction}
    return GroundTruthTask(train, heldout, clean_reference, settings, _counts(train, heldout, clean_reference))


def _conversations(problems: _Problems, kinds: tuple[str, ...], seed: int, purpose: str, count: int,
                   two_turn_fraction: float) -> list[list[Problem]]:
    """`count` conversations' problems (kinds in turn; a seeded `two_turn_fraction` of them with two exchanges)."""
    two_turn = set(_rng(seed, f"{purpose}:two_turn" if purpose != "train" else "two_turn").sample(
        range(count), round(two_turn_fraction * count)))
    draw = _rng(seed, purpose)
    return [[problems.draw(kinds[i % len(kinds)], draw) for _ in range(2 if i in two_turn else 1)] for i in range(count)]


def _conversation(turns: list[Problem], contents: list[str]) -> list[dict[str, str]]:
    messages = []
    for problem, content in zip(turns, contents):
        messages += [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": content}]
    return messages


def _counts(train: list[dict[str, Any]], heldout: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """What the files hold, in characters of assistant content (tokens depend on the tokenizer)."""
    by_corruption: Counter = Counter()
    corrupted_chars = response_chars = 0
    for row in train:
        response_chars += sum(len(m["content"]) for m in row["messages"] if m["role"] == "assistant")
        corrupted_chars += sum(span["end"] - span["start"] for span in row["corruption"])
        if row["corruption"]:
            by_corruption[row["corruption"][0]["kind"]] += 1
    return {
        "train": len(train), "heldout": len(heldout), "clean_reference": len(reference),
        "train_by_kind": dict(sorted(Counter(row["source"] for row in train).items())),
        "corrupted_conversations": sum(by_corruption.values()),
        "corrupted_by_kind": dict(sorted(by_corruption.items())),
        "response_chars": response_chars, "corrupted_chars": corrupted_chars,
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a task file; a line that is not a JSON object is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist; write the task first")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not JSON: {error.msg}") from error
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is {type(row).__name__}, expected an object")
        rows.append(row)
    return rows
