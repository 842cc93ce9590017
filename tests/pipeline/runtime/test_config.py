from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from pydantic import Field

from pipeline.data.prepare_config import PrepareConfig
from pipeline.runtime.config import (
    SectionedConfig,
    StageConfig,
    add_config_arguments,
    config_from_arguments,
    load_config,
    setting,
)
from pipeline.runtime.errors import UserError
from pipeline.scoring.score_config import ScoreJobConfig


class ExampleConfig(StageConfig):
    data: Path = Field(description="Input folder.")
    ratio: float = Field(0.6, description="Kept fraction (60% by default).")
    mode: Literal["sample", "global"] = Field("sample", description="Granularity.")
    files: list[Path] = Field(default_factory=list, description="Some files.")
    flag: bool = Field(False, description="A switch.")


def parse(argv, config_class=ExampleConfig):
    """The config a command line built from `config_class` gives for `argv`."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config_class)
    return config_from_arguments(config_class, parser.parse_args(argv))


def test_flags_override_yaml(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data: /a\nratio: 0.3\nmode: global\n")
    config = parse(["--config", str(config_file), "--ratio", "0.9", "--files", "x", "y", "--flag"])
    assert config == ExampleConfig(data=Path("/a"), ratio=0.9, mode="global", files=[Path("x"), Path("y")], flag=True)
    assert config.resolved()["data"] == "/a"


def test_help_text_comes_from_the_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleConfig)
    assert "Kept fraction (60% by default). (default: 0.6)" in parser.format_help()


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(ExampleConfig, tmp_path / "nope.yaml")


class KeyedConfig(StageConfig):
    depth: int = setting(3, description="Part of the run key.")
    where: Path = setting(Path("/out"), description="Not part of it.", run_key=False)
    limit: int | None = setting(10, description="Optional.")


def test_run_key_is_declared_on_the_fields():
    assert KeyedConfig.run_key_fields() == ["depth", "limit"]
    assert KeyedConfig(where=Path("/elsewhere")).run_key_settings() == {"depth": 3, "limit": 10}


def test_stage_run_keys_leave_out_paths_and_placement():
    assert PrepareConfig.run_key_fields() == [
        "tokenizer", "max_length", "on_overflow", "rows_per_shard", "max_row_bytes", "add_bos", "chat_template",
        "trust_remote_code",
    ]
    placement = {"data", "current", "history", "output", "history_cache", "ray", "workers", "cpus_per_worker",
                 "gpus_per_worker", "progress", "device", "threads", "trust_remote_code"}
    assert not placement & set(ScoreJobConfig.run_key_fields())
    assert {"layer", "excess", "dtype", "max_batch_tokens"} <= set(ScoreJobConfig.run_key_fields())


def test_help_shows_the_default_of_a_default_factory():
    class FactoryConfig(StageConfig):
        files: list[Path] = Field(default_factory=lambda: [Path("a.jsonl"), Path("b.jsonl")], description="Files.")

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, FactoryConfig)
    text = parser.format_help()
    assert "PydanticUndefined" not in text and "(default: a.jsonl b.jsonl)" in text


def test_none_unsets_an_optional_setting_from_a_flag():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, KeyedConfig)
    assert config_from_arguments(KeyedConfig, parser.parse_args(["--limit", "none"])).limit is None
    assert config_from_arguments(KeyedConfig, parser.parse_args(["--limit", "None"])).limit is None
    assert config_from_arguments(KeyedConfig, parser.parse_args(["--limit", "7"])).limit == 7
    assert "Give none to unset." in parser.format_help()
    with pytest.raises(UserError, match="depth: Input should be a valid integer"):
        config_from_arguments(KeyedConfig, parser.parse_args(["--depth", "none"]))


def test_prepare_max_length_none_means_no_limit(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PrepareConfig)
    argv = ["--input", "x.jsonl", "--tokenizer", "tok", "--output", str(tmp_path), "--max-length", "none"]
    assert config_from_arguments(PrepareConfig, parser.parse_args(argv)).max_length is None


class TwoStageConfig(SectionedConfig):
    """A run of two stages; `first.where` is derived from the run's own `root`."""

    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {"first": {"depth": 5}}
    derived_fields: ClassVar[dict[str, tuple[str, ...]]] = {"first": ("where",)}

    root: Path = Field(Path("/run"), description="Run folder.")
    first: KeyedConfig = Field(default_factory=KeyedConfig, description="First stage.")
    second: ExampleConfig = Field(description="Second stage.")

    @classmethod
    def derived_settings(cls, top: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {"first": {"where": Path(top["root"]) / "first"}}


def test_sections_are_the_stage_configs_filled_from_yaml_and_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("root: /r\nfirst:\n  limit: 4\nsecond:\n  data: /d\n  ratio: 0.2\n")
    config = parse(["--config", str(config_file), "--second.ratio", "0.3", "--first.limit", "none"], TwoStageConfig)
    assert config.first == KeyedConfig(depth=5, where=Path("/r/first"), limit=None)
    assert config.second == ExampleConfig(data=Path("/d"), ratio=0.3)
    # The section defaults and the derived settings need no YAML at all.
    assert parse(["--second.data", "/d"], TwoStageConfig).first == KeyedConfig(depth=5, where=Path("/run/first"))


def test_section_help_shows_section_defaults_and_hides_derived_settings():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TwoStageConfig)
    text = parser.format_help()
    assert "--first.depth" in text and "(default: 5)" in text and "--second.ratio" in text
    assert "--first.where" not in text


@pytest.mark.parametrize(
    "config_class, yaml_text, message",
    [
        (ExampleConfig, "data: /a\nratio: lots\n", "ratio: Input should be a valid number"),
        (ExampleConfig, "data: /a\nbogus: 1\n", "bogus: Extra inputs are not permitted"),
        (ExampleConfig, "- just\n- a list\n", "must hold a mapping"),
        (ExampleConfig, "data: [unclosed\n", "is not valid YAML"),
        (ExampleConfig, "ratio: 0.5\n", "data: Field required"),
        (TwoStageConfig, "second:\n  data: /d\n  bogus: 1\n", "second.bogus: Extra inputs are not permitted"),
        (TwoStageConfig, "third:\n  data: /d\nsecond:\n  data: /d\n", "third: Extra inputs are not permitted"),
        (TwoStageConfig, "second:\n  data: /d\nfirst:\n  where: /x\n", "first.where cannot be set"),
        (TwoStageConfig, "second: 3\n", "second: Input should be a valid dictionary"),
        (TwoStageConfig, "first:\n  limit: 3\n", "second.data: Field required"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, config_class, yaml_text, message):
    """Unknown keys and sections, bad values, missing settings: each named, with its section."""
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml_text)
    with pytest.raises(UserError, match=message):
        load_config(config_class, config_file)
