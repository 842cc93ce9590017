"""Folders without a `weight` column (scores and masks folders written before weights existed) read as weight 1 on
each kept token in train, export, validate and report: nothing is rewritten.

Uses a copy of the session's scored corpus as main wrote it before weights (no weight column) and a masks folder
selected apart from it with the same selection, which stores `weight` = keep; training on either ends with the same
tensors, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.runtime.files import read_manifest, write_manifest, write_parquet_atomic
from pipeline.selection.keep_masks import read_keep_masks
from pipeline.selection.select_config import SelectConfig
from pipeline.selection.select_stage import run_select
from pipeline.training.export_stage import ExportConfig, run_export
from pipeline.training.train_stage import TrainConfig, run_train
from pipeline.training.training_data import shards_key
from pipeline.validation.validate_stage import ValidateConfig, run_validate
from tests.score_factories import as_written_before
from pipeline.views.report import run_report
from pipeline.views.report_config import ReportConfig

SETTINGS = dict(batch_size=4, micro_batch_size=2, lora_r=4, lr=1e-2, checkpoint_every=100, progress=False,
                ray={"runner": "process"})


@pytest.fixture(scope="module")
def scores_of_main(scored_corpus, tmp_path_factory) -> Path:
    """The session's scores as `sstoken score` wrote them before weights: no weight column, no recorded |V|."""
    copy = scored_corpus.copy_scores(tmp_path_factory.mktemp("scores-of-main") / "scores")
    return as_written_before(copy, ("weight",), ("vocab_size",))


@pytest.fixture(scope="module")
def weighted_masks(scored_corpus, tmp_path_factory) -> Path:
    """The scores' own selection (the score stage's defaults), selected apart: a masks folder with `weight`."""
    masks = tmp_path_factory.mktemp("weights-compat") / "masks"
    run_select(SelectConfig(scores=scored_corpus.scores, output=masks))
    return masks


def _problems(folder: Path) -> list[str]:
    summary = run_validate(ValidateConfig(folder=folder))
    return [p for f in summary.details["folders"] for c in f["checks"] for p in c["problems"]]


def test_without_a_weight_column_the_weight_is_keep_and_the_masks_apart_store_it(scores_of_main, weighted_masks):
    assert "weight" not in pq.read_schema(next(scores_of_main.glob("part-*.parquet"))).names
    assert "weight" in pq.read_schema(next(weighted_masks.glob("part-*.parquet"))).names
    (_, old), (_, new) = read_keep_masks(scores_of_main), read_keep_masks(weighted_masks)
    assert old.column("keep").equals(new.column("keep"))  # the same selection
    assert old.column("weight").equals(new.column("weight"))
    keep = np.concatenate([np.asarray(k, bool) for k in old.column("keep").to_pylist()])
    weight = np.concatenate([np.asarray(w, np.float32) for w in old.column("weight").to_pylist()])
    np.testing.assert_array_equal(weight, keep.astype(np.float32))


def test_training_on_scores_without_weights_is_training_on_weights_1_bit_for_bit(scored_corpus, scores_of_main,
                                                                                  weighted_masks, llama_dir, tmp_path):
    tensors = []
    for name, masks in (("old", scores_of_main), ("weighted", weighted_masks)):
        output = tmp_path / name
        run_train(TrainConfig(data=scored_corpus.data, masks=masks, model=llama_dir, output=output, **SETTINGS))
        files = sorted((output / "checkpoint").glob("*.safetensors"))
        tensors.append({k: v for f in files for k, v in load_file(f).items()})
    assert tensors[0].keys() == tensors[1].keys()
    for key, value in tensors[0].items():
        assert torch.equal(value, tensors[1][key]), key


def _as_main_wrote_it(masks: Path, target: Path) -> Path:
    """A copy of a masks folder without its weight column, its manifest resealed: what `select --output` wrote
    before weights existed."""
    target.mkdir()
    manifest = read_manifest(masks)
    for entry in manifest["shards"]:
        table = pq.read_table(masks / entry["file"])
        entry["sha256"] = write_parquet_atomic(table.drop_columns(["weight"]), target / entry["file"])
    manifest["data_fingerprint"] = shards_key(manifest)
    write_manifest(target, manifest)
    return target


@pytest.mark.parametrize("masks_kind", ["scores", "masks of main"])
def test_export_validate_and_report_read_folders_without_weights(scored_corpus, scores_of_main, weighted_masks, tmp_path,
                                                                masks_kind):
    masks = scores_of_main if masks_kind == "scores" else _as_main_wrote_it(weighted_masks, tmp_path / "masks")
    assert "weight" not in pq.read_schema(next(masks.glob("part-*.parquet"))).names
    assert _problems(masks) == []
    export = tmp_path / "export"
    run_export(ExportConfig(data=scored_corpus.data, masks=masks, format="parquet", output=export))
    for part in sorted(export.glob("part-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            assert row["weights"] == [1.0 if label != -100 else 0.0 for label in row["labels"]]
    assert _problems(export) == []
    summary = run_report(ReportConfig(folder=masks, output=tmp_path / "report.html"))
    assert summary.counts["kept"] == read_manifest(export)["counts"]["labels"] > 0  # skipped samples keep none


def test_a_report_reads_masks_with_weights(weighted_masks, tmp_path):
    summary = run_report(ReportConfig(folder=weighted_masks, output=tmp_path / "report.html"))
    assert summary.counts["kept"] == read_manifest(weighted_masks)["counts"]["kept"] > 0

