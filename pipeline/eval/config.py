"""`EvalConfig`: the settings of `sstoken eval`, every selection method through the loop on one corpus, over seeds.

A cell is one seed x one method: an `sstoken run` in its own run folder, built from this config's
`ray:`, `prepare:`, `score:`, `select:` and `train:` sections (as in a run config),
with what the eval decides filled in per cell:
- the corpus: the seed's ground-truth task (`corpus: task`, `pipeline.eval.ground_truth`), or the
  seed's split of a natural corpus (`corpus: natural`, held-out NLL only);
- the rounds: `rounds` epoch rounds over the same samples, so each round's selection quality is
  measured on the same tokens (round 0 selects with the base model, round 1 with round 0's model);
- the seed: of the task, the sample order, the random method and training (every method of a
  seed starts from the same base with the same seed);
- the budget of kept tokens seen: every method keeps `select.ratio` of the trainable tokens and
  trains one pass a round, except `full`, which keeps them all and trains on a `select.ratio` share
  of the samples a round (`train.epochs` = ratio): the same kept tokens seen, in expectation, with
  the same number of optimizer steps per kept token (eval.json has each method's real count);
- rho1 and tokencleaning: a reference model the seed trains first on the clean reference slice
  (the task's clean 20%; a natural corpus: a seeded 20% of its training rows), every trainable
  token, `reference_epochs` passes, shared by both methods of the seed.

`scale` multiplies the samples (the task's train and held-out counts, the natural corpus's
samples), so the steps grow with it: 1 is sized for a 2-core machine, larger for a GPU cluster.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

import pipeline
from pipeline.data.prepare_config import PrepareConfig
from pipeline.loop.run_config import REFERENCE_METHODS, RunConfig
from pipeline.runtime.config import SectionedConfig, StageConfig
from pipeline.runtime.ray_settings import RaySettings
from pipeline.scoring.score_config import ScoreJobConfig
from pipeline.selection.select_settings import Method, SelectSettings
from pipeline.training.train_config import TrainConfig

ALL_METHODS: tuple[str, ...] = ("full", "random", "rel", "attn", "sstoken", "rho1", "tokencleaning")
BUNDLED_CORPUS = Path(pipeline.__file__).resolve().parent.parent / "examples" / "corpus"
# The cell fills these from the eval's own settings; a config that sets them is refused by name.
CELL_FIELDS: dict[str, tuple[str, ...]] = {"select": ("method", "seed"), "train": ("seed", "epochs")}


class TaskSettings(StageConfig):
    """The ground-truth task of every seed (`pipeline.eval.ground_truth.generate_task`), before `scale`."""

    train: int = Field(20, ge=2, description="Training conversations per seed (x scale).")
    heldout: int = Field(24, ge=1, description="Held-out clean problems per seed for NLL and exact match (x scale).")
    corrupt_fraction: float = Field(0.3, ge=0.0, le=1.0, description="Share of training conversations with a corrupted span.")
    reference_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="Share of training conversations whose clean versions train the reference."
    )


class NaturalSettings(StageConfig):
    """corpus natural: JSONL files split per seed into training and held-out rows (held-out NLL only)."""

    corpus: list[Path] = Field(
        default_factory=lambda: [BUNDLED_CORPUS], description="JSONL files or folders of them (default: the bundled chats)."
    )
    samples: int | None = Field(
        None, ge=2, description="Training rows per seed, the first of the seed's order (x scale; none: all but the held-out)."
    )
    heldout: int = Field(40, ge=1, description="Held-out rows per seed (x scale), drawn first from the seed's order.")
    reference_fraction: float = Field(0.2, gt=0.0, le=1.0, description="Share of the training rows that train the reference.")


class EvalConfig(SectionedConfig):
    """Settings of `sstoken eval`: methods x seeds through the loop, then each model measured."""

    derived_fields: ClassVar[dict[str, tuple[str, ...]]] = {
        section: RunConfig.derived_fields.get(section, ()) + CELL_FIELDS.get(section, ())
        for section in ("prepare", "score", "select", "train")
    }
    shared_sections: ClassVar[dict[str, tuple[str, ...]]] = RunConfig.shared_sections
    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "prepare": {"max_length": 512},
        "score": {"progress": False, "signals": "needed"},
        "train": {"progress": False},
        "ray": {"runner": "process"},
    }

    output: Path = Field(Path("runs/eval"), description="Eval folder: eval.json, eval.md, eval.svg, data/ and cells/.")
    model: str = Field("smollm2-135m", description="Base model of every cell: a known model name or a model folder.")
    corpus: Literal["task", "natural"] = Field(
        "task", description="task: the generated worked problems with known corrupted tokens (every measure); natural: "
        "a natural chat corpus (held-out NLL only)."
    )
    methods: list[Method] = Field(default_factory=lambda: list(ALL_METHODS), description="Selection methods, one cell per seed each.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Seeds (task, order, training); the table's spread is over them.")
    scale: float = Field(1.0, gt=0, description="Multiplies the samples (and so the steps): 1 fits a 2-core machine.")
    rounds: int = Field(2, ge=1, description="Epoch rounds of every cell (round 0 selects with the base model).")
    reference_epochs: float = Field(2.0, gt=0, description="rho1, tokencleaning: passes of the reference's training over its slice.")
    max_new_tokens: int = Field(48, ge=1, description="corpus task: greedy tokens generated per held-out problem (exact match).")
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
    def _sizes_fit(self) -> EvalConfig:
        """corpus task: every round (and the reference) takes at least one optimizer step (natural: the run checks)."""
        if self.corpus != "task":
            return self
        batch = self.train.batch_size
        passes = [("task.train", self.task_train, self.select.ratio if "full" in self.methods else 1.0)]
        if set(self.methods) & set(REFERENCE_METHODS):
            passes.append(("the reference slice (task.reference_fraction)", self.reference_samples, self.reference_epochs))
        for label, samples, epochs in passes:
            if int(samples * epochs) < batch:
                raise ValueError(
                    f"{label} gives {samples} samples a seed (x scale {self.scale:g}) and {epochs:g} passes: fewer than "
                    f"one train.batch_size {batch} batch; raise task.train or scale, or lower train.batch_size"
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
        """Training conversations of the reference slice (the task's clean share)."""
        return math.ceil(self.task_train * self.task.reference_fraction)

    def scaled(self, count: int | None) -> int | None:
        return None if count is None else max(1, round(count * self.scale))

    def cell_sections(self) -> dict[str, dict[str, Any]]:
        """The sections as given (defaults included), without the fields a run or a cell fills in."""
        return {
            section: {k: v for k, v in getattr(self, section).model_dump().items() if k not in self.filled_fields(section)}
            for section in (*self.derived_fields, *self.shared_sections)
        }
