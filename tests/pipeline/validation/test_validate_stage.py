"""`sstoken validate`: real artifacts pass every check; each corruption, made in turn, is caught and named."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runtime.files import ArtifactError, write_parquet
from pipeline.runtime.fingerprint import sha256_file
from pipeline.runtime.stage_output import StageSummary
from pipeline.selection.select_config import SelectConfig
from pipeline.selection.select_stage import run_select
from pipeline.training.export_stage import ExportConfig, run_export
from pipeline.validation.validate_stage import ValidateConfig, run_validate
from tests.factories import write_keep_masks, write_tokenized


@pytest.fixture(scope="module")
def artifacts(scored_corpus, tmp_path_factory) -> Path:
    """A folder of real artifacts: tokenized/, scores/ and the history cache (the session's scored corpus,
    copied, its manifests naming the copies), masks/ and export/ made from them here."""
    root = tmp_path_factory.mktemp("artifacts")
    shared = scored_corpus.data.parent
    assert (scored_corpus.data, scored_corpus.scores, scored_corpus.cache) == (
        shared / "tokenized", shared / "scores", shared / "cache")
    shutil.copytree(scored_corpus.data, root / "tokenized")
    scored_corpus.copy_scores(root / "scores")
    shutil.copytree(scored_corpus.cache, root / "cache")
    _repoint(root, shared)
    run_select(SelectConfig(scores=root / "scores", output=root / "masks", method="random", ratio=0.3))
    run_export(ExportConfig(data=root / "tokenized", masks=root / "masks", format="jsonl", output=root / "export"))
    return root


def _validate(folder: Path) -> StageSummary:
    return run_validate(ValidateConfig(folder=folder))


def _problems(summary: StageSummary) -> list[str]:
    return [f"{c['check']}: {p}" for f in summary.details["folders"] for c in f["checks"] for p in c["problems"]]


def test_real_artifacts_pass_every_check(artifacts):
    summary = _validate(artifacts)
    kinds = sorted(f["kind"] for f in summary.details["folders"])
    assert kinds == ["export", "history_nll", "masks", "scores", "tokenized"]
    assert _problems(summary) == [] and summary.counts["problems"] == 0
    checks = {c["check"] for f in summary.details["folders"] for c in f["checks"]}
    assert {"manifest", "files", "fingerprint", "schema", "counts", "unique ids", "join", "alignment", "labels"} <= checks
    scores = next(f for f in summary.details["folders"] if f["kind"] == "scores")
    assert "keep only where trainable, NaN exactly off the targets" in next(c["detail"] for c in scores["checks"] if c["check"] == "alignment")


# -- corruptions: each makes a copy of the artifacts, breaks one property, and expects its message ------


def _rewrite(folder: Path, file: str, change: Callable[[list[dict]], list[dict]], schema: pa.Schema | None = None,
             fix_manifest: bool = True) -> None:
    """Rewrite one shard's rows; with fix_manifest the manifest's checksum and rows follow (only the content is wrong)."""
    path = folder / file
    table = pq.read_table(path)
    rows = change(table.to_pylist())
    write_parquet(pa.Table.from_pylist(rows, schema=schema or table.schema), path)
    if fix_manifest:
        manifest = json.loads((folder / "manifest.json").read_text())
        for entry in manifest["shards"]:
            if entry["file"] == file:
                entry["sha256"], entry["rows"] = sha256_file(path), len(rows)
        manifest["data_fingerprint"] = _key(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))


def _key(manifest: dict) -> str:
    from pipeline.training.training_data import shards_key

    return shards_key(manifest)


def _edit_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(folder: Path) -> None:
    path = folder / "part-00000.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _first_row(change: Callable[[dict], None]) -> Callable[[list[dict]], list[dict]]:
    def apply(rows: list[dict]) -> list[dict]:
        change(rows[0])
        return rows
    return apply


def _keep_where(predicate: str) -> Callable[[dict], None]:
    """Set keep true at position 0, or at the first context token after it (not trainable)."""
    def change(row: dict) -> None:
        position = 0 if predicate == "position 0" else row["score"].index(next(s for s in row["score"][1:] if s != s))
        row["keep"][position] = True
        row["n_kept"] += 1
    return change


def _nan_at_target(row: dict) -> None:
    target = next(i for i, s in enumerate(row["nll_cur"]) if s == s)
    row["nll_cur"][target] = float("nan")


def _number_off_target(row: dict) -> None:
    row["rel"][0] = 0.5


def _shorten(row: dict) -> None:
    row["keep"] = row["keep"][:-1]


def _duplicate(rows: list[dict]) -> list[dict]:
    return rows + [dict(rows[0])]


def _weight_at(where: str, value: float) -> Callable[[list[dict]], list[dict]]:
    """Set the weight of the first row holding a kept token and a dropped target: at a kept token ("kept"), a
    dropped target ("dropped") or the first context token after position 0 ("context")."""
    def apply(rows: list[dict]) -> list[dict]:
        row = next(r for r in rows if any(r["keep"]) and any(s == s and not k for s, k in zip(r["score"], r["keep"])))
        positions = {
            "kept": row["keep"].index(True),
            "dropped": next(i for i, (s, k) in enumerate(zip(row["score"], row["keep"])) if s == s and not k),
            "context": next(i for i, s in enumerate(row["score"]) if i > 0 and s != s),
        }
        row["weight"][positions[where]] = value
        return rows
    return apply


def _masks_weight(where: str, value: float) -> Callable[[Path], None]:
    return lambda f: _rewrite(f, "part-00000.parquet", _weight_at(where, value))


CORRUPTIONS = {
    "flipped byte": ("scores", lambda f: _flip_byte(f), "does not match the checksum"),
    "row count in manifest": ("tokenized", lambda f: _edit_manifest(f, lambda m: m["shards"][0].update(rows=99)),
                              "says part-00000.parquet has 99 rows, the file has 4"),
    "counts in manifest": ("scores", lambda f: _edit_manifest(f, lambda m: m["counts"].update(kept=1)),
                           "counts: the manifest counts kept = 1"),
    "data fingerprint": ("masks", lambda f: _edit_manifest(f, lambda m: m.update(data_fingerprint="0" * 64)),
                         "fingerprint: data_fingerprint 000000000000 is not the digest of the listed shards"),
    "length mismatch": ("masks", lambda f: _rewrite(f, "part-00000.parquet", _first_row(_shorten)),
                        "masks of another length than their tokens"),
    "keep at position 0": ("masks", lambda f: _rewrite(f, "part-00000.parquet", _first_row(_keep_where("position 0"))),
                           "position 0: 'keep' is true at position 0"),
    "keep off trainable": ("scores", lambda f: _rewrite(f, "part-00001.parquet", _first_row(_keep_where("context"))),
                           "keep off the targets: keep is true where trainable is false in 1 sample of part-00001.parquet"),
    "NaN on a target": ("scores", lambda f: _rewrite(f, "part-00000.parquet", _first_row(_nan_at_target)),
                        "NaN at targets: 'nll_cur' is NaN at 1 targets"),
    "number off target": ("scores", lambda f: _rewrite(f, "part-00000.parquet", _first_row(_number_off_target)),
                          "NaN off targets: 'rel' holds a number off the targets"),
    "duplicated sample": ("tokenized", lambda f: _rewrite(f, "part-00001.parquet", _duplicate),
                          "holds sample id 's01-0000' twice"),
    "masks of other data": ("masks", lambda f: _edit_manifest(
        f, lambda m: m["inputs"][1].update(data_fingerprint="1" * 64)), "was made from other tokenized data"),
    "wrong tokenizer fingerprint": ("scores", lambda f: _edit_manifest(
        f, lambda m: m["tokenizer"].update(fingerprint="2" * 64)), "was made with another tokenizer"),
    "export label not its token": ("export", lambda f: _corrupt_export_label(f, "other token"),
                                   "labels: a label is neither -100 nor its token"),
    "export label off trainable": ("export", lambda f: _corrupt_export_label(f, "context"),
                                   "labels off the targets: a label where trainable is false"),
    "export labels not its masks": ("export", lambda f: _corrupt_export_label(f, "dropped"), "labels are not the keep masks"),
    "weight NaN": ("masks", _masks_weight("kept", float("nan")),
                   "'weight' not finite: a weight is NaN or infinite in 1 sample of part-00000.parquet"),
    "weight negative": ("masks", _masks_weight("dropped", -1.0), "'weight' negative: a weight is below 0"),
    "weight off trainable": ("masks", _masks_weight("context", 0.5),
                             "'weight' off the targets: a weight is not 0 where trainable is false"),
    "weight where not kept": ("masks", _masks_weight("dropped", 0.5),
                              "'weight' where not kept: a weight is not 0 where keep is false"),
    "weight 0 where kept": ("masks", _masks_weight("kept", 0.0), "'weight' where kept: a weight is not > 0 where keep is true"),
    "export weight 0 at a label": ("export", lambda f: _corrupt_export_weight(f, 0.0),
                                   "'weights' where kept: a weight is not > 0 where keep is true"),
    "export weights not its masks": ("export", lambda f: _corrupt_export_weight(f, 2.0),
                                     "weights are not the weights of"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_caught_and_named(artifacts, tmp_path, name):
    folder_name, corrupt, expected = CORRUPTIONS[name]
    copy = tmp_path / "artifacts"
    shutil.copytree(artifacts, copy, ignore=shutil.ignore_patterns("cache"))
    _repoint(copy, artifacts)
    assert _problems(_validate(copy / folder_name)) == []  # the copy itself is sound
    corrupt(copy / folder_name)
    problems = _problems(_validate(copy / folder_name))
    assert any(expected in problem for problem in problems), problems


def _repoint(copy: Path, original: Path) -> None:
    """The copies' manifests name the copied inputs, so a corruption of one copy is seen by the others."""
    for manifest_path in copy.glob("*/manifest.json"):
        text = manifest_path.read_text().replace(str(original), str(copy))
        manifest_path.write_text(text)


def _corrupt_export_label(folder: Path, how: str) -> None:
    """One label of the first row: another token's id, a label on a context token, or a kept token's label dropped."""
    path = folder / "part-00000.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    row = rows[0]
    if how == "other token":
        position = next(i for i, label in enumerate(row["labels"]) if label != -100)
        row["labels"][position] += 1
    elif how == "context":
        trainable = pq.read_table(folder.parent / "tokenized" / "part-00000.parquet").to_pylist()[0]["trainable"]
        position = trainable.index(False, 1)
        row["labels"][position] = row["input_ids"][position]
        row["n_kept"] += 1
    else:
        position = next(i for i, label in enumerate(row["labels"]) if label != -100)
        row["labels"][position] = -100
        row["n_kept"] -= 1
    _edit_manifest(folder, lambda m: m["counts"].update(labels=m["counts"]["labels"] + (how == "context") - (how == "dropped")))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _edit_manifest(folder, lambda m: m["shards"][0].update(sha256=sha256_file(path)))
    _edit_manifest(folder, lambda m: m.update(data_fingerprint=_key(m)))


def _corrupt_export_weight(folder: Path, value: float) -> None:
    """The weight of the first label of the first row set to `value`, the file resealed."""
    path = folder / "part-00000.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    position = next(i for i, label in enumerate(rows[0]["labels"]) if label != -100)
    rows[0]["weights"][position] = value
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _edit_manifest(folder, lambda m: m["shards"][0].update(sha256=sha256_file(path)))
    _edit_manifest(folder, lambda m: m.update(data_fingerprint=_key(m)))


def test_an_export_whose_masks_changed_since_is_caught(artifacts, tmp_path):
    copy = tmp_path / "artifacts"
    shutil.copytree(artifacts, copy, ignore=shutil.ignore_patterns("cache"))
    _repoint(copy, artifacts)
    # The masks folder the export names now holds other masks of the same data (as a rerun of select would leave).
    shutil.rmtree(copy / "masks")
    write_keep_masks(copy / "masks", copy / "tokenized", ratio=0.9, seed=5, kind="masks")
    problems = _problems(_validate(copy / "export"))
    assert any("no longer holds the data this was made from" in p for p in problems), problems


def test_a_history_cache_with_a_repeated_sample_is_caught(artifacts, tmp_path):
    leaf = next(p.parent for p in (artifacts / "cache").rglob("*.parquet"))
    copy = tmp_path / "history_nll" / "leaf"
    shutil.copytree(leaf, copy)
    assert _problems(_validate(copy)) == []
    _rewrite(copy, "part-00000.parquet", _duplicate, fix_manifest=False)
    assert any("twice" in p for p in _problems(_validate(copy)))


def test_paths_that_hold_no_artifact_are_user_errors(tmp_path):
    with pytest.raises(ArtifactError, match="is not a folder"):
        _validate(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="holds no sstoken artifact"):
        _validate(tmp_path / "empty")


def test_an_unreadable_manifest_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    assert any("is not valid JSON" in p for p in _problems(_validate(tmp_path / "broken")))
    (tmp_path / "broken" / "manifest.json").write_text(json.dumps({"kind": "scores"}))
    assert any("manifest.v1.schema.json" in p for p in _problems(_validate(tmp_path / "broken")))


@pytest.mark.parametrize("case, field", [
    ("inputs path", "at inputs/0/path: 5 is not of type 'string'"),
    ("rejected file", "at rejected/file: 5 is not of type 'string'"),
    ("deeply nested", "is nested too deeply to be a manifest"),
])
def test_a_manifest_of_wrong_types_or_depth_is_one_problem_line_exit_4(tokenizer, tmp_path, capsys, case, field):
    """Before: a TypeError (Path(5), folder / 5) or a RecursionError traceback."""
    from pipeline.cli import main

    tokenized = write_tokenized(tmp_path / "tokenized", tokenizer, [2], seed=1)
    folder = write_keep_masks(tmp_path / "scores", tokenized)
    if case == "inputs path":
        _edit_manifest(folder, lambda m: m["inputs"][0].update(path=5))
    elif case == "rejected file":
        folder = tokenized
        _edit_manifest(folder, lambda m: m.update(rejected={"file": 5, "rows": 0, "sha256": "0" * 64}))
    else:
        (folder / "manifest.json").write_text('{"config": ' * 50_000 + "{}" + "}" * 50_000)
    assert main(["validate", str(folder)]) == 4
    (problem,) = _problems(_validate(folder))
    assert problem.startswith(f"manifest: {folder / 'manifest.json'} ") and field in problem


def test_a_binary_config_file_is_one_line_naming_it(tmp_path, capsys):
    from pipeline.cli import main

    config = tmp_path / "settings.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert main(["validate", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sstoken validate: error: config file {config} is not text (UTF-8): byte 0 cannot be decoded; pass a YAML file"
    config.write_text("folder: " + "[" * 5000 + "]" * 5000)
    assert main(["validate", "--config", str(config)]) == 2
    assert f"config file {config} is nested too deeply to read" in capsys.readouterr().err


def test_a_train_output_whose_checkpoint_changed_is_caught(artifacts, llama_dir, tmp_path):
    """A folder shaped as `sstoken train` leaves it (the manifest fields validate reads, a checkpoint/ folder)."""
    from pipeline.runtime.checkpoints import checkpoint_fingerprint
    from pipeline.runtime.files import base_manifest, write_manifest
    from pipeline.training.training_data import open_training_data

    output = tmp_path / "train"
    shutil.copytree(llama_dir, output / "checkpoint")
    source = open_training_data(artifacts / "tokenized", artifacts / "masks")
    write_manifest(output, base_manifest("train", {}) | {
        "inputs": [{"kind": "tokenized", "path": str(artifacts / "tokenized"), "data_fingerprint": source.data_key},
                   {"kind": "masks", "path": str(artifacts / "masks"), "data_fingerprint": source.masks_key}],
        "checkpoints": {"final": {"path": str(output / "checkpoint"), "fingerprint": checkpoint_fingerprint(output / "checkpoint")}},
        "shards": [], "counts": {"samples": 1},
    })
    assert _problems(_validate(output)) == []
    weights = next((output / "checkpoint").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    assert any("is not the checkpoint the manifest names" in p for p in _problems(_validate(output)))


def test_an_hf_export_whose_datasets_state_is_gone_is_caught(artifacts, tmp_path):
    out = tmp_path / "hf"
    run_export(ExportConfig(data=artifacts / "tokenized", masks=artifacts / "masks", format="hf", output=out))
    assert _problems(_validate(out)) == []
    (out / "state.json").unlink()
    assert any("state.json is missing or not a datasets state file" in p for p in _problems(_validate(out)))


def test_a_prepared_corpus_with_rejected_rows_passes_and_its_rejected_count_is_checked(tokenizer_dir, tmp_path):
    from pipeline.data.prepare_stage import PrepareConfig, run_prepare

    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(5)] + [{"prompt": "no answer"}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{broken\n")
    run_prepare(PrepareConfig(input=[corpus], tokenizer=str(tokenizer_dir), output=tmp_path / "tokenized", rows_per_shard=2))
    summary = _validate(tmp_path / "tokenized")
    assert _problems(summary) == []
    assert any(c["check"] == "rejected" and c["ok"] for c in summary.details["folders"][0]["checks"])
    _edit_manifest(tmp_path / "tokenized", lambda m: m["counts"].update(rows_rejected=1))
    problems = _problems(_validate(tmp_path / "tokenized"))
    assert any("the manifest counts rows_rejected = 1, rejected.parquet holds 2" in p for p in problems), problems
    assert any("rows_read = 7 is not rows_written + rows_rejected = 6" in p for p in problems), problems
