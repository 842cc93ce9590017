"""The select stage: keep masks from the signals a scores folder stores, by any method; no model runs.

    run_select(SelectConfig(scores=DIR, method="random", ratio=0.3)) -> StageSummary

The score, keep and n_kept columns of every shard are rewritten in place (`selection_shards`),
the manifest's `selection` section and config say what the folder now holds, and the result is
byte-identical to a `sstoken score` run with those settings from scratch (with `--signals all`,
the default; see docs/method.md, "Signals, then selection").

Exactly once through `StageOutput`: the folder's lock; the manifest goes while shards are being
rewritten and comes back last; a shard whose record already carries the selection is skipped.
The manifest the run started from is kept under `_progress/` until it finishes, so a killed
select is finished by running `sstoken select` again (any settings), or `sstoken score` with the
same arguments.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.artifacts.files import MANIFEST, ArtifactError, read_manifest, write_json_atomic
from pipeline.artifacts.schemas import validate_manifest
from pipeline.artifacts.stage_output import StageOutput, StageSummary, read_record, record_path
from pipeline.core.fingerprint import sha256_json
from pipeline.stages.configs import SelectConfig
from pipeline.stages.selection_shards import SelectError, SelectionOutcome, SelectShard, apply_selection, plan_selection

__all__ = ["SelectConfig", "run_select"]


# Under _progress/ (as a record's name): the scores manifest an unfinished select run started from.
STARTED_FROM = "select-started-from"


def _scores_manifest(folder: Path) -> dict[str, Any]:
    started_from = read_record(folder, STARTED_FROM)
    if not (folder / MANIFEST).is_file() and started_from is not None:
        validate_manifest(started_from, source=str(record_path(folder, STARTED_FROM)))
        return started_from  # a select run was killed: finish it from the manifest it started from
    if not (folder / MANIFEST).is_file():
        raise SelectError(
            f"{folder} has no {MANIFEST}: it is not a finished scores folder (an interrupted `sstoken score` or "
            "`sstoken select`?); rerun `sstoken score` with the same arguments, which only redoes what is missing"
        )
    return read_manifest(folder, kind="scores")


def _tokenized_folder(manifest: dict[str, Any], folder: Path) -> Path:
    """The tokenized input the scores were made from, checked to be the same data."""
    entries = [i for i in manifest.get("inputs", []) if i.get("kind") == "tokenized"]
    if not entries:
        raise SelectError(f"{folder / MANIFEST} names no tokenized input; rerun `sstoken score` for this folder")
    data = Path(entries[0]["path"])
    try:
        tokenized = read_manifest(data, kind="tokenized")
    except ArtifactError as error:
        raise SelectError(f"the tokenized input {data} of {folder} cannot be read ({error}); the trainable masks "
                          "come from it: restore it or rerun `sstoken score`") from error
    listed = sorted(s["file"] for s in tokenized["shards"])
    if listed != sorted(s["file"] for s in manifest["shards"]):
        raise SelectError(f"{data} holds other shards than {folder} was scored from; rerun `sstoken score`")
    return data


def reselected_manifest(manifest: dict[str, Any], config: SelectConfig, outcome: SelectionOutcome) -> dict[str, Any]:
    """The scores manifest after a selection: selection section, selection settings, shard checksums, counts."""
    by_file = {r["file"]: r for r in outcome.records}
    shards = [s | {"sha256": by_file[s["file"]]["sha256"], "rows": by_file[s["file"]]["rows"]} for s in manifest["shards"]]
    settings = {name: value for name, value in config.resolved().items() if name != "scores"}
    signals = {k: manifest["selection"][k] for k in ("layer", "excess") if k in manifest["selection"]}
    return manifest | {
        "config": manifest["config"] | settings,
        "selection": signals | outcome.selection,
        "shards": shards,
        "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
        "counts": manifest["counts"] | {"kept": sum(r["kept"] for r in outcome.records)},
    }


def run_select(config: SelectConfig) -> StageSummary:
    """Select `config.method` over the scores folder `config.scores`, in place; returns the summary."""
    started = time.monotonic()
    folder = Path(config.scores)
    manifest = _scores_manifest(folder)
    data = _tokenized_folder(manifest, folder)
    checkpoints = manifest.get("checkpoints", {})
    same_checkpoint = checkpoints.get("current", {}).get("fingerprint") == checkpoints.get("history", {}).get("fingerprint")
    shards = [SelectShard(s["file"], str(folder.resolve()), str((data / s["file"]).resolve())) for s in manifest["shards"]]
    with StageOutput(folder, "scores", inputs=[data]) as out:
        plan = plan_selection(shards, config, same_checkpoint=same_checkpoint)  # every refusal, before any write
        record_path(folder, STARTED_FROM).parent.mkdir(exist_ok=True)
        write_json_atomic(manifest, record_path(folder, STARTED_FROM))
        out.begin()
        outcome = apply_selection(shards, plan)
        written = out.finish(reselected_manifest(manifest, config, outcome))
        record_path(folder, STARTED_FROM).unlink(missing_ok=True)
    counts = written["counts"]
    return StageSummary(
        stage="select",
        output=folder,
        counts={
            "shards": len(shards),
            "shards_rewritten": outcome.rewritten,
            "trainable": counts["trainable"],
            "kept": counts["kept"],
            "kept_ratio": counts["kept"] / counts["trainable"] if counts["trainable"] else 0.0,
        },
        timings={"total_s": round(time.monotonic() - started, 3)},
        notes=list(outcome.warnings),
        details={"selection": outcome.selection},
    )
