"""The `sstoken` command: subcommands built from stage configs, exit statuses, errors on one line, fast help."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipeline.runtime.files as files
import pipeline.data.prepare_stage as prepare_stage
from pipeline.cli import main
from pipeline.cli.command import run_function, summary_table
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import read_manifest

REPO = Path(__file__).resolve().parents[3]


def write_corpus(path: Path, rows: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n" for i in range(rows)))
    return path


@pytest.fixture
def prepare_args(tmp_path, tokenizer_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 9)
    return ["prepare", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--output", str(tmp_path / "out"),
            "--rows-per-shard", "3"]


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_every_command_runs_a_function_that_exists():
    for path in ["pipeline.data.prepare_stage:run_prepare", "pipeline.scoring.score_stage:run_score_job",
                 "pipeline.selection.select_stage:run_select", "pipeline.training.train_stage:run_train", "pipeline.loop.demo:run_demo"]:
        assert callable(run_function(path))


def test_a_user_error_is_one_line_with_its_exit_status(prepare_args, monkeypatch, capsys):
    def refuse(config):
        raise UserError("corpus X has no valid row\n(the second line of a long message)")

    monkeypatch.setattr(prepare_stage, "run_prepare", refuse)
    assert main(prepare_args) == 2
    assert stderr_lines(capsys) == [
        "sstoken prepare: error: corpus X has no valid row; (the second line of a long message)"
    ]


def test_a_bug_keeps_its_traceback(prepare_args, monkeypatch):
    def bug(config):
        return {}["missing"]

    monkeypatch.setattr(prepare_stage, "run_prepare", bug)
    with pytest.raises(KeyError):  # uncaught: the interpreter prints the traceback and exits 1
        main(prepare_args)
    for error in (ValueError("a bug, not bad input"), RuntimeError("also a bug"), MemoryError()):
        monkeypatch.setattr(prepare_stage, "run_prepare", lambda config, error=error: (_ for _ in ()).throw(error))
        with pytest.raises(type(error)):
            main(prepare_args)


def test_a_bug_exits_1_with_a_traceback_from_the_console_script(tmp_path, tokenizer_dir):
    script = (
        "import sys, pipeline.data.prepare_stage as p\n"
        "p.run_prepare = lambda config: {}['missing']\n"
        "from pipeline.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    corpus = write_corpus(tmp_path / "c.jsonl", 2)
    done = subprocess.run(
        [sys.executable, "-c", script, "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer_dir),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError: 'missing'" in done.stderr


@pytest.mark.parametrize(
    "error, expected",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/out/part-00000.parquet"),
         "permission denied on /data/out/part-00000.parquet: give this user access to it, or choose another path"),
        (OSError(errno.EROFS, "Read-only file system", "/data/out/.part.tmp", None, "/data/out/part-00000.parquet"),
         "read-only file system: cannot write /data/out/part-00000.parquet: choose an output folder on writable storage"),
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/part-00001.parquet"),
         "no space left on device writing /data/out/part-00001.parquet: free space and rerun; finished shards are kept"),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/data/out/manifest.json"),
         "disk quota exceeded writing /data/out/manifest.json: free space or raise the quota and rerun; "
         "finished shards are kept"),
    ],
)
def test_os_refusals_while_writing_are_one_line_naming_the_path(prepare_args, monkeypatch, capsys, error, expected):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(files.os, "replace", refuse)
    assert main(prepare_args) == 2
    assert stderr_lines(capsys) == [f"sstoken prepare: error: {expected}"]


def test_an_os_error_that_is_not_the_users_keeps_its_traceback(prepare_args, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", "/data/out/x")

    monkeypatch.setattr(files.os, "replace", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main(prepare_args)


def test_a_rerun_after_disk_full_resumes_and_keeps_finished_shards(prepare_args, tmp_path, monkeypatch, capsys):
    """pyarrow's own ENOSPC names no file: the line names the output folder instead."""
    write_table = files.pq.write_table
    calls = []

    def full_on_second_shard(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return write_table(table, where, **kwargs)

    monkeypatch.setattr(files.pq, "write_table", full_on_second_shard)
    output = tmp_path / "out"
    assert main(prepare_args) == 2
    assert stderr_lines(capsys) == [
        f"sstoken prepare: error: no space left on device writing a file under {output}: "
        "free space and rerun; finished shards are kept"
    ]
    first = (output / "part-00000.parquet").stat()
    assert not (output / "manifest.json").exists()

    monkeypatch.setattr(files.pq, "write_table", write_table)
    assert main(prepare_args) == 0
    manifest = read_manifest(output)
    assert [s["file"] for s in manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert (output / "part-00000.parquet").stat().st_mtime_ns == first.st_mtime_ns  # kept, not rewritten
    assert sum(pq.read_metadata(output / s["file"]).num_rows for s in manifest["shards"]) == 9


def test_summary_is_printed_as_one_table(prepare_args, capsys):
    assert main(prepare_args) == 0
    out = capsys.readouterr().out
    for row in ("rows read", "rows written", "rows rejected", "shards", "trainable tokens", "seconds"):
        assert row in out


def test_summary_table_rows_come_from_counts_details_and_timings():
    from rich.console import Console

    from pipeline.runtime.stage_output import StageSummary

    summary = StageSummary(
        stage="select", output=Path("/s"), counts={"kept": 1234, "kept_ratio": 0.6},
        timings={"total_s": 2.25}, details={"selection": {"method": "rel", "ratio": 0.5}, "phases": {"a": {"b": 1}}},
    )
    console = Console(width=120, record=True)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "select → /s" in text and "1,234" in text and "0.6" in text
    assert "selection: method" in text and "rel" in text and "seconds: total" in text and "2.2" in text
    assert "phases" not in text


def test_help_and_models_list_import_no_torch_transformers_or_ray(tmp_path):
    commands = [["--help"], ["models", "list", "--cache-dir", str(tmp_path)], *[[c, "--help"] for c in
                ("prepare", "score", "select", "train", "demo", "models", "report", "inspect", "export", "validate")]]
    script = (
        "import sys, contextlib, io\n"
        "from pipeline.cli import main\n"
        f"for argv in {commands!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ray', 'pyarrow') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_help_spells_out_none_and_sections(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out
    assert "--max-length MAX_LENGTH" in text and "Give none to unset." in text and "PydanticUndefined" not in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "--select.ratio" in text and "--train.lr" in text and "--prepare.max-length" in text
    assert "--prepare.output" not in text and "--score.ratio" not in text  # derived: the select: section sets it
    assert "--ray.address" in text and "--train.address" not in text and "--score.ray" not in text  # one ray: section


def test_max_length_none_from_the_command_line(prepare_args, capsys):
    assert main([*prepare_args, "--max-length", "none"]) == 0
    assert read_manifest(Path(prepare_args[prepare_args.index("--output") + 1]))["config"]["max_length"] is None


def test_the_cluster_example_config_is_a_score_config():
    from pipeline.runtime.config import load_config
    from pipeline.scoring.score_config import ScoreJobConfig

    paths = {"data": "/d", "current": "/m", "history": "/h", "output": "/o"}
    config = load_config(ScoreJobConfig, REPO / "jobs" / "configs" / "cluster.example.yaml", paths)
    assert (config.granularity, config.workers, config.gpus_per_worker, config.dtype) == ("global", 8, 1, "auto")
    assert config.gpu_batch_tokens == "auto"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["select", "--scores", "{tmp}/none", "--method", "rel"], "{tmp}/none has no manifest.json"),
        (["select", "--scores", "{tmp}/none", "--output", "{tmp}/masks"], "scores folder {tmp}/none does not exist"),
        (["select", "--scores", "{tmp}/none", "--overwrite"], "overwrite applies to a masks folder (--output)"),
        (["score", "--data", "{tmp}/none", "--current", "{tmp}/m", "--output", "{tmp}/o"],
         "tokenized input folder {tmp}/none does not exist"),
    ],
)
def test_select_and_score_refuse_missing_folders_in_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"sstoken {argv[0]}: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]


@pytest.mark.parametrize(
    "command, required",
    [
        ("score", ["--data", "/d", "--current", "/m", "--output", "/o"]),
        ("train", ["--data", "/d", "--masks", "/k", "--model", "/m", "--output", "/o"]),
    ],
)
def test_single_stage_commands_take_their_ray_section_from_yaml_and_flags(tmp_path, command, required):
    import yaml

    from pipeline.cli import build_parser
    from pipeline.runtime.config import config_from_arguments, load_config
    from pipeline.runtime.ray_settings import RaySettings
    from pipeline.scoring.score_config import ScoreJobConfig
    from pipeline.training.train_config import TrainConfig

    config_class = {"score": ScoreJobConfig, "train": TrainConfig}[command]
    config_file = tmp_path / "stage.yaml"
    config_file.write_text("ray:\n  address: 10.0.0.1:6379\n  object-store-mb: 300\n")
    arguments = build_parser().parse_args(
        [command, *required, "--config", str(config_file), "--ray.address", "10.0.0.2:6379", "--ray.connect-timeout-s", "5"]
    )
    config = config_from_arguments(config_class, arguments)
    assert config.ray == RaySettings(address="10.0.0.2:6379", object_store_mb=300, connect_timeout_s=5)
    # The resolved config (as saved in the manifest) read back as YAML is the same config.
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(config.resolved()))
    assert load_config(config_class, resolved) == config
    # The old top-level spelling is refused with the place the setting has now.
    config_file.write_text("address: 10.0.0.1:6379\n")
    with pytest.raises(UserError, match=r"address is a setting of the ray: section: set ray.address \(--ray.address\)"):
        config_from_arguments(config_class, build_parser().parse_args([command, *required, "--config", str(config_file)]))
