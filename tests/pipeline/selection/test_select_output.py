"""`sstoken select --output`: masks apart from the scores folder, the rho1 method, and the keep-mask reader."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.runtime.files import ArtifactError, read_manifest, verify_shards
from pipeline.runtime.fingerprint import sha256_file
from pipeline.runtime.schemas import arrow_schema
from pipeline.runtime.stage_output import record_path
from pipeline.scoring.score_stage import ScoreJobConfig, run_score_job
from pipeline.selection import selection_shards
from pipeline.runtime.mask_weights import with_weight
from pipeline.selection.keep_masks import read_keep_masks
from pipeline.runtime.errors import UserError
from pipeline.selection.select_config import SelectConfig
from pipeline.selection.select_stage import STARTED_FROM, run_select
from pipeline.selection.selection_shards import SAME_CHECKPOINT_NOTE
from tests.factories import SCORED_SHARDS as SHARDS, kill_on_commit


@pytest.fixture(scope="module")
def corpus(scored_corpus) -> Path:
    return scored_corpus.data


def _score(corpus: Path, output: Path, current: Path, history: Path | None, cache: Path, **settings) -> Path:
    """The models in this process (the same shards as Ray actors write: test_score_in_process)."""
    run_score_job(ScoreJobConfig(
        data=corpus, current=current, history=history, output=output, history_cache=cache, progress=False,
        ray={"runner": "process"}, **settings
    ))
    return output


@pytest.fixture(scope="module")
def cache(scored_corpus) -> Path:
    """The shared history cache (the history model's NLLs): scorings here only read it."""
    return scored_corpus.cache


@pytest.fixture(scope="module")
def scored(scored_corpus) -> Path:
    """The default scoring: REL = history - current (ssToken, TokenCleaning). Shared: `select --output` leaves it
    as it is (checked here), in-place selections work on copies."""
    assert (scored_corpus.config.method, scored_corpus.config.excess) == ("sstoken", "history_minus_current")
    return scored_corpus.scores


@pytest.fixture(scope="module")
def rho1_scored(ray_local, corpus, cache, llama_dir, llama_history_dir, tmp_path_factory) -> Path:
    """Rho-1's orientation: REL = current - reference, the reference passed as history (its NLLs from the cache)."""
    return _score(corpus, tmp_path_factory.mktemp("scores") / "rho1", llama_dir, llama_history_dir, cache,
                  excess="current_minus_history", method="rho1")


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (shards, manifest, records, lock), by relative path, with its sha256."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("part-*.parquet"))}


def _column(folder: Path, name: str) -> list:
    return [value for part in sorted(folder.glob("part-*.parquet")) for value in pq.read_table(part).column(name).to_pylist()]


@pytest.mark.parametrize("settings", [{"method": "random", "ratio": 0.3, "seed": 2}, {"gamma": 0.3, "granularity": "global"}])
def test_masks_apart_equal_the_selection_in_place_and_leave_the_scores_untouched(scored, corpus, tmp_path, settings):
    before = _snapshot(scored)
    summary = run_select(SelectConfig(scores=scored, output=tmp_path / "masks", **settings))
    assert _snapshot(scored) == before  # byte for byte, lock and progress records included
    masks = tmp_path / "masks"
    assert summary.output == masks and summary.counts["shards_written"] == len(SHARDS) and not summary.reused

    in_place = shutil.copytree(scored, tmp_path / "in-place")
    run_select(SelectConfig(scores=in_place, **settings))
    assert sorted(_digests(masks)) == sorted(_digests(in_place))  # the same shard names
    for part in sorted(masks.glob("part-*.parquet")):
        # the scores folder stores no weight: it reads as keep (1 where kept, 0 elsewhere), which the masks hold
        table, expected = pq.read_table(part), with_weight(pq.read_table(in_place / part.name))
        offline = [n for n in arrow_schema("masks").names if n != "step"]  # step: the online trainer's column
        assert table.schema.names == offline
        assert table.column("weight").type == pa.list_(pa.float32())
        for name in offline:  # NaN off the targets: compared as arrays, NaN equal to NaN
            got, want = table.column(name).to_pylist(), expected.column(name).to_pylist()
            assert len(got) == len(want), (part.name, name)
            for row, (value, other) in enumerate(zip(got, want)):
                np.testing.assert_array_equal(np.array(value), np.array(other), err_msg=f"{part.name} {name} {row}")

    manifest, scores = read_manifest(masks, kind="masks"), read_manifest(scored, kind="scores")
    verify_shards(masks, manifest)
    assert manifest["selection"] == read_manifest(in_place, kind="scores")["selection"]
    assert manifest["inputs"][0] | {"path": None} == {
        "kind": "scores", "path": None, "data_fingerprint": scores["data_fingerprint"], "run_identity": scores["run_identity"]
    }
    assert manifest["inputs"][1]["data_fingerprint"] == read_manifest(corpus, kind="tokenized")["data_fingerprint"]
    assert manifest["tokenizer"] == scores["tokenizer"] and manifest["checkpoints"] == scores["checkpoints"]
    assert manifest["config"]["method"] == settings.get("method", "sstoken")
    # Counts add up: rows, trainable and kept over the shards equal the manifest's and the summary's.
    counts = manifest["counts"]
    assert counts["samples"] == sum(SHARDS) == sum(s["rows"] for s in manifest["shards"])
    assert counts["trainable"] == sum(_column(masks, "n_trainable")) == scores["counts"]["trainable"]
    assert counts["kept"] == sum(_column(masks, "n_kept")) == sum(sum(k) for k in _column(masks, "keep"))
    assert summary.counts["kept"] == counts["kept"] and summary.counts["trainable"] == counts["trainable"]

    again = run_select(SelectConfig(scores=scored, output=masks, **settings))
    assert again.reused and again.counts["shards_written"] == 0 and again.counts["kept"] == counts["kept"]
    assert _snapshot(scored) == before


def test_a_killed_select_output_resumes_and_ends_as_an_uninterrupted_one(scored, tmp_path):
    expected = tmp_path / "expected"
    run_select(SelectConfig(scores=scored, output=expected, method="attn", ratio=0.5))
    before = _snapshot(scored)
    killed = tmp_path / "killed"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        kill_on_commit(patch, selection_shards, 2)
        run_select(SelectConfig(scores=scored, output=killed, method="attn", ratio=0.5))
    assert not (killed / "manifest.json").exists()  # incomplete, and says so
    summary = run_select(SelectConfig(scores=scored, output=killed, method="attn", ratio=0.5))
    assert summary.counts["shards_written"] == len(SHARDS) - 1
    assert _digests(killed) == _digests(expected)
    assert read_manifest(killed, kind="masks")["selection"] == read_manifest(expected, kind="masks")["selection"]
    assert _snapshot(scored) == before


def test_round_zero_masks_carry_the_same_checkpoint_note(ray_local, corpus, cache, llama_dir, tmp_path):
    round0 = _score(corpus, tmp_path / "round0", llama_dir, None, cache)
    run_select(SelectConfig(scores=round0, output=tmp_path / "masks", ratio=0.5))
    manifest = read_manifest(tmp_path / "masks", kind="masks")
    assert manifest["selection"]["warnings"] == [SAME_CHECKPOINT_NOTE]
    assert manifest["checkpoints"]["current"] == manifest["checkpoints"]["history"]


def test_output_is_refused_when_it_is_a_file_inside_an_input_or_holds_foreign_files(scored, corpus, tmp_path):
    before = _snapshot(scored)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="a-file is a file; pass a folder"):
        run_select(SelectConfig(scores=scored, output=a_file))
    for inside in (scored, scored / "masks", corpus / "masks"):
        with pytest.raises(ArtifactError, match="input folder .*choose an output folder outside the inputs"):
            run_select(SelectConfig(scores=scored, output=inside))
    assert not (scored / "masks").exists() and not (corpus / "masks").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds files this stage did not write: notes.txt"):
        run_select(SelectConfig(scores=scored, output=foreign))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written, not even a lock file
    run_select(SelectConfig(scores=scored, output=foreign, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "manifest.json").is_file()

    # A finished masks folder of other settings is replaced only with overwrite.
    with pytest.raises(ArtifactError, match="already holds a masks artifact made from other inputs or settings"):
        run_select(SelectConfig(scores=scored, output=foreign, ratio=0.2))
    summary = run_select(SelectConfig(scores=scored, output=foreign, ratio=0.2, overwrite=True))
    assert read_manifest(foreign, kind="masks")["selection"]["ratio"] == 0.2 and not summary.reused
    assert _snapshot(scored) == before

    with pytest.raises(ValidationError, match="overwrite applies to a masks folder"):
        SelectConfig(scores=scored, overwrite=True)


def test_output_needs_a_finished_unchanged_scores_folder(scored, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_select(SelectConfig(scores=tmp_path / "nowhere", output=tmp_path / "m0"))
    unfinished = shutil.copytree(scored, tmp_path / "unfinished")
    (unfinished / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json: it is not a finished scores folder"):
        run_select(SelectConfig(scores=unfinished, output=tmp_path / "m1"))
    record_path(unfinished, STARTED_FROM).write_text((scored / "manifest.json").read_text())
    with pytest.raises(UserError, match="killed; finish it by running `sstoken select --scores"):
        run_select(SelectConfig(scores=unfinished, output=tmp_path / "m2"))

    changed = shutil.copytree(scored, tmp_path / "changed")
    shutil.copy(changed / "part-00001.parquet", changed / "part-00000.parquet")
    with pytest.raises(ArtifactError, match="part-00000.parquet does not match the checksum"):
        run_select(SelectConfig(scores=changed, output=tmp_path / "m3"))
    # Scored from other tokenized data than the folder now holds (re-prepared since): the copied fingerprint would lie.
    stale = shutil.copytree(scored, tmp_path / "stale")
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["inputs"][0]["data_fingerprint"] = "0" * 64
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="no longer holds the tokenized data .*stale was scored from"):
        run_select(SelectConfig(scores=stale, output=tmp_path / "m4"))
    assert not any((tmp_path / name).exists() for name in ("m0", "m1", "m2", "m3", "m4"))


def test_a_reused_masks_folder_without_its_counts_is_refused_by_name_and_left_as_it_is(scored, tmp_path):
    masks = tmp_path / "masks"
    run_select(SelectConfig(scores=scored, output=masks, method="attn", ratio=0.5))
    manifest = json.loads((masks / "manifest.json").read_text())
    kept = manifest["counts"]["kept"]
    manifest["counts"] = {}  # still a valid manifest, but not one `select` writes
    (masks / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(masks)
    with pytest.raises(ArtifactError, match=r"manifest.json lacks the count\(s\) trainable, kept: .* delete the folder"):
        run_select(SelectConfig(scores=scored, output=masks, method="attn", ratio=0.5))
    assert _snapshot(masks) == before
    shutil.rmtree(masks)
    again = run_select(SelectConfig(scores=scored, output=masks, method="attn", ratio=0.5))
    assert not again.reused and again.counts["kept"] == kept == read_manifest(masks, kind="masks")["counts"]["kept"]


def test_rho1_keeps_the_highest_raw_current_minus_reference_losses(rho1_scored, tmp_path):
    manifest = read_manifest(rho1_scored, kind="scores")
    assert manifest["selection"]["excess"] == "current_minus_history" and manifest["selection"]["method"] == "rho1"
    run_select(SelectConfig(scores=rho1_scored, output=tmp_path / "sample", method="rho1", ratio=0.4))
    run_select(SelectConfig(scores=rho1_scored, output=tmp_path / "global", method="rho1", ratio=0.4, granularity="global"))
    signals = {name: _column(rho1_scored, name) for name in ("nll_cur", "nll_hist", "rel")}
    sample_keep, global_keep = _column(tmp_path / "sample", "keep"), _column(tmp_path / "global", "keep")
    kept_rel, dropped_rel = [], []
    for row in range(len(signals["rel"])):
        rel, cur, hist = (np.array(signals[name][row], np.float32) for name in ("rel", "nll_cur", "nll_hist"))
        targets = ~np.isnan(cur)
        np.testing.assert_allclose(rel[targets], (cur - hist)[targets], atol=1e-6)  # loss(current) - loss(reference)
        keep = np.array(sample_keep[row], bool)
        assert keep.sum() == math.ceil(0.4 * targets.sum() - 1e-9) and not keep[~targets].any()
        if keep.any() and (targets & ~keep).any():
            assert rel[keep].min() >= rel[targets & ~keep].max()  # raw excess, highest kept
        chosen = np.array(global_keep[row], bool)
        kept_rel += rel[chosen].tolist()
        dropped_rel += rel[targets & ~chosen].tolist()
    total = len(kept_rel) + len(dropped_rel)
    assert len(kept_rel) == math.ceil(0.4 * total - 1e-9) and min(kept_rel) >= max(dropped_rel)  # raw nats, corpus-wide
    assert read_manifest(tmp_path / "global", kind="masks")["selection"]["excess"] == "current_minus_history"


def test_a_baseline_over_rel_of_the_other_direction_is_refused(scored, rho1_scored, corpus, cache, llama_dir,
                                                                llama_history_dir, tmp_path):
    before, before_rho1 = _snapshot(scored), _snapshot(rho1_scored)
    for output in (tmp_path / "masks", None):
        with pytest.raises(UserError, match="method rho1 ranks REL = current - history.*--excess current_minus_history"):
            run_select(SelectConfig(scores=scored, output=output, method="rho1"))
        with pytest.raises(UserError, match="method tokencleaning ranks REL = history - current.*--excess history_minus_current"):
            run_select(SelectConfig(scores=rho1_scored, output=output, method="tokencleaning"))
    assert _snapshot(scored) == before and _snapshot(rho1_scored) == before_rho1 and not (tmp_path / "masks").exists()
    with pytest.raises(UserError, match="this scoring \\(--excess\\) stores REL as history - current"):
        _score(corpus, tmp_path / "refused", llama_dir, llama_history_dir, cache, method="rho1")
    assert not (tmp_path / "refused").exists()  # before any model runs or anything is written


def test_read_keep_masks_reads_scores_and_masks_folders_alike(scored, corpus, tmp_path):
    run_select(SelectConfig(scores=scored, output=tmp_path / "masks", method="random", ratio=0.3))
    in_place = shutil.copytree(scored, tmp_path / "in-place")
    run_select(SelectConfig(scores=in_place, method="random", ratio=0.3))
    (scores_source, from_scores), (masks_source, from_masks) = read_keep_masks(in_place), read_keep_masks(tmp_path / "masks")
    assert (scores_source.kind, masks_source.kind) == ("scores", "masks")
    tokenized = read_manifest(corpus, kind="tokenized")
    for source in (scores_source, masks_source):
        assert source.tokenized_fingerprint == tokenized["data_fingerprint"]
        assert source.tokenizer_fingerprint == tokenized["tokenizer"]["fingerprint"]
        assert source.chat_template_fingerprint == tokenized["tokenizer"]["chat_template_fingerprint"]
        assert source.tokenized_path == corpus and source.selection["method"] == "random"
    assert from_scores.column_names == ["sample_id", "keep", "weight"] and from_scores.equals(from_masks)
    assert from_masks.num_rows == sum(SHARDS)

    with pytest.raises(ArtifactError, match="holds a 'tokenized' artifact, not keep masks"):
        read_keep_masks(corpus)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_keep_masks(tmp_path)
    shutil.copy(tmp_path / "masks" / "part-00002.parquet", tmp_path / "masks" / "part-00000.parquet")
    with pytest.raises(ArtifactError, match="part-00000.parquet does not match the checksum"):
        read_keep_masks(tmp_path / "masks")
    no_provenance = shutil.copytree(scored, tmp_path / "no-provenance")
    manifest = json.loads((no_provenance / "manifest.json").read_text())
    (no_provenance / "manifest.json").write_text(json.dumps(manifest | {"inputs": []}))
    with pytest.raises(ArtifactError, match="does not say which tokenized data and tokenizer"):
        read_keep_masks(no_provenance)
