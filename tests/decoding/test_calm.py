"""CALM: per-example exits with state copying, against a plain per-example Python loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import (
    CONFIG,
    EOS,
    SEEDS,
    L,
    N,
    encoder_tokens,
    naive_greedy,
    threshold_between,
    with_eos,
)

from free_jax.decoding import confidence as conf_lib
from free_jax.decoding import make_decoder
from free_jax.models import T5, init_cache
from free_jax.models.cache import write_layer

MIN_EXIT = 2


def _calm():
    return make_decoder(CONFIG, method="calm", max_decode_len=N, exit_layer=MIN_EXIT)


@functools.lru_cache
def _pieces():
    model = T5(CONFIG)

    def bound(p):
        return model.bind({"params": p})

    def layer(p, h, cache, cross, enc, offset, i):
        return bound(p).decode_layers(
            h, start=i, end=i + 1, cache=cache, cross=cross, encoder_mask_BS=enc != 0,
            offset_B=offset,
        )  # fmt: skip

    def copy(p, h, cache, offset, i):
        k, v = bound(p).layer_self_kv(h, i)
        return cache.replace_layers(i, (write_layer(cache.layers[i], k, v, offset),))

    return (
        jax.jit(lambda p, e: bound(p).precompute_cross(bound(p).encode(e))),
        jax.jit(layer, static_argnums=6),
        jax.jit(copy, static_argnums=4),
        jax.jit(lambda p, t: bound(p).embed_decoder(t)),
        jax.jit(lambda p, h: bound(p).exit_logits(h)),
    )


def naive_calm(params, enc_1S, threshold):
    """CALM on one example with Python control flow: exit, then copy h_exit into the skipped layers."""
    encode, layer, copy, embed, head = _pieces()
    cache = init_cache(CONFIG, 1, N)
    token, tokens, exits = CONFIG.decoder_start_token_id, [], []
    enc = jnp.asarray(enc_1S)
    cross = encode(params, enc)
    for t in range(N):
        offset = jnp.array([t], jnp.int32)
        h = embed(params, jnp.array([[token]], jnp.int32))
        exited = None
        for i in range(L):
            if exited is not None:
                cache = copy(params, h, cache, offset, i)
                continue
            h, cache = layer(params, h, cache, cross, enc, offset, i)
            logits = head(params, h)[:, 0]
            if i + 1 == L or (
                i + 1 >= MIN_EXIT and float(conf_lib.softmax_margin(logits)[0]) > threshold
            ):
                exited, token = i + 1, int(jnp.argmax(logits[0]))
        tokens.append(token), exits.append(exited)
        if token == EOS:
            break
    pad = lambda xs: np.array(xs + [0] * (N - len(xs)))
    return pad(tokens), pad(exits)


@pytest.mark.parametrize("seed", SEEDS)
def test_never_exit_equals_greedy(seed):
    enc, params = encoder_tokens(seed), with_eos(seed)
    out = _calm()(params, enc, 1.0)
    np.testing.assert_array_equal(out.tokens, naive_greedy(params, enc))
    lengths = np.asarray(out.lengths)
    np.testing.assert_array_equal(out.layers_computed, L * lengths)
    np.testing.assert_array_equal(out.num_deep_passes, lengths)


@pytest.mark.parametrize("seed", SEEDS)
def test_always_exit_at_the_minimum_layer_equals_static_exit(seed):
    enc, params = encoder_tokens(seed), with_eos(seed)
    out = _calm()(params, enc, -1.0)
    np.testing.assert_array_equal(out.tokens, naive_greedy(params, enc, exit_layer=MIN_EXIT))
    lengths = np.asarray(out.lengths)
    np.testing.assert_array_equal(out.layers_computed, MIN_EXIT * lengths)
    assert int(out.batch_layers_computed) == MIN_EXIT * lengths.max()
    np.testing.assert_array_equal(out.num_deep_passes, [0, 0, 0])


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_with_mixed_exits_equals_naive_per_example_loop(seed):
    enc, params = encoder_tokens(seed), with_eos(seed)
    # a threshold in the middle of the minimum exit layer's observed confidences
    probe = _calm()(params, enc, -1.0)
    conf = np.asarray(probe.confidence)[np.asarray(probe.exit_layer) > 0]
    threshold = threshold_between(conf)
    out = _calm()(params, enc, threshold)
    exit_layer = np.asarray(out.exit_layer)
    assert len(set(exit_layer[exit_layer > 0].tolist())) >= 2, "exits must differ"
    for row in range(3):
        tokens, exits = naive_calm(params, enc[row : row + 1], threshold)
        np.testing.assert_array_equal(out.tokens[row], tokens)
        np.testing.assert_array_equal(exit_layer[row], exits)
    np.testing.assert_array_equal(out.layers_computed, exit_layer.sum(axis=1))
    # the batch ran a layer for a position as long as any example still needed it
    per_step = np.where(exit_layer > 0, exit_layer, 0).max(axis=0)
    assert int(out.batch_layers_computed) == int(per_step.sum())


def test_counters_with_per_example_max_lengths():
    enc, params = encoder_tokens(0), with_eos(1)
    out = _calm()(params, enc, -1.0, max_lengths=[3, 1, 2])
    lengths = np.asarray(out.lengths)
    assert (lengths <= [3, 1, 2]).all()
    np.testing.assert_array_equal(out.layers_computed, MIN_EXIT * lengths)


def test_position_decay_is_traced():
    """A huge decay temperature makes the threshold 0.9 * thr at every position."""
    enc, params = encoder_tokens(1), with_eos(1)
    probe = _calm()(params, enc, -1.0)
    # position 0 does not depend on the trajectory: make its layer-2 confidence fall between
    # 0.9 * thr and thr, so that only the decayed threshold lets it exit there
    threshold = float(probe.confidence[0, 0]) * 1.05
    decayed = _calm()(params, enc, threshold, position_temp=1e4)
    lowered = _calm()(params, enc, 0.9 * threshold)
    np.testing.assert_array_equal(decayed.tokens, lowered.tokens)
    np.testing.assert_array_equal(decayed.exit_layer, lowered.exit_layer)
    flat = _calm()(params, enc, threshold)
    assert int(decayed.exit_layer[0, 0]) == MIN_EXIT != int(flat.exit_layer[0, 0])
    assert _calm().trace_count == 1
