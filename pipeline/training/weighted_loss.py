"""Train on an export's weights with another trainer: the loss sum(w_i * nll_i) / sum(w_i) that `sstoken train` uses.

    loss = weighted_token_loss(model(input_ids=..., attention_mask=...).logits, labels, weights)

An export (`sstoken export`) holds, per row, `labels` (the token where it is kept, -100 elsewhere; the
unshifted Hugging Face convention) and `weights` (the masks' weight at each label, 0 elsewhere). The
logits at position t - 1 predict label t, as in every Hugging Face causal LM. With a binary selection
every weight at a label is 1 and the loss is the plain mean NLL over the labels.

For a Hugging Face `Trainer` (or TRL's `SFTTrainer`), `WeightedLossMixin` replaces `compute_loss` and the
count a global batch is normalised by (the weight total of every accumulation micro-batch, gathered over
processes, where the Trainer would count labels), so the update is the one `sstoken train` makes on the
same global batch; `pad_weighted` is the collator that pads `weights` with 0. Ready-made classes are
in `pipeline.training.hf_trainers` (imports transformers, and TRL for `WeightedSFTTrainer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.training.masked_loss import IGNORE_INDEX

WEIGHTS = "weights"  # the export's column


def _refuse_bad_inputs(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or weights.shape != labels.shape:
        raise ValueError(f"weighted_token_loss takes logits [B, T, V] with labels and weights [B, T]; got logits "
                         f"{tuple(logits.shape)}, labels {tuple(labels.shape)}, weights {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and >= 0 (an export's weights are); got NaN, infinite or negative ones")


def label_weight_total(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weights' total at the labels (position 0 never counts): what a batch's loss is normalised by."""
    return torch.where(labels[..., 1:] != IGNORE_INDEX, weights[..., 1:].float(), 0.0).sum()


def weighted_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, normaliser: torch.Tensor | float | None = None
) -> torch.Tensor:
    """sum(w_t * -log softmax(logits[t - 1])[labels[t]]) over the labels, divided by `normaliser` (default: the
    batch's own weight total; a Trainer passes the global batch's). Float32 log-softmax whatever the logits' dtype."""
    _refuse_bad_inputs(logits, labels, weights)
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    weighted = torch.where(targets != IGNORE_INDEX, weights[:, 1:].float(), 0.0) * nll
    total = label_weight_total(labels, weights) if normaliser is None else normaliser
    return weighted.sum() / total


def pad_weighted(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A collator for export rows: input_ids (padded with `pad_token_id`), labels (-100) and weights (0), right-padded
    to the longest row, and the attention mask (1 on each row's tokens: export rows are unpadded, and TRL drops
    that column); the other columns are left out."""
    width = max(len(f["input_ids"]) for f in features)
    pads = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, WEIGHTS: 0.0}
    batch = {}
    for name, pad in pads.items():
        dtype = torch.float32 if name == WEIGHTS else torch.long
        batch[name] = torch.tensor([list(f[name]) + [pad] * (width - len(f[name])) for f in features], dtype=dtype)
    lengths = torch.tensor([len(f["input_ids"]) for f in features])
    batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return batch


class WeightedLossMixin:
    """Put before `transformers.Trainer` (or `trl.SFTTrainer`) in the bases: the loss is sum(w_i * nll_i) / sum(w_i)
    over the global batch, from the batch's `labels` and `weights` (pass `data_collator=` a `pad_weighted`)."""

    loss_is_scaled_for_ga = True  # normalised by the weight total of the whole accumulated batch

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        if WEIGHTS not in self._signature_columns:  # else `remove_unused_columns` drops the weights
            self._signature_columns = [*self._signature_columns, WEIGHTS]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The weight total of every accumulation micro-batch, summed over processes (where the Trainer counts labels)."""
        if not batch_samples or any(WEIGHTS not in b or "labels" not in b for b in batch_samples):
            return super()._get_num_items_in_batch(batch_samples, device)  # type: ignore[misc]
        total = sum(label_weight_total(b["labels"], b[WEIGHTS]) for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | None = None) -> Any:
        inputs = dict(inputs)
        labels, weights = inputs.pop("labels"), inputs.pop(WEIGHTS)
        outputs = model(**inputs)
        loss = weighted_token_loss(outputs.logits, labels, weights, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients; the normaliser is already global
        return (loss, outputs) if return_outputs else loss
