"""`sstoken eval`: every row of the table (a way of training) through the loop, seed by seed, each model measured.

    run_eval(EvalConfig(...)) -> EvalResult    # EVAL/eval.json, eval.md, eval.svg

Layout of the eval folder:
    data/seed-N/             the seed's train.jsonl, heldout.jsonl, reference.jsonl (`pipeline.eval.data`), and
                             for the task tokenized/ and token_labels.parquet (the oracle's input, the measures' truth)
    cells/seed-N/ROW/        the cell's `sstoken run` folder (run.json, tokenized/, rounds/rNNN/...)
    cells/seed-N/ROW.measures.json      the cell's measures, written last
    cells/seed-N/reference/  rho1: the reference's run (its clean set, every token)
    cells/seed-N/base.measures.json     the base model's held-out figures (before any training)

A cell is done when its measures file (`pipeline.eval.records`, `schemas/measures.v2.schema.json`) is there
and names the cell's identity (the run's settings and the measures' own): a rerun skips it without
loading a model; a file of another identity (other settings, an older version) is measured again.
A cell killed before that is finished by `run_loop`'s own resume (finished rounds and stages
kept) and then measured. All cells share one Ray session.

Per cell: held-out clean NLL and (corpus task) exact match of the last round's model; the
selection against the known corrupted tokens (`pipeline.eval.selection_measures`) per round and over
the rounds that count (the first pass's slices after the warm-up slice 0: the same samples for every
row, each scored by a model that has not trained on it); the seconds of scoring (score + select) and
training summed over the rounds (run.json), the kept tokens and the optimizer steps its training
took (the train stages' manifests).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.eval.config import EvalConfig
from pipeline.eval.data import SeedData, seed_data
from pipeline.eval.records import MEASURES_VERSION, CellMeasures, EvalReport, read_measures, write_measures
from pipeline.eval.rows import ROWS
from pipeline.loop.run_config import RunConfig
from pipeline.loop.run_folder import RoundEntry, RoundSummary, RunFolder, RunRecord
from pipeline.runtime.checkpoints import checkpoint_fingerprint
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import ArtifactError, read_manifest, read_shard
from pipeline.runtime.fingerprint import sha256_file, sha256_json
from pipeline.runtime.log import say
from pipeline.runtime.model_zoo import ensure_model
from pipeline.runtime.ray_session import ray_session
from pipeline.scoring.score_settings import ScoreSettings

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
    return {"output": cell_folder(config, seed, name), "corpus": [corpus], "model": config.model, "seed": seed}


def reference_run_config(config: EvalConfig, data: SeedData) -> RunConfig:
    """The seed's reference: the base trained on its clean set (disjoint from training), every trainable token,
    reference_epochs passes, in one round."""
    sections = config.cell_sections()
    return RunConfig(
        **_top_level(config, data.seed, REFERENCE, data.reference), round_unit="epoch", epochs=1, ray=sections["ray"],
        prepare=sections["prepare"], score=sections["score"],
        select=sections["select"] | {"method": "full", "seed": data.seed},
        train=sections["train"] | {"seed": data.seed, "epochs": config.reference_epochs},
    )


def cell_run_config(config: EvalConfig, data: SeedData, name: str, reference: Path | None) -> RunConfig:
    """The `sstoken run` of one cell: the row's method and settings (`pipeline.eval.rows`), the eval's rounds, one
    pass of each round's training over its samples (every row the same samples and steps, but full_tokens)."""
    row, sections = ROWS[name], config.cell_sections()
    if row.online:
        return _online_cell_run_config(config, data, name)
    top = _top_level(config, data.seed, name, data.train) | {
        "round_unit": config.round_unit, "epochs": config.epochs, "history": row.history, "warmup": row.warmup}
    if config.round_unit == "slice":
        top["slices"] = config.slices
    if row.reference:
        top["reference"] = reference
    if row.token_matched:
        top["samples"] = config.token_matched(data.samples)
    select = sections["select"] | {"method": row.method, "seed": data.seed}
    if row.granularity is not None:
        select["granularity"] = row.granularity
    if row.needs_labels:
        select["labels"] = data.labels
    return RunConfig(
        **top, ray=sections["ray"], prepare=sections["prepare"], score=sections["score"], select=select,
        train=sections["train"] | {"seed": data.seed, "epochs": 1.0},
    )


def _score_settings(config: EvalConfig) -> ScoreSettings:
    """How held-out NLL is computed: the score stage's precision, batching and threads."""
    score = config.score
    return ScoreSettings(dtype=score.dtype, device=score.device, max_batch_tokens=score.max_batch_tokens,
                         threads=score.threads, trust_remote_code=score.trust_remote_code)


def _measure_identity(config: EvalConfig, data: SeedData) -> dict[str, Any]:
    heldout = sha256_json(data.heldout.read_text())
    labels = sha256_file(data.labels) if data.labels is not None else None
    return {"version": MEASURES_VERSION, "heldout": heldout, "labels": labels, "max_new_tokens": data.max_new_tokens,
            "nll": _score_settings(config).resolved()}


def _read_done(path: Path, identity: str) -> CellMeasures | None:
    """The cell's measures when it is done with this identity. A file of another identity (other settings, or
    another version of the measures) is to be measured again; a malformed one is one error naming it."""
    if not path.is_file():
        return read_measures(path)  # None when absent; a folder in its place is an error naming it
    try:
        written = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        written = None
    if isinstance(written, dict) and written.get("identity") != identity:
        return None
    done = read_measures(path)
    return done if done is not None and done.identity == identity else None


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def heldout_figures(config: EvalConfig, data: SeedData, model: Path) -> dict[str, float | None]:
    """Held-out clean NLL (and exact match for the task, with room for the longest answer) of one model."""
    from pipeline.eval.measures import exact_match, heldout_nll

    figures = {"heldout_nll": _finite(heldout_nll(model, data.heldout, _score_settings(config)))}
    if data.max_new_tokens is not None:
        accuracy = exact_match(model, data.heldout, max_new_tokens=data.max_new_tokens, dtype=config.score.dtype,
                               threads=config.score.threads)
        figures["exact_match"] = _finite(accuracy)
    return figures


def column_by_sample(folder: Path, kind: str, column: str) -> dict[str, list]:
    """sample_id -> one list column of an artifact folder's shards."""
    manifest = read_manifest(folder, kind)
    values: dict[str, list] = {}
    for entry in manifest["shards"]:
        shard = read_shard(folder / entry["file"], kind, columns=["sample_id", column])
        values.update(zip(shard.column("sample_id").to_pylist(), shard.column(column).to_pylist()))
    return values


def measured_rounds(record: RunRecord) -> list[int]:
    """The rounds the selection measures pool: the first pass's slices after the warm-up slice 0 (the same samples
    for every row, each scored by a model that has not trained on it); with one slice or epoch rounds, round 0."""
    first_pass = [entry for entry in record.rounds if entry.epoch == 0]
    after_warmup = [entry.round for entry in first_pass if (entry.slice or 0) > 0]
    return after_warmup or [first_pass[0].round]


def _corruption_kinds(train_jsonl: Path) -> dict[str, str | None]:
    """sample_id -> the corruption kind of the training row (None: clean)."""
    from pipeline.eval.ground_truth import read_jsonl

    return {str(row["id"]): (row["corruption"][0]["kind"] if row.get("corruption") else None)
            for row in read_jsonl(train_jsonl)}


def _labels(run: RunFolder, data: SeedData) -> dict[str, Any]:
    """The seed's token labels, after checking that the cell prepared the very tokens they were made for."""
    from pipeline.selection.token_labels import read_token_labels

    assert data.labels is not None and data.tokenized is not None
    labelled = read_manifest(data.tokenized, "tokenized")["data_fingerprint"]
    if read_manifest(run.tokenized, "tokenized")["data_fingerprint"] != labelled:
        raise ArtifactError(f"{run.tokenized} holds other tokens than {data.tokenized}, which the labels "
                            f"{data.labels} were made for; remove {run.root} and run the eval again")
    return read_token_labels(data.labels)


def _online_cell_run_config(config: EvalConfig, data: SeedData, name: str) -> RunConfig:
    """An online row's run: one round over the cell's samples, the same batch size, seed and number of optimizer
    steps as the offline rows (their slices' whole batches: the online pass stops there); the warm-up as many
    samples as the offline warm-up slice (slice 0) holds (none with epoch rounds)."""
    from pipeline.loop.slices import slice_bounds

    row, sections = ROWS[name], config.cell_sections()
    if config.epochs != 1:
        raise UserError(f"row {name} trains online in one pass; set epochs 1 or leave {name} out of methods")
    bounds = slice_bounds(data.samples, config.slices) if config.round_unit == "slice" else [(0, data.samples)]
    warmup = bounds[0][1] if config.round_unit == "slice" else 0
    # The offline rows' optimizer steps (each slice's whole batches): the online pass stops after as many.
    batch = config.train.batch_size
    steps = sum((stop - start) // batch for start, stop in bounds)
    train = sections["train"] | {"seed": data.seed, "epochs": min(1.0, (steps * batch + 0.5) / data.samples),
                                 "selection": "online", "online": {"warmup_samples": warmup}}
    return RunConfig(
        **_top_level(config, data.seed, name, data.train), round_unit="epoch", ray=sections["ray"],
        prepare=sections["prepare"], score=sections["score"],
        select=sections["select"] | {"method": row.method, "seed": data.seed}, train=train,
    )


def trained_after_warmup(masks: Path) -> set[str] | None:
    """Online masks: the samples the steps after the warm-up selected (None: offline masks, every sample counts)."""
    manifest = read_manifest(masks, "masks")
    if not manifest.get("selection", {}).get("online"):
        return None
    warmup = int(manifest["selection"].get("warmup_steps", 0))
    steps = column_by_sample(masks, "masks", "step")
    return {sample_id for sample_id, step in steps.items() if step > warmup}


def selection_measures(run: RunFolder, record: RunRecord, data: SeedData, granularity: str
                       ) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """The selection measures over the rounds that count, and per round (`pipeline.eval.selection_measures`)."""
    from pipeline.eval.ground_truth import CORRUPTION_KINDS
    from pipeline.eval.selection_measures import SelectionTally, selection_tally

    corrupted, kinds = _labels(run, data), _corruption_kinds(data.train)
    trainable = column_by_sample(run.tokenized, "tokenized", "trainable")
    counted = measured_rounds(record)
    total, by_round = SelectionTally(), []
    for entry in record.rounds:
        masks = run.inside(entry.masks, "a masks folder") if entry.masks else run.masks(entry.round)
        keep = column_by_sample(masks, "masks", "keep")
        score = column_by_sample(masks, "masks", "score")  # what the selection ranked
        counted_ids = trained_after_warmup(masks)
        ids = sorted(i for i in keep if counted_ids is None or i in counted_ids)
        tally = selection_tally([keep[i] for i in ids], [score[i] for i in ids], [trainable[i] for i in ids],
                                [corrupted[i] for i in ids], kinds=[kinds.get(i) for i in ids], granularity=granularity)
        if entry.round in counted:
            total = total.merge(tally)
        by_round.append({"round": entry.round, "selection": _selection_method(entry), "warmup": entry.warmup is not None,
                         "measured": entry.round in counted}
                        | {name: _finite(value) for name, value in tally.figures().items()})
    present = [kind for kind in CORRUPTION_KINDS if any(k == kind for k, _ in total.within)]  # the measured kinds
    return {name: _finite(value) for name, value in total.figures(present).items()}, by_round


def _selection_method(entry: RoundEntry) -> str:
    return entry.selection.method if entry.selection is not None else "?"


def _train_counts(run: RunFolder, record: RunRecord) -> dict[str, int]:
    """Kept tokens and optimizer steps of the cell's training, summed over its rounds."""
    counts = [read_manifest(run.train(entry.round), "train")["counts"] for entry in record.rounds]
    return {"kept_tokens": sum(c["kept_tokens"] for c in counts), "steps": sum(c["steps"] for c in counts)}


def _summaries(record: RunRecord, run: RunFolder) -> list[RoundSummary]:
    """Every round's summary: a finished run has one for each (else its run.json is not the run's)."""
    missing = [entry.round for entry in record.rounds if entry.summary is None]
    if missing or not record.rounds:
        raise ArtifactError(f"{run.record} has no summary for round(s) {missing or 'any'}: the run did not finish")
    return [entry.summary for entry in record.rounds if entry.summary is not None]


def cell_measures(config: EvalConfig, data: SeedData, record: RunRecord, run: RunFolder,
                  granularity: str) -> dict[str, Any]:
    """The measures of a finished cell: its last model on the held-out rows, its selection, its costs."""
    summaries = _summaries(record, run)
    values: dict[str, Any] = heldout_figures(config, data, run.checkpoint(record.rounds[-1].round))
    values |= {
        "score_s": round(sum(s.score_s + s.select_s for s in summaries), 3),
        "train_s": round(sum(s.train_s for s in summaries), 3),
    } | _train_counts(run, record)
    by_round: list[dict[str, Any]] = []
    if data.labelled:
        pooled, by_round = selection_measures(run, record, data, granularity)
        values |= pooled
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
        measures = {"schema_version": MEASURES_VERSION, "identity": key, "seed": seed, "method": name} | work()
        measures["wall_s"] = round(time.monotonic() - started, 3)
        written = write_measures(path, measures)
        self.run += 1
        shown = {k: v for k, v in written.values.items() if k in ("heldout_nll", "exact_match", "auroc_within")}
        say("eval", f"seed {seed} {name}: measured in {written.wall_s:.0f} s: "
            + ", ".join(f"{k} {v:.4g}" if v is not None else f"{k} -" for k, v in shown.items()))
        return written


def _run_cell(cells: _Cells, data: SeedData, name: str, run_config: RunConfig) -> CellMeasures:
    from pipeline.loop.rounds import run_identity, run_loop

    config = cells.config
    identity = {"run": run_identity(run_config), "measures": _measure_identity(config, data)}

    def work() -> dict[str, Any]:
        say("eval", f"seed {data.seed} {name}: {run_config.rounds} round(s) in {run_config.output}")
        result = run_loop(run_config)
        return cell_measures(config, data, result.record, result.folder, run_config.select.granularity)

    return cells.measured(data.seed, name, identity, work)


def _reference_model(cells: _Cells, data: SeedData) -> tuple[CellMeasures, Path]:
    """The seed's reference: its measures (its training time) and checkpoint (trained once, for the rho1 rows)."""
    from pipeline.loop.rounds import run_identity, run_loop

    run_config = reference_run_config(cells.config, data)
    folder = RunFolder(Path(run_config.output))
    identity = {"run": run_identity(run_config), "measures": _measure_identity(cells.config, data)}

    def work() -> dict[str, Any]:
        say("eval", f"seed {data.seed} reference: training the base on {data.reference} (disjoint from training)")
        result = run_loop(run_config)
        return {"values": {"train_s": _summaries(result.record, result.folder)[0].train_s}, "selection_by_round": []}

    return cells.measured(data.seed, REFERENCE, identity, work), folder.checkpoint(0)


def _base_measures(cells: _Cells, data: SeedData, base: Path) -> CellMeasures:
    identity = {"base": checkpoint_fingerprint(base), "measures": _measure_identity(cells.config, data)}  # content, not path
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
    generation: dict[int, int | None] = {}
    with ray_session(config.ray):
        for seed in config.seeds:
            data = seed_data(config, seed, base)
            generation[seed] = data.max_new_tokens
            measures.append(_base_measures(cells, data, base))
            reference = None
            if any(ROWS[name].reference for name in config.methods):
                reference_measures, reference = _reference_model(cells, data)
                measures.append(reference_measures)
            for method in config.methods:
                measures.append(_run_cell(cells, data, method, cell_run_config(config, data, method, reference)))
    report = write_eval(config, measures, wall_s=time.monotonic() - started, cells_run=cells.run,
                        max_new_tokens={str(seed): generate for seed, generate in generation.items()})
    say("eval", f"{cells.run} cell(s) run now, {cells.reused} done earlier; table in {Path(config.output) / 'eval.md'}")
    say("eval", report.verdict)
    return EvalResult(Path(config.output), report, cells.run, cells.reused)
