"""Content fingerprints: files, folders, tokenizers and checkpoints, as hex sha256 digests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_json(value: Any) -> str:
    """Digest of a JSON-ready value, independent of dict key order."""
    return sha256_text(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def files_fingerprint(files: Iterable[Path], root: Path | None = None) -> str:
    """Digest over (relative name, content digest) of each file, in sorted order."""
    entries = []
    for path in sorted(Path(f) for f in files):
        name = str(path.relative_to(root)) if root is not None else path.name
        entries.append([name, sha256_file(path)])
    return sha256_json(entries)


def tokenizer_fingerprints(tokenizer: Any) -> dict[str, str]:
    """Fingerprints of a tokenizer's vocabulary/merges/special tokens and of its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
        "added": sorted(str(t) for t in tokenizer.get_added_vocab()),
    }
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(
        tokenizer.chat_template, sort_keys=True
    )
    return {
        "tokenizer": sha256_json({"vocabulary": sha256_text(vocabulary), "special": special}),
        "chat_template": sha256_text(template or ""),
    }
