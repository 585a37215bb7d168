"""Decoding with many exits (self-supervised exit heads on layers 1 and 2 of a 4-layer tiny
Llama): multi-exit FREE against a teacher-forced reference, its lossless mode, batch = one by one,
exact caches, and many-exit CALM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_testlib import N, config, prompts
from test_headed_decoding import NAME, headed, run

from free_jax.decoding import CalmSpec, FreeSpec, GreedySpec, decode
from free_jax.decoding.confidence import softmax_margin
from free_jax.decoding.free import free_loop
from free_jax.decoding.state import decode_setup
from free_jax.models import DecoderLM
from free_jax.models.exit_heads import head_logits

EXITS = (1, 2)
L = 4
MIXED = np.array([0.3, 0.5], np.float32)  # both heads take some tokens, others go deep


@functools.lru_cache
def _forward():
    base = config(NAME)
    return jax.jit(lambda b, t: DecoderLM(base).apply({"params": b}, t, return_hidden=True))


def reference(prompt, thresholds):
    """Multi-exit early exit with exact states, by re-running the whole teacher-forced model every
    step: the token comes from the first head whose margin passes its threshold, else the final
    layer. (Every layer sees exact states of all earlier positions: what FREE's passes provide.)
    Returns (tokens, exit layers), zero-padded to N."""
    c, p = headed()
    base = config(NAME)
    seq, out, where = list(prompt), [], []
    for _ in range(N):
        padded = np.zeros((1, len(prompt) + N), np.int32)
        padded[0, : len(seq)] = seq
        res = _forward()(p["backbone"], jnp.asarray(padded))
        at = len(seq) - 1
        token, layer = int(jnp.argmax(res.logits[0, at])), L
        for thr, exit_layer in zip(thresholds, EXITS):
            logits_V = head_logits(base, p["exit_heads"], exit_layer, res.hidden[exit_layer - 1])[
                0, at
            ]
            if float(softmax_margin(logits_V[None])[0]) > thr:
                token, layer = int(jnp.argmax(logits_V)), exit_layer
                break
        out.append(token)
        where.append(layer)
        seq.append(token)
        if token == base.eos_token_id:
            break
    pad = lambda xs: xs + [0] * (N - len(xs))
    return pad(out), pad(where)


def decode_headed(spec, threshold, tokens=None, lengths=None):
    c, p = headed()
    if tokens is None:
        tokens, lengths = prompts(NAME)
    return decode(
        c, p, tokens, spec, max_decode_len=N, threshold=threshold, prompt_lengths=lengths
    )  # fmt: skip


@pytest.mark.parametrize("window", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_free_with_many_exits_equals_the_teacher_forced_reference(window):
    out = decode_headed(FreeSpec(window=window, exits=EXITS), MIXED)
    tokens, lengths = prompts(NAME)
    layers = np.asarray(out.exit_layer)
    assert {1, 2, L} <= set(layers[np.asarray(out.tokens) > 0].tolist()), "every exit is used"
    for row in range(3):
        want_tokens, want_layers = reference(tokens[row, : lengths[row]], MIXED)
        assert np.asarray(out.tokens[row]).tolist() == want_tokens
        assert layers[row].tolist() == want_layers


def test_never_exit_equals_greedy_and_lossless_equals_greedy_where_tokens_exit():
    greedy = run(GreedySpec())
    never = np.ones(2, np.float32)
    for spec in [FreeSpec(window=4, exits=EXITS), FreeSpec(window=4, exits=EXITS, lossless=True),
                 CalmSpec(exits=EXITS)]:  # fmt: skip
        np.testing.assert_array_equal(np.asarray(decode_headed(spec, never).tokens), greedy)
    plain = decode_headed(FreeSpec(window=4, exits=EXITS), np.zeros(2, np.float32))
    assert (np.asarray(plain.tokens) != greedy).any(), "heads that always exit change the output"
    for thresholds in [np.zeros(2, np.float32), MIXED]:
        out = decode_headed(FreeSpec(window=4, exits=EXITS, lossless=True), thresholds)
        np.testing.assert_array_equal(np.asarray(out.tokens), greedy)
    kept = np.asarray(out.exit_layer)[greedy > 0]
    assert (kept < L).mean() > 0.2, "lossless kept some head tokens at the mixed thresholds"


def test_a_batch_decodes_like_each_example_alone():
    tokens, lengths = prompts(NAME)
    spec = FreeSpec(window=4, exits=EXITS)
    batch = decode_headed(spec, MIXED)
    for row in range(3):
        one = decode_headed(spec, MIXED, tokens[row : row + 1], lengths[row : row + 1])
        np.testing.assert_array_equal(np.asarray(one.tokens[0]), np.asarray(batch.tokens[row]))
        np.testing.assert_array_equal(
            np.asarray(one.exit_layer[0]), np.asarray(batch.exit_layer[row])
        )


@pytest.mark.slow  # exits=(S,) takes the same code path as the default
def test_one_exit_given_as_exits_is_plain_free():
    a = decode_headed(FreeSpec(window=4), 0.3)
    b = decode_headed(FreeSpec(window=4, exits=(1,)), 0.3)
    for field in ("tokens", "exit_layer", "layers_computed", "num_deep_passes"):
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))


def test_caches_are_exact_below_each_positions_frontier():
    c, p = headed()
    tokens, lengths = prompts(NAME)
    w = 4
    # found by search: the last example ends with two positions stacked, at exits 2 and 1
    thresholds, max_lengths = np.array([0.5, 0.1], np.float32), jnp.asarray([4, 4, 8], jnp.int32)
    state = jax.jit(
        lambda p, t, n: free_loop(
            c,
            p,
            t,
            thresholds,
            max_decode_len=N,
            window=w,
            exits=EXITS,
            input_lengths_B=n,
            max_lengths_B=max_lengths,
        )  # fmt: skip
    )(p, jnp.asarray(tokens), jnp.asarray(lengths))
    out = np.asarray(state.log.tokens)
    # the reference: every output token through every layer, on top of the same prefilled prompts
    setup = decode_setup(
        c, p, jnp.asarray(tokens), N, input_lengths_B=jnp.asarray(lengths), slack=w
    )
    inputs_BN = jnp.concatenate([setup.ctx.first_token_B[:, None], out[:, :-1]], axis=1)
    base_B = setup.ctx.base_B
    _, ref = setup.model.layers(
        setup.model.embed(inputs_BN, base_B), start=0, end=L, cache=setup.cache,
        context=setup.ctx, offset_B=base_B,
    )  # fmt: skip
    pos, stack_len = np.asarray(state.pos_B), np.asarray(state.stack_len_B)
    frontier = np.asarray(state.stack_exit_BW)
    at_frontier = [frontier[b, i] for b in range(3) for i in range(stack_len[b])]
    assert 0 in at_frontier and 1 in at_frontier, "positions stacked at either exit at the end"
    for b in range(3):
        flushed = pos[b] - stack_len[b]
        for layer in range(L):
            # exact: every flushed position, and each stacked one below its frontier's exit
            upto = flushed
            for i in range(stack_len[b]):
                if layer < EXITS[frontier[b, i]]:
                    upto = flushed + i + 1
            rows = int(base_B[b]) + upto
            for got, want in [
                (state.cache.layers[layer].key_BHTK, ref.layers[layer].key_BHTK),
                (state.cache.layers[layer].value_BHTK, ref.layers[layer].value_BHTK),
            ]:
                np.testing.assert_allclose(
                    got[b, :, :rows], want[b, :, :rows], atol=2e-5, rtol=2e-5
                )


@pytest.mark.slow
def test_calm_with_exits_tests_only_those_layers():
    every = decode_headed(CalmSpec(), 0.3)
    listed = decode_headed(CalmSpec(exits=(1, 2, 3)), 0.3)
    np.testing.assert_array_equal(np.asarray(every.tokens), np.asarray(listed.tokens))
    np.testing.assert_array_equal(np.asarray(every.exit_layer), np.asarray(listed.exit_layer))
    only2 = decode_headed(CalmSpec(exits=(2,)), 0.0)
    used = set(np.asarray(only2.exit_layer)[np.asarray(only2.tokens) > 0].tolist())
    assert used == {2}
    # a never-passing first threshold is the same as not having that exit
    np.testing.assert_array_equal(
        np.asarray(decode_headed(CalmSpec(exits=(1, 2)), np.array([1.0, 0.4])).tokens),
        np.asarray(decode_headed(CalmSpec(exits=(2,)), 0.4).tokens),
    )


def test_bad_exits_and_thresholds_are_named():
    with pytest.raises(ValueError, match=r"FreeSpec.exits=\(2, 1\) must be strictly increasing"):
        decode_headed(FreeSpec(exits=(2, 1)), 0.5)
    with pytest.raises(ValueError, match="CalmSpec.exits"):
        decode_headed(CalmSpec(exits=(1, L)), 0.5)
    with pytest.raises(ValueError, match="shallow or exits"):
        FreeSpec(shallow=1, exits=(1, 2))
    with pytest.raises(ValueError, match="non-empty sequence"):
        FreeSpec(exits=())
    with pytest.raises(ValueError, match=r"threshold has shape \(3,\).*\(2,\)"):
        decode_headed(FreeSpec(exits=EXITS), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"threshold has shape \(2,\); FreeSpec takes a scalar$"):
        decode_headed(FreeSpec(), np.zeros(2, np.float32))
    assert FreeSpec(exits=[1, 2]).exits == (1, 2)  # lists (gin, JSON) become tuples
