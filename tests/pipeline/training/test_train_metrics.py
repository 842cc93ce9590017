"""metrics.jsonl read back: one reader for the trainer, the run record, the report and inspect; a torn tail is left out."""

from __future__ import annotations

import json

import pytest

from pipeline.loop.rounds import read_train_loss
from pipeline.runtime.files import ArtifactError
from pipeline.training.train_metrics import read_metrics, rewind_metrics, train_curve

STEPS = [{"step": 1, "loss": 2.0, "kept_tokens": 5, "tokens": 9}, {"step": 2, "loss": 1.0, "kept_tokens": 4, "tokens": 8}]
TORN = '{"step": 3, "loss": 0.'


def _write(folder, tail: str = TORN):
    folder.mkdir(exist_ok=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in STEPS) + tail)
    return path


def test_a_torn_last_line_is_left_out_by_every_reader(tmp_path):
    path = _write(tmp_path / "train")
    assert read_metrics(path) == STEPS
    assert train_curve(tmp_path / "train") == STEPS
    assert read_train_loss(tmp_path / "train") == 1.5
    assert read_metrics(tmp_path / "nothing.jsonl") == []


@pytest.mark.parametrize("tail", ['{"step": 3, "loss": NaN}', '{"step": "3"}', "[1, 2]", "\x00\x00"])
def test_a_last_line_that_is_no_step_is_a_torn_tail(tmp_path, tail):
    assert read_metrics(_write(tmp_path / "train", tail)) == STEPS


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(STEPS[0]) + "\n" + TORN + "\n" + json.dumps(STEPS[1]) + "\n")
    with pytest.raises(ArtifactError, match=r"metrics.jsonl line 2 is not a step's metrics"):
        read_metrics(path)


def test_a_resume_rewinds_to_its_step_and_rewrites_the_file_without_the_torn_tail(tmp_path):
    path = _write(tmp_path / "train")
    rewind_metrics(path, 1)
    assert path.read_text() == json.dumps(STEPS[0]) + "\n"
    path = _write(tmp_path / "other")
    rewind_metrics(path, 5)
    assert path.read_text().endswith("\n") and read_metrics(path) == STEPS and TORN not in path.read_text()


def test_a_process_run_killed_mid_line_resumes(tmp_path, monkeypatch, tokenizer, llama_dir):
    """A kill while rank 0 appends a line: the resumed run drops the torn line and ends with every step once."""
    from pipeline.training import train_in_process
    from pipeline.training.train_stage import TrainConfig, run_train
    from tests.factories import write_keep_masks, write_tokenized

    data = write_tokenized(tmp_path / "tokenized", tokenizer, [6, 5], seed=11)
    masks = write_keep_masks(tmp_path / "masks", data, ratio=0.5, seed=3)
    config = TrainConfig(data=data, masks=masks, model=llama_dir, output=tmp_path / "out", ray={"runner": "process"},
                         batch_size=4, micro_batch_size=2, lora_r=4, checkpoint_every=1, progress=False)
    keep = train_in_process._keep

    def torn_after_the_first(work, metrics, state):
        keep(work, metrics, state)
        with open(tmp_path / "out" / "metrics.jsonl", "a") as log:
            log.write(TORN)
        raise KeyboardInterrupt("killed mid-write")

    with monkeypatch.context() as patch:
        patch.setattr(train_in_process, "_keep", torn_after_the_first)
        with pytest.raises(KeyboardInterrupt):
            run_train(config)
    assert (tmp_path / "out" / "metrics.jsonl").read_text().endswith(TORN)
    summary = run_train(config)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, summary.counts["steps"] + 1))
