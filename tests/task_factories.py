"""`write_task`: a ground-truth task (`pipeline.eval.ground_truth.generate_task`) as files, for the tests.

`sstoken eval` writes each seed's rows itself (`pipeline.eval.data`); the tests of the task, its
labels and its measures want the task alone in a folder: train.jsonl, heldout.jsonl,
clean_reference.jsonl and task.json (last, so a folder with a task.json holds a complete task).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.eval.ground_truth import GroundTruthTask
from pipeline.runtime.files import write_text_atomic

TRAIN, HELDOUT, CLEAN_REFERENCE, TASK = "train.jsonl", "heldout.jsonl", "clean_reference.jsonl", "task.json"


@dataclass(frozen=True)
class TaskFiles:
    folder: Path
    train: Path
    heldout: Path
    clean_reference: Path
    task: Path


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_task(task: GroundTruthTask, folder: Path) -> TaskFiles:
    """Write the task's three row files, then task.json (its settings and counts), each whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = TaskFiles(folder, folder / TRAIN, folder / HELDOUT, folder / CLEAN_REFERENCE, folder / TASK)
    for rows, path in ((task.train, files.train), (task.heldout, files.heldout), (task.clean_reference, files.clean_reference)):
        write_text_atomic(_jsonl(rows), path)
    description = {"kind": "ground_truth_task", "settings": task.settings, "counts": task.counts}
    write_text_atomic(json.dumps(description, indent=2, ensure_ascii=False) + "\n", files.task)
    return files
