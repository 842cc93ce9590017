"""`sstoken demo`: the main job on its embedded default, end to end on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console

from pipeline.core.config import add_config_arguments, config_from_arguments


def register(commands: argparse._SubParsersAction) -> None:
    from pipeline.loop.demo import DemoConfig

    parser = commands.add_parser(
        "demo",
        help="Fetch SmolLM2-135M, prepare the bundled corpus and score it on an embedded Ray.",
        description="The embedded default: fetch the real small model once (cached), prepare the bundled corpus, "
        "score it on a local in-process Ray and show one sample's kept tokens.",
    )
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(handler=_run)


def _show_sample(console: Console, scores_dir: Path, tokenized_dir: Path, model: Path) -> None:
    """One multi-turn sample, kept tokens highlighted: the masks are something to look at, not a number."""
    from pipeline.core.checkpoints import load_tokenizer
    from pipeline.cli.token_view import keep_view, legend

    tokenized = pq.read_table(sorted(tokenized_dir.glob("part-*.parquet"))[0]).to_pylist()
    scores = {r["sample_id"]: r for r in pq.read_table(sorted(scores_dir.glob("part-*.parquet"))[0]).to_pylist()}
    sample = max(tokenized, key=lambda r: (r["n_turns"] > 1, -abs(r["n_tokens"] - 120)))
    keep = scores[sample["sample_id"]]["keep"]
    console.rule(f"sample {sample['sample_id']} ({sample['n_trainable']} targets, {sum(keep)} kept)")
    console.print(keep_view(load_tokenizer(model), sample["input_ids"], sample["trainable"], keep))
    console.print(legend())


def _run(arguments: argparse.Namespace) -> int:
    from pipeline.cli.prepare import print_summary
    from pipeline.cli.score import format_summary
    from pipeline.loop.demo import DemoConfig, resolve_model, run_demo

    config = config_from_arguments(DemoConfig, arguments)
    console = Console()
    prepared, scored = run_demo(config)
    print_summary(prepared, console)
    console.print(format_summary(scored))
    _show_sample(console, Path(scored.output), Path(prepared.output), resolve_model(config.model))
    return 0
