"""The scoring engine against the naive reference, plus its settings, skips and input checks."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from pipeline.engine.attention import ATTENTION_IMPLEMENTATION
from pipeline.artifacts.schemas import arrow_schema, validate_table
from pipeline.engine.scorer import Scorer, ScoreSettings, history_nll_table, history_scorer, score_shard
from tests.pipeline.engine.reference import load_eager, naive_forward, naive_scores

FIELDS = ("nll_cur", "nll_hist", "rel", "attn", "score")
FP32 = dict(dtype="float32", device="cpu")


def _chat_sample(tokenizer, messages):
    """ChatML ids with assistant content + <|im_end|> marked trainable, rendered piece by piece."""
    ids, trainable = [], []
    for role, content in messages:
        head = tokenizer.encode(f"<|im_start|>{role}\n", add_special_tokens=False)
        body = tokenizer.encode(content, add_special_tokens=False) + tokenizer.encode("<|im_end|>", add_special_tokens=False)
        tail = tokenizer.encode("\n", add_special_tokens=False)
        ids += head + body + tail
        trainable += [False] * len(head) + [role == "assistant"] * len(body) + [False] * len(tail)
    return np.array(ids, dtype=np.int64), np.array(trainable, dtype=bool)


@pytest.fixture(scope="module")
def samples(tokenizer):
    """Mixed lengths, single- and multi-turn chats, and random-id samples; sizes force padding."""
    chats = [
        [("system", "You help."), ("user", "What is the capital of France?"), ("assistant", "Paris.")],
        [("user", "Hello!"), ("assistant", "How can I help you today?"), ("user", "Add 2 and 3."),
         ("assistant", "def add(a, b):\n    return a + b\n"), ("user", "Thanks"), ("assistant", "The quick brown fox.")],
        [("user", "Numbers?"), ("assistant", "0 1 2 3 4 5 6 7 8 9")],
    ]
    ids, masks = zip(*(_chat_sample(tokenizer, chat) for chat in chats))
    ids, masks = list(ids), list(masks)
    rng = np.random.default_rng(0)
    for length in (57, 9, 57, 120):
        x = rng.integers(0, 300, length)
        m = np.zeros(length, bool)
        m[length // 4 : length // 2] = True
        m[2 * length // 3 : length - 1] = True
        ids.append(x)
        masks.append(m)
    sample_ids = [f"s{i}" for i in range(len(ids))]
    return sample_ids, ids, masks


def _assert_matches_reference(results, reference, masks, atol=1e-4):
    for got, expected, mask in zip(results, reference, masks):
        for name in FIELDS:
            a, b = getattr(got, name), expected[name]
            assert a.dtype == np.float32 and a.shape == mask.shape
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
            np.testing.assert_allclose(a[mask], b[mask], atol=atol, rtol=0, err_msg=f"{got.sample_id} {name}")
        np.testing.assert_array_equal(got.keep, expected["keep"], err_msg=got.sample_id)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("layer", [-1, 0])
def test_fast_path_matches_naive_reference(request, samples, family, layer):
    current = request.getfixturevalue(f"{family}_dir")
    history = request.getfixturevalue(f"{family}_history_dir")
    sample_ids, ids, masks = samples
    # A small budget: several micro-batches, each mixing lengths with right padding.
    scorer = Scorer(current, history, ScoreSettings(layer=layer, max_batch_tokens=240, **FP32))
    results = scorer.score_samples(sample_ids, ids, masks)
    assert [r.sample_id for r in results] == sample_ids
    assert scorer.forward_counts["current"] >= 3
    cur, hist = load_eager(current), load_eager(history)
    reference = [naive_scores(cur, hist, x, m, layer=layer) for x, m in zip(ids, masks)]
    _assert_matches_reference(results, reference, masks)


def test_literal_alignment(llama_dir):
    """Entry i is token i as a target; attention uses query row i (not i-1); turn 2's context holds turn 1."""
    ids = np.array([11, 12, 13, 14, 15, 16, 17, 18])
    trainable = np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=bool)
    scorer = Scorer(llama_dir, None, ScoreSettings(**FP32))
    result = scorer.score_samples(["x"], [ids], [trainable])[0]
    assert np.isnan(result.nll_cur).tolist() == [True, True, False, False, True, True, False, False]
    assert result.keep[~trainable].sum() == 0 and result.keep.sum() == 3  # ceil(0.6 * 4)

    model = load_eager(llama_dir)
    logits = model(input_ids=torch.tensor(ids)[None]).logits[0].float()
    for i in (2, 3, 6, 7):
        assert result.nll_cur[i] == pytest.approx(-torch.log_softmax(logits[i - 1], -1)[ids[i]].item(), abs=1e-5)
    attention = naive_forward(model, ids).attentions[-1][0].numpy()  # [H, T, T]
    assert result.attn[2] == pytest.approx(attention[:, 2, :2].sum(-1).mean(), abs=1e-5)
    assert result.attn[3] == pytest.approx(attention[:, 3, :2].sum(-1).mean(), abs=1e-5)
    assert result.attn[6] == pytest.approx(attention[:, 6, :6].sum(-1).mean(), abs=1e-5)  # earlier turn included
    assert result.attn[7] == pytest.approx(attention[:, 7, :6].sum(-1).mean(), abs=1e-5)
    assert result.attn[2] < 0.999  # row 1 would give exactly 1: everything before it is context


def test_gamma_one_skips_attention(llama_dir, llama_history_dir, samples):
    sample_ids, ids, masks = samples
    scorer = Scorer(llama_dir, llama_history_dir, ScoreSettings(gamma=1.0, **FP32))
    assert scorer.current.config._attn_implementation == "sdpa"
    results = scorer.score_samples(sample_ids, ids, masks)
    cur, hist = load_eager(llama_dir), load_eager(llama_history_dir)
    for result, x, m in zip(results, ids, masks):
        assert np.isnan(result.attn).all()
        expected = naive_scores(cur, hist, x, m, gamma=1.0)
        np.testing.assert_allclose(result.score[m], expected["score"][m], atol=1e-4)
        np.testing.assert_array_equal(result.keep, expected["keep"])


def test_gamma_zero_skips_history(llama_dir, llama_history_dir, samples):
    sample_ids, ids, masks = samples
    scorer = Scorer(llama_dir, llama_history_dir, ScoreSettings(gamma=0.0, **FP32))
    assert scorer.history is None and scorer.current.config._attn_implementation == ATTENTION_IMPLEMENTATION
    results = scorer.score_samples(sample_ids, ids, masks)
    assert scorer.forward_counts["history"] == 0
    for result, m in zip(results, masks):
        assert np.isnan(result.nll_hist).all() and np.isnan(result.rel).all()
        np.testing.assert_array_equal(result.score[m], result.attn[m])
        assert not np.isnan(result.nll_cur[m]).any()


def test_excess_direction(llama_dir, llama_history_dir, samples):
    sample_ids, ids, masks = samples
    forward = Scorer(llama_dir, llama_history_dir, ScoreSettings(gamma=1.0, **FP32)).score_samples(sample_ids, ids, masks)
    reverse = Scorer(
        llama_dir, llama_history_dir, ScoreSettings(gamma=1.0, excess="current_minus_history", **FP32)
    ).score_samples(sample_ids, ids, masks)
    for a, b, m in zip(forward, reverse, masks):
        np.testing.assert_allclose(b.rel[m], -a.rel[m], atol=1e-6)
        np.testing.assert_allclose(b.rel[m], b.nll_cur[m] - b.nll_hist[m], atol=1e-6)


@pytest.mark.parametrize("history", ["same", "none"])
def test_same_checkpoint_skips_history_forward(request, llama_dir, samples, history):
    sample_ids, ids, masks = samples
    other = llama_dir if history == "same" else None
    scorer = Scorer(llama_dir, other, ScoreSettings(**FP32))
    assert scorer.history is None and scorer.history_fingerprint == scorer.current_fingerprint
    results = scorer.score_samples(sample_ids, ids, masks)
    assert scorer.forward_counts["history"] == 0
    cur = load_eager(llama_dir)
    for result, x, m in zip(results, ids, masks):
        np.testing.assert_array_equal(result.rel[m], 0.0)
        np.testing.assert_array_equal(result.nll_hist, result.nll_cur)
        expected = naive_scores(cur, None, x, m)
        np.testing.assert_array_equal(result.keep, expected["keep"])


def _tokenized_table(sample_ids, ids, masks):
    rows = [
        {"sample_id": s, "source": "test", "input_ids": x.tolist(), "trainable": m.tolist(), "n_tokens": len(x),
         "n_trainable": int(m.sum()), "n_turns": 1, "truncated": False}
        for s, x, m in zip(sample_ids, ids, masks)
    ]
    return pa.Table.from_pylist(rows, schema=arrow_schema("tokenized"))


def _assert_tables_equal(left, right):
    """Table equality where NaN equals NaN (Arrow's equals says NaN != NaN)."""
    assert left.schema == right.schema
    for name in left.column_names:
        for a, b in zip(left.column(name).to_pylist(), right.column(name).to_pylist()):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _count_forwards(model):
    counter = {"calls": 0}
    model.model.register_forward_pre_hook(lambda module, args: counter.__setitem__("calls", counter["calls"] + 1))
    return counter


def test_rescoring_with_cached_history_runs_one_forward_per_batch(llama_dir, llama_history_dir, samples):
    sample_ids, ids, masks = samples
    tokenized = _tokenized_table(sample_ids, ids, masks)
    settings = ScoreSettings(max_batch_tokens=240, **FP32)

    first = Scorer(llama_dir, llama_history_dir, settings)
    current_calls = _count_forwards(first.current)
    scores, history = score_shard(first, tokenized, None)
    batches = current_calls["calls"]
    assert batches >= 3 and first.forward_counts == {"current": batches, "history": batches}
    validate_table(scores, "scores")
    validate_table(history, "history_nll")

    second = Scorer(llama_dir, llama_history_dir, settings)
    current_calls = _count_forwards(second.current)
    shuffled = history.take(pa.array(np.random.default_rng(0).permutation(history.num_rows)))  # join by id
    rescored, no_history = score_shard(second, tokenized, shuffled)
    assert no_history is None
    assert current_calls["calls"] == batches and second.forward_counts == {"current": batches, "history": 0}
    assert second.history is None  # never even loaded
    _assert_tables_equal(rescored, scores)
    assert scores.column("n_kept").to_pylist() == [int(np.ceil(0.6 * m.sum() - 1e-9)) for m in masks]
    assert scores.column("n_tokens").to_pylist() == [len(x) for x in ids]


def test_history_pass_alone_gives_the_combined_paths_history_nlls(llama_dir, llama_history_dir, samples):
    """Phase 1 of the job (history model alone) = the nll_hist of the two-model Scorer, bit for bit in fp32."""
    sample_ids, ids, masks = samples
    tokenized = _tokenized_table(sample_ids, ids, masks)
    settings = ScoreSettings(max_batch_tokens=240, **FP32)
    combined, _ = score_shard(Scorer(llama_dir, llama_history_dir, settings), tokenized, None)

    alone = history_scorer(llama_history_dir, settings)
    assert alone.models_resident == 1 and alone.model_loads == 1 and not alone.uses_attention
    assert alone.current_fingerprint == Scorer(llama_dir, llama_history_dir, settings).history_fingerprint
    table = history_nll_table(alone, tokenized)
    validate_table(table, "history_nll")
    assert table.column("sample_id").to_pylist() == sample_ids
    for got, expected in zip(table.column("nll").to_pylist(), combined.column("nll_hist").to_pylist()):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))

    # Phase 2: the current model with that table never loads the history model, same scores.
    scorer = Scorer(llama_dir, llama_history_dir, settings)
    rescored, no_history = score_shard(scorer, tokenized, table)
    assert no_history is None and scorer.history is None and scorer.models_resident == 1
    assert scorer.forward_counts["history"] == 0 and scorer.model_loads == 1
    _assert_tables_equal(rescored, combined)
    with pytest.raises(ValueError, match="history_scorer"):
        history_nll_table(scorer, tokenized)


def test_score_shard_without_history_model_returns_no_history_table(llama_dir, samples):
    scores, history = score_shard(Scorer(llama_dir, None, ScoreSettings(**FP32)), _tokenized_table(*samples), None)
    assert history is None and scores.num_rows == len(samples[0])


def test_tokenized_table_without_needed_columns_is_refused(llama_dir, samples):
    table = _tokenized_table(*samples).drop_columns(["trainable"])
    with pytest.raises(ValueError, match="lacks column\\(s\\) trainable"):
        score_shard(Scorer(llama_dir, None, ScoreSettings(**FP32)), table, None)


def test_history_table_missing_a_sample_is_refused(llama_dir, llama_history_dir, samples):
    scorer = Scorer(llama_dir, llama_history_dir, ScoreSettings(**FP32))
    partial = pa.Table.from_pylist([{"sample_id": "s0", "nll": [0.0]}], schema=arrow_schema("history_nll"))
    with pytest.raises(ValueError, match="lacks 6 of this shard's samples"):
        score_shard(scorer, _tokenized_table(*samples), partial)


def test_bf16_keeps_the_same_tokens_as_fp32(llama_dir, llama_history_dir, samples):
    sample_ids, ids, masks = samples
    rng = np.random.default_rng(1)
    ids = list(ids) + [rng.integers(0, 300, 200) for _ in range(6)]
    masks = list(masks) + [np.arange(200) >= 40 for _ in range(6)]
    sample_ids = [f"s{i}" for i in range(len(ids))]
    exact = Scorer(llama_dir, llama_history_dir, ScoreSettings(**FP32)).score_samples(sample_ids, ids, masks)
    fast = Scorer(llama_dir, llama_history_dir, ScoreSettings(dtype="bfloat16", device="cpu"))
    assert fast.dtype_name == "bfloat16-mixed"
    approx = fast.score_samples(sample_ids, ids, masks)
    same = sum(int((a.keep[m] == b.keep[m]).sum()) for a, b, m in zip(exact, approx, masks))
    total = sum(int(m.sum()) for m in masks)
    assert same / total >= 0.99, f"bf16 keep agreement {same / total:.4f}"


@pytest.mark.parametrize(
    ("settings", "field"), [({"ratio": 0.0}, "ratio"), ({"ratio": 1.2}, "ratio"), ({"gamma": -0.1}, "gamma"),
                            ({"gamma": 1.5}, "gamma"), ({"max_batch_tokens": 0}, "max_batch_tokens")]
)
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ValidationError, match=field):
        ScoreSettings(**settings)


def test_layer_out_of_range(llama_dir):
    with pytest.raises(ValueError, match="layer 2 is out of range.*2 layers"):
        Scorer(llama_dir, None, ScoreSettings(layer=2, **FP32))
    with pytest.raises(ValueError, match="layer -3 is out of range"):
        Scorer(llama_dir, None, ScoreSettings(layer=-3, **FP32))
    # Without attention (gamma 1, the history pass) the layer plays no part and is not checked.
    assert history_scorer(llama_dir, ScoreSettings(layer=5, **FP32)).layer_idx is None


@pytest.mark.parametrize(
    ("ids", "masks", "history", "message"),
    [
        ([np.array([1, 2, 3])], [np.array([0, 1], bool)], None, "trainable has 2 entries but input_ids has 3"),
        ([np.array([1, 2, 3])], [np.array([1, 1, 0], bool)], None, "trainable\\[0\\] is true"),
        ([np.array([1, 2, 99999])], [np.array([0, 1, 1], bool)], None, "token ids must lie in"),
        ([np.array([1, 2, 3])], [np.array([0, 1, 1])], None, "trainable must be boolean"),
        ([np.array([], dtype=np.int64)], [np.array([], bool)], None, "non-empty"),
        ([np.array([1, 2, 3])], [np.array([0, 1, 1], bool)], [np.array([np.nan, 1.0])], "history_nll has 2 entries"),
        ([np.array([1, 2, 3])], [np.array([0, 1, 1], bool)], [np.array([np.nan, 1.0, np.nan])], "NaN at a target"),
    ],
)
def test_bad_inputs_are_named(llama_dir, llama_history_dir, ids, masks, history, message):
    scorer = Scorer(llama_dir, llama_history_dir, ScoreSettings(**FP32))
    with pytest.raises(ValueError, match=message):
        scorer.score_samples(["bad"], ids, masks, history)


def test_mismatched_list_lengths(llama_dir):
    scorer = Scorer(llama_dir, None, ScoreSettings(**FP32))
    with pytest.raises(ValueError, match="same length"):
        scorer.score_samples(["a", "b"], [np.array([1, 2])], [np.array([0, 1], bool)])
