"""Typed stage configs filled from YAML files and command-line flags.

Every stage has one pydantic model whose fields carry their help text. The CLI builds its flags
from the model, so a YAML file and `--flag value` fill the same object (flags win), and the
resolved config is what gets saved next to the output.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

Config = TypeVar("Config", bound="StageConfig")


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names it."""


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def resolved(self) -> dict[str, Any]:
        """The config as plain JSON-ready data, as saved in manifests."""
        return json.loads(self.model_dump_json())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, tuple)


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[StageConfig]) -> None:
    """Add one flag per config field (plus `--config FILE`); defaults stay unset so YAML can fill them."""
    parser.add_argument("--config", type=Path, help="YAML file with any of the settings below; flags override it.")
    for name, field in config_class.model_fields.items():
        annotation = _strip_optional(field.annotation)
        help_text = field.description or ""
        if field.default is not None and not field.is_required():
            help_text += f" (default: {field.default})"
        # argparse formats help with %-interpolation: a literal "%" in a description must be doubled.
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_list(annotation):
            kwargs["nargs"] = "+"
        elif typing.get_origin(annotation) is Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(annotation)]
        parser.add_argument(_flag(name), **kwargs)


def load_config(
    config_class: type[Config], config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Build a config from an optional YAML file and flag overrides (flags win)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        if not Path(config_file).is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {config_file} is not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of settings")
        values.update({key.replace("-", "_"): value for key, value in loaded.items()})
    values.update(overrides or {})
    try:
        return config_class(**values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"invalid {config_class.__name__} settings: {problems}") from error


def config_from_arguments(config_class: type[Config], arguments: argparse.Namespace) -> Config:
    """The config a parsed command line asks for."""
    overrides = {name: getattr(arguments, name) for name in config_class.model_fields if hasattr(arguments, name)}
    return load_config(config_class, getattr(arguments, "config", None), overrides)
