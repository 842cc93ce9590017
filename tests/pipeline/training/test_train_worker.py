"""One training rank in-process (no Ray): resume from any checkpoint, metrics, rounds sharing one schedule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.training.train_settings import TrainSettings, learning_rate, warmup_steps
from pipeline.training.train_worker import FINAL, RankJob, run_rank
from tests.factories import write_keep_masks, write_tokenized

CPU = torch.device("cpu")
# LoRA with dropout: the resumed run must replay the same dropout masks.
SETTINGS = dict(batch_size=4, micro_batch_size=2, epochs=2.0, lora_r=4, lora_dropout=0.1, lr=1e-2, checkpoint_every=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    data = write_tokenized(tmp_path_factory.mktemp("tokenized"), tokenizer, [5, 4], seed=7)
    return data, write_keep_masks(tmp_path_factory.mktemp("masks"), data, ratio=0.6, seed=2)


def _run(inputs, llama_dir, folder: Path, resume: Path | None = None, **overrides) -> list[Path]:
    """Run rank 0 of 1 into `folder`; returns copies of the checkpoints it reported."""
    data, masks = inputs
    folder.mkdir(parents=True, exist_ok=True)
    job = RankJob(
        data=str(data), masks=str(masks), model=str(llama_dir), metrics=str(folder / "metrics.jsonl"),
        work=str(folder), settings=TrainSettings(**(SETTINGS | overrides)).model_dump(), workers=1,
    )
    saved: list[Path] = []

    def report(metrics, checkpoint):
        if checkpoint is not None:
            saved.append(Path(shutil.copytree(checkpoint, folder / f"checkpoint-{metrics['step']}")))

    run_rank(job, 0, 1, resume, report, CPU)
    return saved


def _metrics(folder: Path) -> list[dict]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in ("seconds", "tokens_per_s")} for m in lines]


@pytest.fixture(scope="module")
def uninterrupted(inputs, llama_dir, tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    return folder, _run(inputs, llama_dir, folder)


def test_a_run_resumed_from_any_checkpoint_ends_with_the_same_tensors(inputs, llama_dir, uninterrupted, tmp_path):
    folder, checkpoints = uninterrupted
    assert len(checkpoints) >= 3
    expected = load_file(folder / FINAL / "model.safetensors")
    for resume in (checkpoints[0], checkpoints[-2]):
        again = tmp_path / resume.name
        # A killed run's log: it had got further than the checkpoint it resumes from.
        again.mkdir()
        shutil.copy(folder / "metrics.jsonl", again / "metrics.jsonl")
        _run(inputs, llama_dir, again, resume=resume)
        found = load_file(again / FINAL / "model.safetensors")
        assert found.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(found[name], expected[name], rtol=0, atol=0, msg=name)
        assert _metrics(again) == _metrics(folder)  # every step logged once, with the same figures


def test_metrics_has_one_line_per_step_with_loss_kept_tokens_rate_and_lr(uninterrupted):
    folder, checkpoints = uninterrupted
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, len(checkpoints) + 1))
    assert all(m["kept_tokens"] > 0 and m["tokens"] >= m["kept_tokens"] and m["tokens_per_s"] > 0 for m in lines)
    assert all(m["loss"] > 0 for m in lines)
    total = len(lines)
    assert [m["lr"] for m in lines] == [learning_rate(k, 1e-2, total, warmup_steps(total, 0.03)) for k in range(total)]


def test_rounds_follow_one_schedule_with_schedule_start_and_total_steps(inputs, llama_dir, uninterrupted, tmp_path):
    folder, _ = uninterrupted
    whole = [m["lr"] for m in _metrics(folder)]  # one run of two epochs
    half = len(whole) // 2
    first = tmp_path / "round1"
    _run(inputs, llama_dir, first, epochs=1.0, schedule_total_steps=len(whole), warmup_ratio=0.03)
    second = tmp_path / "round2"
    _run(inputs, llama_dir, second, epochs=1.0, schedule_start_step=half, schedule_total_steps=len(whole))
    assert [m["lr"] for m in _metrics(first) + _metrics(second)] == whole
