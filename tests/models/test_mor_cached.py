"""Mixture-of-Recursions decoded step by step against its cache equals the teacher-forced pass with
the same causal routing; the protocol refuses early-exit layer ranges; greedy decoding runs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.decoding import GreedySpec, decode
from free_jax.models import bind
from free_jax.models.mor import TINY, MoRConfig, init_mor_params, mor_forward
from free_jax.models.mor_cached import MoRCache, mor_forward_dense


@functools.cache
def _setup(router: str, kv: str):
    config = MoRConfig(
        **TINY, num_layers=6, num_loops=2, router=router, kv=kv, router_alpha=1.0
    )  # K' = 2 layers per recursion: the per-layer cache bookkeeping is exercised
    params = init_mor_params(config, jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return config, jax.tree_util.tree_unflatten(tree, noisy)


def _tokens(batch=3, length=10, seed=4):
    return jax.random.randint(jax.random.key(seed), (batch, length), 3, TINY["vocab_size"])


def _stepwise(config, params, tokens_BT, prompt: int):
    """Prefill `prompt` - 1 tokens, then feed one token per step: logits [B, T - prompt + 1, V]
    at positions prompt - 1 .. T - 1, and the final cache."""
    model = bind(config, params)
    b, t = tokens_BT.shape
    context, cache = model.start(tokens_BT[:, :prompt], None, extra_length=t - prompt)
    logits = []
    for pos in range(prompt - 1, t):
        offset_B = jnp.full((b,), pos, jnp.int32)
        hidden_B1D = model.embed(tokens_BT[:, pos : pos + 1], offset_B)
        hidden_B1D, cache = model.layers(
            hidden_B1D, start=0, end=config.num_layers, cache=cache, context=context,
            offset_B=offset_B,
        )  # fmt: skip
        logits.append(model.exit_logits(hidden_B1D)[:, 0])
    return jnp.stack(logits, axis=1), cache


@pytest.mark.parametrize(
    "router, kv",
    [
        ("expert_choice", "recursion"),
        # the slow twin: shared keys/values are also checked fast, through greedy decoding, by
        # tests/decoding/test_mor_depthwise.py
        pytest.param("expert_choice", "share", marks=pytest.mark.slow),
        ("token_choice", "recursion"),
    ],
)
def test_cached_step_by_step_equals_teacher_forced_causal_pass(router, kv):
    config, params = _setup(router, kv)
    tokens_BT = _tokens()
    prompt = 4
    step_BNV, cache = _stepwise(config, params, tokens_BT, prompt)
    dense = mor_forward_dense(config, params, tokens_BT, routing="causal")
    gathered = mor_forward(config, params, tokens_BT, routing="causal")
    want_BNV = dense.logits[:, prompt - 1 :]
    # One chunk against one token at a time sums in another order: ~2e-6 measured on logits of ~6.
    np.testing.assert_allclose(step_BNV, want_BNV, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gathered.logits[:, prompt - 1 :], want_BNV, atol=1e-5, rtol=1e-5)
    # The cache records exactly the teacher-forced routing: recursion r ran where kept[r].
    assert isinstance(cache, MoRCache)
    for active_BT, kept_BT in zip(cache.active, dense.kept):
        np.testing.assert_array_equal(active_BT, kept_BT)
    # Routing is not trivial on these weights: some token skips a recursion.
    assert not bool(jnp.all(dense.kept[-1]))


def test_routing_depends_on_the_tokens_not_on_the_chunking():
    """Prefilling 8 tokens at once or feeding them one by one routes the same way (the router
    reads only a token's own state, and the cache carries the rest)."""
    config, params = _setup("expert_choice", "recursion")
    tokens_BT = _tokens(batch=2, length=9, seed=7)
    _, one_by_one = _stepwise(config, params, tokens_BT, prompt=1)
    _, prefilled = _stepwise(config, params, tokens_BT, prompt=9)
    for a_BT, b_BT in zip(one_by_one.active, prefilled.active):
        np.testing.assert_array_equal(a_BT[:, :8], b_BT[:, :8])


def test_greedy_decode_continues_the_teacher_forced_argmax():
    config, params = _setup("expert_choice", "recursion")
    prompt_BS = _tokens(batch=2, length=5, seed=9)
    out = decode(config, params, prompt_BS, GreedySpec(), max_decode_len=6)
    generated_BN = np.asarray(out.tokens)
    # Where a row stopped at EOS the tokens after it are padding: compare up to the first EOS.
    full_BT = jnp.concatenate([prompt_BS, jnp.asarray(generated_BN)], axis=1)
    logits = mor_forward_dense(config, params, full_BT, routing="causal").logits
    want_BN = np.asarray(jnp.argmax(logits[:, 4:-1], axis=-1))
    for b in range(2):
        stop = np.flatnonzero(generated_BN[b] == config.eos_token_id)
        n = int(stop[0]) + 1 if stop.size else generated_BN.shape[1]
        np.testing.assert_array_equal(generated_BN[b, :n], want_BN[b, :n])


def test_early_exit_layer_ranges_are_refused():
    config, params = _setup("expert_choice", "recursion")
    model = bind(config, params)
    cache = model.init_cache(1, 4)
    hidden = model.embed(jnp.ones((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="whole routed stack"):
        model.layers(hidden, start=0, end=2, cache=cache, offset_B=jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="FREE, CALM and static exit"):
        model.start(jnp.ones((1, 3), jnp.int32), None, extra_length=2, num_layers=3)
