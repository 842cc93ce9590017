"""Small problems with checkable answers and worked steps: arithmetic, unit conversion, sorting.

A problem is a prompt, a few named values (the givens and the results each step derives from
them) and sentence templates that mention the values by name. Rendering records where each value
lands in the text, so a corrupted variant can replace one step's result with a wrong number, carry
it through every later step that uses it, and say exactly which characters now differ from the
truth. Every answer ends with the same sentence, "So the answer is X.", so `extract_answer` can
read X back from any model's generation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

PROBLEM_KINDS = ("arithmetic", "unit_conversion", "sorting")

ANSWER_SENTENCE = "So the answer is {answer}."

_PLACEHOLDER = re.compile(r"\{(\w+)\}")

Values = dict[str, int]


@dataclass(frozen=True)
class Problem:
    """One problem: its prompt, how its values derive from each other, and how its answer reads.

    `steps` derive the results in order (each from the values before it); `sentences` are the
    worked answer, one template per sentence, the last being the answer sentence.
    """

    kind: str
    prompt: str
    givens: Values
    steps: tuple[tuple[str, Callable[[Values], int]], ...]
    sentences: tuple[str, ...]

    def values(self, overrides: Values | None = None) -> Values:
        """Every value; an overridden result replaces the derived one and feeds the later steps."""
        overrides = overrides or {}
        values = dict(self.givens)
        for name, derive in self.steps:
            values[name] = overrides.get(name, derive(values))
        return values

    @property
    def results(self) -> tuple[str, ...]:
        """Names of the values the worked answer computes (the ones a wrong result can replace)."""
        return tuple(name for name, _ in self.steps)


@dataclass(frozen=True)
class Rendered:
    """A worked answer's sentences and, per sentence, the character spans of each named value in it."""

    sentences: tuple[str, ...]
    value_spans: tuple[tuple[tuple[str, int, int], ...], ...] = field(default=())

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    def sentence_starts(self) -> list[int]:
        """Character offset of each sentence in `text`."""
        starts, at = [], 0
        for sentence in self.sentences:
            starts.append(at)
            at += len(sentence) + 1
        return starts


def render(problem: Problem, overrides: Values | None = None) -> Rendered:
    """The worked answer with values filled in (overridden where asked), and where each value sits."""
    values = problem.values(overrides)
    sentences, spans = [], []
    for template in problem.sentences:
        pieces, sentence_spans, at, length = [], [], 0, 0
        for match in _PLACEHOLDER.finditer(template):
            literal = template[at : match.start()]
            pieces.append(literal)
            length += len(literal)
            value = str(values[match.group(1)])
            sentence_spans.append((match.group(1), length, length + len(value)))
            pieces.append(value)
            length += len(value)
            at = match.end()
        pieces.append(template[at:])
        sentences.append("".join(pieces))
        spans.append(tuple(sentence_spans))
    return Rendered(tuple(sentences), tuple(spans))


def answer_of(problem: Problem) -> str:
    """The checkable final answer, as the answer sentence writes it."""
    return extract_answer(render(problem).sentences[-1]) or ""


def differing_spans(problem: Problem, overrides: Values) -> list[tuple[int, int]]:
    """Character spans in the overridden rendering's text where a value differs from the truth."""
    truth, wrong = problem.values(), problem.values(overrides)
    rendered = render(problem, overrides)
    spans = []
    for start, sentence_spans in zip(rendered.sentence_starts(), rendered.value_spans):
        for name, begin, end in sentence_spans:
            if truth[name] != wrong[name]:
                spans.append((start + begin, start + end))
    return spans


def wrong_value(rng: random.Random, truth: int) -> int:
    """A plausible wrong result: near the truth, never equal to it, never negative."""
    while True:
        offset = rng.choice([-1, 1]) * rng.randint(1, max(9, truth // 10))
        if truth + offset >= 0 and offset != 0:
            return truth + offset


# --- the kinds -----------------------------------------------------------------------------

_ASK = ("What is {expression}?", "Compute {expression}.", "Calculate {expression}.")


def arithmetic(rng: random.Random) -> Problem:
    """Two operations with precedence: the product (or the bracketed sum) first, then the rest."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 12), rng.randint(2, 12)
    form = rng.randrange(3)
    if form == 0:
        expression, steps, sentences = f"{a} + {b} * {c}", (
            ("m", lambda v: v["b"] * v["c"]), ("r", lambda v: v["a"] + v["m"])), (
            "First, {b} * {c} = {m}.", "Then, {a} + {m} = {r}.")
    elif form == 1:
        expression, steps, sentences = f"({a} + {b}) * {c}", (
            ("m", lambda v: v["a"] + v["b"]), ("r", lambda v: v["m"] * v["c"])), (
            "First, {a} + {b} = {m}.", "Then, {m} * {c} = {r}.")
    else:
        a = rng.randint(1, b * c - 1)  # the difference stays positive
        expression, steps, sentences = f"{b} * {c} - {a}", (
            ("m", lambda v: v["b"] * v["c"]), ("r", lambda v: v["m"] - v["a"])), (
            "First, {b} * {c} = {m}.", "Then, {m} - {a} = {r}.")
    prompt = rng.choice(_ASK).format(expression=expression)
    return Problem("arithmetic", prompt, {"a": a, "b": b, "c": c}, steps,
                   (*sentences, ANSWER_SENTENCE.format(answer="{r}")))


# (unit, its singular, the next smaller unit, how many of those in one)
_UNITS = (
    ("weeks", "week", "days", 7),
    ("days", "day", "hours", 24),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("kilometers", "kilometer", "meters", 1000),
    ("meters", "meter", "centimeters", 100),
    ("kilograms", "kilogram", "grams", 1000),
    ("liters", "liter", "milliliters", 1000),
    ("yards", "yard", "feet", 3),
    ("feet", "foot", "inches", 12),
)
_CHAINS = {unit: i for i, (unit, *_) in enumerate(_UNITS)}
UNITS = _UNITS  # the unit facts, for the task model's pretraining skills (pipeline.eval.task_model)


def unit_conversion(rng: random.Random) -> Problem:
    """A quantity to a smaller unit, in one step or two (say, hours to minutes to seconds)."""
    first = rng.randrange(len(_UNITS))
    unit, singular, smaller, factor = _UNITS[first]
    chain = [(unit, singular, smaller, factor)]
    follow = _CHAINS.get(smaller)
    if follow is not None and rng.random() < 0.4:
        chain.append(_UNITS[follow])
    n = rng.randint(2, 60)
    givens, steps, sentences = {"n": n}, [], []
    quantity = "n"
    for i, (name, one, into, how_many) in enumerate(chain):
        factor_name, result = f"f{i}", f"x{i}"
        givens[factor_name] = how_many
        steps.append((result, lambda v, q=quantity, f=factor_name: v[q] * v[f]))
        sentences.append(f"One {one} is {{{factor_name}}} {into}, so {{{quantity}}} {name} is "
                         f"{{{quantity}}} * {{{factor_name}}} = {{{result}}} {into}.")
        quantity = result
    target = chain[-1][2]
    prompt = rng.choice(("Convert {n} {unit} to {target}.", "How many {target} are in {n} {unit}?")).format(
        n=n, unit=unit, target=target)
    return Problem("unit_conversion", prompt, givens, tuple(steps),
                   (*sentences, ANSWER_SENTENCE.format(answer="{" + quantity + "}")))


def sorting(rng: random.Random) -> Problem:
    """A few distinct numbers sorted ascending by picking the smallest left, one at a time."""
    numbers = rng.sample(range(1, 100), rng.randint(4, 5))
    ordered = sorted(numbers)
    givens = {f"g{i}": number for i, number in enumerate(numbers)}
    # Each pick is a result: a wrong one shows in its step and in the final list.
    steps = tuple((f"p{i}", lambda v, x=x: x) for i, x in enumerate(ordered))
    sentences = ["The smallest is {p0}."] + [f"Next is {{p{i}}}." for i in range(1, len(ordered))]
    listed = ", ".join(f"{{p{i}}}" for i in range(len(ordered)))
    prompt = rng.choice(("Sort these numbers from smallest to largest: {numbers}.",
                         "Put these numbers in increasing order: {numbers}.")).format(
        numbers=", ".join(map(str, numbers)))
    return Problem("sorting", prompt, givens, steps, (*sentences, ANSWER_SENTENCE.format(answer=listed)))


MAKERS: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": arithmetic,
    "unit_conversion": unit_conversion,
    "sorting": sorting,
}

# --- reading the answer back ---------------------------------------------------------------

_ANSWER = re.compile(r"the answer is\s+(.*?)\s*(?:\.(?=\s|$)|\n|$)", re.IGNORECASE | re.DOTALL)


def extract_answer(text: str) -> str | None:
    """X from the last "the answer is X." in `text` (whitespace collapsed); None when there is none.

    The answer stops at a full stop followed by whitespace or the end, at a line break, or at the
    end of the text (a generation cut by the token limit), so "3.5." reads as "3.5".
    """
    matches = list(_ANSWER.finditer(text))
    if not matches:
        return None
    answer = " ".join(matches[-1].group(1).split())
    return answer or None
