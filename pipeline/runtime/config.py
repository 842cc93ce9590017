"""Typed stage configs filled from YAML files and command-line flags.

Every stage has one pydantic model whose fields carry their help text. The CLI builds its flags
from the model, so a YAML file and `--flag value` fill the same object (flags win), and the
resolved config is what gets saved next to the output.

Two things are declared on the fields rather than listed elsewhere:
- whether a setting is part of the stage's run key (`setting(..., run_key=False)` for settings
  that say where or how the work runs, not what it computes: a rerun with a new value reuses the
  finished shards);
- its help text and default, which `--help` shows.

A field typed as a StageConfig is a section: a mapping under its name in YAML, `--SECTION.FLAG`
on the command line (`sstoken score --ray.address HOST:PORT`). A `SectionedConfig` composes stages:
its sections are the stage configs themselves, unchanged, filled from one YAML file with a mapping
per section and from flags like `--score.ratio 0.3`.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.runtime.errors import UserError

Config = TypeVar("Config", bound="StageConfig")

# The spelling that sets an optional setting back to "not set" from the command line.
NONE_SPELLING = "none"
_RUN_KEY = "run_key"


def setting(default: Any = PydanticUndefined, *, description: str, run_key: bool = True, **constraints: Any) -> Any:
    """A config field with its help text; `run_key=False` keeps it out of the stage's run key.

    Leave a setting out of the run key when it changes where or how the work runs (output folder,
    threads, device, workers) but not what a finished shard holds, so changing it reuses that shard.
    """
    extra = None if run_key else {_RUN_KEY: False}
    return Field(default, description=description, json_schema_extra=extra, **constraints)


def in_run_key(field: FieldInfo) -> bool:
    """Whether a field is part of its stage's run key (the default, unless declared otherwise)."""
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get(_RUN_KEY) is False)


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def sections(cls) -> dict[str, type[StageConfig]]:
        """Section name -> its config class: the fields typed as a StageConfig."""
        return {
            name: field.annotation
            for name, field in cls.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, StageConfig)
        }

    @model_validator(mode="before")
    @classmethod
    def _section_settings_in_their_section(cls, data: Any) -> Any:
        """A section's setting given at the top level (`address:` for `ray: {address: ...}`) is refused with its place."""
        if isinstance(data, dict):
            for name in set(data) - set(cls.model_fields):
                owners = [s for s, c in cls.sections().items() if name in c.model_fields and name not in cls.filled_fields(s)]
                if owners:
                    places = " or ".join(f"{s}: section: set {s}.{name} (--{s}.{str(name).replace('_', '-')})" for s in owners)
                    raise ValueError(f"{name} is a setting of the {places}")
        return data

    @classmethod
    def filled_fields(cls, section: str) -> tuple[str, ...]:
        """The settings of `section` this config fills itself, which the user cannot set (none here)."""
        return ()

    def resolved(self) -> dict[str, Any]:
        """The config as plain JSON-ready data, as saved in manifests."""
        return json.loads(self.model_dump_json())

    @classmethod
    def run_key_fields(cls) -> list[str]:
        """Names of the settings that are part of the run key, in declaration order."""
        return [name for name, field in cls.model_fields.items() if in_run_key(field)]

    def run_key_settings(self) -> dict[str, Any]:
        """The resolved settings that are part of the run key: a finished shard is reused only if they match."""
        resolved = self.resolved()
        return {name: resolved[name] for name in self.run_key_fields()}


class SectionedConfig(StageConfig):
    """A config whose sections are stage configs (`prepare:`, `score:`, ...), plus top-level fields of its own.

    A field typed as a StageConfig is a section: in YAML a mapping under its name, on the command
    line `--SECTION.FLAG`. `section_defaults` gives a section other defaults than the stage's own;
    `derived_fields` names the section settings this config fills itself from its top-level fields
    (`derived_settings`), which the user cannot set. `shared_sections` names a section of this
    config that is also a section of some stage sections (`ray:`, the one Ray session of a run): it
    is set once here and copied into each of them, and a stage section that sets it, or one of its
    settings, is refused with the place to set it.
    """

    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    derived_fields: ClassVar[dict[str, tuple[str, ...]]] = {}
    shared_sections: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def filled_fields(cls, section: str) -> tuple[str, ...]:
        """The settings of `section` this config fills itself: derived ones and shared sections."""
        shared = tuple(name for name, stages in cls.shared_sections.items() if section in stages)
        return cls.derived_fields.get(section, ()) + shared

    @classmethod
    def derived_settings(cls, top: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Section settings derived from the top-level values (as given, or their defaults); none here."""
        return {}

    @classmethod
    def derived_from_sections(cls, given: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Section settings derived from other sections' given values (section defaults included); none here.

        A run config whose `select:` section also decides the selection fields of its `score:` section
        fills them here, so one setting is stated in one place.
        """
        return {}

    @model_validator(mode="before")
    @classmethod
    def _complete_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        sections = cls.sections()
        top = {
            name: data[name] if name in data else field.get_default(call_default_factory=True)
            for name, field in cls.model_fields.items()
            if name not in sections and (name in data or not field.is_required())
        }
        derived = cls.derived_settings(top)
        given_sections = {
            section: cls.section_defaults.get(section, {}) | _as_mapping(data.get(section, {})) for section in sections
        }
        for section, values in cls.derived_from_sections(given_sections).items():
            derived[section] = derived.get(section, {}) | values
        for shared, stages in cls.shared_sections.items():
            for stage in stages:
                _refuse_shared_settings(data.get(stage, {}), stage, shared, sections[shared])
                derived[stage] = derived.get(stage, {}) | {shared: given_sections[shared]}
        completed = dict(data)
        for section in sections:
            given = data.get(section, {})
            if not isinstance(given, dict):
                continue  # a complete stage config is used as it is; pydantic refuses anything else by name
            refused = sorted(set(given) & set(cls.derived_fields.get(section, ())))
            if refused:
                names = ", ".join(f"{section}.{name}" for name in refused)
                raise ValueError(f"{names} cannot be set: {cls.__name__} fills it from its own settings")
            completed[section] = cls.section_defaults.get(section, {}) | given | derived.get(section, {})
        return completed


def _refuse_shared_settings(given: Any, stage: str, shared: str, shared_class: type[StageConfig]) -> None:
    """A stage section must not set the shared section (`score: {ray: ...}`) or one of its settings (`score: {address: ...}`)."""
    if not isinstance(given, dict):
        return
    for name in given:
        if name == shared or name in shared_class.model_fields:
            setting = shared if name == shared else f"{shared}.{name}"
            raise ValueError(
                f"{stage}.{name} cannot be set in a stage section: set {setting} in the {shared}: section "
                f"(--{setting.replace('_', '-')}), which every stage uses"
            )


def _as_mapping(section: Any) -> dict[str, Any]:
    """A section's given settings: its mapping, or the fields of a complete stage config passed as it."""
    if isinstance(section, BaseModel):
        return section.model_dump()
    return section if isinstance(section, dict) else {}


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, tuple)


def _is_optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _none_or_value(text: str) -> str | None:
    """Flag values of optional settings: `none` (any case) unsets the setting."""
    return None if text.lower() == NONE_SPELLING else text


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(item) for item in value)
    return str(value)


def _help_text(field: FieldInfo, default: Any = PydanticUndefined) -> str:
    """The field's description, its default (the real one, also from a default factory) and how to unset it."""
    text = field.description or ""
    if default is PydanticUndefined and not field.is_required():
        default = field.get_default(call_default_factory=True)
    if default is not PydanticUndefined and default is not None and default != []:
        text += f" (default: {_plain(default)})"
    if _is_optional(field.annotation) and not _is_list(_strip_optional(field.annotation)):
        text += f" Give {NONE_SPELLING} to unset."
    # argparse formats help with %-interpolation: a literal "%" in a description must be doubled.
    return text.replace("%", "%%")


def _add_field_flag(
    parser: argparse._ActionsContainer, name: str, field: FieldInfo, prefix: str = "", default: Any = PydanticUndefined
) -> None:
    """One flag for one field; its value stays unset unless given, so YAML can fill it."""
    annotation = _strip_optional(field.annotation)
    optional = _is_optional(field.annotation)
    kwargs: dict[str, Any] = {"dest": prefix + name, "default": argparse.SUPPRESS, "help": _help_text(field, default)}
    if annotation is not bool:
        kwargs["metavar"] = name.upper()
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif _is_list(annotation):
        kwargs["nargs"] = "+"
    else:
        if optional:
            kwargs["type"] = _none_or_value
        if typing.get_origin(annotation) is Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(annotation)] + ([None] if optional else [])
            kwargs["metavar"] = "{" + ",".join(str(c) for c in typing.get_args(annotation)) + "}"
    parser.add_argument("--" + prefix + name.replace("_", "-"), **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[StageConfig]) -> None:
    """Add one flag per config field (plus `--config FILE`); a section's fields become `--SECTION.FLAG`."""
    parser.add_argument("--config", type=Path, help="YAML file with any of the settings below; flags override it.")
    sections = config_class.sections()
    for name, field in config_class.model_fields.items():
        if name not in sections:
            _add_field_flag(parser, name, field)
    sectioned = issubclass(config_class, SectionedConfig)
    for section, section_class in sections.items():
        group = parser.add_argument_group(
            f"{section} section", f"Settings of {section_class.__name__}: `{section}:` in the YAML file, or --{section}.FLAG."
        )
        filled = config_class.filled_fields(section)
        defaults = config_class.section_defaults.get(section, {}) if sectioned else {}
        for name, field in section_class.model_fields.items():
            # A section's own sections are filled by the config (shared) or set in YAML only: flags go one level deep.
            if name not in filled and name not in section_class.sections():
                _add_field_flag(group, name, field, prefix=f"{section}.", default=defaults.get(name, PydanticUndefined))


def _read_yaml(config_file: Path) -> dict[str, Any]:
    if not Path(config_file).is_file():
        raise UserError(f"config file {config_file} does not exist")
    try:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {config_file} is not valid YAML: {error}") from error
    if not isinstance(loaded, dict):
        raise UserError(f"config file {config_file} must hold a mapping of settings")
    return loaded


def _python_names(values: dict[str, Any], sections: set[str]) -> dict[str, Any]:
    """YAML keys may be spelled like flags (max-length); a section's mapping is renamed the same way."""
    renamed = {str(key).replace("-", "_"): value for key, value in values.items()}
    for section in sections & renamed.keys():
        if isinstance(renamed[section], dict):
            renamed[section] = {str(key).replace("-", "_"): value for key, value in renamed[section].items()}
    return renamed


def _merge(base: dict[str, Any], overrides: dict[str, Any], sections: set[str]) -> dict[str, Any]:
    """Overrides win; a section's settings are merged one by one, not replaced as a whole."""
    merged = dict(base)
    for key, value in overrides.items():
        if key in sections and isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = merged[key] | value
        else:
            merged[key] = value
    return merged


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors())


def load_config(
    config_class: type[Config], config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Build a config from an optional YAML file and flag overrides (flags win, setting by setting)."""
    sections = set(config_class.sections())
    values = _python_names(_read_yaml(config_file), sections) if config_file is not None else {}
    values = _merge(values, overrides or {}, sections)
    try:
        return config_class(**values)
    except ValidationError as error:
        raise UserError(f"invalid {config_class.__name__} settings: {_problems(error)}") from error


def config_from_arguments(config_class: type[Config], arguments: argparse.Namespace) -> Config:
    """The config a parsed command line asks for."""
    given = vars(arguments)
    overrides: dict[str, Any] = {name: given[name] for name in config_class.model_fields if name in given}
    for section in config_class.sections():
        prefix = section + "."
        flags = {dest[len(prefix):]: value for dest, value in given.items() if dest.startswith(prefix)}
        if flags:
            overrides[section] = flags
    return load_config(config_class, getattr(arguments, "config", None), overrides)
