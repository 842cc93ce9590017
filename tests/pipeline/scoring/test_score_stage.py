"""The score job on the session's local Ray: artifacts, resume, global selection, refusals, accounting.

The models run in this process (`ray.runner: process`; the Ray tasks that check and select shards still run on
the session Ray): both runners write the same shards (test_score_in_process.py, which also runs the actor
pool's two phases). The shared scored corpus (tests/conftest.py) is the first run; reruns work on copies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import ArtifactError, exclusive_output, read_manifest, verify_shards, write_manifest
from pipeline.runtime.fingerprint import sha256_file
from pipeline.runtime.stage_output import PROGRESS
from pipeline.scoring.score_stage import ScoreJobConfig, plan_workers, run_score_job, workers_note
from pipeline.scoring.scorer import Scorer, nll_table, score_shard
from tests import tiny
from tests.factories import SCORED_SHARDS as SHARDS, write_tokenized


@pytest.fixture(scope="module")
def corpus(scored_corpus) -> Path:
    return scored_corpus.data


def _config(corpus: Path, output: Path, llama_dir: Path, history: Path | None, **overrides) -> ScoreJobConfig:
    return ScoreJobConfig(
        data=corpus, current=llama_dir, history=history, output=output,
        history_cache=output.parent / f"{output.name}-cache", progress=False, **({"ray": {"runner": "process"}} | overrides),
    )


@pytest.fixture(scope="module")
def sample_run(scored_corpus, llama_dir, llama_history_dir):
    """The shared scored corpus: its config (runner process) and the summary of its first run."""
    config = scored_corpus.config
    assert (config.current, config.history, config.ray.runner) == (llama_dir, llama_history_dir, "process")
    return config, scored_corpus.summary


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("part-*.parquet"))}


def test_artifacts_manifest_and_accounting(sample_run, corpus, llama_dir, llama_history_dir):
    config, summary = sample_run
    manifest = read_manifest(config.output, kind="scores")
    verify_shards(config.output, manifest)
    tokenized = read_manifest(corpus, kind="tokenized")
    assert [s["file"] for s in manifest["shards"]] == [s["file"] for s in tokenized["shards"]]
    assert [s["rows"] for s in manifest["shards"]] == SHARDS  # samples in = samples scored, per shard
    assert manifest["tokenizer"] == tokenized["tokenizer"]
    assert manifest["input_fingerprint"] == tokenized["data_fingerprint"]
    assert manifest["checkpoints"]["current"]["path"] == str(llama_dir)
    assert manifest["checkpoints"]["history"]["path"] == str(llama_history_dir)
    assert manifest["checkpoints"]["current"]["fingerprint"] != manifest["checkpoints"]["history"]["fingerprint"]
    assert manifest["selection"] == {
        "method": "sstoken", "gamma": 0.5, "ratio": 0.6, "normalise": "per_sample", "rel_is_noise": False,
        "layer": -1, "excess": "history_minus_current", "granularity": "sample"
    }
    assert manifest["config"]["granularity"] == "sample"
    assert {"total_s", "score_s"} <= set(manifest["timings"])
    counts = manifest["counts"]
    assert counts["samples"] == sum(SHARDS) == summary.counts["samples"]
    assert summary.counts["shards_scored"] == len(SHARDS) and summary.counts["shards_skipped"] == 0
    assert summary.details["tokens_per_s"] > 0 and 0.6 <= summary.details["kept_ratio"] < 0.75
    for entry, source in zip(manifest["shards"], tokenized["shards"]):
        scores = pq.read_table(config.output / entry["file"])
        ids = pq.read_table(corpus / source["file"], columns=["sample_id"]).column("sample_id")
        assert scores.column("sample_id").equals(ids)


def test_sample_selection_equals_the_in_process_engine(sample_run, corpus, llama_dir, llama_history_dir):
    config, _ = sample_run
    settings = config.score_settings().model_copy(update={"threads": 2})
    history, current = Scorer(llama_history_dir, settings, importance=False), Scorer(llama_dir, settings, importance=True)
    for part in sorted(corpus.glob("part-*.parquet")):
        tokenized = pq.read_table(part)
        expected = score_shard(current, tokenized, config.select_settings(), history_nll=nll_table(history, tokenized))
        actual = pq.read_table(config.output / part.name)
        assert actual.column("keep").equals(expected.column("keep")), part.name
        assert actual.column("n_kept").equals(expected.column("n_kept"))
        for name in ("nll_cur", "nll_hist", "score"):
            a = np.concatenate(actual.column(name).to_numpy(zero_copy_only=False))
            b = np.concatenate(expected.column(name).to_numpy(zero_copy_only=False))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_rerun_redoes_only_missing_or_broken_shards(sample_run, tmp_path):
    config, _ = sample_run
    output = tmp_path / "out"
    shutil.copytree(config.output, output)
    shutil.copytree(config.history_cache, tmp_path / "out-cache")
    before = _digests(output)
    (output / "part-00000.parquet").write_bytes((output / "part-00000.parquet").read_bytes()[:300])  # truncated
    table = pq.read_table(output / "part-00001.parquet")
    pq.write_table(table.slice(1), output / "part-00001.parquet")  # readable, a sample missing
    record = output / PROGRESS / "part-00002.parquet.json"
    record.write_text(record.read_text().replace('"run_key": "', '"run_key": "stale'))  # done under another key
    (output / "manifest.json").unlink()
    summary = run_score_job(config.model_copy(update={"output": output, "history_cache": tmp_path / "out-cache"}))
    assert summary.counts["shards_scored"] == 3 and summary.counts["shards_skipped"] == 1
    assert (summary.counts["history_reused"], summary.counts["history_computed"]) == (3, 0)  # no history forward
    assert _digests(output) == before
    verify_shards(output, read_manifest(output, kind="scores"))


def test_history_phase_first_one_model_per_actor_and_resumable(sample_run, tmp_path):
    """Phase 1 fills the history cache with only the history model loaded; phase 2 scores with only the
    current model (the history model is never loaded); each actor loads its model once; a rerun skips
    phase 1 for shards whose cache file validates and redoes only broken or missing ones."""
    config, summary = sample_run
    history, score = summary.details["phases"]["history"], summary.details["phases"]["score"]
    assert history["shards"] == score["shards"] == len(SHARDS)
    assert history["model_loads"] == history["actors"] >= 1  # one model per actor, loaded once, not once per shard
    assert score["model_loads"] == score["actors"] >= 1
    assert history["forwards"] >= len(SHARDS) and score["forwards"] >= len(SHARDS)
    assert (summary.counts["history_computed"], summary.counts["history_reused"]) == (len(SHARDS), 0)
    cached = sorted(Path(config.history_cache).glob("history_nll/*/*/float32/part-*.parquet"))
    assert [p.name for p in cached] == sorted(p.name for p in Path(config.data).glob("part-*.parquet"))

    # Rerun into a fresh output with the same cache: no phase 1 at all, same scores.
    again = run_score_job(config.model_copy(update={"output": tmp_path / "again"}))
    assert again.details["phases"]["history"]["shards"] == 0 and again.details["phases"]["history"]["forwards"] == 0
    assert (again.counts["history_computed"], again.counts["history_reused"]) == (0, len(SHARDS))
    assert again.details["phases"]["score"]["model_loads"] == again.details["phases"]["score"]["actors"]
    assert _digests(tmp_path / "again") == _digests(config.output)

    # A cache with one file missing and one truncated: phase 1 redoes those two only.
    cache = tmp_path / "cache"
    shutil.copytree(config.history_cache, cache)
    files = sorted(cache.glob("history_nll/*/*/float32/part-*.parquet"))
    files[0].unlink()
    files[2].write_bytes(files[2].read_bytes()[:100])
    partial = run_score_job(config.model_copy(update={"output": tmp_path / "partial", "history_cache": cache}))
    assert partial.details["phases"]["history"]["shards"] == 2
    assert _digests(tmp_path / "partial") == _digests(config.output)


def test_cached_current_nll_serves_a_later_run_as_its_history(sample_run, tmp_path):
    """With cache_current_nll, a run stores its current model's NLLs as that checkpoint's history NLLs,
    byte-identical to what a history pass computes, so a later run taking it as history skips phase 1."""
    config, _ = sample_run
    cache = tmp_path / "cache"
    first = run_score_job(config.model_copy(update={
        "current": config.history, "output": tmp_path / "round0", "history_cache": cache, "cache_current_nll": True,
    }))
    assert first.counts["history_computed"] == 0  # one checkpoint: no history pass
    stored = sorted(cache.glob("history_nll/*/*/float32/part-*.parquet"))
    computed = sorted(Path(config.history_cache).glob("history_nll/*/*/float32/part-*.parquet"))
    assert [p.relative_to(cache) for p in stored] == [p.relative_to(config.history_cache) for p in computed]
    for mine, theirs in zip(stored, computed):  # bit for bit (NaN off the targets)
        a, b = pq.read_table(mine), pq.read_table(theirs)
        assert a.column("sample_id").equals(b.column("sample_id"))
        bits = [t.column("nll").combine_chunks().values.to_numpy(zero_copy_only=False).view(np.uint32) for t in (a, b)]
        assert np.array_equal(*bits)

    later = run_score_job(config.model_copy(update={"output": tmp_path / "round1", "history_cache": cache}))
    assert (later.counts["history_computed"], later.counts["history_reused"]) == (0, len(SHARDS))
    assert _digests(tmp_path / "round1") == _digests(config.output)


def test_global_selection_is_the_exact_corpus_top_k(ray_local, sample_run, corpus, tmp_path):
    config, _ = sample_run
    output = tmp_path / "global"
    shutil.copytree(config.output, output)  # scores are granularity-independent: only keep is rewritten
    summary = run_score_job(config.model_copy(update={"output": output, "granularity": "global"}))
    assert summary.counts["shards_scored"] == 0 and summary.counts["shards_rewritten"] == len(SHARDS)
    scores = [pq.read_table(output / p.name) for p in sorted(corpus.glob("part-*.parquet"))]
    trainable = [pq.read_table(p).column("trainable") for p in sorted(corpus.glob("part-*.parquet"))]
    flat_scores = np.concatenate([np.concatenate(t.column("score").to_numpy(zero_copy_only=False)) for t in scores])
    flat_trainable = np.concatenate([np.concatenate(c.to_numpy(zero_copy_only=False)) for c in trainable]).astype(bool)
    flat_keep = np.concatenate([np.concatenate(t.column("keep").to_numpy(zero_copy_only=False)) for t in scores])
    candidates = np.flatnonzero(flat_trainable)
    order = sorted(candidates, key=lambda i: (-flat_scores[i], i))  # score descending, then global order
    k = int(np.ceil(0.6 * len(candidates)))
    expected = np.zeros_like(flat_keep)
    expected[order[:k]] = True
    assert np.array_equal(flat_keep, expected)
    manifest = read_manifest(output, kind="scores")
    assert manifest["counts"]["kept"] == k == manifest["selection"]["k"]
    assert manifest["selection"]["granularity"] == "global"
    assert sum(t.column("n_kept").to_numpy().sum() for t in scores) == k
    # Rerun: nothing to score or rewrite, same bytes.
    before = _digests(output)
    again = run_score_job(config.model_copy(update={"output": output, "granularity": "global"}))
    assert again.counts["shards_skipped"] == len(SHARDS) and again.counts["shards_rewritten"] == 0
    assert _digests(output) == before


def test_a_new_ratio_or_granularity_only_reselects(ray_local, sample_run, tmp_path):
    """Ratio 0.6 -> 0.3, sample -> global -> sample: no forward runs, and every output is byte-identical
    to a job that scored from scratch at those settings."""
    config, _ = sample_run
    output = tmp_path / "reselect"
    shutil.copytree(config.output, output)
    fresh = run_score_job(config.model_copy(update={"output": tmp_path / "fresh", "ratio": 0.3}))
    assert fresh.counts["shards_scored"] == len(SHARDS)

    lower = run_score_job(config.model_copy(update={"output": output, "ratio": 0.3}))
    assert lower.counts["shards_scored"] == 0 and lower.counts["tokens_scored"] == 0 and lower.counts["shards_rewritten"] == len(SHARDS)
    assert _digests(output) == _digests(tmp_path / "fresh")
    assert read_manifest(output, kind="scores")["selection"]["ratio"] == 0.3
    assert lower.counts["kept"] == fresh.counts["kept"] < 0.5 * lower.counts["trainable"]

    globally = run_score_job(config.model_copy(update={"output": output, "ratio": 0.3, "granularity": "global"}))
    assert globally.counts["shards_scored"] == 0 and globally.counts["kept"] == int(np.ceil(0.3 * globally.counts["trainable"]))
    back = run_score_job(config.model_copy(update={"output": output, "ratio": 0.3}))
    assert back.counts["shards_scored"] == 0 and back.counts["shards_rewritten"] > 0
    assert _digests(output) == _digests(tmp_path / "fresh")
    again = run_score_job(config.model_copy(update={"output": output, "ratio": 0.3}))
    assert again.counts["shards_scored"] == 0 and again.counts["shards_rewritten"] == 0


def test_other_tokenizer_is_refused(corpus, llama_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    write_manifest(data, manifest)
    with pytest.raises(UserError, match="another tokenizer"):
        run_score_job(_config(data, tmp_path / "out", llama_dir, None))
    assert not (tmp_path / "out").exists()


OTHER_TEMPLATE = tiny.CHATML_TEMPLATE + "{# another template #}"


def model_with_template(llama_dir: Path, folder: Path, template: str | None) -> Path:
    """A copy of the tiny model whose tokenizer carries another chat template (or none)."""
    shutil.copytree(llama_dir, folder)
    tiny.save_tokenizer(folder, chat_template=template)
    return folder


def test_a_model_with_another_chat_template_is_refused_naming_both(corpus, llama_dir, tmp_path, capsys):
    from pipeline.runtime.fingerprint import tokenizer_fingerprints
    from pipeline.scoring.score_stage import _check_tokenizer

    model = model_with_template(llama_dir, tmp_path / "other", OTHER_TEMPLATE)
    recorded = read_manifest(corpus)["tokenizer"]["chat_template_fingerprint"]
    found = tokenizer_fingerprints(tiny.build_tokenizer(chat_template=OTHER_TEMPLATE))["chat_template"]
    assert main(["score", "--data", str(corpus), "--current", str(model), "--output", str(tmp_path / "out"),
                 "--ray.runner", "process", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"sstoken score: error: {corpus} was rendered with another chat template (fingerprint {recorded[:12]}) "
                   f"than the model in {model} carries ({found[:12]}); rerun `sstoken prepare` with this model's "
                   "tokenizer (and no --chat-template), or use a model folder whose tokenizer has the template the data "
                   "was rendered with")
    assert not (tmp_path / "out").exists()
    # A history model only scores the same ids; a model without a template (data rendered with --chat-template) passes.
    _check_tokenizer(model, read_manifest(corpus)["tokenizer"], corpus, False, template=False)
    bare = model_with_template(llama_dir, tmp_path / "bare", None)
    _check_tokenizer(bare, read_manifest(corpus)["tokenizer"], corpus, False, template=True)


def test_a_checkpoint_with_nan_weights_is_named_not_blamed_on_signals_needed(corpus, llama_dir, tmp_path, capsys):
    """Scored with --signals all: the selection finds NaN and says the checkpoint gives NaN losses, where."""
    import torch
    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(llama_dir, tmp_path / "nan-model"))
    weights = load_file(model / "model.safetensors")
    save_file({name: torch.full_like(value, float("nan")) for name, value in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    assert main(["score", "--data", str(corpus), "--current", str(model), "--output", str(tmp_path / "out"),
                 "--signals", "all", "--method", "attn", "--ray.runner", "process", "--no-progress"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sstoken")]
    assert re.search(r"attn is NaN at \d+ of \d+ targets \(first at position \d+\); nll_cur is NaN there too: the "
                     r"current checkpoint gives NaN losses", err), err
    assert "--signals" not in err


def test_missing_inputs_give_clear_errors(corpus, llama_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist; run `sstoken prepare`"):
        run_score_job(_config(tmp_path / "nowhere", tmp_path / "out", llama_dir, None))
    with pytest.raises(UserError, match="does not exist"):
        run_score_job(_config(corpus, tmp_path / "out", tmp_path / "no-model", None))
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    (data / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        run_score_job(_config(data, tmp_path / "out", llama_dir, None))
    (data / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        run_score_job(_config(data, tmp_path / "out", llama_dir, None))


def test_corrupt_tokenized_shard_is_refused(ray_local, corpus, llama_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    shard = data / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtifactError, match="part-00002.parquet does not match the checksum"):
        run_score_job(_config(data, tmp_path / "out", llama_dir, None))
    (data / "part-00001.parquet").unlink()
    with pytest.raises(ArtifactError, match="part-00001.parquet is missing"):
        run_score_job(_config(data, tmp_path / "out", llama_dir, None))


# The Ray variant runs in the slow step: a failed actor's teardown kept the next fast test waiting ~14 s on 2 cores.
@pytest.mark.parametrize("runner", [pytest.param("ray", marks=pytest.mark.slow), "process"])
def test_engine_errors_reach_the_caller_as_they_are(ray_local, corpus, llama_dir, tmp_path, runner):
    """Raised where the model loads: in a Ray actor's `load` call (reaching the caller as itself), or here."""
    with pytest.raises(UserError, match="layer 7 is out of range"):
        run_score_job(_config(corpus, tmp_path / "out", llama_dir, None, layer=7, ray={"runner": runner}))


def test_an_engine_user_error_is_one_line_through_the_cli(ray_local, corpus, llama_dir, tmp_path, capsys):
    arguments = ["--data", str(corpus), "--current", str(llama_dir), "--output", str(tmp_path / "out"),
                 "--history-cache", str(tmp_path / "cache"), "--layer", "7", "--no-progress", "--ray.runner", "process"]
    assert main(["score", *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("sstoken score: error: layer 7 is out of range") and "Traceback" not in error


def test_concurrent_writer_is_refused(corpus, llama_dir, tmp_path):
    output = tmp_path / "out"
    with exclusive_output(output):
        with pytest.raises(ArtifactError, match="is being written by"):
            run_score_job(_config(corpus, output, llama_dir, None))


def test_output_holding_another_artifact_is_refused(corpus, llama_dir, tmp_path):
    output = tmp_path / "tokenized-copy"
    shutil.copytree(corpus, output)
    with pytest.raises(ArtifactError, match="holds a 'tokenized' artifact"):
        run_score_job(_config(corpus, output, llama_dir, None))


def test_cli_and_job_entrypoint_share_one_code_path(sample_run, capsys, tmp_path):
    config, _ = sample_run
    output = tmp_path / "out"
    shutil.copytree(config.output, output)  # the finished folder, rerun through the CLI (a copy: it is shared)
    settings = tmp_path / "score.yaml"
    settings.write_text(f"gamma: 0.5\nratio: 0.6\nhistory: {config.history}\nhistory_cache: {config.history_cache}\n")
    arguments = ["--config", str(settings), "--data", str(config.data), "--current", str(config.current),
                 "--output", str(output), "--no-progress", "--ray.runner", "process"]
    assert main(["score", *arguments]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"samples\W+{sum(SHARDS)}\b", printed) and re.search(rf"shards skipped\W+{len(SHARDS)}\b", printed)
    help_text = subprocess.run(
        [sys.executable, "jobs/score.py", "--help"], cwd=Path(__file__).resolve().parents[3],
        capture_output=True, text=True, timeout=120,
    )
    assert help_text.returncode == 0 and "--gpus-per-worker" in help_text.stdout


def test_plan_workers_fits_actors_on_nodes():
    assert plan_workers([2.0], 0.0, None, None, 0.0) == (1, 2.0)
    assert plan_workers([16.0], 0.0, None, None, 0.0) == (4, 4.0)
    assert plan_workers([2.0, 2.0], 0.0, None, None, 0.0) == (2, 2.0)
    assert plan_workers([8.0, 8.0], 4.0, None, None, 1.0) == (4, 1.0)
    assert plan_workers([2.0], 0.0, 3, 0.5, 0.0) == (3, 0.5)
    assert plan_workers([2.0], 0.0, 8, 1.0, 0.0) == (2, 1.0)  # more than the CPUs hold at once
    assert workers_note(8, 2, 1.0, 0.0) == ["--workers 8: the cluster holds 2 actors of 1 CPU each at once, so 2 ran"]
    assert workers_note(64, 1, 2.0, 0.0) == ["--workers 64: the cluster holds 1 actor of 2 CPUs each at once, so 1 ran"]
    assert workers_note(2, 2, 1.0, 0.0) == workers_note(None, 4, 1.0, 0.0) == []
    with pytest.raises(UserError, match="exceeds the largest node"):
        plan_workers([2.0], 0.0, None, 4.0, 0.0)
    with pytest.raises(UserError, match="GPUs"):
        plan_workers([2.0], 0.0, None, None, 1.0)


def _edited_copy(corpus: Path, folder: Path, edit) -> Path:
    """A copy of the tokenized corpus whose manifest `edit(manifest)` changed (files untouched)."""
    shutil.copytree(corpus, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    write_manifest(folder, manifest)
    return folder


def test_a_file_the_stage_did_not_write_is_refused_and_kept(corpus, llama_dir, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "part-00001.parquet").write_bytes(b"someone else's shard")
    with pytest.raises(ArtifactError, match=r"did not write: part-00001.parquet; .*--overwrite"):
        run_score_job(_config(corpus, output, llama_dir, None))
    assert (output / "part-00001.parquet").read_bytes() == b"someone else's shard"
    with pytest.raises(ArtifactError, match="is inside the input folder"):
        run_score_job(_config(corpus, corpus / "scores", llama_dir, None))
    assert not (corpus / "scores").exists()


def test_manifest_problems_are_named(ray_local, corpus, llama_dir, tmp_path):
    def twice(manifest):
        manifest["shards"].append(dict(manifest["shards"][0]))

    def rows(manifest):
        manifest["shards"][1]["rows"] = 99

    with pytest.raises(ArtifactError, match="lists part-00000.parquet more than once"):
        run_score_job(_config(_edited_copy(corpus, tmp_path / "twice", twice), tmp_path / "a", llama_dir, None))
    with pytest.raises(ArtifactError, match=r"manifest.json says part-00001.parquet has 99 rows, the file has 7") as raised:
        run_score_job(_config(_edited_copy(corpus, tmp_path / "rows", rows), tmp_path / "b", llama_dir, None))
    # Checked inside a Ray task, yet raised as the error itself: no worker traceback, no colour codes.
    assert type(raised.value) is ArtifactError and str(raised.value).startswith(str(tmp_path / "rows"))
    assert "\x1b[" not in str(raised.value) and "Traceback" not in str(raised.value)
    repeated = tmp_path / "repeated"
    shutil.copytree(corpus, repeated)
    shutil.copy(repeated / "part-00000.parquet", repeated / "part-00004.parquet")  # every id of shard 0 again

    def listed(manifest):
        manifest["shards"].append(dict(manifest["shards"][0], file="part-00004.parquet"))

    listed_copy = _edited_copy(repeated, tmp_path / "repeated-listed", listed)
    with pytest.raises(ArtifactError, match=r"holds sample id 's00-0000' twice \(part-00000.parquet and part-00004"):
        run_score_job(_config(listed_copy, tmp_path / "c", llama_dir, None))
    for name in ("a", "b", "c"):  # refused before the output was touched
        assert not (tmp_path / name / "manifest.json").exists() and not (tmp_path / name / PROGRESS).exists()


def test_changed_shard_under_an_unchanged_fingerprint_misses_the_history_cache(sample_run, tokenizer, tmp_path):
    """The cache and run keys come from the verified shard checksums, not the editable data_fingerprint;
    and scoring another corpus into a finished scores folder needs --overwrite."""
    config, _ = sample_run
    other = write_tokenized(tmp_path / "other", tokenizer, SHARDS[:1], seed=99)  # same ids, other tokens
    data = tmp_path / "data"
    shutil.copytree(config.data, data)
    shutil.copy(other / "part-00000.parquet", data / "part-00000.parquet")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = sha256_file(data / "part-00000.parquet")  # fingerprint left as it was
    write_manifest(data, manifest)
    output = tmp_path / "out"
    shutil.copytree(config.output, output)
    shutil.copytree(config.history_cache, tmp_path / "cache")  # this run fills it for the changed data
    changed = config.model_copy(update={"data": data, "output": output, "history_cache": tmp_path / "cache"})
    with pytest.raises(ArtifactError, match="made from other inputs or settings; pass --overwrite"):
        run_score_job(changed)
    summary = run_score_job(changed.model_copy(update={"overwrite": True}))
    assert summary.details["phases"]["history"]["shards"] == len(SHARDS)  # no stale history NLLs reused
    assert summary.counts["shards_scored"] == len(SHARDS)
    assert sha256_file(output / "part-00000.parquet") != sha256_file(config.output / "part-00000.parquet")


def test_an_unreachable_cluster_fails_fast_and_touches_no_output(sample_run, tmp_path):
    config, _ = sample_run
    output = tmp_path / "finished"
    shutil.copytree(config.output, output)
    manifest = (output / "manifest.json").read_bytes()
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "score", "--data", str(config.data), "--current", str(config.current),
         "--history", str(config.history), "--history-cache", str(config.history_cache), "--output", str(output),
         "--no-progress", "--ray.address", "127.0.0.1:1", "--ray.connect-timeout-s", "2"],
        cwd=Path(__file__).resolve().parents[3], env=environment, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 60
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in lines[0], result.stderr
    assert "\x1b" not in result.stderr and "Traceback" not in result.stderr
    assert (output / "manifest.json").read_bytes() == manifest


def _flat(table, name: str) -> np.ndarray:
    return np.concatenate(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float64)


def test_the_current_entropy_is_stored_with_every_signal_and_follows_signals_needed(
    sample_run, corpus, llama_dir, llama_history_dir, tmp_path, capsys
):
    """`signals: all` stores entropy_cur (NaN exactly off the targets); `needed` stores it for method entropy alone,
    with no history pass and no attention capture, and a later selection by entropy over scores without it is
    refused naming the column."""
    config, _ = sample_run
    vocab_size = json.loads((llama_dir / "config.json").read_text())["vocab_size"]
    assert read_manifest(config.output, kind="scores")["signals"] == {
        "rel": True, "attention": True, "entropy": True, "layer": -1, "excess": "history_minus_current",
        "vocab_size": vocab_size,
    }
    lean = run_score_job(_config(corpus, tmp_path / "entropy", llama_dir, llama_history_dir, method="entropy",
                                 signals="needed"))
    assert lean.counts["shards_scored"] == len(SHARDS)
    assert read_manifest(tmp_path / "entropy", kind="scores")["signals"]["entropy"] is True
    assert not (tmp_path / "entropy-cache").exists()  # no history pass: nothing cached
    for part in sorted(corpus.glob("part-*.parquet")):
        targets = np.concatenate(pq.read_table(part).column("trainable").to_numpy(zero_copy_only=False)).astype(bool)
        full, entropy_only = pq.read_table(config.output / part.name), pq.read_table(tmp_path / "entropy" / part.name)
        assert (np.isnan(_flat(full, "entropy_cur")) == ~targets).all()
        np.testing.assert_allclose(_flat(entropy_only, "entropy_cur"), _flat(full, "entropy_cur"), rtol=1e-5,
                                   equal_nan=True)
        assert np.isnan(_flat(entropy_only, "attn")).all() and np.isnan(_flat(entropy_only, "rel")).all()

    run_score_job(_config(corpus, tmp_path / "loss", llama_dir, llama_history_dir, method="loss", signals="needed"))
    assert np.isnan(_flat(pq.read_table(tmp_path / "loss" / "part-00000.parquet"), "entropy_cur")).all()
    capsys.readouterr()
    assert main(["select", "--scores", str(tmp_path / "loss"), "--method", "entropy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "entropy_cur is NaN at" in err and "--signals needed" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("granularity", ["sample", "global"])
def test_scoring_with_a_weighted_method_writes_the_weights_select_writes(sample_run, corpus, llama_dir,
                                                                          llama_history_dir, tmp_path, granularity):
    """`sstoken score --method entropy-gated` stores its weights in the scores (per sample by the workers, global by
    the select step after them): the same bytes as `sstoken select` in place over the shared scores."""
    config, _ = sample_run
    scored = tmp_path / "scored"
    run_score_job(_config(corpus, scored, llama_dir, llama_history_dir, method="entropy-gated", ratio=0.5,
                          granularity=granularity))
    reselected = Path(shutil.copytree(config.output, tmp_path / "reselected"))
    assert main(["select", "--scores", str(reselected), "--method", "entropy-gated", "--ratio", "0.5",
                 "--granularity", granularity]) == 0
    assert _digests(scored) == _digests(reselected)
    weight = np.concatenate([_flat(pq.read_table(p), "weight") for p in sorted(scored.glob("part-*.parquet"))])
    keep = np.concatenate([_flat(pq.read_table(p), "keep") for p in sorted(scored.glob("part-*.parquet"))]).astype(bool)
    assert (weight[keep] > 0).all() and (weight[keep] <= 1).all() and (weight[~keep] == 0).all()
    assert len(np.unique(weight[keep])) > 1  # weighted, not 0/1


def test_scores_written_before_weights_are_rescored_by_a_rerun_then_select_weighted_in_place(
    scored_corpus, tmp_path, capsys
):
    """A scores folder as main wrote it (no weight column, no |V|): `sstoken select --method prob` in place is refused
    saying to rescore; rerunning `sstoken score` rescores every shard (a shard without a column the scorer writes is
    not done), after which the weighted selection works in place."""
    from tests.score_factories import as_written_before

    old = as_written_before(scored_corpus.copy_scores(tmp_path / "scores", cache=True), ("weight",), ("vocab_size",))
    assert main(["select", "--scores", str(old), "--method", "prob"]) == 2
    assert "or rescore" in capsys.readouterr().err
    config = scored_corpus.config.model_copy(update={"output": old, "history_cache": tmp_path / "scores-cache"})
    summary = run_score_job(config)
    assert summary.counts["shards_scored"] == len(SHARDS)
    assert read_manifest(old, kind="scores")["signals"]["vocab_size"] > 1
    assert main(["select", "--scores", str(old), "--method", "entropy-gated", "--ratio", "0.5"]) == 0
    assert all("weight" in pq.read_schema(p).names for p in old.glob("part-*.parquet"))
