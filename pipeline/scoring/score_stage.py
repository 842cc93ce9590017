"""The scoring stage: tokenized shards in, score shards and a manifest out, exactly once, on Ray.

    run_score_job(ScoreJobConfig(data=..., current=..., history=..., output=...)) -> StageSummary

Why Ray core (actors + tasks) and not Ray Data: the unit of work is one input shard, and each
shard must become one output file with the same name, written atomically and validated on a
rerun. A pool of long-lived actors, each holding its model (loaded once), takes one shard at a
time and commits `OUTPUT/<input shard name>` with its `_progress/<name>.json` record
(`pipeline.runtime.stage_output`: temporary name, record, rename). Ray Data would split and merge blocks across shards, name its
output files randomly and write them with no per-shard commit point, so a killed job could leave
half a shard or a duplicate; the actor pool keeps the shard boundary as the commit boundary, and
the driver only hands out shard paths and collects small records (no tensors pass through the
object store). The global selection passes are plain tasks, one per shard, returning histograms.

Exactly once: a shard counts as done when its record carries this run's key (scoring settings,
the signals computed, checkpoint and data fingerprints, the input shard's checksum) and the file's sha256, row count,
schema and sample ids all check out (`pipeline.scoring.score_shards`); anything else is redone. An actor
that dies (a node lost, an out-of-memory kill) is replaced and its shard handed out again. The
output folder goes through the stage runner (`pipeline.runtime.stage_runner`): locked, refused when it
holds files the stage did not write (unless --overwrite) or overlaps --data or a model; its manifest is removed only once the cluster answered
and the inputs checked out, and written last, so its presence means "complete".
Output and cache folders must be visible to every node (a local disk on one machine, a shared
file system on a cluster).

History NLLs go to a cache keyed by (history checkpoint, tokenized data, dtype), so a rerun or the
next round skips the history forward. The engine holds one model per Scorer, so the job runs two
phases and an actor holds one model at a time (two fp32 models would double each actor's memory):
1. history (only when the selection uses REL, history != current, and some shard to score lacks
   cached NLLs): actors load the history checkpoint and fill the cache for those shards, one
   atomic file each; a shard whose cache file validates is skipped, so a killed phase 1 resumes.
2. score: the same actors (`pipeline.scoring.actor_pool`: each drops the history model, then loads
   the current one; starting an actor costs more than loading a small model) write the signals
   (nll_cur, nll_hist, rel, attn, entropy_cur) with the cached history NLLs, and the per-sample selection.
Then the select step (`pipeline.selection.selection_shards`, the same code `sstoken select` runs)
checks the method against the corpus (REL floor) and rewrites only shards whose selection differs.
The summary's `phases` says, per phase, shards done, actors (and how many it started), model loads and
forwards run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.runtime.checkpoints import checkpoint_files, checkpoint_fingerprint, load_tokenizer
from pipeline.runtime.files import base_manifest, read_manifest, refuse_repeated_sample_ids
from pipeline.runtime.fingerprint import sha256_json, tokenizer_fingerprints, tokenizer_mismatch
from pipeline.runtime.ray_session import RayRuntime, node_cpus, ordered_map, ray_session
from pipeline.runtime.stage_output import StageOutput, StageSummary, read_record
from pipeline.runtime.stage_runner import Stage, local_inputs, run_stage
from pipeline.scoring.actor_pool import ActorPool
from pipeline.scoring.precision import cpu_bfloat16_note, precision_name
from pipeline.scoring.score_config import ScoreJobConfig
from pipeline.scoring.score_settings import signals_to_compute
from pipeline.scoring.score_shards import ShardTask, check_shard, history_missing
from pipeline.runtime.errors import UserError
from pipeline.selection.methods import excess_refusal, same_checkpoint_refusal
from pipeline.selection.selection_shards import SelectShard, apply_selection, plan_selection, sample_counts


def default_history_cache() -> Path:
    root = os.environ.get("SSTOKEN_CACHE")
    return Path(root).expanduser() / "history" if root else Path.home() / ".cache" / "sstoken" / "history"


# -- the driver ------------------------------------------------------------------------------------


def plan_workers(
    cpus_by_node: list[float],
    total_gpus: float,
    workers: int | None,
    cpus_per_worker: float | None,
    gpus_per_worker: float,
) -> tuple[int, float]:
    """(actors, CPUs per actor). Every actor must fit on one node, and nothing else needs CPUs
    while they run (the validation and selection tasks run before and after), so no deadlock."""
    largest = max(cpus_by_node, default=1.0)
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if gpus_per_worker > 0 else min(4.0, largest) if largest >= 1 else largest
    if cpus_per_worker > largest:
        raise UserError(
            f"cpus_per_worker {cpus_per_worker} exceeds the largest node's {largest} CPUs; no actor could start"
        )
    if gpus_per_worker > 0:
        capacity = int(total_gpus // gpus_per_worker)
        if capacity < 1:
            raise UserError(f"gpus_per_worker {gpus_per_worker} but the cluster has {total_gpus} GPUs")
    else:
        capacity = max(1, sum(int(c // cpus_per_worker) for c in cpus_by_node))
    return min(workers or capacity, capacity), cpus_per_worker


def workers_note(requested: int | None, actors: int, cpus: float, gpus: float) -> list[str]:
    """A line for the summary when --workers asked for more actors than the cluster holds at once."""
    if requested is None or requested <= actors:
        return []
    each = f"{gpus:g} GPU" if gpus > 0 else f"{cpus:g} CPU" + ("" if cpus == 1 else "s")
    plural = "" if actors == 1 else "s"
    return [f"--workers {requested}: the cluster holds {actors} actor{plural} of {each} each at once, so {actors} ran"]


class _Progress:
    """Shards done, tokens/s and ETA on stderr (rich), or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, label: str = "scoring shards"):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.started = time.monotonic()
        self.tokens = 0
        self.bar = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.bar.add_task("score", total=total, rate="")

    def __enter__(self) -> _Progress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def shard_done(self, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        self.bar.update(self.task, advance=1, rate=f"{rate:,.0f} tokens/s")


def _phase_summary(results: list[dict[str, Any]], actors_started: int, seconds: float) -> dict[str, Any]:
    """Shards, actors (and how many the phase started: the score phase reuses the history phase's), model loads
    (each actor's count, summed; each actor holds one model), micro-batch forwards."""
    loads: dict[str, int] = {}
    for r in results:
        loads[r["actor"]] = max(loads.get(r["actor"], 0), r["model_loads"])
    return {
        "shards": len(results),
        "actors": len(loads),
        "actors_started": actors_started,
        "model_loads": sum(loads.values()),
        "forwards": sum(r["forwards"] for r in results),
        "seconds": round(seconds, 3),
    }


def _check_tokenizer(model: Path, expected: dict[str, Any], data: Path, trust_remote_code: bool, template: bool) -> None:
    """Refuse data tokenized with another tokenizer than the model's (its masks would be garbage) or, for the
    current model (`template`), rendered with another chat template than the model's."""
    found = tokenizer_fingerprints(load_tokenizer(model, trust_remote_code=trust_remote_code))
    problem = tokenizer_mismatch(expected, found, data, model, template=template)
    if problem is not None:
        raise UserError(problem)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _read_input(config: ScoreJobConfig) -> dict[str, Any]:
    data = Path(config.data)
    if not data.is_dir():
        raise UserError(f"tokenized input folder {data} does not exist; run `sstoken prepare` first")
    return read_manifest(data, kind="tokenized")


def verified_data_key(tokenized: dict[str, Any]) -> str:
    """What the tokenized data is, from its shards' checksums (each verified against its file before
    use), never from the manifest's editable data_fingerprint: keys the history cache and run keys."""
    return sha256_json([[shard["file"], shard["sha256"]] for shard in tokenized["shards"]])


def _recorded_vocab_size(shards: list[SelectShard]) -> int | None:
    """|V| of the current model, as the score shards' records carry it (None: every shard was scored before it was
    recorded). One run key, one checkpoint: every record that has it has the same."""
    sizes = {(read_record(s.target_folder, s.file) or {}).get("vocab_size") for s in shards} - {None}
    if len(sizes) > 1:
        raise UserError(f"the score shards of {shards[0].folder} record vocabulary sizes {sorted(sizes)} for one "
                        "checkpoint; this is a bug: rerun `sstoken score` with --overwrite")
    return next(iter(sizes), None)


def run_score_job(config: ScoreJobConfig) -> StageSummary:
    """Score every shard of `config.data` into `config.output`; returns the run's summary."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    data, output = Path(config.data), Path(config.output)
    tokenized = _read_input(config)
    checkpoint_files(config.current)  # a clear error for a missing or unusable model folder
    if config.history is not None:
        checkpoint_files(config.history)
    _check_tokenizer(Path(config.current), tokenized["tokenizer"], data, config.trust_remote_code, template=True)
    if config.history is not None and _has_tokenizer(Path(config.history)):
        # The history model only scores the same token ids: its tokenizer must match, its template need not.
        _check_tokenizer(Path(config.history), tokenized["tokenizer"], data, config.trust_remote_code, template=False)
    current_fp = checkpoint_fingerprint(config.current)
    history_fp = checkpoint_fingerprint(config.history) if config.history is not None else current_fp
    data_key = verified_data_key(tokenized)
    selection = config.select_settings()
    excess_refusal(selection, config.excess, "this scoring (--excess)")  # before any model runs
    if history_fp == current_fp and selection.uses_rel:
        same_checkpoint_refusal(selection)  # before any model runs
    # What the shards hold: the run-key settings and which signals are computed (the selection
    # settings are not part of it: a new method, ratio or gamma over the same signals only re-selects).
    signals = asdict(signals_to_compute(config.signals, selection))
    identity = {
        "settings": config.run_key_settings(),
        "signals": signals,
        "current": current_fp,
        "history": history_fp,
        "data": data_key,
    }
    # The history checkpoint whose cached NLLs REL needs (None: REL unused, or REL is 0 on one checkpoint).
    rel_history = history_fp if signals["rel"] and history_fp != current_fp else None
    history_cache = Path(config.history_cache) if config.history_cache else default_history_cache()
    tasks = [
        ShardTask(
            file=shard["file"],
            input_path=str((data / shard["file"]).resolve()),
            input_sha256=shard["sha256"],
            rows=shard["rows"],
            output_dir=str(output.resolve()),
            run_key=sha256_json(identity | {"file": shard["file"], "input_sha256": shard["sha256"]}),
            data_key=data_key,
            history_cache=str(history_cache.resolve()),
            cache_current=config.cache_current_nll,
        )
        for shard in tokenized["shards"]
    ]
    timings["checks_s"] = time.monotonic() - started

    notes: list[str] = []
    phases: dict[str, list[dict[str, Any]]] = {"history": [], "score": []}  # the actors' results
    actors_started = {"history": 0, "score": 0}  # actors each phase started (the score phase reuses the history's)
    rewritten: list[int] = []  # shards the select step rewrote

    @contextmanager
    def checked_session() -> Iterator[tuple[RayRuntime, list[ShardTask]]]:
        """The Ray session, then the input shards checked: nothing in the output is touched before the cluster
        answered and the inputs checked out."""
        with ray_session(config.ray) as runtime:
            phase = time.monotonic()
            records = list(ordered_map(check_shard, [(t,) for t in tasks]))
            refuse_repeated_sample_ids(data, tokenized)
            timings["validate_s"] = time.monotonic() - phase
            yield runtime, [t for t, r in zip(tasks, records) if r is None]

    def work(out: StageOutput, checked: tuple[RayRuntime, list[ShardTask]]) -> dict[str, Any]:
        runtime, todo = checked
        # Phase 1: history NLLs for the shards to score that lack them, history model alone.
        phase = time.monotonic()
        history_todo: list[ShardTask] = []
        if todo and rel_history is not None:
            # As the workers resolve it: actors given no GPU see none (Ray hides them), so `auto` is float32 there.
            worker_device = "cuda" if config.gpus_per_worker > 0 and config.device != "cpu" else "cpu"
            dtype = precision_name(config.dtype, worker_device)
            missing = ordered_map(history_missing, [(t, history_fp, dtype) for t in todo])
            history_todo = [t for t, m in zip(todo, missing) if m]
        if not todo:  # every shard done and checked: no model runs
            timings["history_s"] = timings["score_s"] = 0.0
        else:
            workers, cpus = plan_workers(
                node_cpus(), runtime.gpus, config.workers, config.cpus_per_worker, config.gpus_per_worker
            )
            notes.extend(workers_note(config.workers, workers, cpus, config.gpus_per_worker))
            if config.gpus_per_worker == 0 or config.device == "cpu":
                notes.extend(filter(None, [cpu_bfloat16_note(precision_name(config.dtype, "cpu"))]))
            # One pool for both phases: the history actors stay to score (each drops its model first), and all
            # are gone before the select step's tasks need their CPUs.
            with ActorPool(config, workers, cpus) as pool:
                if history_todo:
                    with _Progress(config.progress, len(history_todo), "phase 1/2 history NLLs") as progress:
                        phases["history"], actors_started["history"] = pool.run_phase("history", history_todo, progress)
                timings["history_s"] = time.monotonic() - phase

                # Phase 2: score with the current model; history NLLs from the cache.
                phase = time.monotonic()
                label = "phase 2/2 scoring shards" if history_todo else "scoring shards"
                with _Progress(config.progress, len(todo), label) as progress:
                    phases["score"], actors_started["score"] = pool.run_phase("score", todo, progress, rel_history)
            timings["score_s"] = time.monotonic() - phase

        # The select step over the stored signals: rewrites the shards whose selection differs.
        phase = time.monotonic()
        shards = [SelectShard(t.file, t.output_dir, t.input_path) for t in tasks]
        vocab_size = _recorded_vocab_size(shards)
        plan = plan_selection(shards, selection, same_checkpoint=history_fp == current_fp, parallel_map=ordered_map,
                              vocab_size=vocab_size)
        outcome = apply_selection(shards, plan, parallel_map=ordered_map)
        notes.extend(outcome.warnings)
        rewritten.append(outcome.rewritten)
        timings["select_s"] = time.monotonic() - phase

        counts = _totals(outcome.records)
        if counts["samples"] != sum(t.rows for t in tasks):
            raise UserError(
                f"accounting mismatch: {sum(t.rows for t in tasks)} samples in, {counts['samples']} scored; "
                "this is a bug, please report it"
            )
        timings["total_s"] = time.monotonic() - started
        manifest = _manifest(config, tokenized, data_key, outcome.records, outcome.selection, current_fp, history_fp,
                             history_cache)
        manifest["signals"] = signals | {"layer": config.layer, "excess": config.excess} | (
            {"vocab_size": vocab_size} if vocab_size is not None else {})
        manifest["timings"] = {k: round(v, 3) for k, v in timings.items()}
        return manifest

    # Finishing also clears temporaries of actors lost mid-write (a node died): every shard is complete then.
    # A finished folder is never reused whole: its shards skip themselves, and the select step re-selects
    # it when the selection settings (not part of the identity) changed.
    inputs = [data, *local_inputs(config.current, config.history)]
    stage = Stage("scores", output, identity, inputs, config.overwrite)
    written = run_stage(stage, work, ready=checked_session, reuse=False).manifest
    counts = written["counts"]
    history_results, results = phases["history"], phases["score"]

    scored_tokens = sum(r["record"]["tokens"] for r in results)
    scoring_s = timings["history_s"] + timings["score_s"]
    return StageSummary(
        stage="score",
        output=output,
        counts={
            **counts,
            "shards_scored": len(results),
            "shards_skipped": len(tasks) - len(results),
            "shards_rewritten": sum(rewritten),
            # History NLLs: computed by this run's phase 1, or reused from the cache an earlier run filled.
            "history_computed": sum(r["computed"] for r in history_results),
            "history_reused": sum(r["history_cached"] for r in results) - sum(r["computed"] for r in history_results),
            "tokens_scored": scored_tokens,
        },
        timings={k: round(v, 3) for k, v in timings.items()},
        notes=notes,
        details={
            "method": config.method,
            "granularity": config.granularity,
            "kept_ratio": counts["kept"] / counts["trainable"] if counts["trainable"] else 0.0,
            # Both phases, actor start-up and model loads included.
            "tokens_per_s": scored_tokens / scoring_s if scored_tokens else 0.0,
            # Time inside the actors' calls of both phases, summed: without actor start-up and model loading.
            "shard_seconds": sum(r["seconds"] for r in [*history_results, *results]),
            "phases": {
                "history": _phase_summary(history_results, actors_started["history"], timings["history_s"]),
                "score": _phase_summary(results, actors_started["score"], timings["score_s"]),
            },
        },
    )


def _totals(records: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "shards": len(records),
        "samples": sum(r["rows"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "trainable": sum(r["trainable"] for r in records),
        "kept": sum(r["kept"] for r in records),
    }


def _manifest(
    config: ScoreJobConfig,
    tokenized: dict[str, Any],
    data_key: str,
    records: list[dict[str, Any]],
    selection: dict[str, Any],
    current_fp: str,
    history_fp: str,
    history_cache: Path,
) -> dict[str, Any]:
    shards = [{"file": r["file"], "rows": r["rows"], "sha256": r["sha256"]} for r in records]
    history_path = config.history if config.history is not None else config.current
    return base_manifest("scores", config.resolved()) | {
        "tokenizer": tokenized["tokenizer"],
        "input_fingerprint": data_key,
        "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
        "inputs": [{"kind": "tokenized", "path": str(config.data), "data_fingerprint": data_key}],
        "checkpoints": {
            "current": {"path": str(config.current), "fingerprint": current_fp},
            "history": {"path": str(history_path), "fingerprint": history_fp},
        },
        "selection": {"layer": config.layer, "excess": config.excess, **selection},
        "compute": {
            "dtypes": sorted({r["dtype"] for r in records}),
            "devices": sorted({r["device"] for r in records}),
        },
        "history_cache": str(history_cache),
        "shards": shards,
        "counts": _totals(records) | sample_counts(selection),
    }


