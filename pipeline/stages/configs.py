"""The stage configs: what `sstoken prepare` and `sstoken score` take, one pydantic model each.

They live apart from the stages' code so that building the CLI, `--help` and a run config's
sections imports pydantic only, never torch or pyarrow. Each field says whether it is part of the
stage's run key (`setting(..., run_key=False)`: it changes where or how the work runs, not what a
finished shard holds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.config import StageConfig, setting
from pipeline.engine.select_settings import SelectSettings
from pipeline.engine.settings import ScoreSettings
from pipeline.engine.train_settings import TrainSettings


class PrepareConfig(StageConfig):
    """Settings of `sstoken prepare`."""

    input: list[Path] = setting(
        description="Input files or folders: JSONL, JSON, Parquet, or a datasets save_to_disk folder.", run_key=False
    )
    tokenizer: str = Field(description="Tokenizer folder (usually the model folder) whose chat template renders the samples.")
    output: Path = setting(
        description="Output folder for part-NNNNN.parquet shards, rejected.parquet and manifest.json.", run_key=False
    )
    max_length: int | None = Field(2048, description="Longest sample in tokens (none: no limit); longer ones are handled per --on-overflow.")
    on_overflow: Literal["truncate", "reject"] = Field("truncate", description="What to do with samples over max_length.")
    rows_per_shard: int = Field(10_000, description="Samples per output shard.")
    max_row_bytes: int = Field(
        4 * 1024 * 1024,
        description="Largest raw row in bytes (a JSONL line, a JSON array entry, the text of a Parquet or datasets row); "
        "larger rows are rejected as row_too_large before they are parsed or tokenized.",
    )
    add_bos: bool = Field(
        False,
        description="Put the tokenizer's BOS token in front of every sample whose rendering does not start with it "
        "(for chat templates that leave it out; ChatML has none). A context token, never trained on.",
    )
    chat_template: Path | None = Field(None, description="Jinja chat template file, for tokenizers without one (or to override it).")
    trust_remote_code: bool = Field(False, description="Allow the tokenizer folder's own Python code to run.")
    overwrite: bool = setting(
        False, description="Write into an output folder holding other files or a corpus made from other inputs or "
        "settings (files of other names are left as they are).", run_key=False
    )

    @field_validator("max_length", "rows_per_shard")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 2:
            raise ValueError("must be at least 2")
        return value

    @field_validator("max_row_bytes")
    @classmethod
    def _at_least_one_byte(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class ScoreJobConfig(ScoreSettings, SelectSettings):
    """`sstoken score`: the scoring and selection settings plus where data, models and output live and how Ray runs.

    None of these fields is part of the run key: the data and checkpoints enter it by fingerprint,
    the rest say where and how the job runs (a new granularity only re-selects).
    """

    data: Path = setting(description="Tokenized input folder (made by `sstoken prepare`).", run_key=False)
    current: Path = setting(description="Current checkpoint folder (safetensors + tokenizer).", run_key=False)
    history: Path | None = setting(
        None, description="History checkpoint folder; default: the current one (REL is 0, attention only).", run_key=False
    )
    output: Path = setting(description="Output folder for score shards and manifest.json.", run_key=False)
    history_cache: Path | None = setting(
        None, description="History NLL cache root; default: $SSTOKEN_CACHE/history or ~/.cache/sstoken/history.",
        run_key=False,
    )
    cache_current_nll: bool = setting(
        False, description="Also store the current checkpoint's NLLs in the history cache, so a later run that takes "
        "this checkpoint as its history model over the same data skips its history pass (`sstoken run` turns it on).",
        run_key=False,
    )
    address: str | None = setting(
        None, description="Ray cluster to run on (HOST:PORT, auto, ray://...); default: RAY_ADDRESS, else embedded.",
        run_key=False,
    )
    workers: int | None = setting(
        None, ge=1, description="Scoring actors; default: as many as the cluster's CPUs (or GPUs) hold.", run_key=False
    )
    runner: Literal["ray", "process"] = setting(
        "ray", description="ray: the models run in Ray actors (a cluster, several workers, GPUs); process: one model at "
        "a time in this process, the shards one after another, without an actor's start-up (a new process importing "
        "torch, seconds per phase on a small machine). The same shards either way.", run_key=False,
    )
    cpus_per_worker: float | None = setting(
        None, gt=0, description="CPUs reserved by each actor (its torch threads); default: up to 4, one node's worth.",
        run_key=False,
    )
    gpus_per_worker: float = setting(0.0, ge=0, description="GPUs per actor; 0 = score on CPU.", run_key=False)
    num_cpus: int | None = setting(
        None, ge=1, description="CPUs of the embedded Ray; default: this machine's.", run_key=False
    )
    object_store_mb: int | None = setting(
        None, ge=100, description="Object store of the embedded Ray in MiB; default: a tenth of memory, within 256-2048.",
        run_key=False,
    )
    progress: bool = setting(True, description="Show a progress bar while scoring.", run_key=False)
    connect_timeout_s: float = setting(
        30.0, gt=0, description="Seconds to wait for the Ray cluster at --address to answer before giving up.",
        run_key=False,
    )
    overwrite: bool = setting(
        False, description="Write into an output folder holding other files or scores of another corpus, "
        "checkpoints or settings (files of other names are left as they are).", run_key=False,
    )

    def score_settings(self) -> ScoreSettings:
        return ScoreSettings(**{name: getattr(self, name) for name in ScoreSettings.model_fields})

    def select_settings(self) -> SelectSettings:
        return SelectSettings(**{name: getattr(self, name) for name in SelectSettings.model_fields})


class SelectConfig(SelectSettings):
    """`sstoken select`: a selection method and its settings, applied to a scores folder in place or
    written apart to a masks folder (`output`)."""

    scores: Path = setting(
        description="Scores folder made by `sstoken score`; without --output its score, keep and n_kept columns are "
        "rewritten in place.",
        run_key=False,
    )
    output: Path | None = setting(
        None,
        description="Masks folder to write the selection to (mask shards named as the score shards, a manifest of kind "
        "masks); the scores folder is then left untouched. Default: select in place.",
        run_key=False,
    )
    overwrite: bool = setting(
        False, description="With --output: write into a folder holding other files or masks of other scores or settings "
        "(files of other names are left as they are).", run_key=False,
    )

    @model_validator(mode="after")
    def _overwrite_needs_output(self) -> SelectConfig:
        if self.overwrite and self.output is None:
            raise ValueError("overwrite applies to a masks folder (--output); a selection in place needs none")
        return self


class ExportConfig(StageConfig):
    """`sstoken export`: tokens and keep masks joined into self-contained training data for any trainer.

    None of these fields is part of the run key: data and masks enter it by fingerprint, and the
    format and the handling of samples without a kept token by the export's identity.
    """

    data: Path = setting(description="Tokenized input folder (made by `sstoken prepare`).", run_key=False)
    masks: Path = setting(
        description="Keep masks: a scores folder (`sstoken score` / `sstoken select`) or a masks folder "
        "(`sstoken select --output`) made from --data.", run_key=False,
    )
    format: Literal["hf", "jsonl", "parquet"] = setting(
        description="hf: a `datasets` folder (`datasets.load_from_disk(OUT)`); jsonl: part-NNNNN.jsonl, one JSON object "
        "per line; parquet: part-NNNNN.parquet. Each row: sample_id, source, input_ids, attention_mask, labels (-100 "
        "where a token is not kept), n_tokens, n_kept.", run_key=False,
    )
    output: Path = setting(description="Output folder: the data files and manifest.json (written last).", run_key=False)
    without_kept: Literal["skip", "keep"] = setting(
        "skip", description="Samples whose mask keeps no token: skip them (counted in the summary and manifest, as "
        "`sstoken train` and TRL leave them out), or keep them with every label -100.", run_key=False,
    )
    overwrite: bool = setting(
        False, description="Write into an output folder holding other files or an export of other inputs or settings "
        "(files of other names are left as they are).", run_key=False,
    )


class ValidateConfig(StageConfig):
    """`sstoken validate`: check an artifact folder (or every one under a run folder) against its schema and manifest."""

    folder: Path = setting(
        description="An artifact folder (tokenized, scores, masks, export, train output, a history cache folder) or a "
        "folder holding several (a run folder): each is checked.", run_key=False,
    )


class TrainConfig(TrainSettings):
    """`sstoken train`: the SFT settings plus where tokens, masks, the starting model and the output live, and how Ray runs.

    None of these fields is part of the run key: data, masks and model enter it by fingerprint, the
    rest say where and how the run goes (another number of workers resumes the same run).
    """

    data: Path = setting(description="Tokenized input folder (made by `sstoken prepare`).", run_key=False)
    masks: Path = setting(
        description="Keep masks: a scores folder (`sstoken score` / `sstoken select`) or a masks folder "
        "(`sstoken select --output`) made from --data.", run_key=False,
    )
    model: Path = setting(description="Starting checkpoint: a Hugging Face folder (safetensors + tokenizer).", run_key=False)
    output: Path = setting(
        description="Output folder: checkpoint/ (the trained model), metrics.jsonl, train/ (resumable state while "
        "running) and manifest.json.", run_key=False,
    )
    workers: int = setting(1, ge=1, description="Training workers (data-parallel ranks).", run_key=False)
    runner: Literal["ray", "process"] = setting(
        "ray", description="ray: the workers run under Ray Train (a cluster, several workers, GPUs); process: one worker "
        "in this process, without Ray Train's start-up (25-45 s per run on a small machine), resumable from its own "
        "checkpoints. Either ends with the same tensors.", run_key=False,
    )
    use_gpu: bool = setting(False, description="One GPU per worker (bf16 autocast with dtype auto).", run_key=False)
    cpus_per_worker: float | None = setting(
        None, gt=0, description="CPUs per worker (its torch threads); default: the cluster's CPUs shared by the workers, "
        "at most one node's.", run_key=False,
    )
    address: str | None = setting(
        None, description="Ray cluster to run on (HOST:PORT, auto, ray://...); default: RAY_ADDRESS, else embedded.",
        run_key=False,
    )
    num_cpus: int | None = setting(None, ge=1, description="CPUs of the embedded Ray; default: this machine's.", run_key=False)
    object_store_mb: int | None = setting(
        None, ge=100, description="Object store of the embedded Ray in MiB; default: a tenth of memory, within 256-2048.",
        run_key=False,
    )
    connect_timeout_s: float = setting(
        30.0, gt=0, description="Seconds to wait for the Ray cluster at --address to answer before giving up.",
        run_key=False,
    )
    trust_remote_code: bool = setting(
        False, description="Allow model code shipped inside the model folder to run.", run_key=False
    )
    progress: bool = setting(True, description="Show a progress bar while training.", run_key=False)
    overwrite: bool = setting(
        False, description="Write into an output folder holding other files or a model trained from other inputs or "
        "settings (files of other names are left as they are).", run_key=False,
    )

    @model_validator(mode="after")
    def _process_runner_is_one_local_worker(self) -> TrainConfig:
        if self.runner == "process" and (self.workers != 1 or self.address is not None):
            raise ValueError("runner process trains one worker in this process; set workers 1 and no address, or runner ray")
        return self


class ReportConfig(StageConfig):
    """`sstoken report`: one self-contained HTML page about a run, a scores or masks folder, or an eval folder."""

    folder: Path = setting(
        description="Run folder, scores folder, masks folder, or eval folder (holding eval.json) to report on.",
        run_key=False,
    )
    output: Path = setting(Path("report.html"), description="HTML file to write (one file, opens offline).", run_key=False)
    data: Path | None = setting(
        None, description="Tokenized folder of a scores or masks folder; default: the one its manifest names.",
        run_key=False,
    )
    embed_tokens: int = setting(
        100_000, ge=1_000, description="Most tokens the page embeds as heatmaps (the highest-, lowest- and "
        "middle-scoring samples, then random ones); the totals and plots always cover every sample.", run_key=False,
    )
    seed: int = setting(0, ge=0, description="Seed of the random samples shown.", run_key=False)
    overwrite: bool = setting(
        False, description="Replace an existing file at --output that is not an sstoken report.", run_key=False
    )


class InspectConfig(StageConfig):
    """`sstoken inspect`: samples' tokens coloured by score in the terminal, with their numbers."""

    folder: Path = setting(description="Run folder, scores folder or masks folder.", run_key=False)
    sample: list[str] = setting([], description="Sample ids to show.", run_key=False)
    top: int | None = setting(None, ge=1, description="Show the N samples of highest mean score.", run_key=False)
    bottom: int | None = setting(None, ge=1, description="Show the N samples of lowest mean score.", run_key=False)
    random: int | None = setting(None, ge=1, description="Show N samples drawn at random (--seed).", run_key=False)
    seed: int = setting(0, ge=0, description="Seed of --random.", run_key=False)
    round: int | None = setting(None, ge=0, description="Round of a run folder to show; default: its last.", run_key=False)
    data: Path | None = setting(
        None, description="Tokenized folder of a scores or masks folder; default: the one its manifest names.",
        run_key=False,
    )
    numbers: bool = setting(True, description="Print each target's numbers in a table under the tokens.", run_key=False)

    @model_validator(mode="after")
    def _something_to_show(self) -> InspectConfig:
        if not (self.sample or self.top or self.bottom or self.random):
            raise ValueError("say which samples to show: --sample ID, --top N, --bottom N or --random N")
        return self
