"""Selection methods on literal signals: each method's score, its keep count, and the REL guards."""

import math
import re

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.runtime.errors import UserError
from pipeline.selection.methods import (
    REL_FLOOR,
    RelStats,
    excess_refusal,
    rel_guard,
    sample_keep,
    sample_score,
    same_checkpoint_refusal,
    selection_size,
)
from pipeline.selection.select_settings import SelectSettings
from pipeline.selection.selection import top_k_mask

NAN = np.nan
TRAINABLE = np.array([False, False, True, True, True, False, True])
REL = np.array([NAN, NAN, 2.0, -1.0, 0.5, NAN, 1.0], dtype=np.float32)
ATTN = np.array([NAN, NAN, 0.2, 0.9, 0.4, NAN, 0.1], dtype=np.float32)


def _score(**settings) -> np.ndarray:
    return sample_score("s", REL, ATTN, TRAINABLE, SelectSettings(**settings))


def _keep(**settings) -> list[int]:
    s = SelectSettings(**settings)
    score = sample_score("s", REL, ATTN, TRAINABLE, s)
    return np.flatnonzero(top_k_mask(score, TRAINABLE, selection_size(s, int(TRAINABLE.sum())))).tolist()


def test_sstoken_combines_per_sample_minmax_rel_and_attention():
    rel_n = (np.array([2.0, -1.0, 0.5, 1.0]) - -1.0) / (3.0 + 1e-8)
    expected = 0.3 * rel_n + 0.7 * np.array([0.2, 0.9, 0.4, 0.1])
    np.testing.assert_allclose(_score(gamma=0.3)[TRAINABLE], expected, rtol=1e-6)
    assert np.isnan(_score(gamma=0.3)[~TRAINABLE]).all()


def test_rel_and_attn_are_gamma_one_and_zero():
    np.testing.assert_array_equal(_score(method="rel"), _score(method="sstoken", gamma=1.0))
    np.testing.assert_array_equal(_score(method="attn"), _score(method="sstoken", gamma=0.0))
    np.testing.assert_array_equal(_score(method="attn")[TRAINABLE], ATTN[TRAINABLE])
    assert _keep(method="rel", ratio=0.5) == [2, 6] and _keep(method="attn", ratio=0.5) == [3, 4]


def test_rel_without_normalisation_ranks_raw_rel():
    np.testing.assert_array_equal(_score(method="rel", normalise="none")[TRAINABLE], REL[TRAINABLE])


def test_tokencleaning_ranks_raw_rel_and_keeps_floor_of_ratio():
    np.testing.assert_array_equal(_score(method="tokencleaning")[TRAINABLE], REL[TRAINABLE])
    assert _keep(method="tokencleaning", ratio=0.6) == [2, 6]  # floor(0.6 * 4) = 2 of 4, the highest raw REL
    assert selection_size(SelectSettings(method="tokencleaning", ratio=0.6), 4) == 2
    assert selection_size(SelectSettings(method="tokencleaning", ratio=0.7), 10) == 7  # no float noise
    assert selection_size(SelectSettings(method="sstoken", ratio=0.6), 4) == 3  # ceil for the others
    with pytest.raises(ValidationError, match="tokencleaning ranks raw REL"):
        SelectSettings(method="tokencleaning", normalise="per_sample")


def test_rho1_ranks_raw_excess_loss_and_keeps_ceil_of_ratio():
    # REL stored as current - reference (--excess current_minus_history): Rho-1's excess loss, in nats.
    np.testing.assert_array_equal(_score(method="rho1")[TRAINABLE], REL[TRAINABLE])
    assert np.isnan(_score(method="rho1")[~TRAINABLE]).all()
    assert _keep(method="rho1", ratio=0.6) == [2, 4, 6]  # ceil(0.6 * 4) = 3: raw 2.0, 1.0, 0.5
    assert _keep(method="rho1", ratio=0.25) == [2]
    assert selection_size(SelectSettings(method="rho1", ratio=0.6), 4) == 3
    assert SelectSettings(method="rho1").selection_key() == {
        "method": "rho1", "ratio": 0.6, "granularity": "sample", "normalise": "none"
    }
    # Raw nats, not min-max (what global granularity compares across samples): negative excess stays negative.
    negative = np.where(TRAINABLE, np.array([0, 0, -3.0, -0.5, -2.0, 0, -1.0]), NAN).astype(np.float32)
    score = sample_score("s", negative, ATTN, TRAINABLE, SelectSettings(method="rho1", ratio=0.5))
    np.testing.assert_array_equal(score[TRAINABLE], [-3.0, -0.5, -2.0, -1.0])
    assert np.flatnonzero(top_k_mask(score, TRAINABLE, 2)).tolist() == [3, 6]
    with pytest.raises(ValidationError, match="rho1 ranks raw REL"):
        SelectSettings(method="rho1", normalise="per_sample")


@pytest.mark.parametrize(
    ("method", "excess", "refused"),
    [("rho1", "history_minus_current", True), ("rho1", "current_minus_history", False),
     ("tokencleaning", "current_minus_history", True), ("tokencleaning", "history_minus_current", False),
     ("sstoken", "current_minus_history", False), ("random", "current_minus_history", False)],
)
def test_a_baseline_over_rel_of_the_other_direction_is_refused_naming_the_fix(method, excess, refused):
    settings = SelectSettings(method=method)
    if not refused:
        excess_refusal(settings, excess, "scores/")
        return
    required = "current_minus_history" if method == "rho1" else "history_minus_current"
    with pytest.raises(UserError, match=f"method {method} ranks REL.*scores/ stores REL as.*--excess {required}") as caught:
        excess_refusal(settings, excess, "scores/")
    assert isinstance(caught.value, UserError)


def test_full_keeps_every_target_whatever_the_ratio():
    assert _keep(method="full", ratio=0.1) == [2, 3, 4, 6]
    assert SelectSettings(method="full", ratio=0.1).selection_key()["ratio"] == 1.0


def test_random_keeps_the_ratio_count_reproducibly_per_sample_id():
    first = sample_score("a", REL, ATTN, TRAINABLE, SelectSettings(method="random", seed=3))
    again = sample_score("a", REL, ATTN, TRAINABLE, SelectSettings(method="random", seed=3))
    other_seed = sample_score("a", REL, ATTN, TRAINABLE, SelectSettings(method="random", seed=4))
    other_id = sample_score("b", REL, ATTN, TRAINABLE, SelectSettings(method="random", seed=3))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[TRAINABLE], other_seed[TRAINABLE])
    assert not np.array_equal(first[TRAINABLE], other_id[TRAINABLE])
    assert np.isnan(first[~TRAINABLE]).all() and ((first[TRAINABLE] >= 0) & (first[TRAINABLE] < 1)).all()
    assert len(_keep(method="random", ratio=0.6)) == math.ceil(0.6 * 4)


def test_missing_signal_is_refused_by_name():
    no_rel = np.full(len(REL), NAN, np.float32)
    with pytest.raises(UserError, match=r"sample 'x': rel is NaN at 4 of 4 targets \(first at position \d\).*--signals needed"):
        sample_score("x", no_rel, ATTN, TRAINABLE, SelectSettings(method="rel"))
    with pytest.raises(UserError, match="attn is NaN at 4 of 4 targets.*--signals needed and a method without it"):
        sample_score("x", REL, no_rel, TRAINABLE, SelectSettings(gamma=0.5))
    # A signal the method does not use may be missing.
    sample_score("x", REL, no_rel, TRAINABLE, SelectSettings(method="tokencleaning"))
    sample_score("x", no_rel, ATTN, TRAINABLE, SelectSettings(method="attn"))


def test_a_nan_signal_says_what_is_nan_where_and_what_it_points_to():
    """Before, every NaN was blamed on --signals needed, also in scores made with --signals all."""
    first = int(np.flatnonzero(TRAINABLE)[0])
    finite = np.where(TRAINABLE, np.float32(2.0), NAN).astype(np.float32)
    one_nan = REL.copy()
    one_nan[first] = NAN
    with pytest.raises(UserError) as caught:  # one NaN written into rel, the NLLs finite: damaged
        sample_score("x", one_nan, ATTN, TRAINABLE, SelectSettings(), nll_cur=finite, nll_hist=finite)
    message = str(caught.value)
    assert f"sample 'x': rel is NaN at 1 of 4 targets (first at position {first})" in message
    assert "so rel was computed: the shard was edited or damaged" in message and "--signals" not in message
    nan_model = np.full(len(REL), NAN, np.float32)  # a NaN checkpoint: every NLL and signal NaN
    with pytest.raises(UserError, match="attn is NaN at 4 of 4 targets.*nll_cur is NaN there too: the current "
                                          "checkpoint gives NaN losses") as caught:
        sample_score("x", nan_model, nan_model, TRAINABLE, SelectSettings(), nll_cur=nan_model, nll_hist=nan_model)
    assert "--signals" not in str(caught.value)
    with pytest.raises(UserError, match="nll_hist is NaN there too: the history checkpoint gives NaN losses"):
        sample_score("x", one_nan, ATTN, TRAINABLE, SelectSettings(), nll_cur=finite, nll_hist=one_nan)
    # Not computed (--signals needed, an attention-only method): REL and nll_hist NaN at every target, nll_cur there.
    with pytest.raises(UserError, match="nll_hist is NaN at every target too: the scores hold no REL .*--signals all"):
        sample_score("x", nan_model, ATTN, TRAINABLE, SelectSettings(), nll_cur=finite, nll_hist=nan_model)


@pytest.mark.parametrize(
    ("settings", "refused"),
    [({"method": "rel"}, True), ({"method": "tokencleaning"}, True), ({"method": "rho1"}, True), ({"gamma": 1.0}, True),
     ({"gamma": 0.5}, False), ({"method": "attn"}, False), ({"method": "random"}, False), ({"method": "full"}, False)],
)
def test_same_checkpoint_refuses_rel_only_selection(settings, refused):
    if refused:
        with pytest.raises(UserError, match="same checkpoint: every REL is 0.*first ceil\\(ratio \\* n\\) tokens") as caught:
            same_checkpoint_refusal(SelectSettings(**settings))
        assert isinstance(caught.value, UserError)
    else:
        same_checkpoint_refusal(SelectSettings(**settings))


def test_rel_below_the_floor_is_noise_treated_as_zero():
    tiny = np.where(TRAINABLE, np.float32(3e-7) * np.arange(len(REL)), NAN).astype(np.float32)  # a re-saved copy
    stats = RelStats.of(tiny, TRAINABLE)
    assert stats.is_noise and stats.targets == 4 and stats.abs_max < REL_FLOOR
    assert not RelStats.of(REL, TRAINABLE).is_noise and not RelStats().is_noise  # no targets: nothing to say
    assert RelStats(2, 1e-6).merge(RelStats(3, 0.5, 1)) == RelStats(5, 0.5, 1)

    settings = SelectSettings(gamma=0.5)
    warnings = rel_guard(settings, stats)
    assert len(warnings) == 1 and "REL is noise and is treated as 0" in warnings[0]
    noisy = sample_score("s", tiny, ATTN, TRAINABLE, settings, rel_is_noise=True)
    # Without the guard min-max would stretch the noise to [0, 1]; with it attention alone decides.
    stretched = sample_score("s", tiny, ATTN, TRAINABLE, settings)
    assert (stretched - 0.5 * ATTN)[TRAINABLE].max() > 0.49  # REL_n of the largest noise value ~ 1
    np.testing.assert_allclose(noisy[TRAINABLE], 0.5 * ATTN[TRAINABLE], rtol=1e-6)
    for method in ("rel", "tokencleaning", "rho1"):
        with pytest.raises(UserError, match="\\|REL\\| < 0.0001 nats.*ranks by REL alone"):
            rel_guard(SelectSettings(method=method), stats)
    assert rel_guard(SelectSettings(method="attn"), stats) == []  # REL plays no part


def test_rel_missing_at_targets_is_refused_before_any_shard_is_written():
    stats = RelStats.of(np.where(TRAINABLE, np.nan, np.nan), TRAINABLE)
    assert stats.missing == 4
    with pytest.raises(UserError, match="needs REL, but 4 of 4 targets have none: the scores hold no REL"):
        rel_guard(SelectSettings(gamma=0.5), stats)
    where = "sample 's': rel is NaN at 1 of 4 targets (first at position 2); the model's NLLs are finite there"
    with pytest.raises(UserError, match=re.escape(f"needs REL, but 1 of 4 targets have none: {where}")):
        rel_guard(SelectSettings(gamma=0.5), RelStats(4, 1.0, 1, where))
    assert rel_guard(SelectSettings(method="random"), stats) == []


def test_selection_key_names_only_what_the_method_uses():
    assert SelectSettings().selection_key() == {
        "method": "sstoken", "ratio": 0.6, "granularity": "sample", "gamma": 0.5, "normalise": "per_sample"
    }
    assert SelectSettings(method="rel", gamma=0.2).selection_key() == SelectSettings(method="rel").selection_key()
    assert SelectSettings(method="tokencleaning").selection_key()["normalise"] == "none"
    assert SelectSettings(method="random", seed=7).selection_key() == {
        "method": "random", "ratio": 0.6, "granularity": "sample", "seed": 7
    }
    assert "normalise" not in SelectSettings(method="attn").selection_key()


def test_the_oracle_drops_the_labelled_tokens_first_then_at_random(tmp_path):
    trainable = np.array([False, True, True, True, True, True, True])
    drop = np.array([False, False, True, False, True, False, False])
    settings = SelectSettings(method="oracle", ratio=0.5, seed=3, labels=tmp_path / "labels.parquet")
    score = sample_score("s", np.full(7, np.nan), np.full(7, np.nan), trainable, settings, drop=drop)
    assert np.isnan(score[0]) and (score[trainable & drop] < 1).all() and (score[trainable & ~drop] >= 1).all()
    # the random part is random's own draw for this sample and seed
    random = sample_score("s", np.full(7, np.nan), np.full(7, np.nan), trainable, settings.model_copy(
        update={"method": "random", "labels": None}))
    np.testing.assert_allclose(score[trainable] - (~drop[trainable]).astype(np.float32), random[trainable], atol=1e-6)
    keep = sample_keep(score, trainable, settings)  # keeps 3 of 6: three of the four clean targets
    assert keep.sum() == 3 and not (keep & drop).any()
    # a budget larger than the clean tokens keeps every clean one, then labelled ones
    keep = sample_keep(score, trainable, settings.model_copy(update={"ratio": 0.8}))  # 5 of 6
    assert keep.sum() == 5 and keep[trainable & ~drop].all()
    with pytest.raises(UserError, match="needs its token labels"):
        sample_score("s", np.full(7, np.nan), np.full(7, np.nan), trainable, settings)


def test_oracle_needs_labels_and_labels_are_for_the_oracle_only(tmp_path):
    with pytest.raises(ValidationError, match="method oracle needs labels"):
        SelectSettings(method="oracle")
    with pytest.raises(ValidationError, match="method oracle needs labels"):
        SelectSettings(method="random", labels=tmp_path / "labels.parquet")
    labels = tmp_path / "labels.parquet"
    key = SelectSettings(method="oracle", seed=2, labels=labels).selection_key()
    assert key == {"method": "oracle", "ratio": 0.6, "granularity": "sample", "seed": 2, "labels": f"missing: {labels}"}
    from pipeline.selection.token_labels import write_token_labels

    write_token_labels(labels, ["a"], [[False, True]])
    first = SelectSettings(method="oracle", labels=labels).selection_key()["labels"]
    write_token_labels(labels, ["a"], [[False, False]])
    assert len(first) == 64 and SelectSettings(method="oracle", labels=labels).selection_key()["labels"] != first
