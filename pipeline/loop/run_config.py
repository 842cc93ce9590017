"""`RunConfig`: the settings of `sstoken run`, rounds of score -> select -> train in one run folder.

Its sections are the stages' own configs (`prepare:`, `score:`, `select:`, `train:`), unchanged,
and `ray:`, the one Ray session every stage of the run uses (a stage section cannot set its own);
its top-level fields say what a round is, which model plays which role, and where the run lives.
The paths that tie the stages together are filled in per round by the loop (they are shown here
for round 0, and cannot be set), and so are the score stage's selection fields (from `select:`,
so a method is stated once) and the train stage's place in the one learning-rate schedule.

Roles per method (current and history are the score stage's two checkpoints):
- sstoken, rel, attn, full, random, loss, confidence, entropy: current = the model before this round (the
  base model in round 0), history = the `history` policy's model (base, previous or ema; loss, confidence
  and entropy rank the current model's own signals and use no history).
- rho1: current = the model before this round, history = the reference (`reference`, or a model
  the run first trains on `reference_corpus` with every trainable token); excess current - history.
- tokencleaning: history = the base model; current = the reference when one is given (the fixed
  form), else the model before this round (the self-evolving form: slice k is scored by the base
  against the model of slice k-1, and training continues from that model).

With `train: {selection: online}` the run is one round, one continuous training from the base model whose
steps select their own tokens with the `select:` section's method (the paper's form): the score stage runs
once, over the history model only (the base; rho1's reference), to cache its NLLs; no select stage runs; the
masks are the train stage's own (rounds/r000/train/masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.data.prepare_config import PrepareConfig
from pipeline.runtime.config import SectionedConfig
from pipeline.runtime.model_zoo import model_dir
from pipeline.runtime.ray_settings import RaySettings
from pipeline.scoring.score_config import ScoreJobConfig
from pipeline.selection.select_settings import SelectSettings
from pipeline.training.train_config import TrainConfig

RoundUnit = Literal["slice", "epoch"]
HistoryPolicy = Literal["base", "previous", "ema"]
Warmup = Literal["attn", "full"]

# The selection fields the score stage also has: filled from the select: section.
SELECTION_FIELDS = tuple(SelectSettings.model_fields)
# Methods whose score is REL alone or in part, so round 0 (current == history, REL 0) needs the warm-up.
REFERENCE_METHODS = ("rho1", "tokencleaning")


def model_folder(name_or_folder: str) -> Path:
    """The folder a model argument names: the folder itself, or where a known model is (or will be) cached."""
    folder = Path(name_or_folder)
    return folder if folder.is_dir() else model_dir(name_or_folder)


def excess_for(method: str) -> str:
    """The direction the score stage stores REL in for a method: Rho-1 ranks current - reference."""
    return "current_minus_history" if method == "rho1" else "history_minus_current"


class RunConfig(SectionedConfig):
    """Settings of `sstoken run`: what a round is, the models' roles, and the stages' own sections."""

    derived_fields: ClassVar[dict[str, tuple[str, ...]]] = {
        "prepare": ("input", "tokenizer", "output"),
        "score": ("data", "current", "history", "output", "history_cache", "cache_current_nll", "excess", *SELECTION_FIELDS),
        "train": ("data", "masks", "model", "output", "schedule_start_step", "schedule_total_steps"),
    }
    # One Ray session serves every stage of a run: its settings are the run's `ray:` section, copied into each stage's.
    shared_sections: ClassVar[dict[str, tuple[str, ...]]] = {"ray": ("score", "train")}

    output: Path = Field(Path("runs/run"), description="Run folder: run.json, tokenized/, history_cache/, rounds/rNNN/.")
    corpus: list[Path] = Field(description="Corpus files or folders to prepare (any input `sstoken prepare` reads).")
    model: str = Field(description="Base model: a known model name (see `sstoken models list`) or a model folder.")
    round_unit: RoundUnit = Field(
        "slice",
        description="What one round trains on: slice (the corpus cut into `slices` parts per epoch, each scored by the "
        "model that has not trained on it yet, as the paper's online selection sees its data) or epoch (the whole "
        "corpus every round).",
    )
    slices: int = Field(5, ge=1, description="round_unit slice: slices per epoch (rounds per epoch).")
    epochs: int = Field(1, ge=1, description="Passes of the loop over the corpus (train.epochs: passes of one round over its data).")
    samples: int | None = Field(
        None, ge=1, description="Use only this many samples: the first of the seeded order (none: every sample)."
    )
    seed: int = Field(0, ge=0, description="Seed of the sample order the slices (and a subset) are cut from.")
    history: HistoryPolicy = Field(
        "base",
        description="History model of REL: base (the model the run starts from, the paper's experiments; its NLLs are "
        "cached), previous (the model before the current one), ema (ema_alpha * history + (1 - ema_alpha) * current).",
    )
    ema_alpha: float = Field(0.9, gt=0.0, lt=1.0, description="history ema: weight of the past in the weight average.")
    warmup: Warmup = Field(
        "attn",
        description="Round 0 of a method that uses REL while current == history (REL is 0): attn trains on the "
        "attention-only selection (the paper's start), full on every trainable token.",
    )
    reference: Path | None = Field(
        None, description="rho1, tokencleaning: the reference model folder (rho1: the history; tokencleaning: the current "
        "scorer, with the base as history).",
    )
    reference_corpus: list[Path] | None = Field(
        None, description="rho1, tokencleaning: a clean corpus the run first trains the reference on (every trainable "
        "token, from the base model), instead of a given reference.",
    )
    ray: RaySettings = Field(
        default_factory=RaySettings, description="The Ray cluster (or embedded Ray) and runner of every stage of the run."
    )
    prepare: PrepareConfig = Field(description="The prepare stage: the corpus into RUN/tokenized.")
    score: ScoreJobConfig = Field(description="The score stage of every round (its selection comes from select:).")
    select: SelectSettings = Field(default_factory=SelectSettings, description="The selection of every round.")
    train: TrainConfig = Field(description="The train stage of every round (one learning-rate schedule across rounds).")

    @classmethod
    def derived_settings(cls, top: dict[str, Any]) -> dict[str, dict[str, Any]]:
        run = Path(top["output"])
        model = model_folder(str(top["model"])) if "model" in top else Path("MODEL")  # missing: refused by name
        first = run / "rounds" / "r000"
        return {
            "prepare": {"input": top.get("corpus", []), "tokenizer": str(model), "output": run / "tokenized"},
            "score": {
                "data": run / "tokenized",
                "current": model,
                "history": model,
                "output": first / "scores",
                "history_cache": run / "history_cache",
                # A round's current model is a later round's history (the base of round 0 in round 1, the
                # previous policy's model): its NLLs over the same data are cached, so that history pass is skipped.
                "cache_current_nll": True,
            },
            "train": {
                "data": run / "tokenized",
                "masks": first / "masks",
                "model": model,
                "output": first / "train",
                "schedule_start_step": 0,
                "schedule_total_steps": None,
            },
        }

    @classmethod
    def derived_from_sections(cls, given: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        select = {name: value for name, value in given.get("select", {}).items() if name in SELECTION_FIELDS}
        method = str(select.get("method", SelectSettings.model_fields["method"].default))
        derived = {"score": select | {"excess": excess_for(method)}}
        train = given.get("train", {})
        if isinstance(train, dict) and train.get("selection") == "online":
            # Online: the steps select with the select: section's method; they read no masks (they write them).
            online = train.get("online", {})
            derived["train"] = {"masks": None, "online": (dict(online) if isinstance(online, dict) else {}) | select}
        return derived

    @property
    def online(self) -> bool:
        """train.selection online: one continuous training whose steps select their own tokens (one round)."""
        return self.train.selection == "online"

    @model_validator(mode="after")
    def _settings_fit_together(self) -> RunConfig:
        method, given = self.select.method, self.model_fields_set
        has_reference = self.reference is not None or self.reference_corpus is not None
        if self.reference is not None and self.reference_corpus is not None:
            raise ValueError("give reference (a model folder) or reference_corpus (to train one), not both")
        if method == "rho1" and not has_reference:
            raise ValueError(
                "select.method rho1 needs a reference model: set reference to a model folder, or reference_corpus to a "
                "clean corpus the run trains one on first"
            )
        if has_reference and method not in REFERENCE_METHODS:
            raise ValueError(f"reference and reference_corpus are for rho1 and tokencleaning, not select.method {method}")
        if method in REFERENCE_METHODS and self.history != "base":
            raise ValueError(f"select.method {method} sets its own history model; leave history at base")
        if "ema_alpha" in given and self.history != "ema":
            raise ValueError(f"ema_alpha applies to history ema, not history {self.history}")
        if "slices" in given and self.round_unit != "slice":
            raise ValueError("slices applies to round_unit slice; an epoch round trains on the whole corpus")
        if self.online:
            wrong = [f"{name} {getattr(self, name)}" for name, ok in (
                ("round_unit", "round_unit" not in given or self.round_unit == "epoch"), ("epochs", self.epochs == 1),
                ("history", self.history == "base"), ("warmup", "warmup" not in given)) if not ok]
            if wrong or "slices" in given:
                raise ValueError(
                    f"train.selection online is one continuous training over the corpus, its history the score stage's "
                    f"cache of one checkpoint, its warm-up train.online.warmup_samples: {', '.join(wrong or ['slices'])} "
                    "cannot be set with it"
                )
        elif self.round_unit == "slice" and self.samples is not None and self.slices > self.samples:
            raise ValueError(f"slices {self.slices} is more than the {self.samples} samples; set slices to at most {self.samples}")
        return self

    @property
    def rounds(self) -> int:
        """How many rounds the run has."""
        if self.online:
            return 1
        return self.epochs * (self.slices if self.round_unit == "slice" else 1)
