"""`sstoken export`: tokens and keep masks as self-contained training data for any trainer (TRL, HF Trainer)."""

from __future__ import annotations

from pipeline.cli.command import stage_command
from pipeline.training.export_config import ExportConfig

register = stage_command(
    "export",
    ExportConfig,
    "pipeline.training.export_stage:run_export",
    help="Write tokens and keep masks as training data (input_ids, attention_mask, labels) for any trainer.",
    description="Join --data (tokenized) and --masks (a scores or masks folder made from it) by sample id and write "
    "one row per sample: sample_id, source, input_ids, attention_mask and labels (input_ids where a token is kept, "
    "-100 elsewhere and at position 0: the Hugging Face convention, the model shifts). --format hf gives a datasets "
    "folder (datasets.load_from_disk), jsonl and parquet one file per tokenized shard. TRL's SFTTrainer trains on "
    "exactly the kept tokens with dataset_kwargs={'skip_prepare_dataset': True}. Masks of other data or another "
    "tokenizer are refused; samples that keep no token are skipped and counted (--without-kept keep exports them).",
)
