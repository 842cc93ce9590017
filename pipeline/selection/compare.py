"""How much two rounds' selections agree, over the samples both selected from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pipeline.runtime.files import read_manifest


def _keep_frame(folder: Path) -> pl.DataFrame:
    manifest = read_manifest(folder)
    files = [str(Path(folder) / entry["file"]) for entry in manifest["shards"]]
    return pl.read_parquet(files, columns=["sample_id", "keep", "n_trainable"])


def mask_agreement(first: Path, second: Path) -> dict[str, Any]:
    """Keep masks of two scores or masks folders, joined by sample_id.

    same_decision: share of the common samples' trainable tokens that both keep or both drop;
    kept_overlap: tokens both keep / tokens either keeps (Jaccard); kept_to_dropped and
    dropped_to_kept: tokens the first round keeps and the second drops, and the other way round.
    Context tokens, never kept, count in none.
    """
    joined = _keep_frame(first).join(_keep_frame(second), on="sample_id", how="inner", suffix="_second")
    tokens = joined.select("keep", "keep_second").explode(["keep", "keep_second"])
    first_keeps, second_keeps = tokens["keep"], tokens["keep_second"]
    both = int((first_keeps & second_keeps).sum())
    either = int((first_keeps | second_keeps).sum())
    trainable = int(joined["n_trainable"].sum() or 0)
    return {
        "samples": joined.height,
        "trainable": trainable,
        "same_decision": 1 - (either - both) / trainable if trainable else None,
        "kept_overlap": both / either if either else None,
        "kept_to_dropped": int((first_keeps & ~second_keeps).sum()),
        "dropped_to_kept": int((~first_keeps & second_keeps).sum()),
    }
