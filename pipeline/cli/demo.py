"""`sstoken demo`: the main job on its embedded default, end to end on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from pipeline.cli.command import print_summary, stage_command
from pipeline.loop.demo import DemoConfig

if TYPE_CHECKING:
    from pipeline.loop.demo import DemoRun


def _show_sample(console: Console, scores_dir: Path, tokenized_dir: Path, model: Path) -> None:
    """One multi-turn sample, kept tokens highlighted: the masks are something to look at, not a number."""
    import pyarrow.parquet as pq

    from pipeline.cli.token_view import keep_view, legend
    from pipeline.core.checkpoints import load_tokenizer

    tokenized = pq.read_table(sorted(tokenized_dir.glob("part-*.parquet"))[0]).to_pylist()
    scores = {r["sample_id"]: r for r in pq.read_table(sorted(scores_dir.glob("part-*.parquet"))[0]).to_pylist()}
    sample = max(tokenized, key=lambda r: (r["n_turns"] > 1, -abs(r["n_tokens"] - 120)))
    keep = scores[sample["sample_id"]]["keep"]
    console.rule(f"sample {sample['sample_id']} ({sample['n_trainable']} targets, {sum(keep)} kept)")
    console.print(keep_view(load_tokenizer(model), sample["input_ids"], sample["trainable"], keep))
    console.print(legend())


def report(run: DemoRun, console: Console) -> int:
    """Both stages' summaries, then one sample with its kept tokens."""
    print_summary(run.prepared, console)
    print_summary(run.scored, console)
    _show_sample(console, Path(run.scored.output), Path(run.prepared.output), run.model)
    return 0


register = stage_command(
    "demo",
    DemoConfig,
    "pipeline.loop.demo:run_demo",
    help="Fetch SmolLM2-135M, prepare the bundled corpus and score it on an embedded Ray.",
    description="The embedded default: fetch the real small model once (cached), prepare the bundled corpus, "
    "score it on a local in-process Ray and show one sample's kept tokens. The prepare: and score: sections of "
    "--config (or --prepare.FLAG, --score.FLAG) set the stages' own settings.",
    report=report,
)
