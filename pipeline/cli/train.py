"""`sstoken train`: fine-tune a model on the kept tokens of a tokenized corpus, on Ray Train."""

from __future__ import annotations

from pipeline.cli.command import stage_command
from pipeline.training.train_config import TrainConfig

register = stage_command(
    "train",
    TrainConfig,
    "pipeline.training.train_stage:run_train",
    help="Fine-tune a model (LoRA or full) on the kept tokens of a tokenized corpus; write a Hugging Face checkpoint.",
    description="Train --model on --data with the loss on the tokens --masks keeps (a scores folder or a masks "
    "folder): the mean NLL over the kept tokens of each global batch. Writes DIR/checkpoint/ (safetensors, LoRA "
    "merged, with the tokenizer), DIR/metrics.jsonl (one line per step) and DIR/manifest.json (last). Runs on an "
    "embedded local Ray (one worker) unless --ray.address or RAY_ADDRESS names a cluster (--workers N, --use-gpu); a "
    "killed run resumes from its last checkpoint with the same result, and a rerun of a finished one returns at once.",
)
