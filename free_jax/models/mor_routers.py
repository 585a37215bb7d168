"""Routers of Mixture-of-Recursions (`models/mor.py`): parameters, decisions and auxiliary losses.

Dimension keys: B batch, T positions, D width, R recursions (N_r), P candidate tokens of a
recursion, A tokens it keeps.

Two routers (Bae et al. 2025, sec. 2.2):

* expert-choice: recursion r has its own linear router, logit_r = theta_r . h + b_r, read on the
  hidden state entering recursion r; its gate is g = alpha * sigmoid(logit_r). Training keeps the
  top-k_r candidates of each sequence (`top_k_keep`; `rank_keep` is the dense reference of the same
  choice), which looks at later tokens; decoding keeps a token iff sigmoid(logit_r) >= 0.5
  (`causal_route`), which the auxiliary BCE loss teaches to agree with the top-k choice.
* token-choice: one router [D, R] reads the hidden state entering recursion 1 once; the token's
  depth is the argmax of softmax over R (1-based), its gate that probability. A per-token choice,
  hence causal already; Switch-style balancing keeps the depths in use.

Parameters (`init_routers`): expert-choice {"theta": [R, D], "bias": [R]} (row r - 1 is recursion
r's router), token-choice {"theta": [D, R], "bias": [R]}. Not named "kernel" on purpose: the
LoRA and sharding rules treat every "kernel" as a dense [in, out] map of a layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from free_jax.models.lm_layers import INIT_STDDEV

if TYPE_CHECKING:
    from free_jax.models.mor import MoRConfig

__all__ = [
    "causal_route",
    "expert_aux",
    "expert_gate",
    "expert_logits",
    "init_routers",
    "rank_keep",
    "token_aux",
    "token_route",
    "top_k_keep",
]


def init_routers(config: MoRConfig, rng: jax.Array) -> dict[str, jax.Array]:
    """Router weights ~ N(0, 0.02) as the layers' kernels, biases 0 (so every gate starts near
    alpha / 2 for expert-choice and every depth near 1 / R for token-choice)."""
    d, r = config.d_model, config.num_loops
    shape = (r, d) if config.router == "expert_choice" else (d, r)
    theta = INIT_STDDEV * jax.random.normal(rng, shape, jnp.float32)
    return {"theta": theta.astype(config.weights_dtype), "bias": jnp.zeros((r,), jnp.float32)}


# ============================================================ expert-choice


def expert_logits(routers, recursion: int, hidden_BTD: jax.Array) -> jax.Array:
    """Float32 logits [B, T] of recursion `recursion`'s (1-based) router on every position."""
    theta_D = routers["theta"][recursion - 1].astype(jnp.float32)
    return hidden_BTD.astype(jnp.float32) @ theta_D + routers["bias"][recursion - 1]


def expert_gate(config: MoRConfig, logits_BT: jax.Array) -> jax.Array:
    """g = alpha * sigmoid(logit): the weight of a kept token's block output."""
    return config.router_alpha * jax.nn.sigmoid(logits_BT)


def top_k_keep(logits_BT: jax.Array, candidates_BP: jax.Array, k: int) -> jax.Array:
    """Positions [B, k] (ascending) of the k candidates with the highest logits.

    `candidates_BP` holds each sequence's candidate positions in ascending order (those kept by
    the previous recursion). Shapes are static: P and k never depend on the data.

    >>> logits = jnp.array([[0.5, 3.0, -1.0, 2.0, 9.0]])
    >>> top_k_keep(logits, jnp.array([[0, 1, 3, 4]]), 2)   # 2 of positions 0, 1, 3, 4
    Array([[1, 4]], dtype=int32)
    """
    cand_logits_BP = jnp.take_along_axis(logits_BT, candidates_BP, axis=1)
    _, pick_BA = jax.lax.top_k(cand_logits_BP, k)
    # Position order, so the kept tokens keep their causal order in the gathered block input.
    pick_BA = jnp.sort(pick_BA, axis=1)
    return jnp.take_along_axis(candidates_BP, pick_BA, axis=1).astype(jnp.int32)


def rank_keep(logits_BT: jax.Array, candidate_BT: jax.Array, k: int) -> jax.Array:
    """[B, T] bool: the same choice as `top_k_keep`, by counting instead of sorting (the dense
    reference). A candidate is kept iff fewer than k candidates outrank it; ties go to the earlier
    position, as `jax.lax.top_k` breaks them.

    >>> rank_keep(jnp.array([[0.5, 3.0, -1.0, 2.0, 9.0]]), jnp.array([[1, 1, 0, 1, 1]], bool), 2)
    Array([[False,  True, False, False,  True]], dtype=bool)
    """
    t = logits_BT.shape[1]
    mine_BT1, other_B1T = logits_BT[:, :, None], logits_BT[:, None, :]
    earlier_TT = jnp.arange(t)[None, :] < jnp.arange(t)[:, None]  # [t, s]: s before t
    beats_BTT = (other_B1T > mine_BT1) | ((other_B1T == mine_BT1) & earlier_TT[None])
    rank_BT = jnp.sum(beats_BTT & candidate_BT[:, None, :], axis=2)
    return candidate_BT & (rank_BT < k)


# ============================================================ token-choice


def token_route(config: MoRConfig, routers, hidden_BTD: jax.Array):
    """(logits [B, T, R] float32, depth [B, T] int32 in 1..R, gate [B, T] float32): the depth is
    the argmax of softmax(logits), the gate its probability."""
    logits_BTR = (
        hidden_BTD.astype(jnp.float32) @ routers["theta"].astype(jnp.float32) + routers["bias"]
    )
    probs_BTR = jax.nn.softmax(logits_BTR, axis=-1)
    choice_BT = jnp.argmax(probs_BTR, axis=-1)
    gate_BT = jnp.take_along_axis(probs_BTR, choice_BT[..., None], axis=-1)[..., 0]
    return logits_BTR, (choice_BT + 1).astype(jnp.int32), gate_BT


# ============================================================ decoding


def causal_route(config: MoRConfig, routers, recursion: int, hidden_BCD: jax.Array):
    """(router logits, run [B, C] bool): whether each position runs recursion `recursion`
    (1-based), from that position's own hidden state alone, so a step-by-step decoder can decide
    before later tokens exist.

    * expert-choice: `hidden_BCD` enters recursion r; run iff r == 1 (training keeps all k_1 = T
      tokens there) or sigmoid(logit_r) >= 0.5. The caller ANDs this with the previous recursion's
      decision (recursions are nested). Logits [B, C].
    * token-choice: `hidden_BCD` enters recursion 1 (the router reads it once); run iff the
      token's depth >= r. Logits [B, C, R].
    """
    if not 1 <= recursion <= config.num_loops:
        raise ValueError(f"causal_route: recursion={recursion} is outside [1, {config.num_loops}]")
    if config.router == "token_choice":
        logits_BCR, depth_BC, _ = token_route(config, routers, hidden_BCD)
        return logits_BCR, depth_BC >= recursion
    logits_BC = expert_logits(routers, recursion, hidden_BCD)
    if recursion == 1:
        return logits_BC, jnp.ones(logits_BC.shape, bool)
    # sigmoid(x) >= 0.5 <=> x >= 0, without the rounding of the sigmoid near 0.5.
    return logits_BC, logits_BC >= 0


# ============================================================ auxiliary losses


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def expert_aux(config: MoRConfig, logits, kept) -> dict[str, jax.Array]:
    """{"router_bce", "router_z", "total"} of expert-choice routing.

    `logits` and `kept` hold per recursion [B, T] router logits and kept masks. Per recursion r the
    candidates are the tokens kept at r - 1 (all tokens at r = 1), as the reference code averages
    over its gathered candidates:
      router_bce = sum over r >= 2 of mean over candidates of BCE(logit_r, kept_r)
      router_z   = sum over r of mean over candidates of logit_r^2 (logsumexp of one logit)
      total      = router_aux * router_bce + router_z * router_z
    Recursion 1 has no BCE term: it keeps every token, and decoding does not route there, so the
    loss would only push gate 1 towards alpha without teaching any decision.
    """
    bce, z = jnp.float32(0.0), jnp.float32(0.0)
    candidate_BT = jnp.ones(logits[0].shape, bool)
    for r, (logits_BT, kept_BT) in enumerate(zip(logits, kept), start=1):
        if r > 1:
            # BCE with logits: softplus(x) - x * y, stable for large |x|.
            loss_BT = jax.nn.softplus(logits_BT) - logits_BT * kept_BT.astype(jnp.float32)
            bce = bce + _masked_mean(loss_BT, candidate_BT)
        z = z + _masked_mean(jnp.square(logits_BT), candidate_BT)
        candidate_BT = kept_BT
    total = config.router_aux * bce + config.router_z * z
    return {"router_bce": bce, "router_z": z, "total": total}


def token_aux(
    config: MoRConfig, logits_BTR: jax.Array, depth_BT: jax.Array
) -> dict[str, jax.Array]:
    """{"balance", "router_z", "total"} of token-choice routing (Switch Transformer's loss).

    balance = sum_i f_i * P_i with f_i = R * (fraction of tokens of depth i) and P_i the mean
    probability of depth i: 1 when the routing is uniform, up to R when every token picks one depth.
    router_z = mean of logsumexp(logits)^2. total = balance * balance + router_z * router_z
    (coefficients from the config).
    """
    r = config.num_loops
    probs_BTR = jax.nn.softmax(logits_BTR, axis=-1)
    share_R = jnp.mean(jax.nn.one_hot(depth_BT - 1, r, dtype=jnp.float32), axis=(0, 1))
    balance = jnp.sum(r * share_R * jnp.mean(probs_BTR, axis=(0, 1)))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_BTR, axis=-1)))
    total = config.balance * balance + config.router_z * z
    return {"balance": balance, "router_z": z, "total": total}
