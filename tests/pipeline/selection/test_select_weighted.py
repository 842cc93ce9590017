"""`sstoken select --method prob|entropy-gated` on the session's really scored corpus: no model runs; in place and
apart, per sample and global, the keep masks and weights are the hand computation from the stored nll_cur /
entropy_cur and the recorded |V|; they validate and train; a scores folder written before weights (and |V|) were
stored selects them apart and refuses them in place by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.runtime.files import read_manifest
from pipeline.training.train_stage import TrainConfig, run_train
from pipeline.validation.validate_stage import ValidateConfig, run_validate
from tests.pipeline.selection.test_select_current_signals import _rows, no_model  # noqa: F401 - a fixture
from tests.score_factories import as_written_before


def _weight(method: str, nll: float, entropy: float, vocab: int) -> float:
    return float(np.float32(math.exp(-nll) if method == "prob" else min(1.0, max(0.0, entropy / math.log(vocab)))))


def _by_hand(rows: list, method: str, ratio: float, granularity: str, vocab: int) -> dict:
    """{(shard, row): weight}: targets sorted by weight (descending), then shard, row, position; the top
    ceil(ratio * n) of each sample or of the corpus, each weighted by its weight, 0 elsewhere."""
    groups: dict = {}
    for shard, row, trainable, nll, entropy in rows:
        key = (shard, row) if granularity == "sample" else "corpus"
        groups.setdefault(key, []).extend(
            (-_weight(method, nll[p], entropy[p], vocab), shard, row, p) for p in np.flatnonzero(trainable))
    weights = {(shard, row): np.zeros(len(trainable), np.float64) for shard, row, trainable, _, _ in rows}
    for candidates in groups.values():
        candidates.sort()
        for negative, shard, row, position in candidates[: math.ceil(round(ratio * len(candidates), 9))]:
            weights[shard, row][position] = -negative
    return weights


def _stored(folder: Path) -> dict:
    """{(shard, row): (keep, weight)} of a scores or masks folder."""
    out = {}
    for shard, entry in enumerate(read_manifest(folder)["shards"]):
        table = pq.read_table(folder / entry["file"])
        for row, (keep, weight) in enumerate(zip(table.column("keep").to_pylist(), table.column("weight").to_pylist())):
            out[shard, row] = (np.array(keep, bool), np.array(weight, np.float64))
    return out


def _problems(folder: Path) -> list[str]:
    summary = run_validate(ValidateConfig(folder=folder))
    return [p for f in summary.details["folders"] for c in f["checks"] for p in c["problems"]]


def test_the_scorer_stores_weights_and_records_the_vocabulary_size(scored_corpus, llama_dir):
    manifest = read_manifest(scored_corpus.scores, kind="scores")
    assert manifest["signals"]["vocab_size"] == json.loads((llama_dir / "config.json").read_text())["vocab_size"]
    for keep, weight in _stored(scored_corpus.scores).values():  # a binary selection: weight = keep
        np.testing.assert_array_equal(weight, keep.astype(np.float64))


@pytest.mark.parametrize(("method", "granularity", "apart"), [
    ("prob", "sample", False), ("prob", "global", True), ("entropy-gated", "sample", True),
    ("entropy-gated", "global", False),
])
def test_select_weighs_each_kept_token_by_its_stored_signal(scored_corpus, tmp_path, no_model, method, granularity,
                                                             apart):
    folder = scored_corpus.copy_scores(tmp_path / "scores")
    vocab = read_manifest(folder, kind="scores")["signals"]["vocab_size"]
    output = ["--output", str(tmp_path / "masks")] if apart else []
    assert main(["select", "--scores", str(folder), "--method", method, "--ratio", "0.4", "--granularity",
                 granularity, *output]) == 0
    written = tmp_path / "masks" if apart else folder
    expected = _by_hand(_rows(folder, scored_corpus.data), method, 0.4, granularity, vocab)
    got = _stored(written)
    assert got.keys() == expected.keys()
    for key, (keep, weight) in got.items():
        np.testing.assert_array_equal(keep, expected[key] > 0, err_msg=str(key))
        np.testing.assert_allclose(weight, expected[key], rtol=1e-6, atol=0, err_msg=str(key))
    assert read_manifest(written)["selection"]["method"] == method
    assert _problems(written) == []


def test_training_on_weighted_masks_uses_the_weights(scored_corpus, llama_dir, tmp_path):
    """prob at ratio 1 keeps every target, as full does: the same tokens, other weights, another model."""
    folder = scored_corpus.scores
    settings = dict(batch_size=4, micro_batch_size=2, lora_r=4, lr=1e-2, checkpoint_every=100, progress=False,
                    ray={"runner": "process"})
    tensors = []
    for method in ("full", "prob"):
        masks = tmp_path / f"masks-{method}"
        assert main(["select", "--scores", str(folder), "--method", method, "--ratio", "1", "--output", str(masks)]) == 0
        output = tmp_path / f"train-{method}"
        run_train(TrainConfig(data=scored_corpus.data, masks=masks, model=llama_dir, output=output, **settings))
        files = sorted((output / "checkpoint").glob("*.safetensors"))
        tensors.append({k: v for f in files for k, v in load_file(f).items()})
    full, prob = (_stored(tmp_path / f"masks-{m}") for m in ("full", "prob"))
    assert all(np.array_equal(full[k][0], prob[k][0]) for k in full)  # the same kept tokens
    assert any(not torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_scores_written_before_weights_select_them_apart_and_refuse_them_in_place(scored_corpus, tmp_path, no_model,
                                                                                 capsys):
    old = as_written_before(scored_corpus.copy_scores(tmp_path / "old"), ("weight",), ("vocab_size",))
    capsys.readouterr()
    assert main(["select", "--scores", str(old), "--method", "prob"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method prob weights each kept token" in err
    assert "has no 'weight' column" in err and "--output" in err
    assert main(["select", "--scores", str(old), "--method", "prob", "--output", str(tmp_path / "masks")]) == 0
    assert _problems(tmp_path / "masks") == []
    assert main(["select", "--scores", str(old), "--method", "entropy-gated", "--output", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records no vocabulary size" in err and "rescore" in err
    assert main(["select", "--scores", str(old), "--method", "entropy", "--ratio", "0.3"]) == 0  # binary: in place
    assert "weight" not in pq.read_schema(next(old.glob("part-*.parquet"))).names  # its own layout
    assert _problems(old) == []
