"""The model under training: LoRA or full, resumable state in safetensors, a merged Hugging Face folder the scorer loads."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime.checkpoints import checkpoint_files, load_model
from pipeline.scoring.score_settings import ScoreSettings
from pipeline.scoring.scorer import Scorer
from pipeline.training.finetune import OPTIMIZER, STATE, TRAINABLE, FineTuned
from pipeline.training.masked_loss import masked_labels
from pipeline.training.train_settings import TrainSettings
from pipeline.training.train_step import MicroBatch, train_step

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 7, 9, 11, 13, 15]])
BATCH = MicroBatch(IDS, torch.ones_like(IDS), masked_labels(IDS, torch.tensor([[0, 1, 1, 0, 1, 1]]).bool()))


def _trained(llama_dir, **settings) -> tuple[FineTuned, torch.optim.Optimizer]:
    tuned = FineTuned(llama_dir, TrainSettings(**settings), CPU)
    optimizer = tuned.optimizer()
    for _ in range(2):
        train_step(tuned.model, optimizer, [BATCH], lr=1e-2, max_grad_norm=1.0)
    return tuned, optimizer


def test_lora_trains_only_the_adapters_of_every_linear_layer_but_the_head(llama_dir):
    tuned = FineTuned(llama_dir, TrainSettings(lora_r=4), CPU)
    names = list(tuned.named_trainable())
    assert names and all("lora_" in name for name in names)
    for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{module}.lora_A" in name for name in names), module
    assert not any("lm_head" in name or "embed" in name for name in names)
    full = FineTuned(llama_dir, TrainSettings(finetune="full"), CPU)
    assert set(full.named_trainable()) == {name for name, _ in load_model(llama_dir).named_parameters()}


def test_resumable_state_restores_weights_moments_and_step(llama_dir, tmp_path):
    tuned, optimizer = _trained(llama_dir, lora_r=4, lora_dropout=0.0)
    tuned.save_state(tmp_path, optimizer, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TRAINABLE, OPTIMIZER, STATE])
    fresh = FineTuned(llama_dir, TrainSettings(lora_r=4, lora_dropout=0.0, seed=9), CPU)  # other initial adapters
    fresh_optimizer = fresh.optimizer()
    assert fresh.load_state(tmp_path, fresh_optimizer) == 2
    # One more step from either gives the same tensors: weights and AdamW moments were restored.
    for model, opt in ((tuned, optimizer), (fresh, fresh_optimizer)):
        train_step(model.model, opt, [BATCH], lr=1e-2, max_grad_norm=1.0)
    for (name, a), b in zip(tuned.named_trainable().items(), fresh.named_trainable().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_state_of_another_model_is_refused(llama_dir, tmp_path):
    tuned, optimizer = _trained(llama_dir, lora_r=4)
    tuned.save_state(tmp_path, optimizer, step=2)
    full = FineTuned(llama_dir, TrainSettings(finetune="full"), CPU)
    with pytest.raises(ValueError, match="holds other parameters than this model trains"):
        full.load_state(tmp_path, full.optimizer())


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_the_final_folder_is_a_checkpoint_the_scorer_loads_with_the_trained_weights(llama_dir, tmp_path, finetune):
    tuned, _ = _trained(llama_dir, finetune=finetune, lora_r=4, lora_dropout=0.0)
    tuned.model.eval()
    with torch.no_grad():
        expected = tuned.model(input_ids=IDS).logits
    tuned.save_pretrained(tmp_path, llama_dir)
    assert {p.name for p in checkpoint_files(tmp_path)} == {"config.json", "model.safetensors"}
    assert (tmp_path / "tokenizer.json").is_file()
    reloaded = load_model(tmp_path)
    with torch.no_grad():
        found = reloaded(input_ids=IDS).logits
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    with torch.no_grad():
        base = load_model(llama_dir)(input_ids=IDS).logits
    assert (found - base).abs().max() > 1e-3  # the training moved the weights
    assert Scorer(tmp_path, ScoreSettings(device="cpu"), importance=False).fingerprint
