"""Every command that writes somewhere: an output path under a regular file, or that is one, is one line, exit 2.

The operating system says NotADirectoryError (a part of the path is a file) or FileExistsError (the
folder to create is a file); either is the user's to fix, as a full disk or a read-only folder is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.factories import write_keep_masks, write_tokenized
from tests.score_factories import write_synthetic_run

# command -> its arguments up to the output flag; {x} are the module's inputs.
COMMANDS = {
    "prepare": ["prepare", "--input", "{corpus}", "--tokenizer", "{tokenizer}", "--output"],
    "score": ["score", "--data", "{tokenized}", "--current", "{model}", "--ray.runner", "process", "--output"],
    "select": ["select", "--scores", "{scores}", "--output"],
    "train": ["train", "--data", "{tokenized}", "--masks", "{scores}", "--model", "{model}", "--ray.runner", "process",
              "--batch-size", "2", "--micro-batch-size", "2", "--output"],
    "run": ["run", "--corpus", "{corpus}", "--model", "{model}", "--output"],
    "demo": ["demo", "--corpus", "{corpus}", "--model", "{model}", "--output"],
    "eval": ["eval", "--model", "{model}", "--output"],
    "export": ["export", "--data", "{tokenized}", "--masks", "{scores}", "--format", "jsonl", "--output"],
    "report": ["report", "{run}", "--output"],
    "models fetch": ["models", "fetch", "smollm2-135m", "--cache-dir"],
}
# Commands whose output is a folder (report writes one file: a file there is its own case, --overwrite).
FOLDER_OUTPUTS = [name for name in COMMANDS if name != "report"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer, tokenizer_dir, llama_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inputs")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n" for i in range(4)))
    tokenized = write_tokenized(root / "tokenized", tokenizer, [4])
    scores = write_keep_masks(root / "scores", tokenized)
    run = write_synthetic_run(root / "run", tokenizer_dir, samples=4)
    paths = {"corpus": corpus, "tokenizer": tokenizer_dir, "model": llama_dir, "tokenized": tokenized, "scores": scores,
             "run": run}
    return {name: str(path) for name, path in paths.items()}


def _argv(command: str, inputs: dict[str, str], output: Path) -> list[str]:
    return [argument.format(**inputs) for argument in COMMANDS[command]] + [str(output)]


def _refused_in_one_line(capsys, command: str, code: int, path: Path) -> None:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"sstoken {command.split()[0]}: error: "), lines
    assert str(path) in lines[0], lines


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_under_a_regular_file_is_one_line_naming_it(command, inputs, tmp_path, capsys, ray_local):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder\n")
    code = main(_argv(command, inputs, blocker / "out"))
    _refused_in_one_line(capsys, command, code, blocker)
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize("command", FOLDER_OUTPUTS)
def test_an_output_folder_that_is_a_regular_file_is_one_line_naming_it(command, inputs, tmp_path, capsys, ray_local):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder\n")
    code = main(_argv(command, inputs, blocker))
    _refused_in_one_line(capsys, command, code, blocker)
    assert blocker.read_text() == "not a folder\n"


def test_a_folder_that_exists_already_stays_a_bug(tmp_path):
    """EEXIST on a folder is our code creating what is there, not a file in the user's way: it keeps its traceback."""
    import errno

    from pipeline.runtime.errors import refusal_from_os_error

    assert refusal_from_os_error(FileExistsError(errno.EEXIST, "File exists", str(tmp_path))) is None
    blocker = tmp_path / "somefile"
    blocker.write_text("")
    refusal = refusal_from_os_error(FileExistsError(errno.EEXIST, "File exists", str(blocker)))
    assert str(refusal) == f"a file stands where a folder must be: {blocker}: choose another path, or move that file away"
