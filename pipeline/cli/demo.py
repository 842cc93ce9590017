"""`sstoken demo`: the self-modulated loop on its embedded default, two rounds end to end on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from pipeline.cli.command import stage_command
from pipeline.cli.run import artifacts_note, rounds_table
from pipeline.loop.demo import DemoConfig

if TYPE_CHECKING:
    from pipeline.loop.demo import DemoRun


def _show_sample(console: Console, masks_dir: Path, tokenized_dir: Path, model: Path) -> None:
    """One multi-turn sample, kept tokens highlighted: the masks are something to look at, not a number."""
    import pyarrow.parquet as pq

    from pipeline.runtime.checkpoints import load_tokenizer
    from pipeline.views.token_view import keep_view, legend

    tokenized = pq.read_table(sorted(tokenized_dir.glob("part-*.parquet"))[0]).to_pylist()
    masks = {r["sample_id"]: r for p in sorted(masks_dir.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()}
    sample = max(tokenized, key=lambda r: (r["n_turns"] > 1, -abs(r["n_tokens"] - 120)))
    keep = masks[sample["sample_id"]]["keep"]
    console.rule(f"sample {sample['sample_id']} ({sample['n_trainable']} targets, {sum(keep)} kept)")
    console.print(keep_view(load_tokenizer(model), sample["input_ids"], sample["trainable"], keep))
    console.print(legend())


def _agreement_line(agreement: dict) -> str:
    return (
        f"agreement between r000's and r001's masks over the same {agreement['samples']} samples "
        f"({agreement['trainable']:,} trainable tokens): {agreement['same_decision']:.1%} same keep/drop decision, "
        f"{agreement['kept_overlap']:.1%} of the tokens either round kept were kept by both"
    )


def report(demo: DemoRun, console: Console) -> int:
    """Each round's loss and kept ratio, the masks' agreement, one sample of the last round, where the artifacts are."""
    result = demo.run
    last = result.record.rounds[-1]
    folder = result.folder
    _show_sample(console, folder.inside(last.masks, "a masks folder"), folder.inside(last.data, "a data folder"),
                 Path(result.record.models.base.path))
    console.print(rounds_table(result.record, folder.root))
    if demo.agreement is not None:
        console.print(_agreement_line(demo.agreement), soft_wrap=True)
    console.print(artifacts_note(result), soft_wrap=True)
    return 0


register = stage_command(
    "demo",
    DemoConfig,
    "pipeline.loop.demo:run_demo",
    help="The self-modulated loop on SmolLM2-135M: two rounds of score -> select -> train over the bundled corpus.",
    description="The embedded default of `sstoken run`: fetch the real small model once (cached), prepare the bundled "
    "corpus, and run two rounds over the same seeded subset of it on a local in-process Ray: round 0 selects by "
    "attention only (current == history), round 1 rescores with round 0's checkpoint against the base. Prints each "
    "round's loss and kept ratio, the agreement of the two rounds' masks, one sample's kept tokens and where the "
    "artifacts are. Every `sstoken run` setting applies (--config FILE, --select.ratio, --train.lr, ...).",
    report=report,
)
