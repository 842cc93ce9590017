"""The stats API over any folder a user has: a run folder, a scores folder or a masks folder.

    from pipeline.views.run_stats import open_stats, train_curves
    stats = open_stats("runs/demo")             # every finished round of the run
    stats.samples().filter(pl.col("round") == 1).sort("kept_ratio").collect()
    train_curves(stats)                          # round, step, loss of each round's training

A run folder's rounds are read from run.json, with the folders the layout gives them (a run folder
moved elsewhere still reads); rounds whose selection has not finished are left out.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.eval.records import EVAL_RECORD
from pipeline.loop.run_folder import RUN_RECORD, RunFolder, read_run_record
from pipeline.runtime.files import MANIFEST, ArtifactError
from pipeline.training.train_metrics import train_curve
from pipeline.views.stats import Stats, open_masks_folder, round_artifacts


def is_run_folder(folder: Path) -> bool:
    """A folder with a run.json (a malformed one too: opening it then names what is wrong with it)."""
    return (Path(folder) / RUN_RECORD).exists()


def _open_run(folder: RunFolder) -> Stats:
    record = read_run_record(folder)  # a malformed run.json: one error naming the file and the field
    if record is None:
        raise ArtifactError(f"{folder.record} does not exist; pass a run folder")
    parts = []
    for entry in sorted(record.rounds, key=lambda e: e.round):
        index = entry.round
        masks = folder.masks(index)
        if not (masks / MANIFEST).is_file():
            continue  # the round's selection has not finished yet
        data = folder.inside(entry.data, "a round's data") if entry.data else None
        signals = folder.scores(index) if (folder.scores(index) / MANIFEST).is_file() else None
        parts.append(round_artifacts(masks, index, tokenized=data, signals=signals))
    if not parts:
        raise ArtifactError(f"run {folder.root} has no finished selection yet: no round has a masks folder")
    return Stats(parts=tuple(parts), record=record, root=folder.root)


def open_stats(folder: Path, data: Path | None = None) -> Stats:
    """Stats over a run folder (every finished round), a scores folder or a masks folder; `data` overrides the
    tokenized folder a scores or masks folder's manifest names. Any other folder: one ArtifactError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} does not exist; pass a run folder, a scores folder or a masks folder")
    if is_run_folder(folder):
        if data is not None:
            raise ArtifactError(f"{folder} is a run folder, which names its own tokenized data: leave out --data")
        return _open_run(RunFolder(folder))
    if (folder / MANIFEST).is_file():
        return open_masks_folder(folder, tokenized=data)
    if (folder / EVAL_RECORD).exists():
        raise ArtifactError(f"{folder} is an eval folder (it holds {EVAL_RECORD}), not a run, scores or masks folder")
    raise ArtifactError(
        f"{folder} is not an sstoken artifact folder (no {RUN_RECORD} or {MANIFEST}); pass a run folder, "
        "a scores folder or a masks folder"
    )


def train_curves(stats: Stats) -> pl.DataFrame:
    """round, step, loss of every round's training in a run (empty outside a run or before any training)."""
    rows = []
    if stats.root is not None and stats.record is not None:
        folder = RunFolder(stats.root)
        for entry in stats.record.rounds:
            rows += [{"round": entry.round, "step": int(m["step"]), "loss": float(m["loss"])}
                     for m in train_curve(folder.train(entry.round))]
    return pl.DataFrame(rows, schema={"round": pl.Int32, "step": pl.Int64, "loss": pl.Float64})
