"""The depth-wise engine on a Mixture-of-Recursions model: the routers choose each slot's depth,
and the tokens equal step-by-step greedy decoding of the same model (continuous or synchronized,
recursion-wise or shared keys/values, either router)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.decoding import DepthwiseSpec, GreedySpec, decode, depthwise_decode
from free_jax.models.mor import TINY, MoRConfig, init_mor_params


@functools.cache
def _setup(router: str, kv: str):
    config = MoRConfig(**TINY, num_layers=6, num_loops=2, router=router, kv=kv, router_alpha=1.0)
    params = init_mor_params(config, jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return config, jax.tree_util.tree_unflatten(tree, noisy)


PROMPTS_QS = jax.random.randint(jax.random.key(3), (5, 6), 3, TINY["vocab_size"])
LENGTHS_Q = jnp.array([6, 3, 5, 2, 6])  # short prompts: prefill runs past their ends


@pytest.mark.parametrize(
    "router, kv",
    [
        ("expert_choice", "recursion"),
        ("expert_choice", "share"),
        # the slow twin: token-choice's cached pass is checked fast by tests/models/test_mor_cached.py
        pytest.param("token_choice", "recursion", marks=pytest.mark.slow),
    ],
)
def test_engine_equals_step_by_step_greedy(router, kv):
    config, params = _setup(router, kv)
    want_QN = np.asarray(
        decode(config, params, PROMPTS_QS, GreedySpec(), max_decode_len=7,
               prompt_lengths=LENGTHS_Q).tokens
    )  # fmt: skip
    ticks = {}
    for synchronized in (False, True):
        spec = DepthwiseSpec(slots=2, max_new_tokens=7, synchronized=synchronized)
        out = depthwise_decode(config, params, PROMPTS_QS, LENGTHS_Q, spec)
        np.testing.assert_array_equal(np.asarray(out.tokens_QN), want_QN)
        depth = np.asarray(out.exit_loop_QN)
        emitted = depth >= 0
        # The routers do choose: some tokens stop after recursion 1, some run both.
        assert 0 < np.mean(depth[emitted] == 0) < 1
        ticks[synchronized] = int(out.ticks)
    # Continuous batching never needs more recursion calls than the synchronized batch.
    assert ticks[False] <= ticks[True]


def test_options_that_do_not_apply_are_refused():
    config, params = _setup("expert_choice", "recursion")
    with pytest.raises(ValueError, match="threshold=0.5 does not apply"):
        depthwise_decode(config, params, PROMPTS_QS, LENGTHS_Q, DepthwiseSpec(), threshold=0.5)
    with pytest.raises(ValueError, match="DepthwiseSpec.skipped_kv='share_loop0' does not apply"):
        depthwise_decode(
            config, params, PROMPTS_QS, LENGTHS_Q, DepthwiseSpec(skipped_kv="share_loop0")
        )
