"""Confidence measures, the exit rule, the learned head and the measures inside FREE."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import (
    CONFIG,
    N,
    W,
    encoder_tokens,
    simulate_free,
    threshold_between,
    with_eos,
)

from free_jax.decoding import confidence as conf_lib
from free_jax.decoding import make_decoder
from free_jax.training.confidence_head import (
    confidence_head_data,
    confidence_head_loss,
    train_confidence_head,
)


def test_softmax_margin_and_max_match_sorted_probabilities():
    logits = np.random.default_rng(0).normal(size=(5, 50)).astype(np.float32) * 3
    probs = np.sort(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), axis=-1)
    np.testing.assert_allclose(
        conf_lib.softmax_margin(logits), probs[:, -1] - probs[:, -2], atol=1e-6
    )
    np.testing.assert_allclose(conf_lib.softmax_max(logits), probs[:, -1], atol=1e-6)
    tie = np.array([[2.0, 2.0, 0.0]], np.float32)
    assert float(conf_lib.softmax_margin(tie)[0]) == 0.0


def test_hidden_cosine_per_example():
    a = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    b = np.array([[2.0, 0.0], [-1.0, -1.0]], np.float32)
    np.testing.assert_allclose(conf_lib.hidden_cosine(a, b), [1.0, -1.0], atol=1e-6)


def test_exit_is_strict_and_decayed_threshold_formula():
    assert not bool(conf_lib.exits(jnp.float32(0.5), jnp.float32(0.5)))
    assert bool(conf_lib.exits(jnp.float32(0.5000001), jnp.float32(0.5)))
    pos = jnp.array([1, 4, 8])
    got = conf_lib.decayed_threshold(0.8, pos, 8, 2.0)
    want = 0.8 * np.exp(-2.0 * np.array([1, 4, 8]) / 8) / 10 + 9 * 0.8 / 10
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (np.asarray(conf_lib.decayed_threshold(0.8, pos, 8, 0.0)) == np.float32(0.8)).all()


def test_unknown_measure_rejected():
    with pytest.raises(ValueError, match="unknown confidence measure"):
        make_decoder(CONFIG, method="free", max_decode_len=N, measure="no_such_measure")


@functools.lru_cache
def _trained_head(seed=0):
    params = with_eos(seed)
    enc = jnp.asarray(np.concatenate([encoder_tokens(s) for s in range(4)]))
    dec = jnp.asarray(np.random.default_rng(5).integers(2, CONFIG.vocab_size, size=(12, N)))
    data = confidence_head_data(
        CONFIG, params, enc, dec, jnp.ones(dec.shape, bool), exit_layer=CONFIG.shallow_layer
    )
    head = train_confidence_head(data, d_model=CONFIG.d_model, steps=150, learning_rate=3e-3)
    return data, head


def test_learned_head_training_lowers_its_loss():
    data, head = _trained_head()
    untrained = conf_lib.init_confidence_head(CONFIG.d_model, jax.random.key(0))
    assert 0.2 < float(np.mean(data.agree_M)) < 0.8  # both classes present
    assert float(confidence_head_loss(head, data)) < 0.9 * float(
        confidence_head_loss(untrained, data)
    )


@pytest.mark.parametrize("measure", ["hidden_cosine", "learned"])
def test_free_with_other_measures_matches_simulation(measure):
    """FREE at S = 2 with the cosine measure (layer 1 vs layer 2) and S = 1 with the learned head."""
    config = CONFIG.replace(shallow_exit_layer=2) if measure == "hidden_cosine" else CONFIG
    params = with_eos(1)
    head = _trained_head()[1] if measure == "learned" else None
    decoder = make_decoder(config, method="free", max_decode_len=N, window=W, measure=measure)
    enc = encoder_tokens(1)
    probe = decoder(params, enc, 2.0, confidence_params=head)
    conf = np.asarray(probe.records.confidence)[np.asarray(probe.records.valid)]
    threshold = threshold_between(conf)
    out = decoder(params, enc, threshold, confidence_params=head)
    assert 0 < int((np.asarray(out.exit_layer) == config.shallow_layer).sum()) < 3 * N
    for row in range(3):
        tokens, exits, confs, _ = simulate_free(
            params, enc[row : row + 1], threshold, measure=measure,
            head_params=(params, head), config=config,
        )  # fmt: skip
        np.testing.assert_array_equal(out.tokens[row], tokens)
        np.testing.assert_array_equal(out.exit_layer[row], exits)
        np.testing.assert_allclose(out.confidence[row], confs, atol=1e-5)
    # Without records, FREE pays the LM head at S only in steps where a token leaves there (one
    # head per token): the same tokens, exits and confidences.
    once = make_decoder(
        config, method="free", max_decode_len=N, window=W, measure=measure, records=False
    )(params, enc, threshold, confidence_params=head)
    for field in ("tokens", "exit_layer", "lengths", "num_deep_passes"):
        np.testing.assert_array_equal(getattr(once, field), getattr(out, field))
    np.testing.assert_allclose(once.confidence, out.confidence, atol=1e-6)
