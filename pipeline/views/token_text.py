"""Token ids as the text they stand for, for people to read (reports, `sstoken inspect`); torch-free.

    pieces = TokenText.first_found(["models/base", "runs/r/tokenized-tokenizer"])
    pieces.text(42)        # "Paris" — or "⟨42⟩" when no tokenizer folder was found

Reads the folder's `tokenizer.json` with the `tokenizers` library (what every fast Hugging Face
tokenizer saves), so no model code and no torch is loaded. Each id is decoded alone: a byte-level
piece that is half of a multi-byte character shows as U+FFFD, as it does in any per-token view.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TokenText:
    """Decodes single token ids, remembering each one; `source` is the tokenizer folder, None when none was found."""

    tokenizer: Any = None
    source: Path | None = None
    _known: dict[int, str] = field(default_factory=dict, repr=False)

    @classmethod
    def first_found(cls, folders: Iterable[str | Path | None]) -> TokenText:
        """The first folder holding a readable tokenizer.json; ids shown as ⟨id⟩ when there is none."""
        from tokenizers import Tokenizer

        for folder in folders:
            if not folder:
                continue
            path = Path(folder) / "tokenizer.json"
            try:
                return cls(Tokenizer.from_file(str(path)), Path(folder))
            except Exception:  # missing, unreadable or not a tokenizer file: try the next one
                continue
        return cls()

    def text(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._known:
            self._known[token_id] = self._decode(token_id)
        return self._known[token_id]

    def _decode(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"⟨{token_id}⟩"
        try:
            return self.tokenizer.decode([token_id], skip_special_tokens=False)
        except Exception:  # an id outside the vocabulary
            return f"⟨{token_id}⟩"

    def texts(self, token_ids: Iterable[int]) -> list[str]:
        return [self.text(token_id) for token_id in token_ids]
