"""The reader that joins tokens, scores and masks by sample_id: polars LazyFrames for notebooks, reports and `inspect`.

    stats = open_masks_folder("runs/r/rounds/r000/scores")    # or pipeline.views.run_stats.open_stats(any folder)
    stats.tokens()    # one row per token: sample_id, source, round, position, token_id, trainable, keep,
                      #   nll_cur, nll_hist, rel, attn, entropy_cur, score, response_position
    stats.samples()   # one row per sample and round: targets, kept, kept_ratio, mean signals
    sample_rollups(stats)  # one round's samples as the sample filter sees them: mean score, kept share, REL, entropy
    stats.sources()   # one row per source and round
    stats.rounds()    # one row per round
    stats.flips(0, 1) # tokens whose keep changed between two rounds

A round is one selection: its keep masks and score (a scores or masks folder), the signals they were
ranked from (the scores folder) and the tokenized data they belong to. Opening a folder checks what
the trainer checks (same tokenizer, masks made from these tokenized shards, every listed shard's
checksum), so a frame never pairs tokens with another corpus's masks. Nothing is read until a frame
is collected; `tokens(sample_ids=..., columns=...)` reads and explodes only those samples and lists.

`response_position` is a target's place among its sample's targets, (k + 0.5) / n_targets in (0, 1):
0 is the start of the response, 1 its end (all assistant turns of a sample count as one response).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.loop.run_folder import RunRecord
from pipeline.runtime.files import MANIFEST, ArtifactError, read_manifest, verify_shards
from pipeline.selection.keep_masks import keep_masks_source
from pipeline.training.training_data import open_training_data
from pipeline.views.token_text import TokenText

# The stored signals (entropy_cur: null in scores written before it existed, as every signal of a folder without one).
SIGNALS = ("nll_cur", "nll_hist", "rel", "attn", "entropy_cur")
TOKEN_COLUMNS = ("sample_id", "source", "round", "position", "token_id", "trainable", "keep", *SIGNALS, "score",
                 "response_position")


@dataclass(frozen=True)
class RoundArtifacts:
    """The folders of one selection, checked to belong together."""

    round: int
    masks: Path  # keep and score: a scores folder or a masks folder
    signals: Path | None  # the scores folder holding nll_cur, nll_hist, rel, attn (None: not found)
    tokenized: Path
    masks_manifest: dict[str, Any] = field(repr=False)
    tokenized_manifest: dict[str, Any] = field(repr=False)
    signals_manifest: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def selection(self) -> dict[str, Any]:
        return self.masks_manifest.get("selection", {})


def _scan(folder: Path, manifest: dict[str, Any]) -> pl.LazyFrame:
    """Every shard a manifest lists, in its order."""
    return pl.scan_parquet([str(folder / entry["file"]) for entry in manifest["shards"]])


def _signals_folder(masks: Path, manifest: dict[str, Any]) -> Path | None:
    """The folder with the signals: the scores folder itself, or the one a masks folder was selected from."""
    if manifest["kind"] == "scores":
        return masks
    for entry in manifest.get("inputs", []):
        path = Path(entry.get("path", ""))
        if entry.get("kind") == "scores" and (path / MANIFEST).is_file():
            return path
    return None


def round_artifacts(masks: Path, round: int = 0, tokenized: Path | None = None, signals: Path | None = None) -> RoundArtifacts:
    """Check one round's folders: `masks` (scores or masks folder), its tokenized data (default: the folder its
    manifest names) and its signals (default: the scores folder it names); raises one clear ArtifactError."""
    masks = Path(masks)
    if not masks.is_dir():
        raise ArtifactError(f"{masks} does not exist; pass a run folder, a scores folder or a masks folder")
    source = keep_masks_source(masks)
    if tokenized is None:
        tokenized = source.tokenized_path
        if not tokenized.is_dir():
            raise ArtifactError(
                f"{masks}'s manifest names tokenized data {tokenized}, which does not exist (moved?); pass --data FOLDER"
            )
    checked = open_training_data(tokenized, masks)  # same tokenizer, made from these shards, tokenized checksums
    verify_shards(masks, source.manifest)
    signals = Path(signals) if signals is not None else _signals_folder(masks, source.manifest)
    signals_manifest = source.manifest if signals == masks else None
    if signals is not None and signals != masks:
        open_training_data(tokenized, signals)
        signals_manifest = read_manifest(signals, kind="scores")
        verify_shards(signals, signals_manifest)
    return RoundArtifacts(round, masks, signals, Path(tokenized), source.manifest, checked.tokenized_manifest, signals_manifest)


def _stored_signals(part: RoundArtifacts) -> list[str]:
    """The SIGNALS the round's scores folder holds (none without one)."""
    if part.signals is None or part.signals_manifest is None:
        return []
    names = _scan(part.signals, part.signals_manifest).collect_schema().names()
    return [name for name in SIGNALS if name in names]


def _round_tokens(part: RoundArtifacts, sample_ids: list[str] | None, columns: tuple[str, ...]) -> pl.LazyFrame:
    """One round's tokens, exploding only the per-token lists `columns` needs (trainable always); a signal the scores
    lack (written before it existed) is null."""
    tokens = _scan(part.tokenized, part.tokenized_manifest)
    if sample_ids is not None:  # before the join and the explode: a few samples of a large corpus read fast
        tokens = tokens.filter(pl.col("sample_id").is_in(sample_ids))
    tokens = tokens.select("sample_id", "source", pl.col("input_ids").alias("token_id"), "trainable")
    from_masks = [name for name in ("score", "keep") if name in columns]
    signals = [name for name in _stored_signals(part) if name in columns]
    if part.signals == part.masks:  # a scores folder: keep, score and signals in one scan
        from_masks, signals = from_masks + signals, []
    frame = tokens.join(_scan(part.masks, part.masks_manifest).select("sample_id", *from_masks), on="sample_id", how="inner")
    if signals:
        frame = frame.join(_scan(part.signals, part.signals_manifest).select("sample_id", *signals), on="sample_id", how="inner")
    lists = ["trainable", *(name for name in ("token_id", "score", "keep", *SIGNALS) if name in columns and name in
                            frame.collect_schema().names())]
    extra, exploded = [], list(lists)
    if "position" in columns:
        extra.append(pl.int_ranges(0, pl.col("token_id").list.len(), dtype=pl.Int32).alias("position"))
        exploded.append("position")
    if "response_position" in columns:
        extra += [(pl.col("trainable").list.eval(pl.element().cast(pl.Int32).cum_sum()) - 1).alias("response_index"),
                  pl.col("trainable").list.sum().alias("n_targets")]
        exploded.append("response_index")
    frame = frame.with_columns(*extra).explode(exploded)
    missing = [name for name in SIGNALS if name in columns and name not in frame.collect_schema().names()]
    frame = frame.with_columns(*(pl.lit(None, pl.Float32).alias(name) for name in missing), pl.lit(part.round, pl.Int32).alias("round"))
    if "response_position" in columns:
        frame = frame.with_columns(pl.when(pl.col("trainable"))
                                   .then(((pl.col("response_index") + 0.5) / pl.col("n_targets")).cast(pl.Float32))
                                   .alias("response_position"))
    return frame.select(columns)


def _mean_over_targets(name: str) -> pl.Expr:
    """The mean of a per-token list over its targets (NaN exactly off the targets), from the list itself."""
    return pl.col(name).list.eval(pl.element().fill_nan(None)).list.mean().alias(f"mean_{name}")


def _round_samples(part: RoundArtifacts) -> pl.LazyFrame:
    """Per-sample figures from the shards' count columns and lists, no per-token frame built."""
    tokens = _scan(part.tokenized, part.tokenized_manifest).select("sample_id", "source", "n_tokens")
    masks = _scan(part.masks, part.masks_manifest).select(
        "sample_id", "n_trainable", "n_kept", _mean_over_targets("score"))
    frame = tokens.join(masks, on="sample_id", how="inner")
    stored = _stored_signals(part)
    if stored:
        signals = _scan(part.signals, part.signals_manifest).select(
            "sample_id", *(_mean_over_targets(name) for name in stored))
        frame = frame.join(signals, on="sample_id", how="inner")
    frame = frame.with_columns(*(pl.lit(None, pl.Float64).alias(f"mean_{name}") for name in SIGNALS if name not in stored))
    return frame.select(
        pl.lit(part.round, pl.Int32).alias("round"), "sample_id", "source",
        *(pl.col(name).cast(pl.Int64) for name in ("n_tokens", "n_trainable", "n_kept")),
        (pl.col("n_kept") / pl.col("n_trainable")).alias("kept_ratio"),
        *(pl.col(f"mean_{name}").cast(pl.Float64) for name in (*SIGNALS, "score")),
    )


@dataclass(frozen=True)
class Stats:
    """LazyFrames over one or more rounds of selections; `record` is the run's run.json when opened from a run."""

    parts: tuple[RoundArtifacts, ...]
    record: RunRecord | None = None
    root: Path | None = None

    def part(self, round: int) -> RoundArtifacts:
        for part in self.parts:
            if part.round == round:
                return part
        known = ", ".join(str(p.round) for p in self.parts)
        raise ArtifactError(f"round {round} is not in {self.root or self.parts[0].masks} (rounds: {known})")

    @property
    def last_round(self) -> int:
        return self.parts[-1].round

    def tokenizer_folders(self) -> list[str]:
        """Where a tokenizer of these samples may be: the one prepare used, then the scoring checkpoints, the run's base."""
        folders = []
        for part in self.parts:
            folders.append(part.tokenized_manifest.get("tokenizer", {}).get("name_or_path"))
            for role in ("current", "history"):
                folders.append(part.masks_manifest.get("checkpoints", {}).get(role, {}).get("path"))
        if self.record is not None:
            folders.append(self.record.models.base.path)
        return [folder for folder in dict.fromkeys(folders) if folder]

    def tokens(self, sample_ids: list[str] | None = None, columns: tuple[str, ...] = TOKEN_COLUMNS) -> pl.LazyFrame:
        """One row per token of every sample and round (context tokens included, their signals NaN); only the
        samples `sample_ids` names, when given, and only `columns` (fewer columns: less to read and explode)."""
        unknown = sorted(set(columns) - set(TOKEN_COLUMNS))
        if unknown:
            raise ValueError(f"unknown token columns {unknown}; known: {', '.join(TOKEN_COLUMNS)}")
        return pl.concat([_round_tokens(part, sample_ids, tuple(columns)) for part in self.parts], how="vertical")

    def samples(self) -> pl.LazyFrame:
        """One row per sample and round: tokens, targets, kept, kept_ratio and the mean signals over its targets."""
        return pl.concat([_round_samples(part) for part in self.parts], how="vertical").sort("round", "sample_id")

    def flips(self, first: int, second: int) -> pl.LazyFrame:
        """The tokens whose keep differs between two rounds, over the samples both selected from:
        sample_id, position, token_id, kept_before (in `first`), kept_after (in `second`)."""
        before, after = self.part(first), self.part(second)
        tokens = _scan(before.tokenized, before.tokenized_manifest).select("sample_id", pl.col("input_ids").alias("token_id"))
        kept_before = _scan(before.masks, before.masks_manifest).select("sample_id", pl.col("keep").alias("kept_before"))
        kept_after = _scan(after.masks, after.masks_manifest).select("sample_id", pl.col("keep").alias("kept_after"))
        return (
            tokens.join(kept_before, on="sample_id").join(kept_after, on="sample_id")
            .with_columns(pl.int_ranges(0, pl.col("token_id").list.len(), dtype=pl.Int32).alias("position"))
            .explode(["token_id", "kept_before", "kept_after", "position"])
            .filter(pl.col("kept_before") != pl.col("kept_after"))
            .select("sample_id", "position", "token_id", "kept_before", "kept_after")
        )

    def sources(self) -> pl.LazyFrame:
        """One row per source and round: samples, targets, kept and the kept ratio over its targets."""
        return totals(self.samples(), ["round", "source"])

    def rounds(self) -> pl.LazyFrame:
        """One row per round: samples, tokens, targets, kept and the kept ratio."""
        return totals(self.samples(), ["round"])


def totals(samples: pl.LazyFrame, keys: list[str]) -> pl.LazyFrame:
    """Samples, tokens, targets, kept, the kept ratio and the target-weighted mean score of a samples frame, by `keys`."""
    return (
        samples.group_by(keys)
        .agg(
            pl.len().alias("samples"),
            pl.col("n_tokens").sum().alias("tokens"),
            pl.col("n_trainable").sum().alias("trainable"),
            pl.col("n_kept").sum().alias("kept"),
            ((pl.col("mean_score") * pl.col("n_trainable")).sum() / pl.col("n_trainable").sum()).alias("mean_score"),
        )
        .with_columns((pl.col("kept") / pl.col("trainable")).alias("kept_ratio"))
        .sort(keys)
    )


def sample_rollups(stats: Stats, round: int | None = None) -> pl.DataFrame:
    """One row per sample of one round (default: the last), as a sample filter ranks them (`sstoken select
    --sample-by`): source, targets, kept, kept_share (kept / targets; null without targets), and the mean over its
    targets of the selection's score, REL, entropy_cur and nll_cur (mean_score, mean_rel, mean_entropy, mean_loss;
    null where the folder stores no such signal, e.g. entropy in folders scored before it existed). By sample id."""
    return rollups_of(_round_samples(stats.part(stats.last_round if round is None else round)).collect())


def rollups_of(samples: pl.DataFrame) -> pl.DataFrame:
    """`sample_rollups` of one round's samples frame (`Stats.samples()`), without reading the folder again."""
    return samples.select(
        "sample_id", "source", pl.col("n_trainable").alias("targets"), pl.col("n_kept").alias("kept"),
        pl.when(pl.col("n_trainable") > 0).then(pl.col("n_kept") / pl.col("n_trainable")).alias("kept_share"),
        "mean_score", "mean_rel", pl.col("mean_entropy_cur").alias("mean_entropy"), pl.col("mean_nll_cur").alias("mean_loss"),
    ).sort("sample_id")


def open_masks_folder(folder: Path, tokenized: Path | None = None) -> Stats:
    """Stats over one scores or masks folder (as round 0)."""
    part = round_artifacts(Path(folder), tokenized=tokenized)
    return Stats(parts=(part,), root=Path(folder))


def pick_samples(
    samples: pl.DataFrame, *, ids: Sequence[str] = (), top: int = 0, bottom: int = 0, middle: int = 0, random: int = 0,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """(why, sample_id) of one round's samples: the given ids, then the highest, lowest and middle by mean score
    (ties by sample id), then `random` others drawn with `seed`; each sample once, the first reason wins."""
    known = set(samples["sample_id"].to_list())
    missing = [sample_id for sample_id in ids if sample_id not in known]
    if missing:
        example = ", ".join(repr(s) for s in sorted(known)[:3])
        raise ArtifactError(f"sample id {missing[0]!r} is not among the {len(known):,} samples (e.g. {example})")
    ranked = samples.filter(pl.col("mean_score").is_not_nan() & pl.col("mean_score").is_not_null()).sort(
        ["mean_score", "sample_id"], descending=[True, False])["sample_id"].to_list()
    start = max(0, (len(ranked) - middle) // 2)
    chosen: dict[str, str] = {sample_id: "asked for" for sample_id in ids}
    for why, group in (("highest score", ranked[:top]), ("lowest score", ranked[::-1][:bottom]),
                       ("middle score", ranked[start:start + middle])):
        for sample_id in group:
            chosen.setdefault(sample_id, why)
    others = samples.filter(~pl.col("sample_id").is_in(list(chosen))).sort("sample_id")
    if random and others.height:
        drawn = others.sample(n=min(random, others.height), seed=seed)["sample_id"].to_list()
        for sample_id in sorted(drawn):
            chosen.setdefault(sample_id, "random")
    return [(why, sample_id) for sample_id, why in chosen.items()]


@dataclass(frozen=True)
class SampleView:
    """One sample of one round, token by token, with the text of each token: what `inspect` and the report show."""

    why: str
    round: int
    sample_id: str
    source: str
    tokens: pl.DataFrame  # position, token_id, trainable, keep, nll_cur, nll_hist, rel, attn, score
    pieces: list[str]

    @property
    def kept(self) -> int:
        return int(self.tokens["keep"].sum())

    @property
    def targets(self) -> int:
        return int(self.tokens["trainable"].sum())


def sample_views(stats: Stats, round: int, chosen: list[tuple[str, str]], token_text: TokenText) -> list[SampleView]:
    """The tokens of the chosen (why, sample_id) of one round, read in one scan, in the order given."""
    ids = [sample_id for _, sample_id in chosen]
    tokens = (stats.tokens(ids).filter(pl.col("round") == round)
              .sort("sample_id", "position").collect())
    by_id = {key[0]: frame for key, frame in tokens.partition_by("sample_id", as_dict=True).items()} if tokens.height else {}
    views = []
    for why, sample_id in chosen:
        frame = by_id[sample_id]
        views.append(SampleView(why, round, sample_id, frame["source"][0], frame.drop("sample_id", "source", "round"),
                                token_text.texts(frame["token_id"].to_list())))
    return views
