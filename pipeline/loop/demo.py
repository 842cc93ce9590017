"""The embedded demo: the self-modulated loop, two rounds on SmolLM2-135M over a subset of the bundled corpus.

`DemoConfig` is a `RunConfig` with the demo's defaults: the real small model (fetched once), the
bundled corpus, and two EPOCH rounds over the same seeded subset of `samples` samples, so both
rounds score the same samples and their masks can be compared token by token:
- round 0 (r000): the base model scores itself (current == history), REL is 0, the selection is
  attention-only (the warm-up), and LoRA training starts from the base;
- round 1 (r001): the round-0 checkpoint is scored against the base (history base, its NLLs
  cached from then on), ssToken's full score selects, and training continues from that checkpoint.
The demo ends with each round's loss and kept ratio, the agreement of the two rounds' masks, and
where the artifacts are. `sstoken run` with the demo's settings does the same without the summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

import pipeline
from pipeline.loop.run_config import RoundUnit, RunConfig
from pipeline.runtime.errors import UserError

BUNDLED_CORPUS = Path(pipeline.__file__).resolve().parent.parent / "examples" / "corpus"


class DemoConfig(RunConfig):
    """Settings of `sstoken demo`: a run config with the demo's defaults (every one can be changed)."""

    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "prepare": {"max_length": 512, "rows_per_shard": 64},
        "train": {"batch_size": 8, "micro_batch_size": 4, "checkpoint_every": 4},
    }

    output: Path = Field(Path("runs/demo"), description="Run folder: run.json, tokenized/, subset/, history_cache/, rounds/.")
    corpus: list[Path] = Field(default_factory=lambda: [BUNDLED_CORPUS], description="Corpus files or folders to prepare.")
    model: str = Field("smollm2-135m", description="Known model name (see `sstoken models list`) or a model folder.")
    round_unit: RoundUnit = Field("epoch", description="The demo's rounds are epochs over the same subset (see `sstoken run`).")
    epochs: int = Field(2, ge=1, description="Rounds (passes over the subset).")
    samples: int | None = Field(64, ge=1, description="Samples of the bundled corpus the demo trains on (a seeded subset).")


@dataclass(frozen=True)
class DemoRun:
    """What the demo did: the run, and how much its first two rounds' masks agree."""

    run: Any  # pipeline.loop.rounds.RunResult
    agreement: dict[str, Any] | None


def run_demo(config: DemoConfig) -> DemoRun:
    """Run the loop; then compare round 0's masks with round 1's."""
    from pipeline.loop.rounds import run_loop
    from pipeline.selection.compare import mask_agreement

    missing = [str(p) for p in config.corpus if not Path(p).exists()]
    if missing:
        raise UserError(
            f"demo corpus {', '.join(missing)} not found; run from a checkout of sstoken or pass --corpus PATH"
        )
    result = run_loop(config)
    rounds, folder = result.record.rounds, result.folder
    agreement = None
    if len(rounds) >= 2:
        agreement = mask_agreement(folder.inside(rounds[0].masks, "a masks folder"), folder.inside(rounds[1].masks, "a masks folder"))
    return DemoRun(run=result, agreement=agreement)
