import os
import shutil

import pytest
import torch

from pipeline.runtime.checkpoints import checkpoint_fingerprint, load_model, load_tokenizer
from pipeline.runtime.errors import UserError


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        load_model(tmp_path / "nowhere")


def test_folder_without_safetensors_is_refused(tmp_path, llama_dir):
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path, llama_dir):
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle weights \\(pytorch_model.bin\\)"):
        load_model(tmp_path)
    with pytest.raises(UserError):
        checkpoint_fingerprint(tmp_path)


def test_load_model_and_tokenizer(llama_dir):
    model = load_model(llama_dir, torch.bfloat16, "cpu")
    assert not model.training and model.dtype == torch.bfloat16
    assert load_tokenizer(llama_dir).eos_token == "<|im_end|>"


def test_fingerprint_follows_content(tmp_path, llama_dir, llama_history_dir):
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(llama_dir)
    assert checkpoint_fingerprint(llama_history_dir) != checkpoint_fingerprint(llama_dir)
    # Same size, new bytes and a new mtime: the in-memory cache must not return the old digest.
    config = copy / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"llama"', '"LLAMA"'))
    os.utime(config, ns=(1, 1))
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(llama_dir)
