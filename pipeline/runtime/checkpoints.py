"""Load checkpoints safely (safetensors only, no remote code, no network) and fingerprint them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.runtime.errors import UserError
from pipeline.runtime.fingerprint import files_fingerprint


_FINGERPRINTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def checkpoint_files(path: Path | str) -> list[Path]:
    """config.json plus the safetensors weight files of a checkpoint folder; raises when unusable."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"checkpoint folder {folder} has no config.json; is it a Hugging Face model folder?")
    weights = _weight_files(folder)
    if not weights:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" It holds pickle weights ({', '.join(pickled)}), which are refused because loading them can run code;"
            " convert them to safetensors (save_pretrained(..., safe_serialization=True)) in a trusted environment."
            if pickled
            else ""
        )
        raise UserError(f"checkpoint folder {folder} has no *.safetensors weights.{hint}")
    return [config, *weights]


def checkpoint_fingerprint(path: Path | str) -> str:
    """sha256 over config.json and every *.safetensors file (names and contents).

    Hashing half a gigabyte takes a second or two, so the digest is remembered per process for as
    long as every file keeps its modification time and size.
    """
    folder = Path(path).resolve()
    files = checkpoint_files(folder)
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    key = (str(folder), stamp)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = files_fingerprint(files, root=folder)
    return _FINGERPRINTS[key]


def load_model(
    path: Path | str,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> Any:
    """A causal LM from a local safetensors folder, in eval mode, on `device` ("auto" dtype: as saved)."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    checkpoint_files(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the model in {folder}: {error}") from error
    return model.to(device).eval()


def load_tokenizer(path: Path | str, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in a local folder (no network)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"tokenizer folder {folder} does not exist")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load a tokenizer from {folder}: {error}") from error
