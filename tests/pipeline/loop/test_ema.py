"""The EMA history: literal tensors averaged file by file, one tensor at a time, into a loadable folder."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pipeline.loop.ema as ema
from pipeline.loop.ema import ema_checkpoint
from pipeline.runtime.checkpoints import load_model
from pipeline.runtime.errors import UserError


def _folder(path, files: dict[str, dict[str, torch.Tensor]]):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "literal"}))
    (path / "tokenizer.json").write_text("{}")
    for name, tensors in files.items():
        save_file(tensors, str(path / name))
    return path


def _read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_ema_of_literal_tensors_file_by_file(tmp_path):
    history = _folder(tmp_path / "h", {
        "model-00001-of-00002.safetensors": {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n": torch.tensor([7])},
        "model-00002-of-00002.safetensors": {"b": torch.tensor([0.0, 8.0], dtype=torch.bfloat16)},
    })
    current = _folder(tmp_path / "c", {
        "model-00001-of-00002.safetensors": {"a": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "n": torch.tensor([9])},
        "model-00002-of-00002.safetensors": {"b": torch.tensor([4.0, 0.0], dtype=torch.bfloat16)},
    })
    out = ema_checkpoint(history, current, alpha=0.75, output=tmp_path / "ema")
    first, second = _read(out / "model-00001-of-00002.safetensors"), _read(out / "model-00002-of-00002.safetensors")
    assert torch.equal(first["a"], torch.tensor([[2.0, 3.0], [4.0, 5.0]]))  # 0.75 * h + 0.25 * c
    assert torch.equal(first["n"], torch.tensor([9]))  # integer tensors: the current checkpoint's
    assert second["b"].dtype == torch.bfloat16 and torch.equal(second["b"], torch.tensor([1.0, 6.0], dtype=torch.bfloat16))
    assert (out / "config.json").read_text() == (current / "config.json").read_text()
    assert (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ema_holds_one_tensor_of_each_model_at_a_time(tmp_path, monkeypatch):
    tensors = {f"t{i}": torch.full((3,), float(i)) for i in range(6)}
    history = _folder(tmp_path / "h", {"model.safetensors": tensors})
    current = _folder(tmp_path / "c", {"model.safetensors": {k: v + 1 for k, v in tensors.items()}})
    alive, peak = [0], [0]
    real_open = ema.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
            return tensor

    monkeypatch.setattr(ema, "safe_open", Counting)
    ema_checkpoint(history, current, alpha=0.5, output=tmp_path / "ema")
    assert peak[0] == 2  # one tensor from each checkpoint, never more
    assert torch.equal(_read(tmp_path / "ema" / "model.safetensors")["t4"], torch.full((3,), 4.5))


def test_ema_of_real_checkpoints_loads_as_a_model(tmp_path, llama_dir, llama_history_dir):
    out = ema_checkpoint(llama_history_dir, llama_dir, alpha=0.9, output=tmp_path / "ema")
    model = load_model(out)
    past, now = load_model(llama_history_dir), load_model(llama_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = 0.9 * past.state_dict()[name] + 0.1 * now.state_dict()[name]
    assert torch.allclose(model.state_dict()[name], expected, atol=1e-6)


def test_an_existing_ema_folder_is_kept_and_mismatched_checkpoints_refused(tmp_path):
    history = _folder(tmp_path / "h", {"model.safetensors": {"a": torch.zeros(2)}})
    current = _folder(tmp_path / "c", {"model.safetensors": {"b": torch.zeros(2)}})
    with pytest.raises(UserError, match="different tensors"):
        ema_checkpoint(history, current, alpha=0.5, output=tmp_path / "ema")
    assert not (tmp_path / "ema").exists()
    wide = _folder(tmp_path / "w", {"model.safetensors": {"a": torch.zeros(3)}})
    with pytest.raises(UserError, match="shape"):
        ema_checkpoint(history, wide, alpha=0.5, output=tmp_path / "ema")
    killed = tmp_path / ".ema.tmp-123-abcdef01"  # a build killed before its rename
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    same = _folder(tmp_path / "s", {"model.safetensors": {"a": torch.ones(2)}})
    ema_checkpoint(history, same, alpha=0.5, output=tmp_path / "ema")
    assert not killed.exists() and torch.equal(_read(tmp_path / "ema" / "model.safetensors")["a"], torch.full((2,), 0.5))
    assert ema_checkpoint(history, wide, alpha=0.5, output=tmp_path / "ema") == tmp_path / "ema"  # complete: kept
