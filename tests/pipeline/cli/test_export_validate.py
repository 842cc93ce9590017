"""`sstoken export` and `sstoken validate` on the command line: the summary, the validation table, exit statuses
(their --help imports no torch: tests/pipeline/cli/test_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cli.validate import EXIT_PROBLEMS_FOUND
from tests.factories import write_keep_masks, write_tokenized


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-export")
    tokenized = write_tokenized(root / "tokenized", tokenizer, [3, 2], seed=1)
    return tokenized, write_keep_masks(root / "masks", tokenized, ratio=0.5, seed=1)


def test_export_then_validate_on_the_command_line(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps the table to the terminal width
    tokenized, masks = inputs
    out = tmp_path / "export"
    assert main(["export", "--data", str(tokenized), "--masks", str(masks), "--format", "parquet", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "export →" in printed and "samples in" in printed and "exported" in printed
    assert main(["validate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "export ·" in printed and "PROBLEM" not in printed and "no problem found" in printed

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["counts"]["labels"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["validate", str(out)]) == EXIT_PROBLEMS_FOUND == 4
    printed = capsys.readouterr().out
    assert "PROBLEM" in printed and "the manifest counts labels" in printed and "1 problem(s) found" in printed


def test_bad_input_is_a_user_error_on_one_line(inputs, tmp_path, capsys):
    tokenized, masks = inputs
    assert main(["validate", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"sstoken validate: error: {tmp_path / 'nope'} is not a folder; pass an " \
        "artifact folder (tokenized, scores, masks, export, train) or a run folder"
    assert main(["export", "--data", str(tokenized), "--masks", str(tokenized), "--format", "hf", "--output",
                 str(tmp_path / "o")]) == 2
    assert "holds a 'tokenized' artifact, not keep masks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--data", str(tokenized), "--masks", str(masks), "--format", "csv", "--output", str(tmp_path)])
    assert "invalid choice: 'csv'" in capsys.readouterr().err
