"""The select stage: keep masks from the signals a scores folder stores, by any method; no model runs.

    run_select(SelectConfig(scores=DIR, method="random", ratio=0.3)) -> StageSummary               # in place
    run_select(SelectConfig(scores=DIR, method="rho1", output=MASKS)) -> StageSummary             # apart

In place: the score, keep and n_kept columns of every shard are rewritten (`selection_shards`),
the manifest's `selection` section and config say what the folder now holds, and the result is
byte-identical to a `sstoken score` run with those settings from scratch (with `--signals all`,
the default; see docs/method.md, "Signals, then selection").

Apart (`output`): the same selection, by the same code, goes to mask shards (`masks.v1`, named as
the score shards) in another folder, with a manifest of kind "masks" that names the scores folder
and copies the provenance a trainer checks (tokenized data and tokenizer fingerprints,
checkpoints, the round's notes). The scores folder is only read: many selections of one scoring
can sit side by side.

Exactly once through the stage runner. In place: every shard must have its progress record (a
folder copied without `_progress/` is refused before anything is touched); the folder's lock; the
manifest goes while shards are being rewritten and comes back last; a shard whose record already
carries the selection is skipped. The manifest the run started from is kept under `_progress/` until it finishes, so a
killed select is finished by running `sstoken select` again (any settings), or `sstoken score`
with the same arguments. Apart: the masks folder behaves as every stage's output (a finished one
with the same scores and settings is reused, a killed run resumes, foreign files are refused).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from pipeline.runtime.files import (
    MANIFEST,
    ArtifactError,
    base_manifest,
    read_manifest,
    refuse_names_outside,
    verify_shards,
    write_json_atomic,
)
from pipeline.runtime.fingerprint import sha256_json
from pipeline.runtime.schemas import validate_manifest
from pipeline.runtime.stage_output import StageOutput, StageSummary, read_record, record_path
from pipeline.runtime.stage_runner import Stage, run_stage
from pipeline.selection.methods import excess_refusal
from pipeline.selection.select_config import SelectConfig
from pipeline.selection.selection_shards import (
    SAMPLE_COUNTS,
    SelectionOutcome,
    SelectionPlan,
    SelectShard,
    apply_selection,
    plan_selection,
    refuse_unrecorded_shards,
    sample_counts,
)
from pipeline.runtime.errors import UserError

__all__ = ["SelectConfig", "run_select"]


# Under _progress/ (as a record's name): the scores manifest an unfinished select run started from.
STARTED_FROM = "select-started-from"
# The REL direction of scores whose manifest predates the `excess` setting.
DEFAULT_EXCESS = "history_minus_current"


def _unfinished_scores(folder: Path) -> UserError:
    return UserError(
        f"{folder} has no {MANIFEST}: it is not a finished scores folder (an interrupted `sstoken score` or "
        "`sstoken select`?); rerun `sstoken score` with the same arguments, which only redoes what is missing"
    )


def _scores_manifest(folder: Path) -> dict[str, Any]:
    started_from = read_record(folder, STARTED_FROM)
    if not (folder / MANIFEST).is_file() and started_from is not None:
        validate_manifest(started_from, source=str(record_path(folder, STARTED_FROM)))
        refuse_names_outside(started_from, record_path(folder, STARTED_FROM))
        return started_from  # a select run was killed: finish it from the manifest it started from
    if not (folder / MANIFEST).is_file():
        raise _unfinished_scores(folder)
    return read_manifest(folder, kind="scores")


def _finished_scores_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a finished scores folder, every shard checked against it (masks apart are made from it)."""
    if not Path(folder).is_dir():
        raise UserError(f"scores folder {folder} does not exist; pass the output folder of `sstoken score`")
    if not (folder / MANIFEST).is_file():
        if read_record(folder, STARTED_FROM) is not None:
            raise UserError(
                f"{folder} is in the middle of a `sstoken select` in place that was killed; finish it by running "
                f"`sstoken select --scores {folder}` (without --output) again, then select to a masks folder"
            )
        raise _unfinished_scores(folder)
    manifest = read_manifest(folder, kind="scores")
    verify_shards(folder, manifest)
    return manifest


def _tokenized_entry(manifest: dict[str, Any], folder: Path) -> dict[str, Any]:
    entries = [i for i in manifest.get("inputs", []) if i.get("kind") == "tokenized"]
    if not entries:
        raise UserError(f"{folder / MANIFEST} names no tokenized input; rerun `sstoken score` for this folder")
    return entries[0]


def _tokenized_input(manifest: dict[str, Any], folder: Path) -> tuple[Path, dict[str, Any]]:
    """The tokenized input the scores were made from and its manifest, checked to hold the same shards."""
    data = Path(_tokenized_entry(manifest, folder)["path"])
    try:
        tokenized = read_manifest(data, kind="tokenized")
    except ArtifactError as error:
        raise UserError(f"the tokenized input {data} of {folder} cannot be read ({error}); the trainable masks "
                          "come from it: restore it or rerun `sstoken score`") from error
    listed = sorted(s["file"] for s in tokenized["shards"])
    if listed != sorted(s["file"] for s in manifest["shards"]):
        raise UserError(f"{data} holds other shards than {folder} was scored from; rerun `sstoken score`")
    return data, tokenized


def _shards_key(manifest: dict[str, Any]) -> str:
    """What a folder's shards are, from the checksums its manifest lists (the same digest as its data_fingerprint)."""
    return sha256_json([[s["file"], s["sha256"]] for s in manifest["shards"]])


def _refuse_changed_tokenized(manifest: dict[str, Any], folder: Path, data: Path, tokenized: dict[str, Any]) -> None:
    """Masks apart copy the scored data's fingerprint for the trainer: the tokenized folder must still hold that data."""
    if _tokenized_entry(manifest, folder).get("data_fingerprint") != _shards_key(tokenized):
        raise UserError(
            f"{data} no longer holds the tokenized data {folder} was scored from (its shards changed since); "
            "rerun `sstoken score` on it, then select"
        )


def stored_excess(manifest: dict[str, Any]) -> str:
    """The direction of the REL a scores manifest's shards store (`sstoken score --excess`)."""
    for section in ("signals", "selection"):
        if "excess" in manifest.get(section, {}):
            return manifest[section]["excess"]
    return DEFAULT_EXCESS


def _vocab_size(manifest: dict[str, Any]) -> int | None:
    """|V| of the model that scored the folder (entropy-gated's ln|V|); None in scores written before it was recorded."""
    return manifest.get("signals", {}).get("vocab_size")


def _same_checkpoint(manifest: dict[str, Any]) -> bool:
    checkpoints = manifest.get("checkpoints", {})
    return checkpoints.get("current", {}).get("fingerprint") == checkpoints.get("history", {}).get("fingerprint")


def _counts(counts: dict[str, Any], outcome: SelectionOutcome) -> dict[str, Any]:
    """A folder's counts after a selection: kept recounted, the sample filter's counts as this selection has them."""
    kept = {"kept": sum(r["kept"] for r in outcome.records)}
    return {k: v for k, v in counts.items() if k not in SAMPLE_COUNTS} | kept | sample_counts(outcome.selection)


def reselected_manifest(manifest: dict[str, Any], config: SelectConfig, outcome: SelectionOutcome) -> dict[str, Any]:
    """The scores manifest after a selection: selection section, selection settings, shard checksums, counts."""
    by_file = {r["file"]: r for r in outcome.records}
    shards = [s | {"sha256": by_file[s["file"]]["sha256"], "rows": by_file[s["file"]]["rows"]} for s in manifest["shards"]]
    settings = {name: value for name, value in config.resolved().items() if name not in ("scores", "output", "overwrite")}
    signals = {k: manifest["selection"][k] for k in ("layer", "excess") if k in manifest["selection"]}
    return manifest | {
        "config": manifest["config"] | settings,
        "selection": signals | outcome.selection,
        "shards": shards,
        "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
        "counts": _counts(manifest["counts"], outcome),
    }


def masks_manifest(
    scores: dict[str, Any], folder: Path, config: SelectConfig, outcome: SelectionOutcome
) -> dict[str, Any]:
    """The manifest of a masks folder: the selection, the scores it came from, and the provenance a trainer checks."""
    shards = [{"file": r["file"], "rows": r["rows"], "sha256": r["sha256"]} for r in outcome.records]
    signals = {k: scores["selection"][k] for k in ("layer", "excess") if k in scores["selection"]}
    scores_input = {"kind": "scores", "path": str(folder), "data_fingerprint": _shards_key(scores)}
    if "run_identity" in scores:
        scores_input["run_identity"] = scores["run_identity"]
    counts = {name: scores["counts"][name] for name in ("shards", "samples", "tokens", "trainable") if name in scores["counts"]}
    manifest = base_manifest("masks", config.resolved()) | {
        "tokenizer": scores["tokenizer"],
        "input_fingerprint": scores_input["data_fingerprint"],
        "data_fingerprint": _shards_key({"shards": shards}),
        "inputs": [scores_input, _tokenized_entry(scores, folder)],
        "checkpoints": scores.get("checkpoints", {}),
        "selection": signals | outcome.selection,
        "shards": shards,
        "counts": _counts(counts, outcome),
    }
    return manifest | ({"signals": scores["signals"]} if "signals" in scores else {})


def _select_in_place(config: SelectConfig, folder: Path) -> tuple[dict[str, Any], SelectionOutcome]:
    manifest = _scores_manifest(folder)
    data, _ = _tokenized_input(manifest, folder)
    excess_refusal(config, stored_excess(manifest), str(folder))
    shards = [SelectShard(s["file"], str(folder.resolve()), str((data / s["file"]).resolve())) for s in manifest["shards"]]
    refuse_unrecorded_shards(shards)  # before the lock: a refused folder is left exactly as it was

    @contextmanager
    def planned() -> Iterator[SelectionPlan]:
        refuse_unrecorded_shards(shards)
        plan = plan_selection(shards, config, same_checkpoint=_same_checkpoint(manifest),
                              vocab_size=_vocab_size(manifest))  # every refusal, before any write
        # Kept until the run finishes (`finish` removes it with the other records no manifest lists): a killed
        # run is finished from it, since the folder's manifest is gone from `begin` on.
        record_path(folder, STARTED_FROM).parent.mkdir(exist_ok=True)
        write_json_atomic(manifest, record_path(folder, STARTED_FROM))
        yield plan

    outcomes: list[SelectionOutcome] = []

    def work(out: StageOutput, plan: SelectionPlan) -> dict[str, Any]:
        outcomes.append(apply_selection(shards, plan))
        return reselected_manifest(manifest, config, outcomes[0])

    written = run_stage(Stage("scores", folder, inputs=[data]), work, ready=planned).manifest
    return written, outcomes[0]


def _select_apart(config: SelectConfig, folder: Path, output: Path) -> tuple[dict[str, Any], SelectionOutcome | None]:
    """The selection to mask shards in `output`; the scores folder is only read. Outcome None: reused as it was."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a folder (new or empty) for the masks")
    manifest = _finished_scores_manifest(folder)
    data, tokenized = _tokenized_input(manifest, folder)
    _refuse_changed_tokenized(manifest, folder, data, tokenized)
    excess_refusal(config, stored_excess(manifest), str(folder))
    identity = {"scores": _shards_key(manifest), "selection": config.selection_key()}
    shards = [
        SelectShard(s["file"], str(folder.resolve()), str((data / s["file"]).resolve()), str(output.resolve()), s["sha256"])
        for s in manifest["shards"]
    ]
    outcomes: list[SelectionOutcome] = []

    def planned() -> AbstractContextManager[SelectionPlan]:
        return nullcontext(plan_selection(shards, config, same_checkpoint=_same_checkpoint(manifest),
                              vocab_size=_vocab_size(manifest)))

    def work(out: StageOutput, plan: SelectionPlan) -> dict[str, Any]:
        outcomes.append(apply_selection(shards, plan))
        if _shards_key(read_manifest(folder, kind="scores")) != identity["scores"]:
            raise UserError(f"{folder} was rewritten while its masks were selected; run `sstoken select` again")
        return masks_manifest(manifest, folder, config, outcomes[0])

    stage = Stage("masks", output, identity, inputs=[folder, data], overwrite=config.overwrite)
    run = run_stage(stage, work, ready=planned)
    return run.manifest, (outcomes[0] if outcomes else None)


def _summary_counts(manifest: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The masks manifest's counts, refused by name when one the summary reports is missing (a manifest edited by
    hand, or written by another tool, that a rerun would otherwise reuse)."""
    counts = manifest["counts"]
    wanted = ["trainable", "kept", *(["samples"] if "samples_kept" in counts else [])]
    missing = [name for name in wanted if name not in counts]
    if missing:
        raise ArtifactError(
            f"{folder}/manifest.json lacks the count(s) {', '.join(missing)}: it was not written by `sstoken select`; "
            "delete the folder and select again"
        )
    return counts


def run_select(config: SelectConfig) -> StageSummary:
    """Select `config.method` over the scores folder `config.scores`, in place or into `config.output`."""
    started = time.monotonic()
    folder = Path(config.scores)
    if config.output is None:
        written, outcome = _select_in_place(config, folder)
        output, action = folder, "shards_rewritten"
    else:
        output = Path(config.output)
        written, outcome = _select_apart(config, folder, output)
        action = "shards_written"
    counts = _summary_counts(written, output)
    selection = written["selection"]
    return StageSummary(
        stage="select",
        output=output,
        counts={
            "shards": len(written["shards"]),
            action: outcome.rewritten if outcome is not None else 0,
            "trainable": counts["trainable"],
            "kept": counts["kept"],
            "kept_ratio": counts["kept"] / counts["trainable"] if counts["trainable"] else 0.0,
            **({"samples": counts["samples"]} if "samples_kept" in counts else {}),
            **{name: counts[name] for name in SAMPLE_COUNTS if name in counts},
        },
        timings={"total_s": round(time.monotonic() - started, 3)},
        notes=list(selection.get("warnings", [])),
        details={"selection": outcome.selection if outcome is not None else selection},
        reused=outcome is None,
    )
