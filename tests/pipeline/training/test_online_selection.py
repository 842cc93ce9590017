"""`sstoken train --selection online`: each step selects its tokens in its own forward, with the select stage's code.

The key test: for every online method, the tokens a step keeps equal, token for token, what `sstoken score` +
`sstoken select` keep over the same samples with the checkpoint of that step (same history NLLs, same
settings). Step 1 is scored by the starting model; step 2 by the checkpoint a one-step run of the same plan ends
with (full fine-tuning, float32: the saved weights are the in-memory ones; no learning-rate warm-up, so step 1
moves them). Runs in this process (`runner: process`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import read_manifest
from pipeline.scoring.score_stage import ScoreJobConfig, run_score_job
from pipeline.selection.select_stage import SelectConfig, run_select
from pipeline.training.online_settings import ONLINE_METHODS
from pipeline.training.online_worker import step_shard
from pipeline.training.train_stage import TrainConfig, run_train
from tests.factories import write_tokenized

PROCESS = {"runner": "process"}
# 9 samples, 4 per step: 2 steps in one pass, 1 in half a pass (the same first global batch).
SETTINGS = dict(batch_size=4, micro_batch_size=2, lr=1e-2, warmup_ratio=0.0, finetune="full", checkpoint_every=1,
                schedule_total_steps=2, progress=False, ray=PROCESS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer, llama_dir, llama_history_dir) -> tuple[Path, Path]:
    """Tokenized data and a history cache holding `llama_history_dir`'s NLLs of it (the score stage filled it)."""
    root = tmp_path_factory.mktemp("online")
    data = write_tokenized(root / "tokenized", tokenizer, [5, 4], seed=3)
    run_score_job(ScoreJobConfig(data=data, current=llama_dir, history=llama_history_dir, output=root / "scores",
                                 history_cache=root / "cache", progress=False, ray=PROCESS))
    return data, root / "cache"


def _online(corpus, model: Path, output: Path, method: str, history: Path, **overrides) -> TrainConfig:
    data, cache = corpus
    online = {"method": method, "history": history, "history_cache": cache} | overrides.pop("online", {})
    return TrainConfig(data=data, model=model, output=output, selection="online", online=online,
                       **(SETTINGS | overrides))


def _excess(method: str) -> str:
    return "current_minus_history" if method == "rho1" else "history_minus_current"


def _masks_of(folder: Path, files: list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """sample_id -> (score, keep, step) of a masks folder's shards (all, or the named ones)."""
    out = {}
    for name in files or [s["file"] for s in read_manifest(folder)["shards"]]:
        table = pq.read_table(folder / name).to_pydict()
        steps = table.get("step", [0] * len(table["sample_id"]))
        for sample_id, score, keep, step in zip(table["sample_id"], table["score"], table["keep"], steps):
            out[sample_id] = (np.asarray(score, np.float32), np.asarray(keep, bool), step)
    return out


def _offline(corpus, current: Path, history: Path, folder: Path, method: str) -> dict:
    """`sstoken score` (current, history, the same cache) then `sstoken select --output`: the masks by sample."""
    data, cache = corpus
    run_score_job(ScoreJobConfig(data=data, current=current, history=history, output=folder / "scores",
                                 history_cache=cache, excess=_excess(method), progress=False, ray=PROCESS))
    run_select(SelectConfig(scores=folder / "scores", output=folder / "masks", method=method))
    return _masks_of(folder / "masks")


def _assert_same_selection(online: dict, offline: dict, where: str) -> None:
    assert online, where
    for sample_id, (score, keep, _) in online.items():
        expected_score, expected_keep, _ = offline[sample_id]
        assert np.array_equal(keep, expected_keep), f"{where}: sample {sample_id} keeps {np.flatnonzero(keep)}, " \
                                                    f"offline {np.flatnonzero(expected_keep)}"
        np.testing.assert_allclose(score, expected_score, rtol=0, atol=1e-5, equal_nan=True, err_msg=f"{where} {sample_id}")


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_every_online_step_keeps_what_score_and_select_keep_with_that_steps_checkpoint(
    method, corpus, llama_dir, llama_history_dir, tmp_path
):
    two = run_train(_online(corpus, llama_dir, tmp_path / "two", method, llama_history_dir))
    one = run_train(_online(corpus, llama_dir, tmp_path / "one", method, llama_history_dir, epochs=0.5))
    assert (two.counts["steps"], one.counts["steps"]) == (2, 1)
    masks = tmp_path / "two" / "masks"
    step_one, step_two = _masks_of(masks, [step_shard(1)]), _masks_of(masks, [step_shard(2)])
    assert {s for _, _, s in step_one.values()} == {1} and {s for _, _, s in step_two.values()} == {2}
    assert len(step_one) == len(step_two) == 4 and not set(step_one) & set(step_two)
    # The one-step run made the same first step: its weights are the ones step 2 selected with.
    assert _masks_of(tmp_path / "one" / "masks", [step_shard(1)]).keys() == step_one.keys()
    _assert_same_selection(step_one, _offline(corpus, llama_dir, llama_history_dir, tmp_path / "base", method),
                           f"{method} step 1 (starting model)")
    after_one = tmp_path / "one" / "checkpoint"
    _assert_same_selection(step_two, _offline(corpus, after_one, llama_history_dir, tmp_path / "after", method),
                           f"{method} step 2 (checkpoint after step 1)")
    if method not in ("full", "random"):  # these ignore the model: the same tokens whatever the weights
        changed = [not np.array_equal(k, _masks_of(tmp_path / "base" / "masks")[s][1]) for s, (_, k, _) in step_two.items()]
        assert any(changed) or method in ("attn",), "step 2's model selected exactly as the starting model: a weak test"


def test_the_loss_of_a_step_is_the_mean_nll_of_its_kept_tokens_over_the_global_batch(corpus, llama_dir, llama_history_dir,
                                                                                     tmp_path):
    import json

    run_train(_online(corpus, llama_dir, tmp_path / "out", "sstoken", llama_history_dir, epochs=0.5))
    masks = _masks_of(tmp_path / "out" / "masks", [step_shard(1)])
    kept = sum(int(k.sum()) for _, k, _ in masks.values())
    targets = sum(math.ceil(round(0.6 * int((~np.isnan(s)).sum()), 9)) for s, _, _ in masks.values())
    metrics = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["kept_tokens"] == kept == targets  # ceil(0.6 n) per sample, known before the forward
    # The loss is the starting model's mean NLL over exactly those tokens (the scorer's NLLs of them).
    offline = _offline(corpus, llama_dir, llama_history_dir, tmp_path / "base", "sstoken")
    nll = pq.read_table(tmp_path / "base" / "scores" / "part-00000.parquet").to_pydict()
    nll |= {k: v + pq.read_table(tmp_path / "base" / "scores" / "part-00001.parquet").to_pydict()[k] for k, v in nll.items()}
    by_id = dict(zip(nll["sample_id"], nll["nll_cur"]))
    expected = sum(float(np.asarray(by_id[s], np.float64)[offline[s][1]].sum()) for s in masks) / kept
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", ["prob", "entropy-gated"])
def test_a_weighted_online_step_trains_sum_w_nll_over_sum_w_with_the_weights_select_writes(
    method, corpus, llama_dir, llama_history_dir, tmp_path
):
    import json

    run_train(_online(corpus, llama_dir, tmp_path / "out", method, llama_history_dir, epochs=0.5))
    online = pq.read_table(tmp_path / "out" / "masks" / step_shard(1)).to_pydict()
    offline = _offline(corpus, llama_dir, llama_history_dir, tmp_path / "base", method)
    masks = {}
    for name in [s["file"] for s in read_manifest(tmp_path / "base" / "masks")["shards"]]:
        table = pq.read_table(tmp_path / "base" / "masks" / name).to_pydict()
        masks |= dict(zip(table["sample_id"], table["weight"]))
    nll = {}
    for name in ("part-00000.parquet", "part-00001.parquet"):
        table = pq.read_table(tmp_path / "base" / "scores" / name).to_pydict()
        nll |= dict(zip(table["sample_id"], table["nll_cur"]))
    weighted, total = 0.0, 0.0
    for sample_id, weight in zip(online["sample_id"], online["weight"]):
        weight = np.asarray(weight, np.float64)
        np.testing.assert_allclose(weight, masks[sample_id], rtol=0, atol=1e-5, err_msg=sample_id)  # select's weights
        assert (weight[~offline[sample_id][1]] == 0).all() and (weight[offline[sample_id][1]] > 0).all()
        kept = offline[sample_id][1]
        weighted += float((weight[kept] * np.asarray(nll[sample_id], np.float64)[kept]).sum())
        total += float(weight.sum())
    metrics = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["loss"] == pytest.approx(weighted / total, rel=1e-5)
    assert run_validate_problems(tmp_path / "out" / "masks") == 0


def run_validate_problems(masks: Path) -> int:
    from pipeline.validation.validate_stage import ValidateConfig, run_validate

    return run_validate(ValidateConfig(folder=masks)).counts.get("problems", 0)


def test_the_warm_up_selects_attention_only_then_the_method(corpus, llama_dir, llama_history_dir, tmp_path):
    run_train(_online(corpus, llama_dir, tmp_path / "out", "sstoken", llama_history_dir, online={"warmup_samples": 3}))
    manifest = read_manifest(tmp_path / "out" / "masks", kind="masks")
    assert manifest["selection"]["warmup_steps"] == 1 and manifest["selection"]["online"] is True
    step_one = _masks_of(tmp_path / "out" / "masks", [step_shard(1)])
    _assert_same_selection(step_one, _offline(corpus, llama_dir, llama_history_dir, tmp_path / "attn", "attn"),
                           "warm-up step 1 (attention only)")


def test_a_rel_only_method_whose_history_is_the_starting_model_needs_a_warm_up(corpus, llama_dir, tmp_path):
    with pytest.raises(UserError, match="same checkpoint.*online.warmup_samples"):
        run_train(_online(corpus, llama_dir, tmp_path / "out", "rel", llama_dir))
    assert not (tmp_path / "out").exists()


def test_a_history_cache_without_that_checkpoint_or_that_data_is_refused_by_name(
    corpus, tokenizer, llama_dir, llama_history_dir, tmp_path
):
    data, cache = corpus
    with pytest.raises(UserError, match=r"holds no NLLs of .*llama-1.*--cache-current-nll"):
        run_train(_online((data, tmp_path / "empty-cache"), llama_dir, tmp_path / "a", "sstoken", llama_history_dir))
    other = write_tokenized(tmp_path / "other", tokenizer, [3], seed=9)
    with pytest.raises(UserError, match=r"for other tokenized data \(another corpus or tokenizer\), not for .*other"):
        run_train(_online((other, cache), llama_dir, tmp_path / "b", "sstoken", llama_history_dir))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_online_masks_validate_export_report_and_read_like_offline_ones(corpus, llama_dir, llama_history_dir,
                                                                           tmp_path):
    from pipeline.training.export_stage import ExportConfig, run_export
    from pipeline.training.training_data import build_index, open_training_data
    from pipeline.validation.validate_stage import ValidateConfig, run_validate
    from pipeline.views.stats import open_masks_folder

    data, _ = corpus
    run_train(_online(corpus, llama_dir, tmp_path / "out", "sstoken", llama_history_dir))
    masks = tmp_path / "out" / "masks"
    manifest = read_manifest(masks, kind="masks")
    assert [s["file"] for s in manifest["shards"]] == [step_shard(1), step_shard(2), "part-untrained.parquet"]
    assert manifest["counts"]["samples"] == 9 and manifest["counts"]["steps"] == 2
    assert _masks_of(masks, ["part-untrained.parquet"]) and all(
        not k.any() and s == 0 for _, k, s in _masks_of(masks, ["part-untrained.parquet"]).values())
    summary = run_validate(ValidateConfig(folder=masks))
    assert summary.counts.get("problems", 0) == 0, summary
    exported = run_export(ExportConfig(data=data, masks=masks, output=tmp_path / "export", format="parquet"))
    # every trained sample; the untrained one keeps nothing; the labels are the kept tokens
    assert (exported.counts["exported"], exported.counts["skipped_without_kept"]) == (8, 1)
    assert exported.counts["labels"] == manifest["counts"]["kept"]
    assert build_index(open_training_data(data, masks)).samples == 8  # masked training can replay them
    samples = open_masks_folder(masks, tokenized=data).samples().collect()
    assert samples.height == 9 and int(samples["n_kept"].sum()) == manifest["counts"]["kept"]
    assert main(["report", str(masks), "--output", str(tmp_path / "report.html")]) == 0
    assert main(["inspect", str(masks), "--top", "1"]) == 0


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize("policy", ["base", "ema"])
def test_a_run_killed_after_a_steps_masks_resumes_to_the_same_masks_and_weights(policy, corpus, llama_dir,
                                                                               llama_history_dir, tmp_path, monkeypatch):
    """base: the cached history; ema: the history weights travel in the resumable state (every 2 steps, so the
    resumed step 3 starts between two updates)."""
    from pipeline.training import train_in_process

    lora = dict(finetune="lora", lora_r=4, batch_size=2, micro_batch_size=1, schedule_total_steps=None)
    if policy == "ema":
        lora["online"] = {"history": None, "history_policy": "ema", "history_every": 2, "ema_alpha": 0.5}
    whole = run_train(_online(corpus, llama_dir, tmp_path / "whole", "sstoken", llama_history_dir, **dict(lora)))
    keep, seen = train_in_process._keep, []

    def killed_at_step_three(work, metrics, state):  # step 3's masks are committed, its state is not kept
        seen.append(metrics["step"])
        if metrics["step"] == 3:
            raise KeyboardInterrupt("killed")
        keep(work, metrics, state)

    config = _online(corpus, llama_dir, tmp_path / "out", "sstoken", llama_history_dir, **dict(lora))
    with monkeypatch.context() as patch:
        patch.setattr(train_in_process, "_keep", killed_at_step_three)
        with pytest.raises(KeyboardInterrupt):
            run_train(config)
    assert (tmp_path / "out" / "masks" / step_shard(3)).is_file() and not (tmp_path / "out" / "masks" / "manifest.json").exists()
    resumed = run_train(config)
    assert not resumed.reused and seen == [1, 2, 3] and resumed.counts["steps"] == whole.counts["steps"] == 4
    expected, found = read_manifest(tmp_path / "whole" / "masks"), read_manifest(tmp_path / "out" / "masks")
    assert [(s["file"], s["sha256"]) for s in found["shards"]] == [(s["file"], s["sha256"]) for s in expected["shards"]]
    before, after = _weights(tmp_path / "whole"), _weights(tmp_path / "out")
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    assert run_train(config).reused  # finished: a rerun returns at once
    (tmp_path / "out" / "masks" / "manifest.json").unlink()  # masks damaged after the fact: not silently kept
    with pytest.raises(UserError, match="masks is incomplete while the trained checkpoint is in place.*--overwrite"):
        run_train(config)


def _three_step_runs(corpus, base: Path, folder: Path, steps: int, online: dict) -> Path:
    """A run of `steps` of the same 3-step plan (3 samples a step, one schedule): its output."""
    settings = dict(batch_size=3, micro_batch_size=3, schedule_total_steps=3, epochs=steps / 3, online=online)
    run_train(_online(corpus, base, folder, "sstoken", None, **settings))
    return folder


def test_the_previous_history_is_the_checkpoint_of_n_steps_ago(corpus, llama_dir, tmp_path):
    online = {"history_policy": "previous", "history_every": 1}
    runs = [_three_step_runs(corpus, llama_dir, tmp_path / f"steps-{n}", n, online) for n in (1, 2, 3)]
    # Step 3 selects with the weights after step 2 against those after step 1 (one step ago).
    data, _ = corpus
    fresh = tmp_path / "cache"
    run_score_job(ScoreJobConfig(data=data, current=runs[1] / "checkpoint", history=runs[0] / "checkpoint",
                                 output=tmp_path / "offline" / "scores", history_cache=fresh, progress=False, ray=PROCESS))
    run_select(SelectConfig(scores=tmp_path / "offline" / "scores", output=tmp_path / "offline" / "masks", method="sstoken"))
    _assert_same_selection(_masks_of(runs[2] / "masks", [step_shard(3)]), _masks_of(tmp_path / "offline" / "masks"),
                           "previous, step 3")
    manifest = read_manifest(runs[2] / "masks", kind="masks")
    assert manifest["selection"]["history_policy"] == "previous" and "history" not in manifest["checkpoints"]


def test_the_ema_history_is_the_weight_average_the_offline_loop_makes(corpus, llama_dir, tmp_path):
    from pipeline.loop.ema import ema_checkpoint

    online = {"history_policy": "ema", "history_every": 1, "ema_alpha": 0.5}
    runs = [_three_step_runs(corpus, llama_dir, tmp_path / f"steps-{n}", n, online) for n in (1, 2)]
    # Step 2 selects with the weights after step 1 against 0.5 * start + 0.5 * (after step 1).
    average = ema_checkpoint(llama_dir, runs[0] / "checkpoint", alpha=0.5, output=tmp_path / "ema")
    data, _ = corpus
    run_score_job(ScoreJobConfig(data=data, current=runs[0] / "checkpoint", history=average,
                                 output=tmp_path / "offline" / "scores", history_cache=tmp_path / "cache", progress=False,
                                 ray=PROCESS))
    run_select(SelectConfig(scores=tmp_path / "offline" / "scores", output=tmp_path / "offline" / "masks", method="sstoken"))
    _assert_same_selection(_masks_of(runs[1] / "masks", [step_shard(2)]), _masks_of(tmp_path / "offline" / "masks"),
                           "ema, step 2")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"masks": "m"}, "selection online selects its own tokens"),
        ({"workers": 2, "ray": {"runner": "ray"}}, "selection online trains one worker"),
        ({"epochs": 2.0}, r"one pass at most \(epochs <= 1, got 2\)"),
        ({"online": {"method": "oracle", "labels": "l"}}, "method oracle cannot select online"),
        ({"online": {"granularity": "global"}}, "granularity sample"),
        ({"online": {"method": "confidence", "min_prob": 0.5}}, "does not take min_prob"),
        ({"online": {"sample_ratio": 0.5}}, r"does not take sample_ratio \(got 0.5\)"),
        ({"online": {"history_policy": "previous"}}, "history_policy previous takes its history from the weights"),
        ({"online": {"method": "rho1", "history_policy": "ema"}}, "rho1 ranks against a fixed reference model"),
        ({"online": {"history_policy": "ema", "ema_alpha": 1.0}}, "ema_alpha"),
        ({"online": {"history_policy": "previous", "history_every": 0}}, "history_every"),
        ({"selection": "masks"}, "selection masks trains on keep masks: pass masks"),
    ],
)
def test_online_settings_that_cannot_work_are_refused_by_name(overrides, message):
    online = {"history": "h"} | overrides.pop("online", {})
    with pytest.raises(ValueError, match=message):
        TrainConfig(data="d", model="m", output="o", selection=overrides.pop("selection", "online"), online=online,
                    **overrides)


def test_cli_online_without_its_history_is_one_line_exit_2(corpus, llama_dir, tmp_path, capsys):
    data, _ = corpus
    code = main(["train", "--data", str(data), "--model", str(llama_dir), "--output", str(tmp_path / "out"),
                 "--selection", "online", "--online.method", "sstoken", "--ray.runner", "process"])
    err = capsys.readouterr().err
    assert code == 2 and "online method sstoken ranks REL: pass --online.history" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cli_help_names_the_online_section(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--selection" in out and "--online.method" in out and "--online.warmup-samples" in out


def test_ties_go_to_the_earlier_position_online_as_offline():
    """Equal scores (attention 0.5 at every target): the step keeps the first ceil(ratio * n) targets of each turn
    order, exactly as `sample_keep` does for the select stage (one function for both)."""
    from pipeline.selection.methods import sample_keep, sample_score
    from pipeline.selection.select_settings import SelectSettings
    from pipeline.training.online_data import OnlineRow
    from pipeline.training.online_step import select_samples

    trainable = np.array([False, False, True, True, True, False, True, True], bool)
    rows = [OnlineRow("a", np.arange(8), trainable, None)]
    settings = SelectSettings(method="attn", ratio=0.5)
    targets = int(trainable.sum())
    selected, warnings = select_samples(rows, torch.full((targets,), 2.0), torch.full((targets,), 0.5), None,
                                        settings, "history_minus_current")
    assert warnings == [] and np.flatnonzero(selected[0].keep).tolist() == [2, 3, 4]  # ceil(0.5 * 5), earliest first
    attn = np.where(trainable, np.float32(0.5), np.float32(np.nan))
    offline = sample_keep(sample_score("a", attn, attn, trainable, settings), trainable, settings)
    assert np.array_equal(selected[0].keep, offline)
