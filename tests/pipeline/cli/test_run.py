"""`sstoken run CONFIG`: the command line of the loop (the loop itself: tests/pipeline/loop/)."""

from __future__ import annotations

import pytest

from pipeline.cli import build_parser, main
from pipeline.loop.run_config import RunConfig
from pipeline.runtime.config import config_from_arguments


def test_config_as_positional_or_flag_and_flags_win(tmp_path, llama_dir):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {llama_dir}\ncorpus: [{tmp_path}]\nslices: 4\nselect:\n  ratio: 0.5\n")
    positional = config_from_arguments(RunConfig, build_parser().parse_args(["run", str(config_file), "--slices", "3"]))
    flag = config_from_arguments(RunConfig, build_parser().parse_args(["run", "--config", str(config_file), "--slices", "3"]))
    assert positional == flag and (positional.slices, positional.select.ratio) == (3, 0.5)


def test_help_lists_the_loop_settings_and_hides_what_the_run_fills_in(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--round-unit", "--slices", "--history", "--ema-alpha", "--warmup", "--reference-corpus",
                 "--select.method", "--train.lr", "--score.max-batch-tokens", "CONFIG"):
        assert flag in text
    for derived in ("--score.method", "--score.excess", "--train.output", "--train.schedule-start-step", "--prepare.input"):
        assert derived not in text


@pytest.mark.parametrize(
    "content, message",
    [
        ("history: median\n", "history"),
        ("select:\n  method: rho1\n", "rho1 needs a reference model"),
        ("history: ema\nema_alpha: 1.5\n", "ema_alpha"),
        ("rounds: 3\n", "rounds"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, llama_dir, capsys, content, message):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {llama_dir}\ncorpus: [{tmp_path}]\n" + content)
    assert main(["run", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sstoken run: error:") and message in err and len(err.strip().splitlines()) == 1


def test_a_missing_config_file_is_named(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
