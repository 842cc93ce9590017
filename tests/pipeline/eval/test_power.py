"""The power gate on synthetic per-seed figures: its verdict flips with the seed spread."""

import statistics

import pytest

from pipeline.eval.power import GATE_FACTOR, gate, overall_verdict, power_gates
from pipeline.eval.records import CellMeasures

LABELS = {"heldout_nll": "held-out NLL", "exact_match": "exact match"}


def _cells(row: str, nll: list[float], accuracy: list[float | None] | None = None) -> list[CellMeasures]:
    accuracy = accuracy or [None] * len(nll)
    return [CellMeasures(schema_version=2, identity="x", seed=seed, method=row, selection_by_round=[], wall_s=1.0,
                         values={"heldout_nll": n, "exact_match": a}) for seed, (n, a) in enumerate(zip(nll, accuracy))]


def test_the_gate_is_three_times_the_std_of_the_paired_differences():
    # oracle - full per seed: -0.10, -0.12, -0.08: mean -0.10, sample std 0.02, 3 x 0.02 = 0.06 < 0.10: passes
    result = gate("heldout_nll", "held-out NLL", False, {0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.10, 1: 1.12, 2: 1.08})
    assert result["difference"] == pytest.approx(-0.10) and result["spread"] == pytest.approx(0.02)
    assert result["threshold"] == pytest.approx(GATE_FACTOR * 0.02) and result["passes"] and result["seeds"] == 3
    assert result["verdict"].startswith("held-out NLL: can tell methods apart at this size")


def test_the_verdict_flips_with_the_spread():
    oracle = {0: 1.0, 1: 1.0, 2: 1.0}
    # the same mean gap, -0.10, now with differences -0.02, -0.10, -0.18: std 0.08, 3 x 0.08 = 0.24 > 0.10
    noisy = gate("heldout_nll", "held-out NLL", False, oracle, {0: 1.02, 1: 1.10, 2: 1.18})
    assert noisy["difference"] == pytest.approx(-0.10) and noisy["spread"] == pytest.approx(0.08)
    assert not noisy["passes"] and "cannot tell methods apart at this size" in noisy["verdict"]
    assert "its rows are not ranked" in noisy["verdict"]
    # just inside and just outside the gate
    for gap, passes in ((0.031, True), (0.029, False)):
        full = {0: 1.0 + gap - 0.01, 1: 1.0 + gap, 2: 1.0 + gap + 0.01}  # differences' std 0.01
        assert gate("heldout_nll", "NLL", False, oracle, full)["passes"] is passes


def test_the_oracle_must_be_better_in_the_measures_direction_and_two_seeds_are_needed():
    worse = gate("exact_match", "exact match", True, {0: 0.2, 1: 0.21}, {0: 0.5, 1: 0.5})  # far apart, wrong way
    assert not worse["passes"] and "the oracle is not better than full" in worse["verdict"]
    better = gate("exact_match", "exact match", True, {0: 0.6, 1: 0.61}, {0: 0.5, 1: 0.5})
    assert better["passes"]
    one = gate("exact_match", "exact match", True, {0: 0.9}, {0: 0.1})
    assert not one["passes"] and one["spread"] is None and "at least 2 seeds" in one["verdict"]
    # a seed without both values does not count (None or NaN)
    partial = gate("exact_match", "exact match", True, {0: 0.9, 1: None, 2: float("nan")}, {0: 0.1, 1: 0.1, 2: 0.1})
    assert partial["seeds"] == 1


def test_power_gates_pair_the_oracle_and_full_cells_by_seed():
    cells = (_cells("oracle", [1.0, 1.0, 1.0], [0.50, 0.40, 0.60]) + _cells("full", [1.10, 1.12, 1.08], [0.45, 0.45, 0.45])
             + _cells("sstoken", [0.5, 0.5, 0.5]))
    gates = power_gates(cells, LABELS)
    assert [g["key"] for g in gates] == ["heldout_nll", "exact_match"]
    assert gates[0]["passes"] and not gates[1]["passes"]
    differences = [0.05, -0.05, 0.15]
    assert gates[1]["spread"] == pytest.approx(statistics.stdev(differences))
    verdict = overall_verdict(gates, has_oracle=True)
    assert verdict.startswith("Power gate passed on held-out NLL") and "not on exact match" in verdict
    assert power_gates(cells, {"heldout_nll": "held-out NLL"})[0]["key"] == "heldout_nll"  # natural: no exact match


def test_the_overall_verdict_refuses_to_rank_when_nothing_passes():
    failing = [gate("heldout_nll", "held-out NLL", False, {0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.2})]
    assert overall_verdict(failing, has_oracle=True).startswith("Power gate failed")
    assert "cannot tell methods apart at this size" in overall_verdict(failing, has_oracle=True)
    assert overall_verdict([], has_oracle=False).startswith("No oracle")
