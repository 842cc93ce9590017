"""`sstoken train`: output layout, a checkpoint the scorer loads, reruns, refusals, the CLI.

One fit shared by the tests here (a module fixture), in this process (`ray: {runner: process}`; Ray Train's
start-up is 25-45 s on a small machine). Ray Train ends with the same output and the same tensors: the slow
tests/pipeline/loop/test_run_recovery.py, whose runs through Ray Train end with exactly the artifacts of the
same run trained in process. Two workers against one, and a run killed mid-training then resumed, are covered
there too (a two-node cluster with 2 training workers; SIGKILL during round 2's training); resuming from any
checkpoint to the same tensors in-process by test_train_worker.py; two ranks by test_train_step.py.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.runtime.checkpoints import checkpoint_fingerprint, load_model
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import ArtifactError, read_manifest
from pipeline.scoring.score_settings import ScoreSettings
from pipeline.scoring.scorer import Scorer
from pipeline.training.train_stage import TrainConfig, run_train
from tests import tiny
from tests.factories import write_keep_masks, write_tokenized

SETTINGS = dict(batch_size=4, micro_batch_size=2, lora_r=4, lr=1e-2, checkpoint_every=1, progress=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    data = write_tokenized(tmp_path_factory.mktemp("tokenized"), tokenizer, [6, 5], seed=11)
    return data, write_keep_masks(tmp_path_factory.mktemp("masks"), data, ratio=0.5, seed=3)


def _config(inputs, model: Path, output: Path, **overrides) -> TrainConfig:
    data, masks = inputs
    return TrainConfig(data=data, masks=masks, model=model, output=output, **(SETTINGS | overrides))


@pytest.fixture(scope="module")
def trained(inputs, llama_dir, tmp_path_factory):
    """One fit in this process (runner process; Ray Train ends with the same tensors: see the module's docstring)."""
    config = _config(inputs, llama_dir, tmp_path_factory.mktemp("train") / "out", ray={"runner": "process"})
    started = time.monotonic()
    summary = run_train(config)
    return config, summary, time.monotonic() - started


def test_output_layout_manifest_and_metrics(trained, inputs, llama_dir):
    config, summary, seconds = trained
    output = Path(config.output)
    assert sorted(p.name for p in output.iterdir()) == [".lock", "_progress", "checkpoint", "manifest.json", "metrics.jsonl"]
    manifest = read_manifest(output, kind="train")
    steps = summary.counts["steps"]
    assert steps == manifest["counts"]["steps"] >= 2
    assert manifest["checkpoints"]["start"]["fingerprint"] == checkpoint_fingerprint(llama_dir)
    assert manifest["checkpoints"]["final"]["fingerprint"] == checkpoint_fingerprint(output / "checkpoint")
    assert [i["kind"] for i in manifest["inputs"]] == ["tokenized", "scores"]
    assert manifest["schedule"] == {"start_step": 0, "total_steps": steps, "warmup_steps": 1}
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    assert {"loss", "kept_tokens", "tokens_per_s", "lr"} <= set(lines[0])
    assert summary.counts["kept_tokens"] == sum(m["kept_tokens"] for m in lines)
    assert summary.details["tokens_per_s"] > 0 and not summary.reused
    assert not (output / "train").exists()  # the resumable state is gone once the run is complete
    print(f"one fit in process (1 worker, {steps} steps, tiny LoRA): {seconds:.1f} s")


def test_the_merged_lora_checkpoint_is_what_the_scorer_loads(trained, llama_dir):
    config, _, _ = trained
    checkpoint = Path(config.output) / "checkpoint"
    assert (checkpoint / "tokenizer.json").is_file() and (checkpoint / "model.safetensors").is_file()
    weights = load_file(checkpoint / "model.safetensors")
    assert not any("lora" in name for name in weights)
    base = load_model(llama_dir).state_dict()
    moved = [name for name in weights if not torch.equal(weights[name], base[name])]
    assert any("q_proj" in name for name in moved) and not any("norm" in name for name in moved)
    assert Scorer(checkpoint, ScoreSettings(device="cpu"), importance=False).fingerprint == checkpoint_fingerprint(checkpoint)


def test_a_rerun_of_a_finished_output_returns_at_once(trained):
    config, summary, _ = trained
    started = time.monotonic()
    again = run_train(config.model_copy(update={"workers": 1, "checkpoint_every": 5}))  # not part of the run key
    assert again.reused and again.counts == summary.counts
    assert time.monotonic() - started < 10


def test_other_settings_into_a_finished_output_are_refused_without_overwrite(trained):
    config, _, _ = trained
    with pytest.raises(ArtifactError, match="already holds a train artifact made from other inputs or settings"):
        run_train(config.model_copy(update={"lr": 5e-3}))


def test_a_batch_that_does_not_divide_is_refused(inputs, llama_dir, tmp_path):
    with pytest.raises(UserError, match="batch_size 6 is not a multiple of micro_batch_size 2 x workers 2 = 4"):
        run_train(_config(inputs, llama_dir, tmp_path / "out", batch_size=6, workers=2))
    with pytest.raises(UserError, match="batch_size 64 is more than the .* samples with kept tokens"):
        run_train(_config(inputs, llama_dir, tmp_path / "out", batch_size=64))
    assert not (tmp_path / "out").exists()


def test_a_model_folder_that_is_not_a_hugging_face_checkpoint_is_refused(inputs, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="has no config.json; is it a Hugging Face model folder"):
        run_train(_config(inputs, folder, tmp_path / "out"))


def test_a_model_with_another_tokenizer_is_refused(inputs, tmp_path):
    model = tmp_path / "model"
    tiny.build_tokenizer(vocab_size=300).save_pretrained(model)
    tiny.save_model(model, "llama", 300)
    with pytest.raises(UserError, match="was tokenized with another tokenizer .* than the model in"):
        run_train(_config(inputs, model, tmp_path / "out"))


def test_a_model_with_another_chat_template_is_refused(inputs, llama_dir, tmp_path, capsys):
    from tests.pipeline.scoring.test_score_stage import OTHER_TEMPLATE, model_with_template

    model = model_with_template(llama_dir, tmp_path / "other", OTHER_TEMPLATE)
    data, masks = inputs
    assert main(["train", "--data", str(data), "--masks", str(masks), "--model", str(model), "--output",
                 str(tmp_path / "out"), "--ray.runner", "process"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{data} was rendered with another chat template (fingerprint " in err
    assert f"than the model in {model} carries (" in err and not (tmp_path / "out").exists()


def test_an_output_folder_holding_someone_elses_checkpoint_folder_is_refused(inputs, llama_dir, tmp_path):
    (tmp_path / "out" / "checkpoint").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="holds files this stage did not write: checkpoint"):
        run_train(_config(inputs, llama_dir, tmp_path / "out"))
    with pytest.raises(ArtifactError, match="checkpoint exists and was not written by sstoken train"):
        run_train(_config(inputs, llama_dir, tmp_path / "out", overwrite=True))
    assert (tmp_path / "out" / "checkpoint").is_dir()  # never deleted


def test_a_starting_model_inside_the_output_is_refused_before_anything_is_touched(trained, inputs, tmp_path, capsys):
    """Issue 20 item 2: `train --overwrite --model OUT/checkpoint --output OUT` (continuing from a finished train output
    into itself, other settings) used to delete its own starting model before training. Now: refused, exit 2."""
    config, _, _ = trained
    output = tmp_path / "out"
    shutil.copytree(config.output, output)
    model = output / "checkpoint"
    fingerprint = checkpoint_fingerprint(model)
    data, masks = inputs
    status = main(["train", "--data", str(data), "--masks", str(masks), "--model", str(model), "--output", str(output),
                   "--overwrite", "--lr", "0.001", "--batch-size", "4", "--micro-batch-size", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "checkpoint is inside the output folder" in err
    assert checkpoint_fingerprint(model) == fingerprint and (output / "manifest.json").is_file()


def test_cli_help_and_a_missing_input_in_one_line(inputs, llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert "--masks" in help_text and "--finetune {lora,full}" in help_text and "--schedule-start-step" in help_text
    _, masks = inputs
    status = main(["train", "--data", str(tmp_path / "nope"), "--masks", str(masks), "--model", str(llama_dir),
                   "--output", str(tmp_path / "out")])
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        f"sstoken train: error: tokenized data folder {tmp_path / 'nope'} does not exist; run `sstoken prepare` first"
    )


# -- slow: several fits --------------------------------------------------------------------------


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(output) / "checkpoint" / "model.safetensors")


def test_workers_an_embedded_ray_cannot_hold_are_refused(inputs, llama_dir, tmp_path):
    from pipeline.runtime.ray_session import RayRuntime
    from pipeline.training.train_stage import _cpus_per_worker

    embedded = RayRuntime(embedded=True, owned=True, address="", cpus=2.0, gpus=0.0, nodes=1)
    assert _cpus_per_worker(_config(inputs, llama_dir, tmp_path, workers=2, cpus_per_worker=1.0), embedded) == 1.0
    with pytest.raises(UserError, match="--workers 3 x 1 CPUs exceed the embedded Ray's 2 CPUs"):
        _cpus_per_worker(_config(inputs, llama_dir, tmp_path, workers=3, cpus_per_worker=1.0), embedded)
    with pytest.raises(UserError, match="--use-gpu with --workers 1 needs 1 GPUs; the Ray cluster has 0"):
        _cpus_per_worker(_config(inputs, llama_dir, tmp_path, use_gpu=True, cpus_per_worker=1.0), embedded)


def test_the_progress_bar_follows_the_metrics_rank_0_writes(tmp_path):
    from pipeline.training.train_stage import _MetricsProgress

    path = tmp_path / "metrics.jsonl"
    with _MetricsProgress(True, path, total=4) as progress:
        progress._update()  # nothing written yet
        path.write_text(json.dumps({"step": 3, "loss": 1.5, "tokens_per_s": 1234.0, "lr": 1e-4}) + "\n" + '{"step": 4, "lo')
        progress._update()  # a half-written line: the last complete one counts on the next poll
        path.write_text(json.dumps({"step": 3, "loss": 1.5, "tokens_per_s": 1234.0, "lr": 1e-4}) + "\n")
        progress._update()
        task = progress.bar.tasks[0]
        assert task.completed == 3 and task.total == 4
        assert task.fields["figures"] == "loss 1.500  1,234 tokens/s  lr 1.00e-04"


# -- runner process: one worker in this process, no Ray Train -------------------------------------


def test_a_process_run_killed_mid_training_resumes_from_its_last_state(trained, inputs, llama_dir, tmp_path, monkeypatch):
    from pipeline.training import train_in_process

    config, _, _ = trained
    keep, states = train_in_process._keep, []

    def killed_after_two(work, metrics, state):
        keep(work, metrics, state)
        states.append(metrics["step"])
        if len(states) == 2:
            raise KeyboardInterrupt("killed")

    settings = _config(inputs, llama_dir, tmp_path / "out", ray={"runner": "process"})
    with monkeypatch.context() as patch:
        patch.setattr(train_in_process, "_keep", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            run_train(settings)
    assert [p.name for p in train_in_process.saved_states(tmp_path / "out" / "train")] == ["step-00000001", "step-00000002"]
    resumed = run_train(settings)
    assert not resumed.reused and states == [1, 2]
    lines = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, resumed.counts["steps"] + 1))
    expected, found = _weights(config.output), _weights(tmp_path / "out")
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=0, atol=0, msg=name)


def test_a_diverging_run_stops_at_the_step_whose_loss_is_not_finite(inputs, llama_dir, tmp_path, capsys):
    data, masks = inputs
    arguments = ["train", "--data", str(data), "--masks", str(masks), "--model", str(llama_dir), "--output",
                 str(tmp_path / "out"), "--ray.runner", "process", "--batch-size", "4", "--micro-batch-size", "2",
                 "--lora-r", "4", "--checkpoint-every", "1", "--no-progress", "--lr", "1e30", "--epochs", "2"]
    assert main(arguments) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sstoken")]  # no traceback
    assert re.match(r"sstoken train: error: training diverged (at step \d|: after step \d)", err)
    assert not (tmp_path / "out" / "checkpoint").exists() and not (tmp_path / "out" / "manifest.json").exists()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert all(math.isfinite(json.loads(line, parse_constant=float)["loss"]) for line in lines)  # no NaN, no Infinity
    assert "NaN" not in "".join(lines) and "Infinity" not in "".join(lines)


def test_disk_full_while_the_process_runner_keeps_a_state_is_one_line_exit_2(inputs, llama_dir, tmp_path, monkeypatch, capsys):
    """shutil.copytree reports a full disk as shutil.Error (its copies' messages, no errno attribute)."""
    real_copytree = shutil.copytree

    def no_space(source, destination, *arguments, **keywords):
        raise OSError(errno.ENOSPC, "No space left on device", str(destination))

    monkeypatch.setattr(shutil, "copytree", lambda source, destination, **kw: real_copytree(source, destination, copy_function=no_space))
    data, masks = inputs
    arguments = ["train", "--data", str(data), "--masks", str(masks), "--model", str(llama_dir), "--output",
                 str(tmp_path / "out"), "--ray.runner", "process", "--batch-size", "4", "--micro-batch-size", "2",
                 "--lora-r", "4", "--checkpoint-every", "1", "--no-progress"]
    assert main(arguments) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sstoken")]  # no traceback
    assert err.startswith(f"sstoken train: error: no space left on device writing {tmp_path / 'out' / 'train' / 'process'}")
    assert err.endswith("free space and rerun; finished shards are kept")


def test_disk_full_in_a_ray_train_worker_is_one_line(inputs, llama_dir, tmp_path, monkeypatch):
    """Ray Train wraps a worker's OSError (errno 28) in a WorkerGroupError."""
    import ray.train
    import ray.train.torch

    from pipeline.training.train_stage import _fit
    from pipeline.training.train_worker import RankJob

    class FullDiskTrainer:
        def __init__(self, *arguments, **keywords):
            pass

        def fit(self):
            full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "train" / "checkpoint_0"))
            raise ray.train.WorkerGroupError("a worker failed", {0: full})

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FullDiskTrainer)
    config = _config(inputs, llama_dir, tmp_path / "out")
    job = RankJob(data="d", masks="m", model="m", metrics="x", work="w", settings={}, workers=1)
    with pytest.raises(UserError, match="no space left on device writing .*checkpoint_0: free space and rerun"):
        _fit(config, job, 1.0, tmp_path / "out" / "train", "run-x")


def test_the_process_runner_is_one_local_worker(inputs, llama_dir, tmp_path):
    with pytest.raises(ValueError, match="ray.runner process trains one worker in this process"):
        _config(inputs, llama_dir, tmp_path, ray={"runner": "process"}, workers=2)
    with pytest.raises(ValueError, match="ray.runner process trains one worker in this process"):
        _config(inputs, llama_dir, tmp_path, ray={"runner": "process", "address": "127.0.0.1:6379"})
