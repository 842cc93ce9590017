"""The data of one eval seed: its training corpus, held-out rows and the reference slice, written once.

    seed_data(config, seed) -> SeedData   # EVAL/data/seed-N/{train,heldout,reference}.jsonl (+ task.json)

corpus task: the seed's ground-truth task (`pipeline.eval.ground_truth`: corrupted spans recorded
per training row, clean held-out problems with answers, the clean versions of a 20% slice).
corpus natural: the rows of the JSONL files in a seeded order: the first `heldout` held out, the
next `samples` (or the rest) for training, the first `reference_fraction` of those for the reference.
The files are a pure function of the seed and the settings; a rerun rewrites none that match.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.eval.config import EvalConfig
from pipeline.runtime.errors import UserError


@dataclass(frozen=True)
class SeedData:
    """One seed's files: training rows (with `corruption` records for the task), held-out rows, the reference slice."""

    seed: int
    train: Path
    heldout: Path
    reference: Path
    labelled: bool  # the training rows carry the corrupted spans (corpus task)


def _write_if_changed(path: Path, text: str) -> None:
    """Write atomically, and only when the content differs (a rerun leaves matching files, and their times, alone)."""
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _task_data(config: EvalConfig, seed: int, folder: Path) -> SeedData:
    from pipeline.eval.ground_truth import generate_task

    task = generate_task(
        seed, config.task_train, config.task_heldout, corrupt_fraction=config.task.corrupt_fraction,
        reference_fraction=config.task.reference_fraction,
    )
    paths = SeedData(seed, folder / "train.jsonl", folder / "heldout.jsonl", folder / "reference.jsonl", labelled=True)
    _write_if_changed(paths.train, _lines(task.train))
    _write_if_changed(paths.heldout, _lines(task.heldout))
    _write_if_changed(paths.reference, _lines(task.clean_reference))
    _write_if_changed(folder / "task.json", json.dumps({"settings": task.settings, "counts": task.counts}, indent=2) + "\n")
    return paths


def natural_rows(corpus: list[Path]) -> list[dict]:
    """Every row of the JSONL files (folders: their *.jsonl files, sorted), in file order."""
    files: list[Path] = []
    for path in map(Path, corpus):
        if path.is_dir():
            files += sorted(path.glob("*.jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"natural.corpus: {path} does not exist")
    if not files:
        raise UserError(f"natural.corpus: no .jsonl file in {', '.join(map(str, corpus))}")
    rows: list[dict] = []
    for file in files:
        for number, line in enumerate(Path(file).read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise UserError(f"natural.corpus: {file} line {number} is not JSON: {error.msg}") from None
    return rows


def _natural_data(config: EvalConfig, seed: int, folder: Path) -> SeedData:
    rows = natural_rows(config.natural.corpus)
    order = list(range(len(rows)))
    random.Random(f"sstoken-eval-natural-{seed}").shuffle(order)
    heldout = config.scaled(config.natural.heldout) or 1
    samples = config.scaled(config.natural.samples)
    train = order[heldout:] if samples is None else order[heldout:heldout + samples]
    if len(train) < 2:
        raise UserError(
            f"natural.corpus has {len(rows)} rows: {heldout} held out leaves {len(train)} to train on; lower natural.heldout"
        )
    reference = train[: max(1, math.ceil(len(train) * config.natural.reference_fraction))]
    paths = SeedData(seed, folder / "train.jsonl", folder / "heldout.jsonl", folder / "reference.jsonl", labelled=False)
    _write_if_changed(paths.train, _lines([rows[i] for i in train]))
    _write_if_changed(paths.heldout, _lines([rows[i] for i in order[:heldout]]))
    _write_if_changed(paths.reference, _lines([rows[i] for i in reference]))
    return paths


def seed_data(config: EvalConfig, seed: int) -> SeedData:
    """Write (or keep) the seed's files under EVAL/data/seed-N and say where they are."""
    folder = Path(config.output) / "data" / f"seed-{seed}"
    return _task_data(config, seed, folder) if config.corpus == "task" else _natural_data(config, seed, folder)
