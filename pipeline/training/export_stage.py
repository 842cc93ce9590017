"""The export stage: tokens and keep masks as training data any trainer reads, no sstoken needed.

    run_export(ExportConfig(data=TOKENIZED, masks=SCORES_OR_MASKS, format="hf", output=OUT)) -> StageSummary

Each row holds sample_id, source, input_ids, attention_mask, labels, weights (`schemas/export.v1.json`):
the unshifted Hugging Face labels, -100 wherever a token is not kept and always at position 0, so
`model(input_ids=..., labels=...)`, the HF `Trainer` and TRL's `SFTTrainer` (with
`dataset_kwargs={"skip_prepare_dataset": True}`) train on exactly the kept tokens. The checks and
the join are the trainer's (`open_training_data`, `join_samples`): masks of other data or another
tokenizer are refused before anything is written.

Formats: `parquet` and `jsonl` write one file per tokenized shard (same stem); `hf` writes a
`datasets` folder (`datasets.load_from_disk(OUT)` opens it: its Arrow files, state.json and
dataset_info.json sit beside our manifest.json).

Accounting: samples in = exported + without a kept token. Those are skipped by default, as
`sstoken train` and TRL (unless it skips preparation) leave them out, or kept with every label
-100 (`without_kept: keep`).

Exactly once through the stage runner (`pipeline.runtime.stage_runner`): a finished export of the same data, masks and settings is
reused; parquet and jsonl files are committed one by one (a killed run redoes only the missing
ones); the hf folder is written by `datasets` in one go (its file names are the output's entries,
claimed first, so a killed run's files are ours and are rewritten by the rerun). The manifest is written last.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.runtime.files import ArtifactError, base_manifest, file_rows, write_parquet
from pipeline.runtime.fingerprint import sha256_file, sha256_json
from pipeline.runtime.stage_output import StageOutput, StageSummary
from pipeline.runtime.stage_runner import Stage, run_stage
from pipeline.training.export_config import ExportConfig
from pipeline.training.export_rows import ShardRows, shard_rows
from pipeline.training.training_data import TrainingSource, join_samples, open_training_data

__all__ = ["ExportConfig", "run_export"]

HF_FILES = ("state.json", "dataset_info.json")


def _write_jsonl(table: pa.Table, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in table.to_pylist():
            handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


# format -> (file suffix, writer of one table to a path)
FILE_FORMATS: dict[str, tuple[str, Callable[[pa.Table, Path], None]]] = {
    "parquet": (".parquet", write_parquet),
    "jsonl": (".jsonl", _write_jsonl),
}


def hf_data_files(shards: int) -> list[str]:
    """The Arrow file names `datasets.Dataset.save_to_disk(..., num_shards=shards)` writes."""
    return [f"data-{index:05d}-of-{shards:05d}.arrow" for index in range(shards)]


def _export_files(out: StageOutput, source: TrainingSource, rows_of: Callable[[str], ShardRows], suffix: str,
                  write: Callable[[pa.Table, Path], None]) -> tuple[list[dict[str, Any]], int]:
    """One file per tokenized shard, each committed with its record; a file already committed by this run is kept."""
    records, written = [], 0
    for entry in source.tokenized_manifest["shards"]:
        name = Path(entry["file"]).stem + suffix
        record = out.done(name, out.identity)
        if record is None:
            rows = rows_of(entry["file"])
            record = out.commit_file(name, lambda path, t=rows.table: write(t, path), rows.table.num_rows,
                                     {"run_key": out.identity, "tokenized_file": entry["file"], "without_kept": rows.without_kept})
            written += 1
        records.append(record)
    return records, written


def _export_hf(out: StageOutput, source: TrainingSource, rows_of: Callable[[str], ShardRows], shards: int
               ) -> tuple[list[dict[str, Any]], int]:
    """A `datasets` folder of `shards` Arrow files, written by `save_to_disk` into the output folder."""
    import datasets

    # Its file names are the output's entries, claimed before they exist: a killed write leaves files of ours.
    tables = [rows_of(entry["file"]) for entry in source.tokenized_manifest["shards"]]
    dataset = datasets.Dataset(pa.concat_tables([t.table for t in tables]))
    datasets.disable_progress_bars()
    dataset.save_to_disk(str(out.folder), num_shards=shards)
    records = []
    for name in hf_data_files(shards):
        path = out.folder / name
        record = {"file": name, "sha256": sha256_file(path), "rows": file_rows(path)}
        out.record_entry(name, record)
        records.append(record)
    return records, shards


def _manifest(config: ExportConfig, source: TrainingSource, records: list[dict[str, Any]], samples_in: int,
              tokens: int, kept: int) -> dict[str, Any]:
    shards = [{"file": r["file"], "rows": r["rows"], "sha256": r["sha256"]} for r in records]
    exported = sum(r["rows"] for r in records)
    masks = source.masks_manifest
    return base_manifest("export", config.resolved()) | {
        "format": config.format,
        "tokenizer": source.tokenized_manifest["tokenizer"],
        "input_fingerprint": sha256_json([source.data_key, source.masks_key]),
        "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
        "inputs": [
            {"kind": "tokenized", "path": str(config.data), "data_fingerprint": source.data_key},
            {"kind": masks["kind"], "path": str(config.masks), "data_fingerprint": source.masks_key},
        ],
        "checkpoints": masks.get("checkpoints", {}),
        **({"selection": masks["selection"]} if "selection" in masks else {}),
        "shards": shards,
        "counts": {
            "samples_in": samples_in,
            "exported": exported,
            "skipped_without_kept": samples_in - exported,
            "tokens": tokens,
            "labels": kept,
        },
    }


def _refuse_output(config: ExportConfig) -> None:
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise ArtifactError(f"--output {output} is a file; pass a folder (new or empty) for the export")


def run_export(config: ExportConfig) -> StageSummary:
    """Write the kept tokens of `config.data` under `config.masks` as training data in `config.format`."""
    started = time.monotonic()
    _refuse_output(config)
    source = open_training_data(config.data, config.masks)
    joined = join_samples(source)
    keep_without_kept = config.without_kept == "keep"
    selected = joined if keep_without_kept else joined.filter(joined["kept"] > 0)
    if not len(selected):
        raise ArtifactError(
            f"no sample of {config.masks} keeps any token ({len(joined)} samples): nothing to export; select with a "
            "higher ratio or another method, or pass --without-kept keep"
        )
    identity = {"data": source.data_key, "masks": source.masks_key, "format": config.format,
                "without_kept": config.without_kept}
    hf_shards = min(len(source.tokenized_manifest["shards"]), len(selected))
    entries = (*HF_FILES, *hf_data_files(hf_shards)) if config.format == "hf" else ()
    written: list[int] = []

    def work(out: StageOutput, _: None) -> dict[str, Any]:
        def rows_of(file: str) -> ShardRows:
            return shard_rows(source, joined, file, keep_without_kept)

        if config.format == "hf":
            records, files = _export_hf(out, source, rows_of, hf_shards)
        else:
            records, files = _export_files(out, source, rows_of, *FILE_FORMATS[config.format])
        written.append(files)
        return _manifest(config, source, records, len(joined), int(selected["n_tokens"].sum()), int(selected["kept"].sum()))

    def opens(out: StageOutput, manifest: dict[str, Any]) -> bool:
        """A datasets folder without its state.json or dataset_info.json is written again."""
        return all((out.folder / name).is_file() for name in entries)

    stage = Stage("export", Path(config.output), identity, inputs=[Path(config.data), Path(config.masks)],
                  overwrite=config.overwrite, entries=entries)
    run = run_stage(stage, work, complete=opens)
    manifest, reused = run.manifest, run.reused
    counts = manifest["counts"]
    return StageSummary(
        stage="export",
        output=Path(config.output),
        counts={"files_written": sum(written), **counts},
        timings={"total_s": round(time.monotonic() - started, 3)},
        notes=[f"{counts['skipped_without_kept']} samples keep no token and were left out (--without-kept keep "
               "exports them with every label -100)"] if counts["skipped_without_kept"] else [],
        details={"format": config.format},
        reused=reused,
    )
