"""Validation helpers: cached greedy decoding against a recompute-everything loop; metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.models import T5, init_params, preset
from free_jax.training.validation import bleu, greedy_decode, rouge, squad


def test_cached_greedy_equals_full_recompute():
    config = preset("tiny")
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(4))
    enc = np.random.default_rng(0).integers(2, 128, (3, 6)).astype(np.int32)
    enc[2, 3:] = 0  # a padded input
    steps = 6
    got = np.asarray(greedy_decode(config, params, jnp.asarray(enc), steps))

    @jax.jit
    def logits_at(dec):
        return T5(config).apply({"params": params}, enc, dec).logits

    dec = np.zeros((3, steps + 1), np.int32)  # decoder inputs: start token 0, then outputs
    done = np.zeros(3, bool)
    for t in range(steps):
        nxt = np.asarray(jnp.argmax(logits_at(jnp.asarray(dec[:, :steps]))[:, t], -1))
        nxt = np.where(done, 0, nxt)
        dec[:, t + 1] = nxt
        done |= nxt == config.eos_token_id
    np.testing.assert_array_equal(got, dec[:, 1:])


def test_metrics_on_known_cases():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]])["bleu"] == pytest.approx(
        100.0
    )
    assert bleu(["xyz"], [["the cat sat on the mat"]])["bleu"] < 1.0
    scores = rouge(["the cat sat"], [["the cat sat"]])
    assert scores["rouge1"] == pytest.approx(100.0) and scores["rougeLsum"] == pytest.approx(100.0)
    assert squad(["The Eiffel tower"], [["Eiffel Tower", "tower"]]) == {
        "exact_match": 100.0,
        "f1": 100.0,
    }
    half = squad(["Paris France"], [["Paris"]])
    assert half["exact_match"] == 0.0 and half["f1"] == pytest.approx(100 * 2 / 3)


@pytest.mark.slow
def test_library_greedy_agrees_with_the_training_loop_greedy():
    """Validation uses free_jax.decoding's greedy when present; both must give the same tokens."""
    decoding = pytest.importorskip("free_jax.decoding")
    from free_jax.training.validation import _decoder

    config = preset("tiny")
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(4))
    enc = jnp.asarray(np.random.default_rng(1).integers(2, 128, (4, 5)), jnp.int32)
    ours = greedy_decode(config, params, enc, 7)
    theirs = decoding.decode(config, params, enc, method="greedy", max_decode_len=7).tokens
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(_decoder()(config, params, enc, 7), ours)
