"""An export trains under TRL's SFTTrainer and the Hugging Face Trainer on exactly the kept tokens: the loss has
no gradient at any other one.

The test watches the gradient of the decoder's last hidden states (TRL 1.x computes the loss with a
fused LM head, so there are no full logits to watch): the head maps position t alone to the
prediction of token t + 1, so position t gets gradient exactly when token t + 1 is a label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.runtime.files import read_manifest
from pipeline.training.export_stage import ExportConfig, run_export
from tests.factories import write_keep_masks, write_tokenized


def _keep_by_sample(masks: Path) -> dict[str, list[bool]]:
    return {
        row["sample_id"]: row["keep"]
        for shard in read_manifest(masks)["shards"]
        for row in pq.read_table(masks / shard["file"], columns=["sample_id", "keep"]).to_pylist()
    }


def _trl_trainer(model: Any, dataset: Any, tokenizer: Any, output: Path) -> Any:
    """What a TRL user writes (README): the export as it is, TRL's own preparation skipped."""
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=str(output), dataset_kwargs={"skip_prepare_dataset": True},
        per_device_train_batch_size=len(dataset), max_steps=1, learning_rate=1e-3,
        bf16=False, activation_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
    )
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def _hf_trainer(model: Any, dataset: Any, tokenizer: Any, output: Path) -> Any:
    """What a Hugging Face Trainer user writes (README): labels padded with -100, the other columns dropped."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=len(dataset), max_steps=1, learning_rate=1e-3,
        use_cpu=True, report_to="none", save_strategy="no",
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    return Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator)


@pytest.mark.parametrize("make_trainer", [_trl_trainer, _hf_trainer], ids=["trl-sft", "hf-trainer"])
def test_a_trainer_on_an_export_takes_gradient_from_the_kept_tokens_only(tokenizer, llama_dir, tmp_path, make_trainer):
    import datasets
    from transformers import AutoModelForCausalLM

    tokenized = write_tokenized(tmp_path / "tokenized", tokenizer, [3, 2], seed=5)
    masks = write_keep_masks(tmp_path / "masks", tokenized, ratio=0.5, seed=3)
    run_export(ExportConfig(data=tokenized, masks=masks, format="hf", output=tmp_path / "export"))
    dataset = datasets.load_from_disk(str(tmp_path / "export"))
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    trainer = make_trainer(model, dataset, tokenizer, tmp_path / "trainer")

    batches, hidden_grads = [], []
    model.register_forward_pre_hook(lambda module, args, kwargs: batches.append(kwargs), with_kwargs=True)

    def watch_hidden_states(module, args, output) -> None:
        output.last_hidden_state.register_hook(hidden_grads.append)

    model.model.register_forward_hook(watch_hidden_states)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()

    assert len(batches) == len(hidden_grads) == 1
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())  # it did train
    input_ids, grad = batches[0]["input_ids"], hidden_grads[0]
    keep_of = _keep_by_sample(masks)
    ids_to_sample = {tuple(row["input_ids"]): row["sample_id"] for row in dataset}
    seen, kept_tokens = set(), 0
    for b in range(input_ids.shape[0]):
        sample = next(s for ids, s in ids_to_sample.items() if input_ids[b, : len(ids)].tolist() == list(ids))
        seen.add(sample)
        keep = keep_of[sample]
        # Position t predicts token t + 1: it gets gradient exactly when token t + 1 is kept (padding: never).
        has_grad = grad[b].abs().sum(dim=-1) != 0
        predicts_kept = torch.tensor([bool(k) for k in keep[1:]] + [False] * (input_ids.shape[1] - len(keep) + 1))
        assert torch.equal(has_grad, predicts_kept), sample
        kept_tokens += int(predicts_kept.sum())
    assert seen == set(ids_to_sample.values()) and kept_tokens == read_manifest(tmp_path / "export")["counts"]["labels"] > 0
