"""An exponential moving average of two checkpoints' weights, one tensor at a time.

    ema_checkpoint(history=H, current=C, alpha=0.9, output=OUT)   # OUT = alpha * H + (1 - alpha) * C

Neither model is ever loaded whole: each tensor is read from both folders' safetensors with
`safe_open`, averaged in float32, cast back to the current checkpoint's dtype and written at
once into a safetensors file laid out like the current checkpoint's (same files, same tensors).
The header is computed first from the tensors' shapes, so each file is written sequentially with
one averaged tensor in memory. The folder (weights, config.json, tokenizer files of the current
checkpoint) is built under a temporary name and renamed into place: it exists only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.runtime.checkpoints import checkpoint_files
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import is_temporary
from pipeline.runtime.weight_average import average_tensor

# safetensors dtype names of the torch dtypes a checkpoint holds.
_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_SAFE_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of `folder` that holds it."""
    where: dict[str, Path] = {}
    for path in checkpoint_files(folder)[1:]:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                where[name] = path
    return where


def _layout(path: Path) -> list[tuple[str, str, list[int]]]:
    """(name, safetensors dtype, shape) of each tensor of one file, in the file's order."""
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    entries = [(name, info["dtype"], info["shape"], info["data_offsets"][0]) for name, info in header.items() if name != "__metadata__"]
    return [(name, dtype, shape) for name, dtype, shape, _ in sorted(entries, key=lambda e: e[3])]


def _header(layout: list[tuple[str, str, list[int]]]) -> bytes:
    """The safetensors header for tensors written back to back in `layout` order, padded to 8 bytes."""
    header, offset = {}, 0
    for name, dtype, shape in layout:
        size = _SAFE_DTYPES[dtype].itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def _check_same_tensors(history: Path, current: Path, history_files: dict[str, Path], current_files: dict[str, Path]) -> None:
    if set(history_files) != set(current_files):
        odd = sorted(set(history_files) ^ set(current_files))[:3]
        raise UserError(
            f"cannot average {history} and {current}: they hold different tensors ({', '.join(odd)}); "
            "the EMA history needs checkpoints of one architecture"
        )


def _write_averaged_file(
    target: Path, source: Path, alpha: float, history_files: dict[str, Path], history_root: Path
) -> None:
    layout = _layout(source)
    with ExitStack() as files:
        out = files.enter_context(open(target, "wb"))
        current = files.enter_context(safe_open(str(source), framework="pt"))
        pasts = {
            path: files.enter_context(safe_open(str(path), framework="pt"))
            for path in sorted({history_files[name] for name, _, _ in layout})
        }
        out.write(_header(layout))
        for name, _, _ in layout:
            old = pasts[history_files[name]].get_tensor(name)
            new = current.get_tensor(name)
            if list(old.shape) != list(new.shape):
                raise UserError(
                    f"cannot average tensor {name}: shape {list(old.shape)} in {history_root}, {list(new.shape)} in {source.parent}"
                )
            averaged = average_tensor(old, new, alpha)
            del old, new
            out.write(averaged.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            del averaged
        out.flush()
        os.fsync(out.fileno())


def ema_checkpoint(history: Path, current: Path, alpha: float, output: Path) -> Path:
    """Write alpha * history + (1 - alpha) * current as a Hugging Face folder at `output` (skipped if it exists)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")
    output = Path(output)
    if output.is_dir():
        return output  # renamed into place only when complete
    history_files, current_files = _tensor_files(Path(history)), _tensor_files(Path(current))
    _check_same_tensors(Path(history), Path(current), history_files, current_files)
    for leftover in output.parent.glob(f".{output.name}.tmp-*"):  # of a write killed before its rename
        if is_temporary(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)
    building = output.with_name(f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    building.mkdir(parents=True)
    try:
        for entry in sorted(Path(current).iterdir()):
            if entry.is_file() and entry.suffix != ".safetensors":
                shutil.copy2(entry, building / entry.name)  # config.json, tokenizer files, the shard index
        for source in sorted(set(current_files.values())):
            _write_averaged_file(building / source.name, source, alpha, history_files, Path(history))
        os.replace(building, output)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return output
