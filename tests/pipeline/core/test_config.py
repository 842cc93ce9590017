from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from pipeline.core.config import ConfigError, StageConfig, add_config_arguments, config_from_arguments, load_config


class ExampleConfig(StageConfig):
    data: Path = Field(description="Input folder.")
    ratio: float = Field(0.6, description="Kept fraction (60% by default).")
    mode: Literal["sample", "global"] = Field("sample", description="Granularity.")
    files: list[Path] = Field(default_factory=list, description="Some files.")
    flag: bool = Field(False, description="A switch.")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleConfig)
    return config_from_arguments(ExampleConfig, parser.parse_args(argv))


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


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("data: /a\nratio: lots\n", "ratio: Input should be a valid number"),
        ("data: /a\nbogus: 1\n", "bogus: Extra inputs are not permitted"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("data: [unclosed\n", "is not valid YAML"),
        ("ratio: 0.5\n", "data: Field required"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, yaml_text, message):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(ExampleConfig, config_file)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ExampleConfig, tmp_path / "nope.yaml")
