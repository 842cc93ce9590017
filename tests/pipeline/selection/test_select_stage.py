"""The select stage: re-selection from stored signals equals a fresh scoring, runs no model, and the guards."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from pipeline.runtime.files import read_manifest, verify_shards
from pipeline.runtime.fingerprint import sha256_file
from pipeline.scoring import scorer as scorer_module
from pipeline.scoring.score_stage import ScoreJobConfig, run_score_job
from pipeline.runtime.errors import UserError
from pipeline.selection.select_config import SelectConfig
from pipeline.selection.select_stage import run_select
from pipeline.selection.selection_shards import SAME_CHECKPOINT_NOTE
from tests import tiny
from tests.factories import SCORED_SHARDS as SHARDS, kill_on_commit


@pytest.fixture(scope="module")
def corpus(scored_corpus) -> Path:
    return scored_corpus.data


@pytest.fixture(scope="module")
def cache(scored_corpus) -> Path:
    """The shared history cache: fresh scorings here with the same history model only read it."""
    return scored_corpus.cache


def _score(corpus: Path, output: Path, current: Path, history: Path | None, cache: Path, **settings) -> ScoreJobConfig:
    """A fresh scoring, the models in this process (the same shards as Ray actors write: test_score_in_process)."""
    config = ScoreJobConfig(
        data=corpus, current=current, history=history, output=output, history_cache=cache, progress=False,
        ray={"runner": "process"}, **settings
    )
    run_score_job(config)
    return config


@pytest.fixture(scope="module")
def scored(scored_corpus, llama_dir, llama_history_dir) -> Path:
    """Default scoring (sstoken, gamma 0.5): every signal stored. Shared: tests select on copies of it."""
    config = scored_corpus.config
    assert (config.current, config.history, config.method, config.signals) == (llama_dir, llama_history_dir, "sstoken", "all")
    return scored_corpus.scores


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("part-*.parquet"))}


@pytest.fixture
def no_model():
    """`with no_model():` building a Scorer (loading a model) in this process fails the test. Only the
    selection runs inside it: the fresh scorings next to it load their models in this process."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded in the driver")

    @contextmanager
    def forbidden():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(scorer_module.Scorer, "__init__", refuse)
            yield

    return forbidden


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize(
    "settings",
    [{"ratio": 0.3}, {"gamma": 0.2, "granularity": "global"}, {"ratio": 0.45, "normalise": "none", "gamma": 0.7}],
)
def test_reselecting_is_byte_identical_to_scoring_fresh(
    ray_local, scored, corpus, cache, llama_dir, llama_history_dir, tmp_path, settings, no_model
):
    """Same signals (sstoken, 0 < gamma < 1): every shard is byte-identical to a fresh scoring, and no model runs."""
    folder = _copy(scored, tmp_path / "reselected")
    with no_model():
        summary = run_select(SelectConfig(scores=folder, **settings))
    assert summary.stage == "select" and summary.counts["shards_rewritten"] == len(SHARDS)
    manifest = read_manifest(folder, kind="scores")
    verify_shards(folder, manifest)
    assert manifest["selection"]["method"] == "sstoken" and manifest["config"]["ratio"] == settings.get("ratio", 0.6)
    assert manifest["selection"]["granularity"] == settings.get("granularity", "sample")
    before = _digests(folder)
    with no_model():
        assert run_select(SelectConfig(scores=folder, **settings)).counts["shards_rewritten"] == 0
    assert _digests(folder) == before

    fresh = _score(corpus, tmp_path / "fresh", llama_dir, llama_history_dir, cache, **settings)
    assert _digests(folder) == _digests(fresh.output)
    fresh_manifest = read_manifest(fresh.output, kind="scores")
    assert manifest["selection"] == fresh_manifest["selection"]
    assert manifest["config"] | {"output": None} == fresh_manifest["config"] | {"output": None}


def test_another_method_on_the_same_signals_is_byte_identical(
    ray_local, corpus, cache, llama_dir, llama_history_dir, tmp_path, no_model
):
    """rel and tokencleaning use the same signals (REL only): scoring with one and selecting the other
    equals scoring with the other."""
    rel = _score(corpus, tmp_path / "rel", llama_dir, llama_history_dir, cache, method="rel")
    with no_model():
        summary = run_select(SelectConfig(scores=rel.output, method="tokencleaning", granularity="global", ratio=0.5))
    assert summary.counts["shards_rewritten"] == len(SHARDS)
    fresh = _score(corpus, tmp_path / "tc", llama_dir, llama_history_dir, cache, method="tokencleaning",
                   granularity="global", ratio=0.5)
    assert _digests(rel.output) == _digests(fresh.output)
    trainable = read_manifest(fresh.output, kind="scores")["counts"]["trainable"]
    assert summary.counts["kept"] == int(0.5 * trainable)  # floor, as TokenCleaning's code


@pytest.mark.parametrize("method", ["random", "full", "attn", "rel", "tokencleaning", "loss", "confidence", "entropy"])
def test_every_method_reselected_is_byte_identical_to_scoring_with_it(
    ray_local, scored, corpus, cache, llama_dir, llama_history_dir, tmp_path, method, no_model
):
    """Every signal is stored by default, so any method selected afterwards gives the very shards a
    fresh scoring with that method writes."""
    folder = _copy(scored, tmp_path / "all-signals")
    with no_model():
        run_select(SelectConfig(scores=folder, method=method, ratio=0.4, seed=11))
    fresh = _score(corpus, tmp_path / "fresh", llama_dir, llama_history_dir, cache, method=method, ratio=0.4, seed=11)
    assert _digests(folder) == _digests(fresh.output)
    assert read_manifest(folder, kind="scores")["selection"] == read_manifest(fresh.output, kind="scores")["selection"]


@pytest.mark.parametrize("method", ["attn", "rel"])
def test_with_only_the_needed_signals_the_selection_columns_still_match(
    ray_local, scored, corpus, cache, llama_dir, llama_history_dir, tmp_path, method, no_model
):
    """`signals: needed` stores only what the method uses (attn: no REL, rel: no attention): its
    score, keep and n_kept equal a re-selection of the full signal set with that method."""
    folder = _copy(scored, tmp_path / "all-signals")
    with no_model():
        run_select(SelectConfig(scores=folder, method=method, ratio=0.4))
    lean = _score(corpus, tmp_path / "lean", llama_dir, llama_history_dir, cache, method=method, ratio=0.4,
                  signals="needed")
    missing = "rel" if method == "attn" else "attn"
    for part in sorted(folder.glob("part-*.parquet")):
        got, expected = pq.read_table(part), pq.read_table(lean.output / part.name)
        for name in ("keep", "n_kept"):
            assert got.column(name).equals(expected.column(name)), (method, part.name, name)
        np.testing.assert_array_equal(
            np.concatenate(got.column("score").to_pylist()), np.concatenate(expected.column("score").to_pylist())
        )
        assert np.isnan(np.concatenate(expected.column(missing).to_pylist())).all()


def test_random_is_reproducible_and_seeded(scored, tmp_path, no_model):
    one, two, other = (_copy(scored, tmp_path / name) for name in ("one", "two", "other"))
    for folder, seed in ((one, 3), (two, 3), (other, 4)):
        with no_model():
            run_select(SelectConfig(scores=folder, method="random", seed=seed))
    assert _digests(one) == _digests(two) != _digests(other)
    manifest = read_manifest(one, kind="scores")
    assert manifest["selection"] == {"method": "random", "ratio": 0.6, "granularity": "sample", "seed": 3,
                                     "layer": -1, "excess": "history_minus_current"}
    trainable = pq.read_table(next(one.glob("part-*.parquet")), columns=["n_trainable", "n_kept"])
    assert trainable.column("n_kept").to_pylist() == [int(np.ceil(0.6 * n - 1e-9)) for n in trainable.column("n_trainable").to_pylist()]


def test_same_checkpoint_refuses_rel_only_selection(ray_local, corpus, cache, llama_dir, tmp_path):
    with pytest.raises(UserError, match="same checkpoint: every REL is 0"):
        _score(corpus, tmp_path / "refused", llama_dir, None, cache, gamma=1.0)
    assert not (tmp_path / "refused").exists()  # refused before any work
    attention_only = _score(corpus, tmp_path / "round0", llama_dir, None, cache)
    selection = read_manifest(attention_only.output, kind="scores")["selection"]
    # REL is 0 by construction here, not the noise of a near-copy: said as such, not as "a re-saved copy?".
    assert selection["rel_is_noise"] is False and selection["warnings"] == [SAME_CHECKPOINT_NOTE]
    before = _digests(attention_only.output)
    for settings in ({"method": "rel"}, {"method": "tokencleaning"}, {"gamma": 1.0}):
        with pytest.raises(UserError, match="position tie-break would keep the first"):
            run_select(SelectConfig(scores=attention_only.output, **settings))
    assert _digests(attention_only.output) == before and (attention_only.output / "manifest.json").is_file()


@pytest.fixture(scope="module")
def near_copy(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """The llama checkpoint re-saved with its weights moved by ~1e-7: REL is numerical noise."""
    path = tmp_path_factory.mktemp("llama-near-copy")
    tiny.save_tokenizer(path)
    model = tiny.build_model("llama", len(tokenizer), seed=0)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.add_(1e-7 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_rel_below_the_floor_is_treated_as_zero_with_a_warning(
    ray_local, corpus, llama_dir, near_copy, tmp_path
):
    config = _score(corpus, tmp_path / "near", llama_dir, near_copy, tmp_path / "cache")  # not the shared cache: new NLLs
    manifest = read_manifest(config.output, kind="scores")
    rel = np.concatenate([np.concatenate(pq.read_table(p).column("rel").to_pylist()) for p in sorted(config.output.glob("part-*"))])
    assert 0 < np.nanmax(np.abs(rel)) < 1e-4  # the checkpoints differ, by noise only
    assert manifest["selection"]["rel_is_noise"] is True
    assert "REL is noise and is treated as 0" in manifest["selection"]["warnings"][0]
    # Treated as zero: the selection is the attention-only one (gamma scales attention, the ranking is the same).
    attention = _copy(config.output, tmp_path / "attn")
    run_select(SelectConfig(scores=attention, method="attn"))
    for part in sorted(config.output.glob("part-*.parquet")):
        assert pq.read_table(part).column("keep").equals(pq.read_table(attention / part.name).column("keep"))
    for method in ("rel", "tokencleaning"):
        with pytest.raises(UserError, match="\\|REL\\| < 0.0001 nats"):
            run_select(SelectConfig(scores=config.output, method=method))


def test_a_signal_the_scores_lack_is_refused_before_any_write(ray_local, corpus, cache, llama_dir, llama_history_dir, tmp_path):
    attention = _score(corpus, tmp_path / "attn", llama_dir, llama_history_dir, cache, method="attn", signals="needed")
    before = _digests(attention.output)
    with pytest.raises(UserError, match="needs REL, but .* targets have none"):
        run_select(SelectConfig(scores=attention.output, method="sstoken"))
    assert _digests(attention.output) == before and (attention.output / "manifest.json").is_file()


def test_a_killed_select_is_finished_by_selecting_again(scored, tmp_path, no_model):
    from pipeline.selection import selection_shards

    expected = _copy(scored, tmp_path / "expected")
    with no_model():
        run_select(SelectConfig(scores=expected, method="random", ratio=0.3))
    killed = _copy(scored, tmp_path / "killed")
    with no_model(), pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        kill_on_commit(patch, selection_shards, 2)
        run_select(SelectConfig(scores=killed, method="random", ratio=0.3))
    assert not (killed / "manifest.json").exists()  # incomplete, and says so
    with no_model():
        summary = run_select(SelectConfig(scores=killed, method="random", ratio=0.3))
    assert summary.counts["shards_rewritten"] == len(SHARDS) - 1
    assert _digests(killed) == _digests(expected)
    assert read_manifest(killed, kind="scores")["selection"] == read_manifest(expected, kind="scores")["selection"]
    assert sorted(p.name for p in (killed / "_progress").iterdir()) == sorted(f"{name}.json" for name in _digests(killed))


def test_select_needs_a_finished_scores_folder(corpus, tmp_path):
    with pytest.raises(UserError, match="no manifest.json: it is not a finished scores folder"):
        run_select(SelectConfig(scores=tmp_path))
    with pytest.raises(Exception, match="'tokenized' artifact"):
        run_select(SelectConfig(scores=corpus))


def test_select_refuses_a_scores_folder_whose_tokenized_input_is_gone(scored, corpus, tmp_path):
    folder = _copy(scored, tmp_path / "moved")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"][0]["path"] = str(tmp_path / "nowhere")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="tokenized input .*nowhere.* cannot be read"):
        run_select(SelectConfig(scores=folder))


def test_one_nan_written_into_rel_of_scores_with_every_signal_is_named_not_blamed_on_signals_needed(
    tmp_path, tokenizer_dir, capsys
):
    """Before: 'these scores were made with --signals needed ...' although every signal was stored."""
    import pyarrow as pa

    from pipeline.cli import main
    from pipeline.runtime.files import write_manifest, write_parquet_atomic
    from pipeline.runtime.fingerprint import sha256_json
    from tests.score_factories import write_synthetic_scores, write_synthetic_tokenized

    tokenized = write_synthetic_tokenized(tmp_path / "tokenized", tokenizer_dir, samples=6, mean_tokens=20)
    scores = write_synthetic_scores(tmp_path / "scores", tokenized)
    shard = scores / "part-00000.parquet"
    rows = pq.read_table(shard).to_pylist()
    position = next(i for i, value in enumerate(rows[2]["rel"]) if value == value) + 1  # a target after the first
    rows[2]["rel"][position] = float("nan")
    manifest = read_manifest(scores)
    manifest["shards"][0]["sha256"] = write_parquet_atomic(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
    manifest["data_fingerprint"] = sha256_json([[e["file"], e["sha256"]] for e in manifest["shards"]])
    write_manifest(scores, manifest)  # re-sealed: the checksums hold, the value does not
    assert main(["select", "--scores", str(scores), "--output", str(tmp_path / "masks"), "--method", "sstoken"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sstoken select: error: method sstoken needs REL, but 1 of ")
    assert f"sample {rows[2]['sample_id']!r}: rel is NaN at 1 of " in err and f"(first at position {position})" in err
    assert "so rel was computed: the shard was edited or damaged" in err and "--signals" not in err


def test_select_in_place_on_a_copy_without_progress_records_is_refused_before_anything_is_touched(
    scored, tmp_path, capsys, no_model
):
    """Issue 20 item 3: a scores folder copied as its documented files (shards and manifest.json, no _progress/) used
    to lose its manifest.json to `select` in place, which then refused. Now: refused, the folder exactly as it was."""
    copied = tmp_path / "copied"
    copied.mkdir()
    for path in scored.iterdir():
        if path.name.endswith(".parquet") or path.name == "manifest.json":
            shutil.copy2(path, copied / path.name)
    before = {p.name: sha256_file(p) for p in copied.iterdir()}
    with no_model():
        assert main(["select", "--scores", str(copied), "--method", "random", "--ratio", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "part-00000.parquet has no progress record" in err and "--output" in err and len(err.splitlines()) == 1
    assert {p.name: sha256_file(p) for p in copied.iterdir()} == before  # not even a lock file
    with no_model():
        assert main(["select", "--scores", str(copied), "--method", "random", "--ratio", "0.3",
                     "--output", str(tmp_path / "masks")]) == 0  # selecting apart only reads the shards
    assert {p.name: sha256_file(p) for p in copied.iterdir()} == before


def _label_every_third_target(corpus: Path, path: Path, skip: str | None = None, short: str | None = None) -> Path:
    """A token labels file flagging every third target of each sample (`skip`: leave that sample out; `short`: give
    it one flag too few)."""
    from pipeline.selection.token_labels import write_token_labels

    ids, drops = [], []
    for part in sorted(corpus.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["sample_id", "trainable"])
        for sample_id, trainable in zip(table.column("sample_id").to_pylist(), table.column("trainable").to_pylist()):
            drop = np.zeros(len(trainable), bool)
            drop[np.flatnonzero(trainable)[::3]] = True
            if sample_id != skip:
                ids.append(sample_id)
                drops.append(drop[:-1] if sample_id == short else drop)
    write_token_labels(path, ids, drops)
    return path


def test_the_oracle_drops_the_labelled_tokens_and_equals_scoring_with_it(
    ray_local, scored, corpus, cache, llama_dir, llama_history_dir, tmp_path, no_model
):
    labels = _label_every_third_target(corpus, tmp_path / "labels.parquet")
    folder = _copy(scored, tmp_path / "oracle")
    run_select(SelectConfig(scores=folder, method="oracle", labels=labels, ratio=0.5, seed=2))
    flagged = {}
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["sample_id", "keep", "n_trainable", "n_kept"])
        for sample_id, keep, n, kept in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            flagged[sample_id] = keep
            assert kept == int(np.ceil(0.5 * n - 1e-9))
    from pipeline.selection.token_labels import read_token_labels

    drops = read_token_labels(labels)
    # a third of the targets flagged, half dropped: no flagged token is kept
    assert all(not (np.asarray(flagged[i]) & drops[i]).any() for i in flagged)
    assert read_manifest(folder, kind="scores")["selection"]["labels"] == sha256_file(labels)
    fresh = _score(corpus, tmp_path / "fresh", llama_dir, llama_history_dir, cache, method="oracle", labels=labels,
                   ratio=0.5, seed=2)
    assert _digests(folder) == _digests(fresh.output)


@pytest.mark.parametrize("case, message", [
    ("skip", "has no row in the token labels"),
    ("short", "do not line up with its tokens"),
    ("missing", "does not exist; the oracle selection needs a token labels file"),
])
def test_oracle_labels_that_do_not_fit_the_corpus_are_refused_by_sample(scored, corpus, tmp_path, no_model, case, message):
    first = pq.read_table(next(iter(sorted(corpus.glob("part-*.parquet")))), columns=["sample_id"]).column(0)[0].as_py()
    labels = tmp_path / "labels.parquet"
    if case != "missing":
        _label_every_third_target(corpus, labels, **{case: first})
    folder = _copy(scored, tmp_path / "oracle")
    with pytest.raises(UserError, match=message):
        run_select(SelectConfig(scores=folder, method="oracle", labels=labels, output=tmp_path / "masks"))
