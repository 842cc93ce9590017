"""Trainers of other libraries that train on an export's weights (`pipeline.training.weighted_loss`).

    from pipeline.training.hf_trainers import WeightedTrainer        # transformers.Trainer
    from pipeline.training.hf_trainers import WeightedSFTTrainer     # trl.SFTTrainer (needs trl: `sstoken[trl]`)

Both take `data_collator=functools.partial(pad_weighted, pad_token_id=...)`. Imported lazily: this module
imports transformers, and TRL only when `WeightedSFTTrainer` is asked for.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from pipeline.training.weighted_loss import WeightedLossMixin


class WeightedTrainer(WeightedLossMixin, Trainer):
    """A Hugging Face `Trainer` whose loss is sum(w_i * nll_i) / sum(w_i) over the global batch."""


def __getattr__(name: str) -> Any:
    if name != "WeightedSFTTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from trl import SFTTrainer
    except ImportError as error:
        raise ImportError("WeightedSFTTrainer needs TRL: pip install 'sstoken[trl]'") from error

    class WeightedSFTTrainer(WeightedLossMixin, SFTTrainer):
        """TRL's `SFTTrainer` whose loss is sum(w_i * nll_i) / sum(w_i) over the global batch (pass
        `dataset_kwargs={"skip_prepare_dataset": True}`: the export is already tokenized and labelled)."""

    globals()["WeightedSFTTrainer"] = WeightedSFTTrainer
    return WeightedSFTTrainer
