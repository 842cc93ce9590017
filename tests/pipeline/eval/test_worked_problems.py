import random
import re

import pytest

from pipeline.eval.worked_problems import (
    MAKERS,
    answer_of,
    arithmetic,
    differing_spans,
    extract_answer,
    render,
    sorting,
    unit_conversion,
)


def _problem_with(maker, wanted, seed=0):
    """The first problem `maker` draws whose prompt contains `wanted` (the forms are random)."""
    rng = random.Random(seed)
    for _ in range(500):
        problem = maker(rng)
        if wanted in problem.prompt:
            return problem
    raise AssertionError(f"no {wanted!r} problem drawn")


def test_arithmetic_worked_steps_reach_the_true_value():
    rng = random.Random(3)
    for _ in range(200):
        problem = arithmetic(rng)
        expression = re.sub(r"^(What is|Compute|Calculate) ", "", problem.prompt)[:-1]
        assert answer_of(problem) == str(eval(expression))  # the prompt's own expression, evaluated by Python
        assert render(problem).sentences[-1] == f"So the answer is {answer_of(problem)}."


def test_unit_conversion_and_sorting_answers_are_right():
    rng = random.Random(4)
    factors = {"days": 7, "hours": 24, "minutes": 60, "seconds": 60, "meters": 1000, "centimeters": 100,
               "grams": 1000, "milliliters": 1000, "feet": 3, "inches": 12}
    for _ in range(100):
        problem = unit_conversion(rng)
        values = problem.values()
        factor = 1
        for i in range(2):
            factor *= values.get(f"f{i}", 1)
        assert answer_of(problem) == str(values["n"] * factor)
        assert set(problem.givens) - {"n"} <= {"f0", "f1"}
        assert all(values[f] in factors.values() for f in problem.givens if f != "n")
        listed = sorting(rng)
        numbers = [int(x) for x in listed.prompt.split(": ")[1].rstrip(".").split(", ")]
        assert answer_of(listed) == ", ".join(map(str, sorted(numbers)))


def test_render_records_where_each_value_sits():
    problem = _problem_with(arithmetic, " + ", seed=1)
    rendered = render(problem)
    for start, spans in zip(rendered.sentence_starts(), rendered.value_spans):
        for name, begin, end in spans:
            assert rendered.text[start + begin : start + end] == str(problem.values()[name])


def test_a_wrong_result_is_carried_through_and_every_differing_number_is_marked():
    rng = random.Random(0)
    problem = next(p for p in (arithmetic(rng) for _ in range(500)) if p.sentences[0] == "First, {b} * {c} = {m}."
                   and "+" in p.sentences[1])
    truth = problem.values()
    wrong = truth["m"] + 1
    text = render(problem, {"m": wrong}).text
    a, b, c = truth["a"], truth["b"], truth["c"]
    assert text == f"First, {b} * {c} = {wrong}. Then, {a} + {wrong} = {a + wrong}. So the answer is {a + wrong}."
    marked = [text[s:e] for s, e in differing_spans(problem, {"m": wrong})]
    assert marked == [str(wrong), str(wrong), str(a + wrong), str(a + wrong)]
    # the givens b, c, a are never marked, even when one happens to equal a wrong number
    assert differing_spans(problem, {}) == []


@pytest.mark.parametrize("text, answer", [
    ("First, 2 * 3 = 6. So the answer is 6.", "6"),
    ("So the answer is 3.5.", "3.5"),
    ("so the answer is 1, 2, 3. Bye", "1, 2, 3"),
    ("The answer is 7. No wait, the answer is 8.", "8"),
    ("So the answer is 42", "42"),  # cut by the token limit
    ("So the answer is  12\nmore", "12"),
    ("I do not know.", None),
    ("So the answer is .", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_every_kind_is_drawn_reproducibly():
    for maker in MAKERS.values():
        first = [render(maker(random.Random(7))).text for _ in range(3)]
        assert len(set(first)) == 1
