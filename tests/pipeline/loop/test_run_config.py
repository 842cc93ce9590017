"""RunConfig: sections that are the stages' own configs, the loop's fields, and refusals that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.loop.roles import round_roles
from pipeline.loop.rounds import plan_rounds, planned_steps, round_stage_configs, run_identity
from pipeline.loop.run_config import RunConfig
from pipeline.loop.run_folder import RunFolder, read_run_record, write_run_record
from pipeline.runtime.config import config_from_arguments, load_config
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import ArtifactError
from pipeline.runtime.ray_settings import RaySettings
from pipeline.runtime.schemas import SchemaError


def _config(tmp_path: Path, model: Path, **settings) -> RunConfig:
    return RunConfig(output=tmp_path / "run", corpus=[tmp_path / "c.jsonl"], model=str(model), **settings)


def test_yaml_sections_and_flags_fill_the_stage_configs(tmp_path, llama_dir):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"model: {llama_dir}\ncorpus: [{tmp_path / 'c.jsonl'}]\nslices: 3\nhistory: ema\nema_alpha: 0.8\n"
        "select:\n  method: rel\n  ratio: 0.4\nscore:\n  max-batch-tokens: 512\ntrain:\n  batch_size: 4\n  lr: 0.001\n"
    )
    arguments = build_parser().parse_args(["run", str(config_file), "--output", str(tmp_path / "r"), "--select.ratio", "0.3"])
    config = config_from_arguments(RunConfig, arguments)
    assert (config.slices, config.history, config.ema_alpha, config.rounds) == (3, "ema", 0.8, 3)
    # The score stage's selection comes from select: (one place); the paths are the run's, round 0 shown.
    assert (config.score.method, config.score.ratio, config.score.max_batch_tokens) == ("rel", 0.3, 512)
    assert config.score.excess == "history_minus_current"
    assert config.score.history_cache == tmp_path / "r" / "history_cache"
    assert config.prepare.output == tmp_path / "r" / "tokenized" and config.prepare.tokenizer == str(llama_dir)
    assert (config.train.batch_size, config.train.lr, config.train.model) == (4, 0.001, llama_dir)
    assert config.train.output == tmp_path / "r" / "rounds" / "r000" / "train"


def test_rho1_stores_current_minus_history(tmp_path, llama_dir, llama_history_dir):
    config = _config(tmp_path, llama_dir, select={"method": "rho1"}, reference=llama_history_dir)
    assert config.score.method == "rho1" and config.score.excess == "current_minus_history"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rounds_total": 3}, "rounds_total"),
        ({"select": {"methd": "rel"}}, "methd"),
        ({"scoring": {}}, "scoring"),
        ({"history": "median"}, "history"),
        ({"history": "ema", "ema_alpha": 1.0}, "ema_alpha"),
        ({"history": "ema", "ema_alpha": 0.0}, "ema_alpha"),
        ({"ema_alpha": 0.5}, "ema_alpha applies to history ema"),
        ({"slices": 0}, "slices"),
        ({"samples": 4, "slices": 5}, "slices 5 is more than the 4 samples"),
        ({"round_unit": "epoch", "slices": 3}, "slices applies to round_unit slice"),
        ({"select": {"method": "rho1"}}, "rho1 needs a reference model"),
        ({"select": {"method": "rel"}, "reference": "/m"}, "for rho1 and tokencleaning, not select.method rel"),
        ({"select": {"method": "tokencleaning"}, "history": "previous"}, "leave history at base"),
        ({"select": {"method": "rho1"}, "reference": "/m", "reference_corpus": ["/c"]}, "not both"),
        ({"score": {"ratio": 0.3}}, "score.ratio cannot be set"),
        ({"score": {"excess": "current_minus_history"}}, "score.excess cannot be set"),
        ({"train": {"output": "/elsewhere"}}, "train.output cannot be set"),
        ({"train": {"schedule_total_steps": 9}}, "train.schedule_total_steps cannot be set"),
        ({"round_unit": "batch"}, "round_unit"),
        ({"select": {"sample_ratio": 1.5}}, "sample_ratio"),
        ({"select": {"sample_by": "entropy"}}, "sample_by entropy ranks samples for the sample filter"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path, llama_dir, settings, message):
    with pytest.raises(UserError, match=message):
        load_config(RunConfig, None, {"output": tmp_path / "r", "corpus": [tmp_path / "c"], "model": str(llama_dir)} | settings)


def test_corpus_and_model_are_required(tmp_path):
    with pytest.raises(UserError, match="corpus: Field required"):
        load_config(RunConfig, None, {"model": str(tmp_path)})
    with pytest.raises(UserError, match="model: Field required"):
        load_config(RunConfig, None, {"corpus": [tmp_path]})


def test_slice_rounds_cover_each_epoch_and_epoch_rounds_the_whole(tmp_path, llama_dir):
    specs = plan_rounds(_config(tmp_path, llama_dir, slices=3, epochs=2), 10)
    assert [(s.index, s.epoch, s.part, s.start, s.stop) for s in specs] == [
        (0, 0, 0, 0, 4), (1, 0, 1, 4, 7), (2, 0, 2, 7, 10), (3, 1, 0, 0, 4), (4, 1, 1, 4, 7), (5, 1, 2, 7, 10),
    ]
    epochs = plan_rounds(_config(tmp_path, llama_dir, round_unit="epoch", epochs=2), 10)
    assert [(s.part, s.start, s.stop) for s in epochs] == [(None, 0, 10), (None, 0, 10)]


def test_planned_steps_follow_the_train_stage(tmp_path, llama_dir):
    config = _config(tmp_path, llama_dir, train={"batch_size": 4, "micro_batch_size": 2, "epochs": 1.5})
    assert planned_steps(config, 10) == 3  # floor(1.5 * 10 / 4): whole global batches


def _roles(config: RunConfig, index: int, reference: Path | None = None):
    return round_roles(config, RunFolder(config.output), index, Path("/base"), reference)


def test_roles_per_history_policy(tmp_path, llama_dir):
    run = tmp_path / "run" / "rounds"
    base = _config(tmp_path, llama_dir)
    first = _roles(base, 0)
    assert (first.current, first.history, first.train_from) == (Path("/base"),) * 3
    assert first.selection.method == "attn" and "REL is 0" in first.warmup and "attention-only" in first.warmup
    third = _roles(base, 2)
    assert (third.current, third.history, third.train_from) == (run / "r001/train/checkpoint", Path("/base"), run / "r001/train/checkpoint")
    assert third.selection.method == "sstoken" and third.warmup is None

    previous = _config(tmp_path, llama_dir, history="previous")
    assert _roles(previous, 1).history == Path("/base") and _roles(previous, 2).history == run / "r000/train/checkpoint"

    ema = _config(tmp_path, llama_dir, history="ema", ema_alpha=0.5)
    assert _roles(ema, 0).ema_parts is None and _roles(ema, 0).history == Path("/base")
    assert _roles(ema, 1).history == run / "r001/history"
    assert _roles(ema, 1).ema_parts == (Path("/base"), run / "r000/train/checkpoint")
    assert _roles(ema, 2).ema_parts == (run / "r001/history", run / "r001/train/checkpoint")

    full = _roles(_config(tmp_path, llama_dir, warmup="full"), 0)
    assert full.selection.method == "full" and "every trainable token" in full.warmup
    assert _roles(_config(tmp_path, llama_dir, select={"method": "random"}), 0).warmup is None
    # a sample filter by REL has no signal in round 0 either: the warm-up, without the filter
    by_rel = _roles(_config(tmp_path, llama_dir, select={"method": "loss", "sample_ratio": 0.5, "sample_by": "rel"}), 0)
    assert by_rel.selection.method == "attn" and not by_rel.selection.filters_samples
    assert "select.sample_by rel has no signal" in by_rel.warmup
    assert _roles(_config(tmp_path, llama_dir, select={"method": "loss", "sample_ratio": 0.5}), 0).warmup is None


def test_roles_of_the_baselines(tmp_path, llama_dir):
    run = tmp_path / "run" / "rounds"
    rho1 = _config(tmp_path, llama_dir, select={"method": "rho1"}, reference=Path("/ref"))
    assert (_roles(rho1, 0, Path("/ref")).current, _roles(rho1, 0, Path("/ref")).history) == (Path("/base"), Path("/ref"))
    assert _roles(rho1, 1, Path("/ref")).current == run / "r000/train/checkpoint"
    fixed = _config(tmp_path, llama_dir, select={"method": "tokencleaning"}, reference=Path("/ref"))
    roles = _roles(fixed, 1, Path("/ref"))
    assert (roles.current, roles.history, roles.train_from) == (Path("/ref"), Path("/base"), run / "r000/train/checkpoint")
    evolving = _config(tmp_path, llama_dir, select={"method": "tokencleaning"})
    assert _roles(evolving, 0).selection.method == "attn"  # round 0: base against itself, the warm-up
    roles = _roles(evolving, 2)
    assert (roles.current, roles.history, roles.train_from) == (run / "r001/train/checkpoint", Path("/base"), run / "r001/train/checkpoint")


def test_run_record_is_written_atomically_and_read_back(tmp_path):
    folder = RunFolder(tmp_path)
    assert read_run_record(folder) is None
    record = {"version": 1, "created_at": "2026-01-01T00:00:00+00:00", "status": "running", "identity": "x",
              "settings": {}, "config": {}, "round_unit": "slice", "history": {"policy": "base"},
              "selection": {"method": "sstoken"}, "models": {"base": {"path": "m", "fingerprint": "f"}, "reference": None},
              "rounds": []}
    written = write_run_record(folder, record)
    assert read_run_record(folder).as_json() == written and "updated_at" in written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(SchemaError, match="run.json does not match run.v1.schema.json at \\(top level\\): 'created_at'"):
        write_run_record(folder, {"version": 1, "rounds": []})  # the writer checks the schema too
    (tmp_path / "run.json").write_text("{half")
    with pytest.raises(ArtifactError, match="run.json is not a run record .*: not readable as JSON"):
        read_run_record(folder)  # never taken for "no run yet" (which would write over it)


def test_run_identity_ignores_where_and_how_the_stages_run(tmp_path, llama_dir):
    one = _config(tmp_path, llama_dir, score={"workers": 1, "progress": False}, train={"workers": 1})
    other = _config(tmp_path, llama_dir, score={"workers": 2}, train={"progress": False, "checkpoint_every": 3})
    assert run_identity(one) == run_identity(other)
    assert run_identity(one) == run_identity(_config(tmp_path, llama_dir, ray={"address": "10.0.0.1:6379", "num_cpus": 3}))
    assert run_identity(one) != run_identity(_config(tmp_path, llama_dir, select={"ratio": 0.5}))
    assert run_identity(one) != run_identity(_config(tmp_path, llama_dir, train={"lr": 0.001}))


def test_a_select_section_given_as_settings_reaches_the_score_section(tmp_path, llama_dir):
    from pipeline.selection.select_settings import SelectSettings

    config = _config(tmp_path, llama_dir, select=SelectSettings(method="random", ratio=0.2, seed=3))
    assert (config.score.method, config.score.ratio, config.score.seed) == ("random", 0.2, 3)


def test_a_sample_filter_in_the_select_section_reaches_the_score_section_and_the_run_key(tmp_path, llama_dir):
    config = _config(tmp_path, llama_dir, select={"method": "loss", "sample_ratio": 0.5, "sample_by": "entropy"})
    assert (config.score.sample_ratio, config.score.sample_by) == (0.5, "entropy")
    assert config.select.selection_key() == {"method": "loss", "ratio": 0.6, "granularity": "sample",
                                             "sample_ratio": 0.5, "sample_by": "entropy"}
    assert run_identity(config) != run_identity(_config(tmp_path, llama_dir, select={"method": "loss"}))


# -- the ray: section: one Ray session for every stage of the run -----------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"train": {"address": "10.0.0.1:6379"}}, "train.address cannot be set in a stage section: set ray.address in the ray: section"),
        ({"score": {"num_cpus": 4}}, "score.num_cpus cannot be set in a stage section: set ray.num_cpus in the ray: section"),
        ({"score": {"object_store_mb": 512}}, r"set ray.object_store_mb in the ray: section \(--ray.object-store-mb\)"),
        ({"train": {"runner": "process"}}, "train.runner cannot be set in a stage section: set ray.runner in the ray: section"),
        ({"score": {"ray": {"address": "auto"}}}, "score.ray cannot be set in a stage section: set ray in the ray: section"),
        ({"connect_timeout_s": 5}, r"connect_timeout_s is a setting of the ray: section: set ray.connect_timeout_s"),
    ],
)
def test_cluster_settings_in_a_stage_section_are_refused_naming_the_ray_section(tmp_path, llama_dir, settings, message):
    """Each stage used to take its own address, and the run silently opened Ray with score's: now one place, named."""
    with pytest.raises(UserError, match=message):
        load_config(RunConfig, None, {"output": tmp_path / "r", "corpus": [tmp_path / "c"], "model": str(llama_dir)} | settings)


def test_the_ray_section_reaches_the_score_and_train_stage_of_every_round(tmp_path, llama_dir):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"model: {llama_dir}\ncorpus: [{tmp_path / 'c.jsonl'}]\nslices: 3\nepochs: 2\nhistory: previous\n"
        "ray:\n  address: 10.0.0.1:6379\n  connect-timeout-s: 5\n"
    )
    argv = ["run", str(config_file), "--ray.address", "10.0.0.2:6379", "--ray.num-cpus", "3", "--ray.object-store-mb", "300"]
    config = config_from_arguments(RunConfig, build_parser().parse_args(argv))
    expected = RaySettings(address="10.0.0.2:6379", num_cpus=3, object_store_mb=300, connect_timeout_s=5)
    assert config.ray == config.score.ray == config.train.ray == expected
    folder = RunFolder(config.output)
    specs = plan_rounds(config, 12)
    assert len(specs) == 6
    for spec in specs:
        stages = round_stage_configs(config, folder, spec.index, folder.data(spec.index), _roles(config, spec.index), (0, 6))
        assert stages.score.ray == stages.train.ray == expected, f"round {spec.index}"
        assert stages.train.output == folder.train(spec.index)


def test_without_a_ray_section_every_stage_runs_on_the_default(tmp_path, llama_dir):
    config = _config(tmp_path, llama_dir, score={"workers": 1}, train={"lr": 0.001})
    assert config.ray == config.score.ray == config.train.ray == RaySettings()
