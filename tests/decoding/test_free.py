"""FREE: synchronized parallel decoding, rollback and lossless mode against plain references."""

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
    S,
    W,
    agreeing,
    encoder_tokens,
    naive_greedy,
    replicate,
    simulate_free,
    teacher_forced,
    threshold_between,
    with_eos,
)

from free_jax.decoding import confidence as conf_lib
from free_jax.decoding import free_loop, make_decoder, pass_widths
from free_jax.models import T5, init_cache

NEVER = 1.0  # softmax margins are <= 1 and a token exits only when strictly above
ALWAYS = -1.0


def _free(mode="plain", **kw):
    method = "free_lossless" if mode == "lossless" else "free"
    return make_decoder(
        CONFIG, method=method, max_decode_len=N, window=W, rollback=mode == "rollback", **kw
    )


def _median_confidence(params, enc):
    """A threshold in the middle of the observed shallow confidences, so about half exit."""
    records = _free()(params, enc, NEVER).records
    return threshold_between(np.asarray(records.confidence)[np.asarray(records.valid)])


@pytest.mark.parametrize("seed", SEEDS)
def test_never_exit_equals_greedy(seed):
    enc, params = encoder_tokens(seed), with_eos(seed)
    out = _free()(params, enc, NEVER)
    np.testing.assert_array_equal(out.tokens, naive_greedy(params, enc))
    produced = np.asarray(out.exit_layer) > 0
    assert (np.asarray(out.exit_layer)[produced] == L).all()
    # every position went through a (width-1) deep pass, so every one has a record
    np.testing.assert_array_equal(np.asarray(out.records.valid), produced)


@pytest.mark.parametrize("seed", SEEDS)
def test_characterised_by_teacher_forcing_at_batch_one(seed):
    """Token t = shallow argmax if shallow confidence > thr else deep argmax, on FREE's own prefix."""
    enc, params = encoder_tokens(seed), with_eos(seed)
    threshold = _median_confidence(params, enc)
    for row in range(enc.shape[0]):
        alone = enc[row : row + 1]
        out = _free()(params, alone, threshold)
        tokens = np.asarray(out.tokens)
        tf = teacher_forced(params, alone, tokens)
        length = int(out.lengths[0])
        margin = np.asarray(conf_lib.softmax_margin(tf.exit_logits[S][0]))[:length]
        leaves = margin > threshold
        want = np.where(
            leaves,
            np.argmax(tf.exit_logits[S][0], -1)[:length],
            np.argmax(tf.logits[0], -1)[:length],
        )
        np.testing.assert_array_equal(tokens[0, :length], want)
        np.testing.assert_array_equal(
            np.asarray(out.exit_layer)[0, :length], np.where(leaves, S, L)
        )
        np.testing.assert_allclose(np.asarray(out.confidence)[0, :length], margin, atol=1e-5)
        assert (tokens[0, length:] == 0).all()
        assert tokens[0, length - 1] == EOS or length == N


def test_thresholds_used_make_both_decisions_happen():
    enc, params = encoder_tokens(0), with_eos(0)
    out = _free()(params, enc, _median_confidence(params, enc))
    exit_layer = np.asarray(out.exit_layer)
    assert (exit_layer == S).sum() >= 4 and (exit_layer == L).sum() >= 4
    assert len(set(np.asarray(out.lengths).tolist())) > 1  # per-example EOS is exercised


@pytest.mark.parametrize("mode", ["plain", "rollback", "lossless"])
@pytest.mark.parametrize("seed", SEEDS)
def test_equals_the_plain_simulation(mode, seed):
    """Tokens, exits and confidences of a batch match `simulate_free` for every example; so do the
    agreement records of each example alone (in a batch, other examples' passes add records)."""
    enc, params = encoder_tokens(seed), with_eos(seed)
    threshold = _median_confidence(params, enc)
    run = functools.partial(_free(mode), params, threshold=threshold, rollback_threshold=1.0)
    out = run(enc)
    for row in range(enc.shape[0]):
        tokens, exits, confs, records = simulate_free(
            params, enc[row : row + 1], threshold, mode=mode, rollback_threshold=1.0
        )
        np.testing.assert_array_equal(out.tokens[row], tokens)
        np.testing.assert_array_equal(out.exit_layer[row], exits)
        np.testing.assert_allclose(out.confidence[row], confs, atol=1e-5)
        alone = run(replicate(enc, row)).records
        assert np.flatnonzero(np.asarray(alone.valid[0])).tolist() == sorted(records)
        for q, (conf, agree) in records.items():
            assert bool(alone.agree[0, q]) == agree
            np.testing.assert_allclose(float(alone.confidence[0, q]), conf, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_lossless_equals_greedy_while_many_tokens_exit(seed):
    enc, params = encoder_tokens(seed), with_eos(seed)
    greedy = naive_greedy(params, enc)
    exited = rejected = 0
    for quantile in (0.2, 0.5):
        records = _free()(params, enc, NEVER).records
        conf = np.asarray(records.confidence)[np.asarray(records.valid)]
        out = _free("lossless")(params, enc, threshold_between(conf, quantile))
        np.testing.assert_array_equal(out.tokens, greedy)
        exited += int((np.asarray(out.exit_layer) == S).sum())
        rejected += int(np.asarray(out.num_rollbacks).sum())
    assert exited >= 6, "the test must exercise accepted shallow tokens"
    assert rejected >= 1, "the test must exercise rejected shallow tokens"


def test_rollback_happens_and_infinite_rollback_threshold_is_plain():
    enc, params = encoder_tokens(1), with_eos(1)
    threshold = _median_confidence(params, enc)
    plain = _free()(params, enc, threshold)
    never = _free("rollback")(params, enc, threshold, rollback_threshold=np.inf)
    assert int(np.asarray(never.num_rollbacks).sum()) == 0
    # Extra verifying passes never change a token that is not rejected.
    np.testing.assert_array_equal(never.tokens, plain.tokens)
    np.testing.assert_array_equal(never.exit_layer, plain.exit_layer)
    rolled = _free("rollback")(params, enc, threshold, rollback_threshold=0.5)
    assert int(np.asarray(rolled.num_rollbacks).sum()) >= 1


@pytest.mark.parametrize("mode", ["plain", "rollback", "lossless"])
def test_batch_equals_each_example_alone(mode):
    enc, params = encoder_tokens(2), with_eos(2)
    threshold = _median_confidence(params, enc)
    batch = _free(mode)(params, enc, threshold, rollback_threshold=1.0)
    for row in range(enc.shape[0]):
        alone = _free(mode)(params, replicate(enc, row), threshold, rollback_threshold=1.0)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
        np.testing.assert_array_equal(batch.exit_layer[row], alone.exit_layer[0])
    if mode == "plain":  # and a real batch of one
        for row in range(enc.shape[0]):
            one = _free()(params, enc[row : row + 1], threshold)
            np.testing.assert_array_equal(batch.tokens[row], one.tokens[0])


# ============================================================================ caches, counters


@functools.lru_cache
def _loop():
    return jax.jit(lambda p, e, thr: free_loop(CONFIG, p, e, thr, max_decode_len=N, window=W))


def test_deep_caches_equal_running_every_token_through_every_layer():
    enc, params = encoder_tokens(0), agreeing(0)
    threshold = _median_confidence(params, enc)
    state = _loop()(params, jnp.asarray(enc), threshold)
    assert int(np.asarray(state.log.exit_layer == S).sum()) >= 4  # stacked positions existed
    tokens = np.asarray(state.log.tokens)
    inputs = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], axis=1)
    model = T5(CONFIG)

    def full(p, e, d):
        m = model.bind({"params": p})
        cross = m.precompute_cross(m.encode(e))
        return m.decode_layers(
            m.embed_decoder(d), start=0, end=L, cache=init_cache(CONFIG, 3, N + W), cross=cross,
            encoder_mask_BS=e != 0, offset_B=jnp.zeros(3, jnp.int32),
        )[1]  # fmt: skip

    ref = jax.jit(full)(params, jnp.asarray(enc), jnp.asarray(inputs))
    flushed = np.asarray(state.pos_B - state.stack_len_B)  # deep caches are exact before these
    shallow_done = np.asarray(state.pos_B)
    assert (flushed >= 3).all()
    for layer in range(L):
        upto = flushed if layer >= S else shallow_done
        for b in range(3):
            for got, want in [
                (state.cache.layers[layer].key_BHTK, ref.layers[layer].key_BHTK),
                (state.cache.layers[layer].value_BHTK, ref.layers[layer].value_BHTK),
            ]:
                np.testing.assert_allclose(
                    got[b, :, : upto[b]], want[b, :, : upto[b]], atol=2e-5, rtol=2e-5
                )


def test_counters_match_hand_counts():
    enc, params = encoder_tokens(0), agreeing(0)
    one = enc[:1]
    # Never exit: one deep pass per token.
    out = _free()(params, one, NEVER, max_lengths=[N])
    assert int(out.lengths[0]) == N
    assert int(out.num_deep_passes[0]) == N and int(out.layers_computed[0]) == N * L
    np.testing.assert_array_equal(out.pass_width_counts, [N, 0, 0])  # widths (1, 2, 4), all 1
    # Always exit, W = 4: the stack fills at steps 3 and 7 (3 stacked + current), forcing passes.
    out = _free()(params, one, ALWAYS)
    assert int(out.lengths[0]) == N, "pick inputs without an early EOS"
    assert (np.asarray(out.exit_layer) == S).all()
    assert int(out.num_deep_passes[0]) == 2
    assert int(out.layers_computed[0]) == N * S + 2 * (L - S)
    assert int(out.batch_layers_computed) == N * S + 2 * (L - S)
    assert int(out.num_steps) == N
    np.testing.assert_array_equal(out.pass_width_counts, [0, 0, 2])
    assert np.asarray(out.records.valid[0]).all()  # the two passes covered every position
    # Batch, max lengths 3, 8, 5. Example 0 stops after 3 tokens with 3 stacked (plain FREE does
    # not verify them); the forced pass at step 3 covers examples 1 and 2; example 2 stops after
    # step 4; example 1's stack fills again at step 7.
    three = np.concatenate([one, one, one])
    out = _free()(params, three, ALWAYS, max_lengths=[3, N, 5])
    np.testing.assert_array_equal(out.lengths, [3, N, 5])
    np.testing.assert_array_equal(out.num_deep_passes, [0, 2, 1])
    np.testing.assert_array_equal(out.layers_computed, [3 * S, N * S + 2 * (L - S), 5 * S + 3])
    assert int(out.batch_layers_computed) == N * S + 2 * (L - S)
    np.testing.assert_array_equal(out.pass_width_counts, [0, 0, 2])  # both passes 4 wide


def test_pass_widths():
    assert pass_widths(8) == (1, 2, 4, 8)
    assert pass_widths(5) == (1, 2, 4, 5)
    assert pass_widths(1) == (1,)
    with pytest.raises(ValueError):
        pass_widths(0)


def test_without_records_same_tokens_and_no_records():
    enc, params = encoder_tokens(1), with_eos(1)
    threshold = _median_confidence(params, enc)
    full = _free()(params, enc, threshold)
    lean = _free(records=False)(params, enc, threshold)
    for field in ("tokens", "exit_layer", "num_deep_passes", "layers_computed"):
        np.testing.assert_array_equal(getattr(lean, field), getattr(full, field))
    np.testing.assert_allclose(lean.confidence, full.confidence, atol=1e-6)
    assert not np.asarray(lean.records.valid).any()
