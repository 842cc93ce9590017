"""An export's weights train under another trainer with our loss: `weighted_token_loss`, the Hugging Face Trainer
and TRL's SFTTrainer with `WeightedLossMixin` give `sstoken train`'s loss on the same batch."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.runtime.checkpoints import load_model
from pipeline.training.export_stage import ExportConfig, run_export
from pipeline.training.masked_loss import IGNORE_INDEX, masked_nll_sum, target_weight
from pipeline.training.train_worker import micro_batch
from pipeline.training.training_data import build_index, load_samples, open_training_data
from pipeline.training.weighted_loss import pad_weighted, weighted_token_loss
from tests.factories import write_keep_masks, write_tokenized


@pytest.fixture
def weighted_export(tokenizer, tmp_path) -> tuple[Path, Path, Path]:
    tokenized = write_tokenized(tmp_path / "tokenized", tokenizer, [3, 2], seed=5)
    masks = write_keep_masks(tmp_path / "masks", tokenized, ratio=0.6, seed=3, kind="masks", weights="random")
    run_export(ExportConfig(data=tokenized, masks=masks, format="hf", output=tmp_path / "export"))
    return tokenized, masks, tmp_path / "export"


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _our_loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    """The trainer's loss on one global batch of one micro-batch (`train_step`'s numerator and normaliser)."""
    nll_sum, _ = masked_nll_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["weights"])
    return float(nll_sum) / target_weight(batch["labels"], batch["weights"])


def test_the_export_holds_the_trainers_labels_and_weights(tokenizer, weighted_export):
    import datasets

    tokenized, masks, export = weighted_export
    rows = list(datasets.load_from_disk(str(export)))
    source = open_training_data(tokenized, masks)
    index = build_index(source)
    samples = load_samples(source, index, np.arange(index.samples))
    ours = micro_batch(samples, np.arange(index.samples))
    by_id = {row["sample_id"]: row for row in rows}
    assert sorted(by_id) == sorted(index.sample_ids)
    for position, sample_id in enumerate(index.sample_ids):
        row, length = by_id[sample_id], int(index.lengths[position])
        assert row["labels"] == ours.labels[position, :length].tolist()
        assert torch.equal(torch.tensor(row["weights"], dtype=torch.float32), ours.weights[position, :length])
    weights = [w for row in rows for w in row["weights"] if w > 0]
    assert len(set(weights)) > 3  # the masks' own weights, not keep as 0/1


def test_weighted_token_loss_on_an_export_batch_is_the_trainers_loss(tokenizer, llama_dir, weighted_export):
    import datasets

    batch = pad_weighted(list(datasets.load_from_disk(str(weighted_export[2]))), _pad_id(tokenizer))
    model = load_model(llama_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = float(weighted_token_loss(logits, batch["labels"], batch["weights"]))
        unweighted = float(weighted_token_loss(logits, batch["labels"], (batch["labels"] != IGNORE_INDEX).float()))
        assert loss == pytest.approx(_our_loss(model, batch), rel=1e-5)
    assert abs(loss - unweighted) > 1e-3  # the weights matter
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        weighted_token_loss(logits, batch["labels"], -batch["weights"])
    with pytest.raises(ValueError, match=r"logits \[B, T, V\] with labels and weights \[B, T\]"):
        weighted_token_loss(logits, batch["labels"], batch["weights"][:, 1:])


def _arguments(output: Path, rows: int) -> dict[str, Any]:
    return dict(output_dir=str(output), per_device_train_batch_size=rows, max_steps=1, learning_rate=1e-3,
                use_cpu=True, report_to="none", save_strategy="no", logging_steps=1)


def _hf(model: Any, dataset: Any, tokenizer: Any, output: Path) -> Any:
    from transformers import TrainingArguments

    from pipeline.training.hf_trainers import WeightedTrainer

    return WeightedTrainer(model=model, args=TrainingArguments(**_arguments(output, len(dataset))), train_dataset=dataset,
                           data_collator=functools.partial(pad_weighted, pad_token_id=_pad_id(tokenizer)))


def _trl(model: Any, dataset: Any, tokenizer: Any, output: Path) -> Any:
    pytest.importorskip("trl")
    from trl import SFTConfig

    from pipeline.training.hf_trainers import WeightedSFTTrainer

    config = SFTConfig(**_arguments(output, len(dataset)), dataset_kwargs={"skip_prepare_dataset": True}, bf16=False,
                       activation_checkpointing=False)
    return WeightedSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              data_collator=functools.partial(pad_weighted, pad_token_id=_pad_id(tokenizer)))


@pytest.mark.parametrize("make_trainer", [_hf, _trl], ids=["hf-trainer", "trl-sft"])
def test_a_trainer_with_the_mixin_steps_on_the_trainers_loss(tokenizer, llama_dir, weighted_export, tmp_path, make_trainer):
    import datasets
    from transformers import AutoModelForCausalLM

    dataset = datasets.load_from_disk(str(weighted_export[2]))
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    trainer = make_trainer(model, dataset, tokenizer, tmp_path / "trainer")
    batches: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: batches.append(dict(kwargs)), with_kwargs=True)
    expected = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():  # the batch the trainer collated (weights kept), before its step changes the model
            expected.append(_our_loss(model, inputs))
            expected.append(float(target_weight(inputs["labels"], inputs["weights"])))
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = compute_loss
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert len(batches) == 1 and "weights" not in batches[0]  # the weights reached the loss, not the model
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it trained
    ours, weight_total = expected
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    assert logged == pytest.approx(ours, rel=1e-4)
    assert weight_total == pytest.approx(float(sum(w for row in dataset for w in row["weights"])), rel=1e-6)
