"""`EvalConfig`: the settings of `sstoken eval`, every row (a way of training) through the loop on one corpus, over seeds.

A cell is one seed x one row of the table (`pipeline.eval.rows`): an `sstoken run` in its own run
folder, built from this config's `ray:`, `prepare:`, `score:`, `select:` and `train:` sections (as
in a run config), with what the eval decides filled in per cell:
- the corpus: the seed's ground-truth task (`corpus: task`, `pipeline.eval.ground_truth`), or the
  seed's split of a natural corpus (`corpus: natural`, held-out NLL only);
- the rounds: by default one pass over the corpus in `slices` slices (`round_unit: slice`), each
  slice scored by the model trained on the slices before it and never on it (as the paper's online
  selection sees its data); slice 0 is the warm-up (REL is 0 there: attention-only for the ssToken
  family, every token for tokencleaning, as their authors start);
- the seed: of the task, the sample order, the random and oracle draws and training (every row
  of a seed starts from the same base with the same seed);
- the budget: every row trains one pass over the same samples in the same optimizer steps and keeps
  select.ratio of the trainable tokens, except `full` (every token) and `full_tokens` (every token
  of a select.ratio share of the samples); eval.json prints each row's kept tokens and steps;
- rho1: a reference model the seed trains first on clean problems disjoint from the training set
  (`task.reference_fraction` as many conversations; a natural corpus: a seeded share of rows held
  apart from training), every trainable token, `reference_epochs` passes;
- scoring in float32 (REL is a difference of two NLLs: bf16 rounding would swamp it).

`scale` multiplies the samples (the task's train and held-out counts, the natural corpus's
samples), so the steps grow with it: 1 is sized for a 2-core machine, larger for a GPU cluster.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

import pipeline
from pipeline.data.prepare_config import PrepareConfig
from pipeline.eval.ground_truth import CORRUPTION_KINDS
from pipeline.eval.worked_problems import PROBLEM_KINDS
from pipeline.eval.rows import DEFAULT_ROWS, FULL, ORACLE, ROWS, row
from pipeline.loop.run_config import RoundUnit, RunConfig
from pipeline.runtime.config import SectionedConfig, StageConfig
from pipeline.runtime.ray_settings import RaySettings
from pipeline.scoring.score_config import ScoreJobConfig
from pipeline.selection.select_settings import SelectSettings
from pipeline.training.train_config import TrainConfig

ALL_METHODS: tuple[str, ...] = tuple(ROWS)
BUNDLED_CORPUS = Path(pipeline.__file__).resolve().parent.parent / "examples" / "corpus"
# The cell fills these from the eval's own settings; a config that sets them is refused by name.
CELL_FIELDS: dict[str, tuple[str, ...]] = {"select": ("method", "seed", "labels"), "train": ("seed", "epochs")}
# REL is a difference of two NLLs: the eval scores in float32 only.
EVAL_DTYPE = "float32"


class TaskSettings(StageConfig):
    """The ground-truth task of every seed (`pipeline.eval.ground_truth.generate_task`), before `scale`."""

    train: int = Field(40, ge=2, description="Training conversations per seed (x scale).")
    heldout: int = Field(24, ge=1, description="Held-out clean problems per seed for NLL and exact match (x scale).")
    corrupt_fraction: float = Field(0.3, ge=0.0, le=1.0, description="Share of training conversations with a corrupted span.")
    reference_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="Clean conversations of the reference (rho1), as a share of task.train: "
        "problems of their own, disjoint from the training and held-out ones."
    )
    kinds: list[str] = Field(
        default_factory=lambda: list(PROBLEM_KINDS), description=f"Problem kinds, in equal shares: {', '.join(PROBLEM_KINDS)}."
    )
    corruptions: list[str] = Field(
        default_factory=lambda: list(CORRUPTION_KINDS),
        description=f"Corruption kinds, in equal shares over the corrupted conversations: {', '.join(CORRUPTION_KINDS)}.",
    )

    @field_validator("kinds", "corruptions")
    @classmethod
    def _known_kinds(cls, chosen: list[str], info: ValidationInfo) -> list[str]:
        known = PROBLEM_KINDS if info.field_name == "kinds" else CORRUPTION_KINDS
        unknown = [kind for kind in chosen if kind not in known]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"give each of {', '.join(known)} at most once (got {', '.join(chosen) or 'none'})")
        return chosen


class NaturalSettings(StageConfig):
    """corpus natural: JSONL files split per seed into training and held-out rows (held-out NLL only)."""

    corpus: list[Path] = Field(
        default_factory=lambda: [BUNDLED_CORPUS], description="JSONL files or folders of them (default: the bundled chats)."
    )
    samples: int | None = Field(
        None, ge=2, description="Training rows per seed, the first of the seed's order (x scale; none: all but the held-out)."
    )
    heldout: int = Field(40, ge=1, description="Held-out rows per seed (x scale), drawn first from the seed's order.")
    reference_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="Rows that train the reference (rho1), held apart from training, as a share of "
        "the training rows.")


class EvalConfig(SectionedConfig):
    """Settings of `sstoken eval`: methods x seeds through the loop, then each model measured."""

    derived_fields: ClassVar[dict[str, tuple[str, ...]]] = {
        section: RunConfig.derived_fields.get(section, ()) + CELL_FIELDS.get(section, ())
        for section in ("prepare", "score", "select", "train")
    }
    shared_sections: ClassVar[dict[str, tuple[str, ...]]] = RunConfig.shared_sections
    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "prepare": {"max_length": 512},
        "score": {"progress": False, "signals": "needed", "dtype": EVAL_DTYPE},
        "train": {"progress": False},
        "ray": {"runner": "process"},
    }

    output: Path = Field(Path("runs/eval"), description="Eval folder: eval.json, eval.md, eval.svg, data/ and cells/.")
    model: str = Field("smollm2-135m", description="Base model of every cell: a known model name or a model folder.")
    corpus: Literal["task", "natural"] = Field(
        "task", description="task: the generated worked problems with known corrupted tokens (every measure); natural: "
        "a natural chat corpus (held-out NLL only)."
    )
    methods: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ROWS),
        description=f"Rows of the table, one cell per seed each (pipeline/eval/rows.py): {', '.join(ROWS)}. corpus "
        "task needs oracle and full (the power gate compares them).",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2], description="Seeds (task, order, training); the table's spread is over them."
    )
    scale: float = Field(
        1.0, gt=0, le=10_000, description="Multiplies the samples (and so the steps): 1 fits a 2-core machine (at most 10000)."
    )
    round_unit: RoundUnit = Field(
        "slice", description="slice: one pass in `slices` slices, each scored before it is trained on (slice 0 the "
        "warm-up); epoch: every round over the whole corpus (a round then scores tokens trained on in the round before).",
    )
    slices: int = Field(5, ge=1, description="round_unit slice: slices per pass (rounds per epoch).")
    epochs: int = Field(1, ge=1, description="Passes over the corpus (1: every sample scored before it is trained on).")
    reference_epochs: float = Field(
        2.0, gt=0, le=10_000, description="rho1, tokencleaning: passes of the reference's training over its clean set (at most 10000)."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="corpus task: greedy tokens generated per held-out problem (exact match); none: the "
        "seed's longest held-out answer in tokens plus answer_margin, so no right answer is cut off.",
    )
    answer_margin: int = Field(8, ge=1, description="Tokens added to the longest held-out answer (max_new_tokens none).")
    task: TaskSettings = Field(default_factory=TaskSettings, description="corpus task: the generated task of every seed.")
    natural: NaturalSettings = Field(default_factory=NaturalSettings, description="corpus natural: the corpus and its split.")
    ray: RaySettings = Field(
        default_factory=RaySettings, description="The Ray cluster (or embedded Ray) and runner of every stage of every cell."
    )
    prepare: PrepareConfig = Field(description="The prepare stage of every cell.")
    score: ScoreJobConfig = Field(description="The score stage of every round (its selection comes from select: and the cell).")
    select: SelectSettings = Field(default_factory=SelectSettings, description="The selection settings of every cell (not its method).")
    train: TrainConfig = Field(description="The train stage of every round.")

    @classmethod
    def derived_settings(cls, top: dict[str, Any]) -> dict[str, dict[str, Any]]:
        # The sections are checked as a run config checks them; each cell fills in its own paths.
        return RunConfig.derived_settings({"output": Path(top["output"]) / "cells", "model": top["model"]})

    @classmethod
    def derived_from_sections(cls, given: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return RunConfig.derived_from_sections(given)

    @field_validator("methods")
    @classmethod
    def _methods_once_each(cls, methods: list[str]) -> list[str]:
        if not methods:
            raise ValueError("give at least one method")
        for name in methods:
            row(name)  # an unknown name is one error listing the rows
        repeated = sorted({m for m in methods if methods.count(m) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} given more than once")
        return methods

    @field_validator("seeds")
    @classmethod
    def _seeds_distinct(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("give at least one seed")
        if any(seed < 0 for seed in seeds):
            raise ValueError(f"seeds must be non-negative integers, got {seeds}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _rows_fit_the_corpus(self) -> EvalConfig:
        """corpus task: the oracle and full rows are there (the power gate); natural: no row needs labels."""
        if self.corpus == "task":
            missing = [name for name in (ORACLE, FULL) if name not in self.methods]
            if missing:
                raise ValueError(f"methods lacks {' and '.join(missing)}: the power gate compares oracle with full, so "
                                 "every eval on the task runs both")
        else:
            labelled = [name for name in self.methods if ROWS[name].needs_labels]
            if labelled:
                raise ValueError(f"{', '.join(labelled)} needs the task's known corrupted tokens; a natural corpus has "
                                 "none: leave it out of methods")
        if self.score.dtype != EVAL_DTYPE:
            raise ValueError(f"score.dtype {self.score.dtype}: the eval scores in float32 (REL is a difference of two "
                             "NLLs, which bf16 rounding swamps); leave score.dtype unset")
        if "slices" in self.model_fields_set and self.round_unit != "slice":
            raise ValueError("slices applies to round_unit slice; an epoch round trains on the whole corpus")
        return self

    @model_validator(mode="after")
    def _sizes_fit(self) -> EvalConfig:
        """corpus task: every round (and the reference) takes at least one optimizer step (natural: the run checks)."""
        if self.corpus != "task":
            return self
        batch = self.train.batch_size
        parts = self.slices if self.round_unit == "slice" else 1
        passes = [(f"task.train over {parts} slices", self.task_train, parts, 1.0)]
        if any(ROWS[name].token_matched for name in self.methods):
            passes.append((f"full_tokens, a select.ratio share of task.train, over {parts} slices",
                           self.token_matched(self.task_train), parts, 1.0))
        if any(ROWS[name].reference for name in self.methods):
            passes.append(("the reference set, task.reference_fraction,", self.reference_samples, 1, self.reference_epochs))
        for label, samples, parts, epochs in passes:
            if int(samples // parts * epochs) < batch:
                raise ValueError(
                    f"{label} gives {samples} samples a seed at scale {self.scale:g}, {samples // parts} a round and "
                    f"{epochs:g} passes: fewer than one train.batch_size {batch} batch; raise task.train or scale, lower "
                    "slices, or lower train.batch_size"
                )
        return self

    @property
    def task_train(self) -> int:
        return max(2, round(self.task.train * self.scale))

    @property
    def task_heldout(self) -> int:
        return max(1, round(self.task.heldout * self.scale))

    @property
    def reference_samples(self) -> int:
        """Conversations of the reference's clean set (the task's, disjoint from training)."""
        return round(self.task_train * self.task.reference_fraction)

    def token_matched(self, samples: int) -> int:
        """The samples `full_tokens` trains on out of `samples`: about the tokens a select.ratio selection keeps."""
        return max(1, math.ceil(round(samples * self.select.ratio, 9)))

    def scaled(self, count: int | None) -> int | None:
        return None if count is None else max(1, round(count * self.scale))

    def cell_sections(self) -> dict[str, dict[str, Any]]:
        """The sections as given (defaults included), without the fields a run or a cell fills in."""
        return {
            section: {k: v for k, v in getattr(self, section).model_dump().items() if k not in self.filled_fields(section)}
            for section in (*self.derived_fields, *self.shared_sections)
        }
