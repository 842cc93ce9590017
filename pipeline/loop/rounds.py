"""`sstoken run`: prepare once, then rounds of score -> select -> train in one run folder.

    run_loop(RunConfig(...)) -> RunResult

Each round's checkpoint is the next round's current model, and training continues from it; every
round follows one linear learning-rate schedule (`schedule_start_step`, `schedule_total_steps`),
planned up front from the rounds' sample counts. The roles per method are in `pipeline.loop.roles`,
the slices in `pipeline.loop.slices`, the layout and run.json in `pipeline.loop.run_folder`.

The run folder goes through the stage runner (`pipeline.runtime.stage_runner`): locked, refused
when it overlaps the corpus or a model or holds anything the run did not write; run.json (typed:
`pipeline.loop.run_folder.RunRecord`, `schemas/run.v1.schema.json`) is its record.

Resume: every stage is exactly-once on its own, so a killed run is finished by running it again.
A round recorded done in run.json whose checkpoint is complete is skipped whole; in the round in
flight a stage recorded done whose output's manifest is there is skipped, and any other stage is
run again, which resumes from its own progress (finished shards, the trainer's last checkpoint).
One Ray session serves every stage of the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.loop.ema import ema_checkpoint
from pipeline.loop.roles import RoundRoles, round_roles
from pipeline.loop.run_config import RunConfig, model_folder
from pipeline.loop.run_folder import (
    RUN_ENTRIES,
    RUN_RECORD_VERSION,
    RunFolder,
    RunRecord,
    read_run_record,
    write_run_record,
)
from pipeline.loop.slices import corpus_ids, materialise_slice, sample_order, slice_bounds
from pipeline.runtime.checkpoints import checkpoint_fingerprint
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import MANIFEST, read_manifest, utc_now
from pipeline.runtime.fingerprint import sha256_json
from pipeline.runtime.log import say
from pipeline.runtime.model_zoo import ensure_model
from pipeline.runtime.ray_session import ray_session
from pipeline.runtime.stage_output import StageOutput, StageSummary
from pipeline.runtime.stage_runner import Stage, local_inputs, run_stage
from pipeline.scoring.score_config import ScoreJobConfig
from pipeline.selection.select_config import SelectConfig
from pipeline.training.train_config import TrainConfig
from pipeline.training.train_metrics import train_curve
from pipeline.training.training_data import DataPlan, shards_key


@dataclass(frozen=True)
class RoundSpec:
    """Round `index`: pass `epoch` over the corpus, slice `part` of it (None: the whole), order[start:stop]."""

    index: int
    epoch: int
    part: int | None
    start: int
    stop: int

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RunResult:
    """What a run did: its folder, its record (run.json, typed) and the prepare stage's summary."""

    folder: RunFolder
    record: RunRecord
    prepared: StageSummary | None


def plan_rounds(config: RunConfig, samples: int) -> list[RoundSpec]:
    """The rounds of the run over `samples` samples (positions in the seeded order)."""
    if config.online:
        return [RoundSpec(0, 0, None, 0, samples)]
    if config.round_unit == "epoch":
        return [RoundSpec(epoch, epoch, None, 0, samples) for epoch in range(config.epochs)]
    bounds = slice_bounds(samples, config.slices)
    return [
        RoundSpec(epoch * config.slices + part, epoch, part, start, stop)
        for epoch in range(config.epochs)
        for part, (start, stop) in enumerate(bounds)
    ]


def planned_steps(config: RunConfig, samples: int) -> int:
    """Optimizer steps of a round of `samples` samples, as the train stage counts them."""
    train = config.train
    return DataPlan(samples, train.batch_size, train.micro_batch_size, train.workers, train.seed, train.epochs).steps


def _refuse_stepless_rounds(config: RunConfig, specs: list[RoundSpec], steps: list[int]) -> None:
    """A round too small for one global batch would train nothing; say which and what to change."""
    for spec, count in zip(specs, steps):
        if count == 0:
            raise UserError(
                f"round {spec.index} has {spec.samples} samples, fewer than train.batch_size {config.train.batch_size} "
                f"/ train.epochs {config.train.epochs}: it would take no optimizer step; lower train.batch_size, or use "
                "fewer slices or more samples"
            )


def run_identity(config: RunConfig) -> dict[str, Any]:
    """What the run's results depend on: a rerun with other values is another run (refused in the same folder).

    Models enter by content, never by path: `model` (and a given `reference`) is its checkpoint's fingerprint,
    so other weights at the same path are another run. The base model must be in place (`ensure_model`)."""
    paths = ("output", "model", "reference")
    top = {name: value for name, value in config.resolved().items() if name not in (*config.sections(), *paths)}
    models = {"model": checkpoint_fingerprint(model_folder(config.model))}
    if config.reference is not None:
        models["reference"] = checkpoint_fingerprint(config.reference)
    # prepare's tokenizer is the base model's folder: its content is the model fingerprint above.
    prepare = {name: value for name, value in config.prepare.run_key_settings().items() if name != "tokenizer"}
    return top | models | {
        "prepare": prepare,
        "score": config.score.run_key_settings(),
        "select": config.select.selection_key(),
        "train": config.train.train_settings().run_key_settings(),
    } | ({"online": config.train.online.selection_key() | {"warmup_samples": config.train.online.warmup_samples,
                                                            "layer": config.train.online.layer}}
         if config.online else {})


@contextmanager
def section_flags(section: str) -> Iterator[None]:
    """A stage's error inside a run names the run's flag: its `--overwrite` is `--SECTION.overwrite` here."""
    try:
        yield
    except UserError as error:
        if error.args and isinstance(error.args[0], str) and "--overwrite" in error.args[0]:
            error.args = (error.args[0].replace("--overwrite", f"--{section}.overwrite"), *error.args[1:])
        raise


def _model_entry(path: Path) -> dict[str, str]:
    return {"path": str(path), "fingerprint": checkpoint_fingerprint(path)}


def earlier_run(
    folder: RunFolder, identity: dict[str, Any], models: dict[str, Path | str | None] | None = None
) -> RunRecord | None:
    """The record of an earlier run of these settings in `folder` (None: a new run); another run's is refused, and a
    run.json that is not a run record is one error naming it (never overwritten). `models` (identity key -> path:
    model, reference) lets the refusal say which path now holds other weights."""
    record = read_run_record(folder)
    if record is not None and record.identity != sha256_json(identity):
        before = record.settings
        changed = sorted(k for k in identity.keys() | before.keys() if identity.get(k) != before.get(k))
        weights = [
            f"{name} {path} now holds other weights (fingerprint {identity[name][:12]}, "
            f"the run's: {str(before.get(name))[:12]})"
            for name, path in (models or {}).items() if name in changed and name in identity
        ]
        raise UserError(
            f"{folder.root} holds a run made with other settings ({', '.join(changed) or 'code'} differ"
            + "".join(f"; {line}" for line in weights)
            + "); choose another output folder, or rerun with the settings and models it was started with"
        )
    return record


class _Run:
    """One run in progress: its config, folder, record (run.json, a dict while it is written) and base model."""

    def __init__(self, config: RunConfig, folder: RunFolder, base: Path, earlier: RunRecord | None):
        self.config, self.folder, self.base = config, folder, base
        self.data_fingerprint: str | None = None  # RUN/tokenized's, once prepared: what the rounds are cut from
        self.record = self._start_record(earlier)

    def prepared(self, data_fingerprint: str) -> None:
        """The corpus is prepared: refuse rounds recorded from another one, then stamp the record with it.

        A round depends on the data it was cut from: with the corpus changed under the run (and re-prepared
        with --prepare.overwrite), a finished round would be kept while tokenized/ holds other samples."""
        stale = [entry["round"] for entry in self.record["rounds"]
                 if entry.get("data_fingerprint") not in (None, data_fingerprint)]
        if stale:
            before = next(e["data_fingerprint"] for e in self.record["rounds"] if e["round"] == stale[0])
            raise UserError(
                f"{self.folder.tokenized} now holds another corpus (data fingerprint {data_fingerprint[:12]}) than the "
                f"one round(s) {', '.join(f'r{i:03d}' for i in stale)} of this run were cut from ({before[:12]}); they "
                "cannot be kept for it: choose another output folder for a run on this corpus, or restore the corpus "
                "the run was started with"
            )
        self.data_fingerprint = data_fingerprint
        self.record["data_fingerprint"] = data_fingerprint

    def _start_record(self, earlier: RunRecord | None) -> dict[str, Any]:
        identity = run_identity(self.config)
        if earlier is not None:
            record = earlier.as_json()
        else:
            record = {
                "version": RUN_RECORD_VERSION,
                "created_at": utc_now(),
                "status": "running",
                "identity": sha256_json(identity),
                "settings": identity,
                "config": self.config.resolved(),
                "round_unit": self.config.round_unit,
                "history": {"policy": self.config.history}
                | ({"alpha": self.config.ema_alpha} if self.config.history == "ema" else {}),
                "selection": self.config.select.selection_key(),
                "models": {"base": _model_entry(self.base), "reference": None},
                "rounds": [],
            }
        return self.save(record)

    def save(self, record: dict[str, Any] | None = None) -> dict[str, Any]:
        self.record = write_run_record(self.folder, record if record is not None else self.record)
        return self.record

    def round_entry(self, spec: RoundSpec) -> dict[str, Any]:
        for entry in self.record["rounds"]:
            if entry["round"] == spec.index:
                return entry
        entry = {"round": spec.index, "epoch": spec.epoch, "slice": spec.part, "samples": spec.samples,
                 "data_fingerprint": self.data_fingerprint, "status": "running", "stages": {}}
        self.record["rounds"].append(entry)
        return entry

    def stage(self, entry: dict[str, Any], name: str, output: Path, run: Callable[[], StageSummary]) -> dict[str, Any]:
        """Run one stage of a round unless it is recorded done and its output is complete; its figures."""
        done = entry["stages"].get(name)
        if done is not None and (Path(output) / MANIFEST).is_file():
            return done
        started = time.monotonic()
        with section_flags(name) if name in ("score", "train") else nullcontext():  # select has no overwrite here
            summary = run()
        figures = {"seconds": round(time.monotonic() - started, 3), "counts": dict(summary.counts),
                   "notes": list(summary.notes)}
        entry["stages"][name] = figures
        self.save()
        return figures


def _round_data(run: _Run, spec: RoundSpec, order: list[str]) -> Path:
    """The tokenized folder a round scores and trains on: its slice, the subset, or the whole corpus."""
    config, folder = run.config, run.folder
    rows = config.prepare.rows_per_shard
    if spec.part is not None:
        description = {"round": spec.index, "epoch": spec.epoch, "slice": spec.part, "of": config.slices, "seed": config.seed}
        materialise_slice(folder.tokenized, order[spec.start:spec.stop], folder.data(spec.index), rows, description)
        return folder.data(spec.index)
    if config.samples is None:
        return folder.tokenized
    materialise_slice(folder.tokenized, order, folder.subset, rows, {"subset": len(order), "seed": config.seed})
    return folder.subset


def _trained_reference(run: _Run) -> Path:
    """rho1 / tokencleaning with reference_corpus: the base trained on it with every trainable token."""
    from pipeline.data.prepare_stage import run_prepare
    from pipeline.scoring.score_stage import run_score_job
    from pipeline.training.train_stage import run_train

    config, folder, base = run.config, run.folder, run.base
    assert config.reference_corpus is not None
    say("run", f"reference: training {base} on every trainable token of {', '.join(map(str, config.reference_corpus))}")
    with section_flags("prepare"):
        run_prepare(config.prepare.model_copy(update={"input": config.reference_corpus, "output": folder.reference("tokenized")}))
    with section_flags("score"):
        run_score_job(config.score.model_copy(update={
            "data": folder.reference("tokenized"), "current": base, "history": base, "output": folder.reference("scores"),
            "method": "full", "signals": "needed", "excess": "history_minus_current",
        }))
    with section_flags("train"):
        run_train(config.train.model_copy(update={
            "data": folder.reference("tokenized"), "masks": folder.reference("scores"), "model": base,
            "output": folder.reference("train"), "schedule_start_step": 0, "schedule_total_steps": None,
        }))
    return folder.reference("train") / "checkpoint"


def _reference(run: _Run) -> Path | None:
    config = run.config
    if config.reference is None and config.reference_corpus is None:
        return None
    reference = Path(config.reference) if config.reference is not None else _trained_reference(run)
    entry = _model_entry(reference) | {"trained_by_run": config.reference is None}
    if run.record["models"].get("reference") != entry:
        run.record["models"]["reference"] = entry
        run.save()
    return reference


def read_train_loss(train_output: Path) -> float | None:
    """Mean loss over the optimizer steps of a train stage's metrics.jsonl (the last line of a step wins)."""
    losses = [float(metric["loss"]) for metric in train_curve(train_output)]
    return sum(losses) / len(losses) if losses else None


def _round_summary(entry: dict[str, Any], train_output: Path) -> dict[str, Any]:
    stages = entry["stages"]
    select_counts = stages["select"]["counts"]
    score_s, select_s, train_s = (stages[name]["seconds"] for name in ("score", "select", "train"))
    return {
        "train_loss": read_train_loss(train_output),
        "kept": select_counts.get("kept"),
        "trainable": select_counts.get("trainable"),
        "kept_ratio": select_counts.get("kept_ratio"),
        "history_computed": stages["score"]["counts"].get("history_computed"),
        "history_reused": stages["score"]["counts"].get("history_reused"),
        "score_s": score_s,
        "select_s": select_s,
        "train_s": train_s,
        "rescore_to_train": round(score_s / train_s, 4) if train_s else None,
    }


def _roles_entry(run: _Run, roles: RoundRoles) -> dict[str, Any]:
    return {
        "current": _model_entry(roles.current),
        "history": _model_entry(roles.history) | {"policy": run.config.history},
        "train_from": str(roles.train_from),
        "selection": roles.selection.selection_key(),
        "warmup": roles.warmup,
    }


@dataclass(frozen=True)
class RoundStages:
    """The stage configs of one round."""

    score: ScoreJobConfig
    select: SelectConfig
    train: TrainConfig


def round_stage_configs(
    config: RunConfig, folder: RunFolder, index: int, data: Path, roles: RoundRoles, schedule: tuple[int, int]
) -> RoundStages:
    """Round `index`'s score, select and train configs: the run's sections with the round's data, models, paths,
    selection and schedule filled in (everything else, the run's `ray:` section included, as the run gives it)."""
    selection = roles.selection.model_dump()
    return RoundStages(
        score=config.score.model_copy(update={
            "data": data, "current": roles.current, "history": roles.history, "output": folder.scores(index), **selection,
        }),
        select=SelectConfig(scores=folder.scores(index), output=folder.masks(index), **selection),
        train=config.train.model_copy(update={
            "data": data, "masks": folder.masks(index), "model": roles.train_from, "output": folder.train(index),
            "schedule_start_step": schedule[0], "schedule_total_steps": schedule[1],
        }),
    )


def _run_round(run: _Run, spec: RoundSpec, order: list[str], reference: Path | None, schedule: tuple[int, int]) -> None:
    from pipeline.scoring.score_stage import run_score_job
    from pipeline.selection.select_stage import run_select
    from pipeline.training.train_stage import run_train

    config, folder, index = run.config, run.folder, spec.index
    entry = run.round_entry(spec)
    checkpoint = folder.checkpoint(index)
    if entry["status"] == "done" and (folder.train(index) / MANIFEST).is_file():
        say("run", f"r{index:03d}: done earlier, kept ({folder.relative(checkpoint)})")
        return
    where = f", epoch {spec.epoch}" + (f", slice {spec.part}" if spec.part is not None else "")
    label = f"r{index:03d} (round {index + 1} of {config.rounds}{where})"
    data = _round_data(run, spec, order)
    roles = round_roles(config, folder, index, run.base, reference)
    if config.online:
        _run_online_round(run, entry, data, roles.history, schedule, label)
        return
    if roles.ema_parts is not None:
        ema_checkpoint(*roles.ema_parts, alpha=config.ema_alpha, output=roles.history)
    entry |= {"data": folder.relative(data)} | _roles_entry(run, roles)
    entry |= {"scores": folder.relative(folder.scores(index)), "masks": folder.relative(folder.masks(index)),
              "checkpoint": folder.relative(checkpoint), "schedule": {"start_step": schedule[0], "total_steps": schedule[1]}}
    run.save()
    if roles.warmup is not None:
        say("run", roles.warmup)
    say("run", f"{label}: scoring {spec.samples} samples, current {roles.current}, history {roles.history}")
    stages = round_stage_configs(config, folder, index, data, roles, schedule)
    run.stage(entry, "score", folder.scores(index), lambda: run_score_job(stages.score))
    say("run", f"{label}: selecting ({roles.selection.method}) into {folder.relative(folder.masks(index))}")
    run.stage(entry, "select", folder.masks(index), lambda: run_select(stages.select))
    say("run", f"{label}: training from {roles.train_from} (schedule steps from {schedule[0]} of {schedule[1]})")
    run.stage(entry, "train", folder.train(index), lambda: run_train(stages.train))
    entry["checkpoint_fingerprint"] = checkpoint_fingerprint(checkpoint)
    entry["summary"] = _round_summary(entry, folder.train(index))
    entry["status"] = "done"
    run.save()
    say("run", f"{label}: done: " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in entry["summary"].items()
                                       if k in ("train_loss", "kept_ratio") and v is not None))


def online_stage_configs(config: RunConfig, folder: RunFolder, data: Path, base: Path, history: Path,
                         schedule: tuple[int, int]) -> tuple[ScoreJobConfig | None, TrainConfig]:
    """An online run's two stages: the score stage over the history model alone, to cache its NLLs (None when the
    method uses no REL, or REL against the trained weights: train.online.history_policy previous or ema), and the
    one continuous training from the base model that selects as it goes."""
    uses_rel = config.train.online.uses_rel and not config.train.online.moving_history  # a cached history checkpoint
    score = None
    if uses_rel:
        score = config.score.model_copy(update={
            "data": data, "current": history, "history": history, "output": folder.scores(0), "cache_current_nll": True,
            "method": "full", "signals": "needed", "excess": "history_minus_current",
        })
    online = config.train.online.model_copy(update={"history": history if uses_rel else None,
                                                   "history_cache": folder.history_cache})
    train = config.train.model_copy(update={
        "data": data, "masks": None, "model": base, "output": folder.train(0), "online": online,
        "schedule_start_step": schedule[0], "schedule_total_steps": schedule[1],
    })
    return score, train


def _run_online_round(run: _Run, entry: dict[str, Any], data: Path, history: Path, schedule: tuple[int, int],
                      label: str) -> None:
    from pipeline.scoring.score_stage import run_score_job
    from pipeline.training.train_stage import MASKS, run_train

    config, folder = run.config, run.folder
    score, train = online_stage_configs(config, folder, data, run.base, history, schedule)
    masks = folder.train(0) / MASKS
    entry |= {"data": folder.relative(data), "masks": folder.relative(masks), "train_from": str(run.base),
              "checkpoint": folder.relative(folder.checkpoint(0)), "selection": config.select.selection_key(),
              "schedule": {"start_step": schedule[0], "total_steps": schedule[1]}}
    if score is not None:
        entry |= {"scores": folder.relative(folder.scores(0)),
                  "history": _model_entry(history) | {"policy": config.history}}
        say("run", f"{label}: caching the history NLLs of {history} (score stage, history model only)")
        run.stage(entry, "score", folder.scores(0), lambda: run_score_job(score))
    run.save()
    say("run", f"{label}: training from {run.base} with online selection ({config.select.method}); masks into "
               f"{folder.relative(masks)}")
    run.stage(entry, "train", folder.train(0), lambda: run_train(train))
    counts = read_manifest(masks, kind="masks")["counts"]
    stages = entry["stages"]
    entry["checkpoint_fingerprint"] = checkpoint_fingerprint(folder.checkpoint(0))
    entry["summary"] = {
        "train_loss": read_train_loss(folder.train(0)), "kept": counts["kept"], "trainable": counts["trainable"],
        "kept_ratio": counts["kept"] / counts["trainable"] if counts["trainable"] else None,
        "history_computed": None,
        "history_reused": None, "score_s": stages["score"]["seconds"] if "score" in stages else 0.0,
        "select_s": 0.0, "train_s": stages["train"]["seconds"], "rescore_to_train": None,
    }
    entry["status"] = "done"
    run.save()
    say("run", f"{label}: done: train loss {entry['summary']['train_loss']:.4g}, kept ratio "
               f"{entry['summary']['kept_ratio']:.4g}")


def run_loop(config: RunConfig) -> RunResult:
    """Prepare (if needed), then every round; a killed run resumes where it stopped. Returns the run's record.

    The run folder goes through the stage runner like every stage's output: an output that overlaps the corpus or a
    model, or that holds anything the run did not write (a run.json of someone else's included), is refused before
    anything is written. It keeps its own record, run.json, instead of a manifest."""
    from pipeline.data.prepare_stage import run_prepare

    folder = RunFolder(Path(config.output))
    base = Path(config.model) if Path(config.model).is_dir() else ensure_model(config.model)
    identity = run_identity(config)
    runs: list[_Run] = []
    prepared: list[StageSummary] = []

    def work(out: StageOutput, earlier: RunRecord | None) -> None:
        run = _Run(config, folder, base, earlier)
        runs.append(run)
        with ray_session(config.ray):
            with section_flags("prepare"):
                prepared.append(run_prepare(config.prepare))
            run.prepared(shards_key(read_manifest(folder.tokenized, kind="tokenized")))
            order = sample_order(corpus_ids(folder.tokenized), config.seed)[: config.samples]
            specs = plan_rounds(config, len(order))
            steps = [planned_steps(config, spec.samples) for spec in specs]
            _refuse_stepless_rounds(config, specs, steps)
            run.record["schedule"] = {"total_steps": sum(steps), "steps_per_round": steps}
            run.record["samples"] = len(order)
            run.save()
            reference = _reference(run)
            for spec in specs:
                _run_round(run, spec, order, reference, (sum(steps[: spec.index]), sum(steps)))
        run.record["status"] = "done"
        run.save()

    inputs = [*config.corpus, base, *local_inputs(config.reference), *(config.reference_corpus or [])]
    stage = Stage("run", folder.root, inputs=inputs, entries=RUN_ENTRIES)
    models = {"model": base, "reference": config.reference}
    run_stage(stage, work, ready=lambda: nullcontext(earlier_run(folder, identity, models)))
    return RunResult(folder=folder, record=RunRecord.model_validate(runs[0].record), prepared=prepared[0])
