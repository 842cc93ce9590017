"""What the trainer reads: tokenized shards and keep masks joined by sample_id, and the order it reads them in.

    source = open_training_data(tokenized_folder, masks_folder)   # checks provenance and checksums
    index = build_index(source)                                    # one row per sample with kept tokens
    plan = DataPlan(samples=index.samples, batch_size=8, micro_batch_size=4, workers=2, seed=0, epochs=1.0)
    for rank-local micro-batches: plan.micro_batches(step, rank, index.lengths) -> sample positions
    rows = load_samples(source, index, positions)                  # input_ids, keep and weight, read by the rank itself

The masks folder is either a scores folder (`sstoken score` / `sstoken select` in place) or a masks
folder (`sstoken select --output`); both manifests record the tokenizer fingerprint and the
tokenized data they were made from, which must be the data given here.

The order is a pure function of (seed, epoch): the samples with kept tokens are shuffled once per
epoch, epochs are laid end to end, and global batch `step` is positions [step*B, (step+1)*B) of that
stream. Inside a global batch the samples are sorted by length and dealt out in micro-batches, so
padding stays small; every rank computes the same plan and reads only the rows of its own
micro-batches. A resumed run (any checkpoint) and a run on another number of workers see exactly the
same global batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.runtime.alignment import keep_problems
from pipeline.runtime.files import ArtifactError, read_manifest, verify_shards
from pipeline.runtime.fingerprint import sha256_json
from pipeline.runtime.mask_weights import read_mask_columns
from pipeline.selection.keep_masks import KeepMasksSource, keep_masks_source, read_keep_mask_shard


@dataclass(frozen=True)
class TrainingSource:
    """A tokenized folder and a masks folder checked to belong together."""

    tokenized: Path
    masks: Path
    tokenized_manifest: dict[str, Any]
    keep_masks: KeepMasksSource

    @property
    def masks_manifest(self) -> dict[str, Any]:
        return self.keep_masks.manifest

    @property
    def data_key(self) -> str:
        """The tokenized data, from its shards' verified checksums."""
        return shards_key(self.tokenized_manifest)

    @property
    def masks_key(self) -> str:
        return shards_key(self.masks_manifest)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.tokenized_manifest["tokenizer"]["fingerprint"]


def shards_key(manifest: dict[str, Any]) -> str:
    """Digest of an artifact's shards (names and checksums): its data fingerprint, verified shard by shard."""
    return sha256_json([[shard["file"], shard["sha256"]] for shard in manifest["shards"]])


def open_training_data(tokenized: Path, masks: Path) -> TrainingSource:
    """Check that `masks` were made from `tokenized` with the same tokenizer, and the tokenized shards'
    checksums (the masks shards' are checked as they are read)."""
    tokenized, masks = Path(tokenized), Path(masks)
    if not tokenized.is_dir():
        raise ArtifactError(f"tokenized data folder {tokenized} does not exist; run `sstoken prepare` first")
    if not masks.is_dir():
        raise ArtifactError(
            f"masks folder {masks} does not exist; give a scores folder (`sstoken score`) or a masks folder "
            "(`sstoken select --output`)"
        )
    tokenized_manifest = read_manifest(tokenized, kind="tokenized")
    verify_shards(tokenized, tokenized_manifest)
    source = TrainingSource(tokenized, masks, tokenized_manifest, keep_masks_source(masks))
    mask_tokenizer = source.keep_masks.tokenizer_fingerprint
    if mask_tokenizer != source.tokenizer_fingerprint:
        raise ArtifactError(
            f"{masks} was made with another tokenizer (fingerprint {str(mask_tokenizer)[:12]}) than {tokenized} "
            f"({source.tokenizer_fingerprint[:12]}); score and select the data in {tokenized}, or pass the "
            "tokenized folder those masks were made from"
        )
    made_from = source.keep_masks.tokenized_fingerprint
    if made_from != source.data_key:
        raise ArtifactError(
            f"{masks} was made from other tokenized data than {tokenized} (data fingerprint {str(made_from)[:12]}, "
            f"not {source.data_key[:12]}); pass the tokenized folder those masks were scored from, or score {tokenized}"
        )
    return source


@dataclass(frozen=True)
class SampleIndex:
    """One entry per sample with at least one kept token, in the tokenized shards' order."""

    sample_ids: list[str]
    lengths: np.ndarray  # tokens per sample
    kept: np.ndarray  # kept targets per sample
    tokenized_place: list[tuple[str, int]]  # (shard file, row) in the tokenized folder
    masks_place: list[tuple[str, int]]  # (shard file, row) in the masks folder
    without_kept: int  # samples left out: no kept token

    @property
    def samples(self) -> int:
        return len(self.sample_ids)


def _with_place(frame: pl.DataFrame, file: str) -> pl.DataFrame:
    """The shard's rows with the shard's file name and each row's number in it."""
    return frame.with_columns(pl.lit(file).alias("file"), pl.int_range(pl.len()).alias("row"))


def _tokens_frame(source: TrainingSource) -> pl.DataFrame:
    shards = source.tokenized_manifest["shards"]
    return pl.concat([
        _with_place(pl.from_arrow(pq.read_table(source.tokenized / s["file"], columns=["sample_id", "n_tokens"])), s["file"])
        for s in shards
    ])


def _masks_frame(source: TrainingSource) -> pl.DataFrame:
    """Per sample: mask length and kept targets (position 0 is never one), with its place."""
    frames = []
    for entry in source.masks_manifest["shards"]:
        keep = pl.from_arrow(read_keep_mask_shard(source.keep_masks, entry))
        frames.append(_with_place(keep, entry["file"]).with_columns(
            pl.col("keep").list.len().alias("mask_length"),
            pl.col("keep").list.slice(1).list.sum().fill_null(0).alias("kept"),
        ).drop("keep", "weight"))
    return pl.concat(frames)


def _refuse_unmatched(source: TrainingSource, joined: pl.DataFrame, tokens: pl.DataFrame, masks: pl.DataFrame) -> None:
    if len(joined) == len(tokens) == len(masks):
        return
    missing = tokens.join(masks, on="sample_id", how="anti")
    extra = masks.join(tokens, on="sample_id", how="anti")
    if len(missing):
        raise ArtifactError(
            f"{len(missing)} sample ids of {source.tokenized} have no mask in {source.masks} (e.g. "
            f"{missing['sample_id'][0]!r}); the masks belong to other data: score and select {source.tokenized}"
        )
    raise ArtifactError(
        f"{len(extra)} sample ids of {source.masks} are not in {source.tokenized} (e.g. {extra['sample_id'][0]!r}); "
        "the masks belong to other data: pass the tokenized folder they were made from"
    )


def join_samples(source: TrainingSource, check_keep: bool = True) -> pl.DataFrame:
    """Every sample, in the tokenized shards' order: sample_id, n_tokens, kept, and its place in both folders
    (file, row; file_mask, row_mask). Refuses ids on one side only, lengths that disagree and (`check_keep`)
    a keep mask that is true at position 0 or off the trainable tokens (validate reports that itself)."""
    tokens, masks = _tokens_frame(source), _masks_frame(source)
    joined = tokens.join(masks, on="sample_id", how="inner", suffix="_mask", maintain_order="left")
    _refuse_unmatched(source, joined, tokens, masks)
    wrong = joined.filter(pl.col("n_tokens") != pl.col("mask_length"))
    if len(wrong):
        first = wrong.row(0, named=True)
        raise ArtifactError(
            f"{len(wrong)} samples have masks of another length than their tokens, e.g. {first['sample_id']!r}: "
            f"{first['n_tokens']} tokens in {source.tokenized / first['file']}, {first['mask_length']} mask entries in "
            f"{source.masks / first['file_mask']}; the masks were made from other data: score and select it again"
        )
    if check_keep:
        _refuse_keep_off_targets(source, joined)
    return joined


def _refuse_keep_off_targets(source: TrainingSource, joined: pl.DataFrame) -> None:
    """The alignment contract's keep rules (`pipeline.runtime.alignment.keep_problems`), pair of shards by pair:
    a manifest re-sealed over edited masks passes the checksums, not this."""
    problems: list[str] = []
    for (file, file_mask), group in joined.group_by(["file", "file_mask"], maintain_order=True):
        trainable = pq.read_table(source.tokenized / file, columns=["trainable"]).column("trainable")
        keep = read_mask_columns(source.masks / file_mask)  # the weights are checked with the keep mask
        problems += keep_problems(keep.take(group["row_mask"].to_list()), file_mask, trainable.take(group["row"].to_list()))
    if problems:
        raise ArtifactError(
            f"{source.masks} keeps or weighs tokens against the alignment contract of {source.tokenized}: "
            f"{'; '.join(problems[:3])}; the masks were edited: select them again (`sstoken select`) or rescore"
        )


def build_index(source: TrainingSource) -> SampleIndex:
    """The samples with at least one kept token (`join_samples`); refuses masks that keep none."""
    joined = join_samples(source)
    eligible = joined.filter(pl.col("kept") > 0)
    if not len(eligible):
        raise ArtifactError(
            f"no sample of {source.masks} keeps any token ({len(joined)} samples); select with a higher ratio "
            "or another method"
        )
    return SampleIndex(
        sample_ids=eligible["sample_id"].to_list(),
        lengths=eligible["n_tokens"].to_numpy().astype(np.int64),
        kept=eligible["kept"].to_numpy().astype(np.int64),
        tokenized_place=list(zip(eligible["file"].to_list(), eligible["row"].to_list())),
        masks_place=list(zip(eligible["file_mask"].to_list(), eligible["row_mask"].to_list())),
        without_kept=len(joined) - len(eligible),
    )


@dataclass(frozen=True)
class DataPlan:
    """Which samples each optimizer step, rank and micro-batch trains on: a pure function of the settings."""

    samples: int
    batch_size: int
    micro_batch_size: int
    workers: int
    seed: int
    epochs: float

    @property
    def steps(self) -> int:
        """Optimizer steps of the run: whole global batches in `epochs` passes."""
        return int(self.epochs * self.samples) // self.batch_size

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.workers)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The shuffled sample positions of one epoch."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.samples)

    def global_batch(self, step: int) -> np.ndarray:
        """The sample positions of optimizer step `step` (batches may span the end of an epoch)."""
        stream = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = stream // self.samples
        orders = {int(epoch): self.epoch_order(int(epoch)) for epoch in np.unique(epochs)}
        return np.array([orders[int(e)][p] for e, p in zip(epochs, stream % self.samples)], dtype=np.int64)

    def micro_batches(self, step: int, rank: int, lengths: np.ndarray) -> list[np.ndarray]:
        """Rank `rank`'s accumulation micro-batches of step `step`: the global batch sorted by length
        (ties by position), cut into micro-batches, dealt to the ranks in turn."""
        batch = self.global_batch(step)
        ordered = batch[np.lexsort((batch, lengths[batch]))]
        chunks = ordered.reshape(-1, self.micro_batch_size)
        return [chunks[index] for index in range(rank, len(chunks), self.workers)]


SampleRow = tuple[np.ndarray, np.ndarray, np.ndarray]  # input_ids (int64), keep (bool), weight (float32)


def load_samples(source: TrainingSource, index: SampleIndex, positions: np.ndarray) -> dict[int, SampleRow]:
    """input_ids, keep and weight (keep as 0/1 for masks without weights) of the given index positions, read from
    their shards (each shard once)."""
    wanted = sorted({int(p) for p in positions})
    by_shard: dict[tuple[str, str], list[int]] = {}
    for position in wanted:
        key = (index.tokenized_place[position][0], index.masks_place[position][0])
        by_shard.setdefault(key, []).append(position)
    rows: dict[int, SampleRow] = {}
    for (token_file, mask_file), members in by_shard.items():
        tokens = pq.read_table(source.tokenized / token_file, columns=["sample_id", "input_ids"])
        masks = read_mask_columns(source.masks / mask_file)
        token_rows = tokens.take([index.tokenized_place[p][1] for p in members]).to_pylist()
        mask_rows = masks.take([index.masks_place[p][1] for p in members]).to_pylist()
        for position, token_row, mask_row in zip(members, token_rows, mask_rows):
            expected = index.sample_ids[position]
            if token_row["sample_id"] != expected or mask_row["sample_id"] != expected:
                raise ArtifactError(f"{source.tokenized / token_file} or {source.masks / mask_file} changed while "
                                        "training; rerun sstoken train")
            ids = np.asarray(token_row["input_ids"], dtype=np.int64)
            keep = np.asarray(mask_row["keep"], dtype=bool)
            weight = np.asarray(mask_row["weight"], dtype=np.float32)
            if not len(ids) == len(keep) == len(weight):
                raise ArtifactError(f"sample {expected!r}: {len(ids)} tokens, {len(keep)} mask entries, {len(weight)} weights")
            rows[position] = (ids, keep, weight)
    return rows
