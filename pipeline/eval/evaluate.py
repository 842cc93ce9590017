"""`sstoken eval`: every selection method through the loop, seed by seed, each model then measured.

    run_eval(EvalConfig(...)) -> EvalResult    # EVAL/eval.json, eval.md, eval.svg

Layout of the eval folder:
    data/seed-N/             the seed's train.jsonl, heldout.jsonl, reference.jsonl (`pipeline.eval.data`)
    cells/seed-N/METHOD/     the cell's `sstoken run` folder (run.json, tokenized/, rounds/rNNN/...)
    cells/seed-N/METHOD.measures.json   the cell's measures, written last
    cells/seed-N/reference/  rho1 and tokencleaning: the reference's run (the clean slice, every token)
    cells/seed-N/base.measures.json     the base model's held-out figures (before any training)

A cell is done when its measures file (`pipeline.eval.records`, `schemas/measures.v1.schema.json`) is there
and names the cell's identity (the run's settings
and the measures' own): a rerun skips it without loading a model. A cell killed before that is
finished by `run_loop`'s own resume (finished rounds and stages kept) and then measured. All cells
share one Ray session.

Per cell: held-out clean NLL and (corpus task) exact match of the last round's model; per round,
the selection quality against the known corrupted tokens (`pipeline.eval.measures`); the
seconds of scoring (score + select) and training summed over the rounds (run.json), and the kept
tokens its training saw (the train stages' manifests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.eval.config import EvalConfig
from pipeline.eval.data import SeedData, seed_data
from pipeline.eval.records import CellMeasures, EvalReport, read_measures, write_measures
from pipeline.loop.run_config import REFERENCE_METHODS, RunConfig
from pipeline.loop.run_folder import RoundSummary, RunFolder, RunRecord
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import ArtifactError, read_manifest, read_shard
from pipeline.runtime.fingerprint import sha256_json
from pipeline.runtime.log import say
from pipeline.runtime.model_zoo import ensure_model
from pipeline.runtime.ray_session import ray_session
from pipeline.scoring.score_settings import ScoreSettings

MEASURES_VERSION = 1
REFERENCE = "reference"
BASE = "base"


@dataclass(frozen=True)
class EvalResult:
    """What an eval did: its folder, the eval.json it wrote, and how many cells ran now (the rest were done earlier)."""

    output: Path
    report: EvalReport
    cells_run: int
    cells_reused: int


def cell_folder(config: EvalConfig, seed: int, name: str) -> Path:
    return Path(config.output) / "cells" / f"seed-{seed}" / name


def measures_path(config: EvalConfig, seed: int, name: str) -> Path:
    return cell_folder(config, seed, name).with_name(f"{name}.measures.json")


def _top_level(config: EvalConfig, seed: int, name: str, corpus: Path) -> dict[str, Any]:
    return {"output": cell_folder(config, seed, name), "corpus": [corpus], "model": config.model,
            "round_unit": "epoch", "seed": seed}


def reference_run_config(config: EvalConfig, data: SeedData) -> RunConfig:
    """The seed's reference: the base trained on the clean slice, every trainable token, reference_epochs passes."""
    sections = config.cell_sections()
    return RunConfig(
        **_top_level(config, data.seed, REFERENCE, data.reference), epochs=1, ray=sections["ray"],
        prepare=sections["prepare"], score=sections["score"],
        select=sections["select"] | {"method": "full", "seed": data.seed},
        train=sections["train"] | {"seed": data.seed, "epochs": config.reference_epochs},
    )


def cell_run_config(config: EvalConfig, data: SeedData, method: str, reference: Path | None) -> RunConfig:
    """The `sstoken run` of one cell; `full` trains a select.ratio share of the samples a round (the same budget)."""
    sections = config.cell_sections()
    top = _top_level(config, data.seed, method, data.train) | {"epochs": config.rounds}
    if method in REFERENCE_METHODS:
        top["reference"] = reference
    epochs = config.select.ratio if method == "full" else 1.0
    return RunConfig(
        **top, ray=sections["ray"], prepare=sections["prepare"], score=sections["score"],
        select=sections["select"] | {"method": method, "seed": data.seed},
        train=sections["train"] | {"seed": data.seed, "epochs": epochs},
    )


def _score_settings(config: EvalConfig) -> ScoreSettings:
    """How held-out NLL is computed: the score stage's precision, batching and threads."""
    score = config.score
    return ScoreSettings(dtype=score.dtype, device=score.device, max_batch_tokens=score.max_batch_tokens,
                         threads=score.threads, trust_remote_code=score.trust_remote_code)


def _measure_identity(config: EvalConfig, data: SeedData) -> dict[str, Any]:
    heldout = sha256_json(data.heldout.read_text())
    return {"version": MEASURES_VERSION, "heldout": heldout, "labelled": data.labelled,
            "max_new_tokens": config.max_new_tokens if data.labelled else None, "nll": _score_settings(config).resolved()}


def _read_done(path: Path, identity: str) -> CellMeasures | None:
    """The cell's measures when it is done with this identity (a malformed file is one error naming it)."""
    done = read_measures(path)
    return done if done is not None and done.identity == identity else None


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def heldout_figures(config: EvalConfig, data: SeedData, model: Path) -> dict[str, float | None]:
    """Held-out clean NLL (and exact match for the task) of one model."""
    from pipeline.eval.measures import exact_match, heldout_nll

    figures = {"heldout_nll": _finite(heldout_nll(model, data.heldout, _score_settings(config)))}
    if data.labelled:
        accuracy = exact_match(model, data.heldout, max_new_tokens=config.max_new_tokens, dtype=config.score.dtype,
                               threads=config.score.threads)
        figures["exact_match"] = _finite(accuracy)
    return figures


def _column(folder: Path, kind: str, column: str) -> dict[str, list]:
    """sample_id -> one list column of an artifact folder's shards."""
    manifest = read_manifest(folder, kind)
    values: dict[str, list] = {}
    for entry in manifest["shards"]:
        shard = read_shard(folder / entry["file"], kind, columns=["sample_id", column])
        values.update(zip(shard.column("sample_id").to_pylist(), shard.column(column).to_pylist()))
    return values


def selection_by_round(run: RunFolder, record: RunRecord, train_jsonl: Path) -> list[dict[str, Any]]:
    """Per round: corrupted and clean tokens dropped, and the AUROC of the round's score (its selection's)."""
    from pipeline.eval.ground_truth_labels import corrupted_token_mask
    from pipeline.eval.measures import selection_quality

    labels = corrupted_token_mask(run.tokenized, train_jsonl)
    corrupted = dict(zip(labels["sample_id"].to_list(), labels["corrupted"].to_list()))
    trainable = _column(run.tokenized, "tokenized", "trainable")
    rounds = []
    for entry in record.rounds:
        index = entry.round
        keep = _column(run.masks(index), "masks", "keep")
        score = _column(run.scores(index), "scores", "score")
        ids = sorted(keep)
        quality = selection_quality([keep[i] for i in ids], [score[i] for i in ids], [trainable[i] for i in ids],
                                    [corrupted[i] for i in ids])
        rounds.append({"round": index, "selection": entry.selection.method, "warmup": entry.warmup is not None,
                       **{name: _finite(value) for name, value in quality.items()}})
    return rounds


def _kept_tokens_seen(run: RunFolder, record: RunRecord) -> int:
    return sum(read_manifest(run.train(entry.round), "train")["counts"]["kept_tokens"] for entry in record.rounds)


def _summaries(record: RunRecord, run: RunFolder) -> list[RoundSummary]:
    """Every round's summary: a finished run has one for each (else its run.json is not the run's)."""
    missing = [entry.round for entry in record.rounds if entry.summary is None]
    if missing or not record.rounds:
        raise ArtifactError(f"{run.record} has no summary for round(s) {missing or 'any'}: the run did not finish")
    return [entry.summary for entry in record.rounds if entry.summary is not None]


def cell_measures(config: EvalConfig, data: SeedData, record: RunRecord, run: RunFolder) -> dict[str, Any]:
    """The measures of a finished cell: its last model on the held-out rows, its selection per round, its costs."""
    summaries = _summaries(record, run)
    values: dict[str, Any] = heldout_figures(config, data, run.checkpoint(record.rounds[-1].round))
    values |= {
        "score_s": round(sum(s.score_s + s.select_s for s in summaries), 3),
        "train_s": round(sum(s.train_s for s in summaries), 3),
        "kept_tokens": _kept_tokens_seen(run, record),
    }
    by_round = selection_by_round(run, record, data.train) if data.labelled else []
    if by_round:
        values |= {name: by_round[-1][name] for name in ("corrupted_dropped", "clean_dropped", "auroc")}
    return {"values": values, "selection_by_round": by_round}


class _Cells:
    """The eval in progress: which cells ran now and which were done earlier."""

    def __init__(self, config: EvalConfig):
        self.config, self.run, self.reused = config, 0, 0

    def measured(self, seed: int, name: str, identity: dict[str, Any], work: Callable[[], dict[str, Any]]) -> CellMeasures:
        """The cell's measures file: read when done with this identity, else `work()` and write it."""
        path, key = measures_path(self.config, seed, name), sha256_json(identity)
        done = _read_done(path, key)
        if done is not None:
            self.reused += 1
            say("eval", f"seed {seed} {name}: done earlier, kept ({path.name})")
            return done
        started = time.monotonic()
        measures = {"identity": key, "seed": seed, "method": name} | work()
        measures["wall_s"] = round(time.monotonic() - started, 3)
        written = write_measures(path, measures)
        self.run += 1
        shown = {k: v for k, v in written.values.items() if k in ("heldout_nll", "exact_match", "auroc")}
        say("eval", f"seed {seed} {name}: measured in {written.wall_s:.0f} s: "
            + ", ".join(f"{k} {v:.4g}" if v is not None else f"{k} -" for k, v in shown.items()))
        return written


def _run_cell(cells: _Cells, data: SeedData, name: str, run_config: RunConfig) -> CellMeasures:
    from pipeline.loop.rounds import run_identity, run_loop

    config = cells.config
    identity = {"run": run_identity(run_config), "measures": _measure_identity(config, data)}

    def work() -> dict[str, Any]:
        say("eval", f"seed {data.seed} {name}: {config.rounds if name != REFERENCE else 1} round(s) in {run_config.output}")
        result = run_loop(run_config)
        return cell_measures(config, data, result.record, result.folder)

    return cells.measured(data.seed, name, identity, work)


def _reference_model(cells: _Cells, data: SeedData) -> tuple[CellMeasures, Path]:
    """The seed's reference: its measures (its training time) and checkpoint (trained once, for rho1 and tokencleaning)."""
    from pipeline.loop.rounds import run_identity, run_loop

    run_config = reference_run_config(cells.config, data)
    folder = RunFolder(Path(run_config.output))
    identity = {"run": run_identity(run_config), "measures": _measure_identity(cells.config, data)}

    def work() -> dict[str, Any]:
        say("eval", f"seed {data.seed} reference: training the base on {data.reference}")
        result = run_loop(run_config)
        return {"values": {"train_s": _summaries(result.record, result.folder)[0].train_s}, "selection_by_round": []}

    return cells.measured(data.seed, REFERENCE, identity, work), folder.checkpoint(0)


def _base_measures(cells: _Cells, data: SeedData, base: Path) -> CellMeasures:
    identity = {"base": str(base), "measures": _measure_identity(cells.config, data)}
    return cells.measured(data.seed, BASE, identity,
                          lambda: {"values": heldout_figures(cells.config, data, base), "selection_by_round": []})


def check_inputs(config: EvalConfig) -> None:
    """What can be refused before any model runs: a natural corpus that is not there."""
    if config.corpus == "natural":
        missing = [str(p) for p in config.natural.corpus if not Path(p).exists()]
        if missing:
            raise UserError(f"natural.corpus: {', '.join(missing)} does not exist")


def run_eval(config: EvalConfig) -> EvalResult:
    """Every seed x method cell (resuming), then eval.json, eval.md and eval.svg from the measures files."""
    from pipeline.eval.table import write_eval

    started = time.monotonic()
    check_inputs(config)
    base = Path(config.model) if Path(config.model).is_dir() else ensure_model(config.model)
    cells = _Cells(config)
    measures: list[CellMeasures] = []
    with ray_session(config.ray):
        for seed in config.seeds:
            data = seed_data(config, seed)
            measures.append(_base_measures(cells, data, base))
            reference = None
            if set(config.methods) & set(REFERENCE_METHODS):
                reference_measures, reference = _reference_model(cells, data)
                measures.append(reference_measures)
            for method in config.methods:
                measures.append(_run_cell(cells, data, method, cell_run_config(config, data, method, reference)))
    report = write_eval(config, measures, wall_s=time.monotonic() - started, cells_run=cells.run)
    say("eval", f"{cells.run} cell(s) run now, {cells.reused} done earlier; table in {Path(config.output) / 'eval.md'}")
    return EvalResult(Path(config.output), report, cells.run, cells.reused)
