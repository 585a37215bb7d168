"""Mixture-of-Recursions: the gather/scatter pass equals the dense masked reference, causal routing
is causal (and training-time top-k is not), the KV statistics, router losses, config errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.models.mor import TINY, MoRConfig, init_mor_params, mor_forward
from free_jax.models.mor_cached import mor_forward_dense
from free_jax.models.mor_routers import causal_route, rank_keep, top_k_keep

# N_r = 3 with K' = 1 keeps compiles short; K' = 2 (two layers per recursion) runs where the
# per-layer key/value bookkeeping matters (share, the gather/scatter test).
LAYERS_LOOPS = {"k1": (5, 3), "k2": (6, 2)}


def _config(router="expert_choice", kv="recursion", shape="k1", **changes) -> MoRConfig:
    layers, loops = LAYERS_LOOPS[shape]
    # alpha 1 so the routed recursions move the logits by O(1), not O(alpha / 2).
    return MoRConfig(
        **TINY, num_layers=layers, num_loops=loops, router=router, kv=kv, router_alpha=1.0,
        **changes,
    )  # fmt: skip


@functools.cache
def _params(config: MoRConfig):
    """Initial weights plus N(0, 0.3) noise on every leaf: at the 0.02 initial scale the routed
    recursions barely move the logits and routers barely separate tokens, so a wrong gather would
    hide under the tolerance."""
    params = init_mor_params(config, jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, noisy)


@functools.cache
def _out(config: MoRConfig, routing: str, dense: bool):
    """The pass on `_tokens()`, computed once per session (several tests read the same one)."""
    return _forward(config, routing, dense, _tokens())


def _forward(config: MoRConfig, routing: str, dense: bool, tokens_BT: jax.Array):
    # Eager: these tiny passes dispatch in ~0.1 s once each primitive has compiled for its shapes
    # (shared across configs and tests), while every jit would compile the whole pass again.
    fn = mor_forward_dense if dense else mor_forward
    return fn(config, _params(config), tokens_BT, routing=routing)


def _tokens(batch: int = 8, length: int = 9, seed: int = 2) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 3, TINY["vocab_size"])


# ============================================================ gather/scatter == dense


@pytest.mark.parametrize(
    "router, kv, routing",
    [
        ("expert_choice", "recursion", "topk"),
        ("expert_choice", "recursion", "causal"),
        pytest.param("expert_choice", "share", "topk", marks=pytest.mark.slow),
        ("expert_choice", "share", "causal"),
        # Token-choice routing is per token: "causal" is the same pass as "topk".
        ("token_choice", "recursion", "topk"),
        pytest.param("token_choice", "share", "topk", marks=pytest.mark.slow),
    ],
)  # the slow twins: each strategy's gather path is checked fast by another row
def test_gather_path_equals_dense_reference(router, kv, routing):
    config = _config(router, kv, shape="k2" if kv == "share" else "k1")
    fast = _out(config, routing, False)
    ref = _out(config, routing, True)
    for r, (a, b) in enumerate(zip(fast.kept, ref.kept), start=1):
        np.testing.assert_array_equal(a, b, err_msg=f"kept tokens of recursion {r}")
    np.testing.assert_allclose(fast.logits, ref.logits, atol=1e-5, rtol=0)
    for name in ref.aux:
        np.testing.assert_allclose(fast.aux[name], ref.aux[name], rtol=1e-5, err_msg=name)
    # The routing is not trivial: some tokens stop early, some run every recursion.
    depth = np.asarray(ref.depth)
    assert depth.min() < config.num_loops and depth.max() == config.num_loops, depth


def test_the_tolerance_is_small_against_what_routing_changes():
    """1e-5 means something: the KV strategy alone moves these logits by far more."""
    recursion = _out(_config(kv="recursion", shape="k2"), "topk", True)
    share = _out(_config(kv="share", shape="k2"), "topk", True)
    assert float(jnp.max(jnp.abs(recursion.logits - share.logits))) > 1e-2


@pytest.mark.slow  # compiles the whole pass once (~4 s); every decoder test runs jitted code
def test_jit_matches_eager():
    config = _config()
    jitted = jax.jit(lambda p, x: mor_forward(config, p, x))(_params(config), _tokens())
    eager = _out(config, "topk", False)
    np.testing.assert_allclose(jitted.logits, eager.logits, atol=1e-5, rtol=0)


def test_top_k_keep_equals_rank_keep_with_ties():
    # Integer logits in [0, 4) tie often: both must break ties towards the earlier position.
    logits_BT = jax.random.randint(jax.random.key(0), (8, 12), 0, 4).astype(jnp.float32)
    candidates_BP = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (8, 12))
    candidate_BT = jnp.ones((8, 12), bool)
    for k in (12, 8, 5, 1):  # nested rounds, as the recursions
        candidates_BP = top_k_keep(logits_BT, candidates_BP, k)
        fast_BT = jnp.zeros((8, 12), bool).at[jnp.arange(8)[:, None], candidates_BP].set(True)
        candidate_BT = rank_keep(logits_BT, candidate_BT, k)
        np.testing.assert_array_equal(fast_BT, candidate_BT)
        assert np.all(np.diff(np.asarray(candidates_BP), axis=1) > 0)  # ascending positions


# ============================================================ causality of the routing


def _prefix_variants(length: int, prefix: int, variants: int) -> jax.Array:
    """[variants, length]: one shared prefix, different continuations after it."""
    tokens = np.array(_tokens(variants, length, seed=5))
    tokens[:, :prefix] = tokens[0, :prefix]
    return jnp.asarray(tokens)


@pytest.mark.parametrize(
    "router, kv",
    [("expert_choice", "recursion"), ("expert_choice", "share"), ("token_choice", "recursion")],
)
def test_causal_routing_of_a_prefix_ignores_later_tokens(router, kv):
    config = _config(router, kv)
    prefix, tokens = 5, _prefix_variants(9, 5, 8)
    out = _forward(config, "causal", False, tokens)
    for r, kept in enumerate(out.kept, start=1):
        kept = np.asarray(kept)[:, :prefix]
        np.testing.assert_array_equal(kept, np.broadcast_to(kept[0], kept.shape), f"recursion {r}")
    logits = np.asarray(out.logits)[:, :prefix]
    np.testing.assert_allclose(logits, np.broadcast_to(logits[0], logits.shape), atol=1e-5)
    # The decision is the per-position rule itself: expert-choice recursion 2 keeps a token iff
    # its logit >= 0 (sigmoid >= 0.5); token-choice iff its depth >= 2.
    rule = out.router_logits[1] >= 0 if router == "expert_choice" else out.depth >= 2
    np.testing.assert_array_equal(out.kept[1], rule)


def test_training_top_k_routing_of_a_prefix_depends_on_later_tokens():
    """The contrast that makes causal routing necessary: top-k ranks a token against later ones."""
    config = _config("expert_choice", "recursion")
    prefix, tokens = 5, _prefix_variants(9, 5, 8)
    out = _forward(config, "topk", False, tokens)
    changed = [
        r for r, kept in enumerate(out.kept, start=1)
        if not np.all(np.asarray(kept)[:, :prefix] == np.asarray(kept)[0, :prefix])
    ]  # fmt: skip
    assert changed, "no continuation changed which prefix tokens the top-k keeps"
    # The hidden states entering recursion 1 are causal; the decision is what leaks.
    first = np.asarray(out.router_logits[0])[:, :prefix]
    np.testing.assert_allclose(first, np.broadcast_to(first[0], first.shape), atol=1e-5)


def test_causal_route_reads_one_position():
    config = _config("expert_choice")
    routers = _params(config)["routers"]
    hidden_BCD = jax.random.normal(jax.random.key(0), (2, 6, TINY["d_model"]))
    _, run_all = causal_route(config, routers, 2, hidden_BCD)
    _, run_one = causal_route(config, routers, 2, hidden_BCD[:, 3:4])
    np.testing.assert_array_equal(run_all[:, 3:4], run_one)
    assert bool(jnp.all(causal_route(config, routers, 1, hidden_BCD)[1]))
    with pytest.raises(ValueError, match="recursion=4"):
        causal_route(config, routers, 4, hidden_BCD)


# ============================================================ key/value statistics


@pytest.mark.parametrize("shape", ["k1", "k2"])  # N_r = 3 divides T = 9; N_r = 2 does not
def test_recursion_wise_kv_stores_sum_k_over_n_t(shape):
    config = _config("expert_choice", "recursion", shape=shape)
    n, (batch, length) = config.num_loops, _tokens().shape
    out = _out(config, "topk", False)
    stored = sum(int(np.sum(s)) for s in out.kv_stored) / (n * batch * length)
    k = config.keep_counts(length)
    assert k == tuple(int(np.ceil(length * (n - r + 1) / n)) for r in range(1, n + 1))
    assert k[0] == length
    assert stored == pytest.approx(sum(k) / (n * length), abs=1e-12)
    assert stored == pytest.approx(config.kv_fraction(length), abs=1e-12)
    # (N_r + 1) / (2 N_r) exactly when N_r divides T, within ceil's rounding otherwise.
    assert abs(stored - (n + 1) / (2 * n)) <= (1 if length % n else 0) * n / (n * length)
    for s, kept in zip(out.kv_stored, out.kept):
        np.testing.assert_array_equal(s, kept)


def test_shared_kv_stores_one_over_n():
    config = _config("expert_choice", "share")
    n, (batch, length) = config.num_loops, _tokens().shape
    out = _out(config, "topk", False)
    stored = sum(int(np.sum(s)) for s in out.kv_stored) / (n * batch * length)
    assert stored == pytest.approx(1 / n) == pytest.approx(config.kv_fraction(length))


# ============================================================ router losses


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_aux_losses_are_finite_and_train_the_routers(router):
    config = _config(router)
    params, tokens = _params(config), _tokens()

    def losses(routers):
        out = mor_forward(config, {**params, "routers": routers}, tokens)
        return jnp.stack([out.aux["total"], jnp.mean(out.logits**2)])

    # One jit, both gradients (rows: the aux loss, an LM-style loss reaching the routers only
    # through the gates); eager differentiation of the pass costs more than compiling it.
    grads = jax.jit(jax.jacrev(losses))(params["routers"])
    for i, what in enumerate(("aux loss", "LM loss through the gates")):
        theta = np.asarray(grads["theta"][i])
        assert np.all(np.isfinite(theta)) and np.abs(theta).max() > 0, what
        assert np.all(np.isfinite(np.asarray(grads["bias"][i]))), what
    out = _out(config, "topk", False)
    expected = {"expert_choice": {"router_bce", "router_z", "total"},
                "token_choice": {"balance", "router_z", "total"}}[router]  # fmt: skip
    assert set(out.aux) == expected
    assert all(np.isfinite(float(v)) for v in out.aux.values())
    if router == "token_choice":
        assert 1.0 <= float(out.aux["balance"]) <= config.num_loops + 1e-5


# ============================================================ config


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"sharing": "cycle"}, "sharing"),
        ({"num_loops": 5, "num_layers": 7}, "num_loops"),
        ({"num_loops": 1, "num_layers": 3}, "num_loops"),
        ({"lora_rank": 2}, "lora_rank"),
        ({"router": "random"}, "router"),
        ({"kv": "none"}, "kv"),
        ({"router_alpha": 0.0}, "router_alpha"),
        ({"router_aux": -1.0}, "router_aux"),
        ({"balance": -0.1}, "balance"),
        ({"router_z": float("nan")}, "router_z"),
        ({"num_layers": 6}, "num_loops"),  # 4 middle layers do not split into 3 recursions
    ],
)
def test_config_errors_name_the_field(changes, field):
    base = dict(TINY, num_layers=5, num_loops=3)
    with pytest.raises(ValueError, match=field):
        MoRConfig(**{**base, **changes})


def test_forward_errors():
    config = _config()
    params = _params(config)
    with pytest.raises(ValueError, match="routing='greedy'"):
        mor_forward(config, params, _tokens(1, 4), routing="greedy")
    with pytest.raises(ValueError, match="rng"):
        mor_forward(config, params, _tokens(1, 4), deterministic=False)
    with pytest.raises(ValueError, match="vocabulary"):
        mor_forward(config, params, jnp.full((1, 4), 99))


def test_config_json_round_trip():
    from free_jax.models.configs import config_from_json

    config = _config(kv="share")
    assert config_from_json(config.to_json()) == config
    assert type(config_from_json(config.to_json())) is type(config)
