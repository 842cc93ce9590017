"""The data of one eval seed: its training corpus, held-out rows and the reference's rows, written once.

    seed_data(config, seed, base) -> SeedData   # EVAL/data/seed-N/{train,heldout,reference}.jsonl (+ task.json)

corpus task: the seed's ground-truth task (`pipeline.eval.ground_truth`: corrupted spans recorded
per training row, clean held-out problems with answers, clean reference conversations of their own
problems). Beside them: `tokenized/`, the training rows prepared as every cell prepares them, and
`token_labels.parquet`, their corrupted tokens per token (`pipeline.selection.token_labels`), the
oracle's selection input and the measures' ground truth; and the tokens generation gets for exact
match (the longest held-out answer plus a margin, unless `max_new_tokens` is given).
corpus natural: the rows of the JSONL files in a seeded order: the first `heldout` held out, the
next `reference_fraction` share for the reference, the next `samples` (or the rest) for training.
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
    samples: int  # training rows
    labels: Path | None = None  # corpus task: the token labels of the prepared training rows
    tokenized: Path | None = None  # corpus task: the training rows prepared (what the labels line up with)
    max_new_tokens: int | None = None  # corpus task: tokens generated per held-out problem

    @property
    def labelled(self) -> bool:
        """The training rows' corrupted tokens are known (corpus task)."""
        return self.labels is not None


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


def _task_data(config: EvalConfig, seed: int, folder: Path, base: Path) -> SeedData:
    from pipeline.eval.ground_truth import generate_task
    from pipeline.eval.measures import longest_answer_tokens

    task = generate_task(
        seed, config.task_train, config.task_heldout, corrupt_fraction=config.task.corrupt_fraction,
        reference_fraction=config.task.reference_fraction, kinds=tuple(config.task.kinds),
        corruptions=tuple(config.task.corruptions),
    )
    train, heldout = folder / "train.jsonl", folder / "heldout.jsonl"
    _write_if_changed(train, _lines(task.train))
    _write_if_changed(heldout, _lines(task.heldout))
    _write_if_changed(folder / "reference.jsonl", _lines(task.clean_reference))
    _write_if_changed(folder / "task.json", json.dumps({"settings": task.settings, "counts": task.counts}, indent=2) + "\n")
    tokenized, labels = _token_labels(config, train, folder, base)
    generate = config.max_new_tokens or longest_answer_tokens(base, task.heldout) + config.answer_margin
    return SeedData(seed, train, heldout, folder / "reference.jsonl", len(task.train), labels, tokenized, generate)


def _token_labels(config: EvalConfig, train: Path, folder: Path, base: Path) -> tuple[Path, Path]:
    """The training rows prepared as every cell prepares them, and their corrupted tokens (the labels file)."""
    from pipeline.data.prepare_config import PrepareConfig
    from pipeline.data.prepare_stage import run_prepare
    from pipeline.eval.ground_truth_labels import corrupted_token_mask
    from pipeline.selection.token_labels import write_token_labels

    tokenized, labels = folder / "tokenized", (folder / "token_labels.parquet").resolve()
    prepare = config.cell_sections()["prepare"] | {"input": [train], "tokenizer": str(base), "output": tokenized}
    run_prepare(PrepareConfig(**prepare))
    mask = corrupted_token_mask(tokenized, train)
    write_token_labels(labels, mask["sample_id"].to_list(), mask["corrupted"].to_list())
    return tokenized, labels


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
    pool = order[heldout:]
    # The reference's rows come out of the pool before training's, so the two are disjoint.
    reference_count = max(1, math.ceil((len(pool) if samples is None else samples) * config.natural.reference_fraction))
    reference = pool[:reference_count]
    train = pool[reference_count:] if samples is None else pool[reference_count:reference_count + samples]
    if len(train) < 2:
        raise UserError(
            f"natural.corpus has {len(rows)} rows: {heldout} held out and {reference_count} for the reference leave "
            f"{len(train)} to train on; lower natural.heldout or natural.reference_fraction"
        )
    paths = SeedData(seed, folder / "train.jsonl", folder / "heldout.jsonl", folder / "reference.jsonl", len(train))
    _write_if_changed(paths.train, _lines([rows[i] for i in train]))
    _write_if_changed(paths.heldout, _lines([rows[i] for i in order[:heldout]]))
    _write_if_changed(paths.reference, _lines([rows[i] for i in reference]))
    return paths


def seed_data(config: EvalConfig, seed: int, base: Path) -> SeedData:
    """Write (or keep) the seed's files under EVAL/data/seed-N and say where they are (`base`: the model folder)."""
    folder = Path(config.output) / "data" / f"seed-{seed}"
    return _task_data(config, seed, folder, base) if config.corpus == "task" else _natural_data(config, seed, folder)
