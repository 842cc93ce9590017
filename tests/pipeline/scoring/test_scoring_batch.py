"""A scoring micro-batch's host-built indices, on literal token lists, and the one copy back per forward."""

import sys
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from pipeline.scoring.scorer import Scorer, ScoreSettings
from pipeline.scoring.scoring_batch import plan_scoring_batch, split_counts

SCORING = str(Path(__file__).resolve().parents[3] / "pipeline" / "scoring")


def test_plan_literal():
    ids = [np.array([5, 6, 7, 8, 9]), np.array([1, 2, 3])]
    masks = [np.array([0, 0, 1, 1, 0], bool), np.array([0, 1, 1], bool)]
    plan = plan_scoring_batch(ids, masks)
    assert plan.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert plan.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # Targets (0, 2), (0, 3), (1, 1), (1, 2) are predicted from rows b*5 + i - 1.
    assert plan.predicting.tolist() == [1, 2, 5, 6]
    assert plan.labels.tolist() == [7, 8, 2, 3]
    assert plan.counts == [2, 2]
    assert plan.query_positions.tolist() == [[2, 3], [1, 2]]
    assert plan.context_end.tolist() == [[2, 2], [1, 1]]
    assert plan.key_length == 4
    assert plan.importance_index.tolist() == [0, 1, 2, 3]


def test_plan_pads_query_slots_and_skips_the_mask_without_padding():
    ids = [np.arange(1, 7), np.arange(1, 7)]
    masks = [np.array([0, 1, 1, 0, 1, 1], bool), np.array([0, 0, 0, 0, 0, 1], bool)]
    plan = plan_scoring_batch(ids, masks)
    assert plan.attention_mask is None
    assert plan.query_positions.tolist() == [[1, 2, 4, 5], [5, 0, 0, 0]]
    assert plan.context_end.tolist() == [[1, 1, 4, 4], [5, 0, 0, 0]]
    assert plan.importance_index.tolist() == [0, 1, 2, 3, 4]  # sample 1's one target sits at slot 4 = 1*4 + 0
    assert [a.tolist() for a in split_counts(np.arange(5), plan.counts)] == [[0, 1, 2, 3], [4]]


def test_plan_of_samples_without_targets():
    plan = plan_scoring_batch([np.array([4, 5]), np.array([6])], [np.zeros(2, bool), np.zeros(1, bool)])
    assert plan.predicting.size == 0 and plan.counts == [0, 0] and plan.importance_index.size == 0


# Calls that make the host wait for the device on CUDA (or copy to the host).
HOST_SYNCS = {"cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select"}


class EngineSyncs(TorchFunctionMode):
    """Records host-syncing tensor calls made from pipeline/scoring code (not from transformers)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_SYNCS and sys._getframe(1).f_code.co_filename.startswith(SCORING):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_one_copy_back_per_micro_batch(llama_dir):
    """Per forward, the engine's only host-bound call is the final copy of the results (cpu + numpy of a
    host tensor); no nonzero, item or bool that would stall the host while the device works."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 300, n) for n in (40, 33, 21)]
    masks = [np.arange(len(x)) % 3 == 1 for x in ids]
    for importance, entropy in ((True, True), (True, False), (False, True), (False, False)):
        scorer = Scorer(llama_dir, ScoreSettings(device="cpu", dtype="bfloat16-full"), importance=importance,
                        entropy=entropy)
        with torch.inference_mode(), EngineSyncs() as syncs:
            found = scorer.forward(ids, masks)
        assert syncs.calls == ["cpu", "numpy"], (importance, entropy)
        assert [len(n) for n in found.nll] == [int(m.sum()) for m in masks]
        assert (found.attn is not None) == importance and (found.entropy is not None) == entropy
        if entropy:
            assert [len(e) for e in found.entropy] == [int(m.sum()) for m in masks]


def test_the_sync_detector_sees_a_device_query(llama_dir):
    """The detector is not blind: target_nll finds its targets with nonzero and checks them with bool."""
    from pipeline.runtime.checkpoints import load_model
    from pipeline.scoring.nll import output_head, target_nll

    model = load_model(llama_dir)
    targets = torch.zeros(1, 6, dtype=torch.bool)
    targets[0, 2:] = True
    with torch.inference_mode(), EngineSyncs() as syncs:
        target_nll(torch.zeros(1, 6, model.config.hidden_size), torch.ones(1, 6, dtype=torch.long), targets, output_head(model)[0])
    assert {"nonzero", "__bool__"} <= set(syncs.calls)
