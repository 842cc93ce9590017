"""The alignment contract row by row, on literal token lists: each violation named, a sound row passing."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pipeline.runtime.schemas import table_from_rows
from pipeline.runtime.alignment import alignment_problems

NAN = math.nan
# Tokens 0..4: 0 and 1 are context (1 is "assistant\n"), 2 3 4 are targets.
TRAINABLE = [False, False, True, True, True]


def _masks_row(**change) -> dict:
    row = {"sample_id": "a", "score": [NAN, NAN, 0.2, 0.9, 0.5], "keep": [False, False, False, True, True],
           "n_tokens": 5, "n_trainable": 3, "n_kept": 2}
    return row | change


def _problems(row: dict, kind: str = "masks", trainable=TRAINABLE) -> list[str]:
    targets = None if trainable is None else pa.chunked_array([pa.array([trainable], pa.list_(pa.bool_()))])
    return alignment_problems(kind, table_from_rows([row], kind), "part-00000.parquet", targets)


def test_a_sound_row_passes_with_and_without_targets():
    assert _problems(_masks_row()) == [] and _problems(_masks_row(), trainable=None) == []


@pytest.mark.parametrize("change, message", [
    ({"keep": [False, False, True, True]}, "length: 'keep' is not len(input_ids) long in 1 sample of part-00000.parquet (e.g. 'a')"),
    ({"keep": [True, False, False, True, True], "n_kept": 3}, "position 0: 'keep' is true at position 0"),
    ({"keep": [False, True, False, True, True], "n_kept": 3}, "keep off the targets: keep is true where trainable is false"),
    ({"n_kept": 1}, "row counts: 'n_kept' is not the number of true entries of keep"),
    ({"n_trainable": 4}, "row counts: 'n_trainable' is not the number of true entries of the tokenized trainable"),
    ({"score": [NAN, 0.1, 0.2, 0.9, 0.5]}, "NaN off targets: 'score' holds a number off the targets"),
    ({"score": [NAN, NAN, NAN, 0.9, 0.5]}, "NaN at targets: 'score' is NaN at 1 targets"),
])
def test_each_violation_is_named(change, message):
    problems = _problems(_masks_row(**change))
    assert any(message in p for p in problems), problems


def test_a_signal_not_computed_is_nan_everywhere_and_passes():
    assert _problems(_masks_row(score=[NAN] * 5)) == []


def test_export_labels_are_their_token_or_minus_100_and_only_at_targets():
    ids = [7, 8, 9, 10, 11]
    row = {"sample_id": "a", "source": "s", "input_ids": ids, "attention_mask": [1] * 5,
           "labels": [-100, -100, -100, 10, 11], "n_tokens": 5, "n_kept": 2}
    assert _problems(row, "export") == []
    assert any("a label is neither -100 nor its token" in p for p in _problems(row | {"labels": [-100, -100, -100, 10, 12]}, "export"))
    assert any("labels off the targets" in p for p in _problems(row | {"labels": [-100, 8, -100, 10, 11], "n_kept": 3}, "export"))
    assert any("position 0: 'labels'" in p for p in _problems(row | {"labels": [7, -100, -100, 10, 11], "n_kept": 3}, "export"))
    assert any("attention mask: not 1" in p for p in _problems(row | {"attention_mask": [1, 1, 1, 1, 0]}, "export"))


# Weights: finite, >= 0, 0 off the targets and where not kept, > 0 where kept (keep: tokens 3 and 4).
SOUND_WEIGHT = [0.0, 0.0, 0.0, 0.5, 2.0]


def test_weights_that_fit_the_keep_mask_pass_and_a_table_without_them_reads_as_keep():
    assert _problems(_masks_row(weight=SOUND_WEIGHT)) == [] and _problems(_masks_row(weight=SOUND_WEIGHT), trainable=None) == []
    assert "weight" not in table_from_rows([_masks_row()], "masks").column_names  # an optional column, absent


@pytest.mark.parametrize("weight, message", [
    ([0.0, 0.0, 0.0, NAN, 1.0], "'weight' not finite: a weight is NaN or infinite in 1 sample of part-00000.parquet (e.g. 'a')"),
    ([0.0, 0.0, 0.0, math.inf, 1.0], "'weight' not finite"),
    ([0.0, 0.0, -1.0, 1.0, 1.0], "'weight' negative: a weight is below 0"),
    ([0.0, 0.5, 0.0, 1.0, 1.0], "'weight' off the targets: a weight is not 0 where trainable is false"),
    ([0.0, 0.0, 0.5, 1.0, 1.0], "'weight' where not kept: a weight is not 0 where keep is false"),
    ([0.0, 0.0, 0.0, 0.0, 1.0], "'weight' where kept: a weight is not > 0 where keep is true"),
    ([0.0, 0.0, 0.0, 1.0], "length: 'weight' is not len(input_ids) long"),
])
def test_each_weight_violation_is_named(weight, message):
    problems = _problems(_masks_row(weight=weight))
    assert any(message in p for p in problems), problems


def test_without_targets_a_weight_off_keep_is_still_named():
    problems = _problems(_masks_row(weight=[0.0, 0.5, 0.0, 1.0, 1.0]), trainable=None)
    assert any("'weight' where not kept" in p for p in problems), problems


def test_export_weights_are_checked_against_the_labels():
    row = {"sample_id": "a", "source": "s", "input_ids": [7, 8, 9, 10, 11], "attention_mask": [1] * 5,
           "labels": [-100, -100, -100, 10, 11], "weights": SOUND_WEIGHT, "n_tokens": 5, "n_kept": 2}
    assert _problems(row, "export") == []
    assert any("'weights' where kept: a weight is not > 0" in p
               for p in _problems(row | {"weights": [0.0, 0.0, 0.0, 0.0, 1.0]}, "export"))
    assert any("'weights' where not kept" in p for p in _problems(row | {"weights": [0.0, 0.0, 1.0, 1.0, 1.0]}, "export"))
