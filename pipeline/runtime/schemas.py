"""Load the versioned artifact schemas in `schemas/` and check tables and manifests against them."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa

from pipeline.runtime.errors import UserError

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"

_SCALARS = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}


class SchemaError(UserError):
    """Data that does not match its schema file; the message names the source and the field."""


def _arrow_type(name: str) -> pa.DataType:
    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(_arrow_type(name[5:-1]))
    if name not in _SCALARS:
        raise SchemaError(f"unknown type '{name}' in a schema file")
    return _SCALARS[name]


@cache
def _definition(name: str, version: int) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.v{version}.json").read_text())


@cache
def arrow_schema(name: str, version: int = 1) -> pa.Schema:
    """The Arrow schema defined by `schemas/{name}.v{version}.json` (every field, optional ones included: what is written)."""
    definition = _definition(name, version)
    return pa.schema(
        [pa.field(f["name"], _arrow_type(f["type"]), nullable=f.get("nullable", True)) for f in definition["fields"]],
        metadata={"sstoken_schema": f"{name}.v{version}"},
    )


@cache
def optional_fields(name: str, version: int = 1) -> frozenset[str]:
    """Fields marked `"optional": true`: added after folders were written without them; a reader fills them
    (e.g. masks' `weight` from `keep`), and a table may lack them."""
    return frozenset(f["name"] for f in _definition(name, version)["fields"] if f.get("optional", False))


MANIFEST_SCHEMA = "manifest.v1.schema.json"


@cache
def _validator(schema_file: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / schema_file).read_text())
    return jsonschema.Draft202012Validator(schema)


def validate_json(value: Any, schema_file: str, source: str) -> None:
    """Check a JSON value against `schemas/<schema_file>` (a JSON Schema); one SchemaError naming the source and
    the first field that does not match."""
    errors = sorted(_validator(schema_file).iter_errors(value), key=lambda e: [str(p) for p in e.path])
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "(top level)"
        raise SchemaError(f"{source} does not match {schema_file} at {where}: {_short(errors[0].message)}")


def _short(message: str, limit: int = 200) -> str:
    """A validator's message quotes the offending value whole: a long one is cut, so the error stays one line."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def validate_manifest(manifest: dict[str, Any], source: str = "manifest") -> None:
    validate_json(manifest, MANIFEST_SCHEMA, source)


def table_from_rows(rows: list[dict[str, Any]], name: str) -> pa.Table:
    """Build a table with exactly the schema's columns and types (an optional column only when some row has it)."""
    schema = arrow_schema(name)
    absent = [f for f in optional_fields(name) if rows and not any(f in row for row in rows)]
    for field in absent:
        schema = schema.remove(schema.get_field_index(field))
    return pa.Table.from_pylist(rows, schema=schema)


def validate_table(table: pa.Table, name: str, source: str = "table") -> None:
    """Every schema column must be present with its type (an optional one may be absent), and non-nullable
    columns free of nulls."""
    expected = arrow_schema(name)
    for field in expected:
        if field.name not in table.column_names and field.name in optional_fields(name):
            continue
        if field.name not in table.column_names:
            raise SchemaError(f"{source}: column '{field.name}' required by {name}.v1 is missing")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(f"{source}: column '{field.name}' is {actual}, {name}.v1 requires {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{source}: column '{field.name}' has nulls, which {name}.v1 forbids")
