"""Continuous depth-wise batching of a Mixture-of-Recursions model: R slots share each call of the
middle block, each slot at its own recursion, and a slot's token leaves when its router says stop.

The engine of `depthwise.py` (slots, a queue of requests, a request store [Q + 1, L, H, T, K] whose
last row is scratch, `refill`) with MoR's decisions in place of a confidence threshold. Each tick
runs one recursion for every slot:

1. slots starting a token (recursion 1): embed it and run the unique first layer;
2. the router of the slot's recursion r reads the hidden state entering r (expert-choice: gate
   g = alpha sigmoid(logit_r); token-choice: at r = 1 the router picks the depth d and gate g once);
3. the K' middle blocks, one call each over all slots (row i as effective layer
   1 + (r_i - 1) K' + j); expert-choice h <- h + g f(h), token-choice passes f(h) on and adds
   h^1 + g f(h^d) at its last recursion;
4. a slot stops after recursion r when r = N_r, or (expert-choice) when the router of r + 1 says
   no (logit_{r+1} < 0, i.e. sigmoid < 0.5), or (token-choice) when r = d: it runs the unique last
   layer and the head, emits the greedy token, and starts its next token (or request) next tick.

Routing reads only the token's own state, so the engine emits what step-by-step decoding of the
same model emits (`models/mor_cached.py`, the protocol every full-depth decoder uses);
`synchronized=True` is batched early exit without depth-wise batching (a stopped slot waits for
the batch), with the same tokens.

Keys/values follow the model's `kv`: "recursion" writes a token's keys/values only at the
recursions it ran and marks them in `active_QRT`, and queries at recursion r read only positions
marked for r; "share" writes recursion 1's and every later recursion reads them (writes nothing).

    result = routed_decode(config, params, prompts_QS, lengths_Q, DepthwiseSpec(slots=8))
    result.tokens_QN, result.exit_loop_QN (recursions run - 1), result.ticks
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from free_jax.decoding.depthwise import (
    DepthwiseResult,
    finish_tick,
    open_store,
    serve,
    store_block,
    with_scratch,
)
from free_jax.decoding.specs import DepthwiseSpec
from free_jax.models.mor import MoRConfig
from free_jax.models.mor_routers import expert_gate, token_route

__all__ = ["RoutedState", "routed_decode"]


@struct.dataclass
class RoutedState:
    """The engine's loop state (R slots, Q requests, L effective layers, N_r recursions, T cache
    positions, N new tokens per request, D width).

    Attributes:
      request_R: [R] int32 request each slot serves; Q (the scratch row) when empty.
      position_R: [R] int32 cache position of the slot's current input token.
      token_R: [R] int32 the slot's current input token.
      loop_R: [R] int32 the recursion the slot runs next, 0-based (0 .. N_r - 1).
      hidden_RD: [R, D] the state entering that recursion (token-choice: the state passed on).
      first_RD: [R, D] token-choice: the state entering recursion 1 (h^1); unused otherwise.
      depth_R: [R] int32 token-choice: the token's chosen depth (1 .. N_r); unused otherwise.
      gate_R: [R] float32 token-choice: the chosen depth's gate; unused otherwise.
      count_R: [R] int32 tokens emitted for the slot's request.
      waiting_R: [R] bool stopped and waiting for the batch (synchronized mode only).
      next_request: [] int32 the queue's next request.
      key_QLHTK, value_QLHTK: [Q + 1, L, H, T, K] the request store.
      active_QRT: [Q + 1, N_r, T] bool: the token at position t ran recursion r.
      tokens_QN: [Q + 1, N] int32 emitted tokens (pad after EOS).
      exit_loop_QN: [Q + 1, N] int32 recursions each token ran minus one (-1: not emitted).
      ticks: [] int32 recursion calls so far (each over all R slots).
      busy: [] int32 slot-recursions that advanced a token.
    """

    request_R: jax.Array
    position_R: jax.Array
    token_R: jax.Array
    loop_R: jax.Array
    hidden_RD: jax.Array
    first_RD: jax.Array
    depth_R: jax.Array
    gate_R: jax.Array
    count_R: jax.Array
    waiting_R: jax.Array
    next_request: jax.Array
    key_QLHTK: jax.Array
    value_QLHTK: jax.Array
    active_QRT: jax.Array
    tokens_QN: jax.Array
    exit_loop_QN: jax.Array
    ticks: jax.Array
    busy: jax.Array


def routed_decode(
    config: MoRConfig, params, prompts_QS, lengths_Q=None, spec: DepthwiseSpec | None = None
) -> DepthwiseResult:
    """Greedy decoding of Q right-padded prompts through R slots (see the module docstring).

    `spec.skipped_kv` and `spec.measure` do not apply (the routers decide the depth and every
    key/value a query reads exists) and must stay at their defaults.
    """
    if not isinstance(config, MoRConfig):
        raise TypeError(f"routed_decode needs a MoRConfig model, got {type(config).__name__}")
    spec = DepthwiseSpec() if spec is None else spec
    default = DepthwiseSpec()
    for name in ("skipped_kv", "measure"):
        if getattr(spec, name) != getattr(default, name):
            raise ValueError(
                f"DepthwiseSpec.{name}={getattr(spec, name)!r} does not apply to a "
                "Mixture-of-Recursions model (its routers choose each token's depth and its "
                f"keys/values follow MoRConfig.kv={config.kv!r}); leave it at "
                f"{getattr(default, name)!r}"
            )
    prompts_QS = jnp.asarray(prompts_QS, jnp.int32)
    q, s = prompts_QS.shape
    lengths_Q = jnp.full((q,), s, jnp.int32) if lengths_Q is None else jnp.asarray(lengths_Q)
    return _decode(config, spec, params, prompts_QS, lengths_Q.astype(jnp.int32))


def _router_logits(config: MoRConfig, params, loop_R, hidden_RD):
    """Expert-choice logits [R] of each slot's recursion loop_R + 1 (clipped to N_r)."""
    routers = params["routers"]
    at_R = jnp.minimum(loop_R, config.num_loops - 1)
    theta_RD = routers["theta"][at_R].astype(jnp.float32)
    return jnp.sum(hidden_RD.astype(jnp.float32) * theta_RD, -1) + routers["bias"][at_R]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(config, spec, params, prompts_QS, lengths_Q) -> DepthwiseResult:
    c, slots = config, spec.slots
    model, cache, fill, store = open_store(c, params, prompts_QS, lengths_Q, spec)
    q = prompts_QS.shape[0]
    last_loop, last_layer, width = c.num_loops - 1, c.num_layers - 1, c.loop_width
    expert = c.router == "expert_choice"
    zeros_RD = jnp.zeros((slots, c.d_model), c.compute_dtype)
    state = RoutedState(
        **store, hidden_RD=zeros_RD, first_RD=zeros_RD,
        depth_R=jnp.ones((slots,), jnp.int32), gate_R=jnp.zeros((slots,), jnp.float32),
        active_QRT=with_scratch(jnp.stack(cache.active, axis=1)),
    )  # fmt: skip
    run = functools.partial(store_block, c, params)

    def tick(st: RoutedState) -> RoutedState:
        running_R = (st.request_R < q) & ~st.waiting_R
        starting_R = running_R & (st.loop_R == 0)
        # 1. A token's first tick: embed and the unique first layer.
        embedded_RD = model.embed(st.token_R[:, None], st.position_R)[:, 0]
        hidden_RD = jnp.where(starting_R[:, None], embedded_RD, st.hidden_RD)
        st, hidden_RD = run(st, 0, jnp.zeros_like(st.loop_R), starting_R, hidden_RD)
        # 2. The router of this recursion.
        if expert:
            gate_R = expert_gate(c, _router_logits(c, params, st.loop_R, hidden_RD))
            first_RD, depth_R = st.first_RD, st.depth_R
        else:
            _, chosen_R1, picked_R1 = token_route(c, params["routers"], hidden_RD[:, None])
            first_RD = jnp.where(starting_R[:, None], hidden_RD, st.first_RD)
            depth_R = jnp.where(starting_R, chosen_R1[:, 0], st.depth_R)
            gate_R = jnp.where(starting_R, picked_R1[:, 0], st.gate_R)
        # 3. The middle blocks at each slot's recursion.
        # A new token's position forgets every recursion first: a prompt's prefill ran past a
        # short prompt's end, and its routing there is not this token's.
        rows_R = jnp.where(starting_R, st.request_R, q)
        active_QRT = st.active_QRT.at[rows_R, :, st.position_R].set(False)
        rows_R = jnp.where(running_R, st.request_R, q)
        active_QRT = active_QRT.at[rows_R, st.loop_R, st.position_R].set(True)
        st = st.replace(active_QRT=active_QRT)
        x_RD = hidden_RD
        for j in range(width):
            layer_R = 1 + st.loop_R * width + j
            if c.kv == "recursion":
                st, x_RD = run(st, 1 + j, layer_R, running_R, x_RD,
                               keys_valid_RT=active_QRT[rows_R, st.loop_R])  # fmt: skip
            else:  # recursion 1 writes; later recursions read recursion 1's layer, write nothing
                st, x_RD = run(st, 1 + j, layer_R, running_R, x_RD,
                               read_R=jnp.full_like(layer_R, 1 + j), write_R=st.loop_R == 0)  # fmt: skip
        recursion_R = st.loop_R + 1
        if expert:
            hidden_RD = hidden_RD + gate_R[:, None].astype(x_RD.dtype) * x_RD
            go_on_R = _router_logits(c, params, recursion_R, hidden_RD) >= 0
            stop_R = running_R & ((st.loop_R == last_loop) | ~go_on_R)
        else:
            stop_R = running_R & (recursion_R >= depth_R)
            out_RD = first_RD + gate_R[:, None].astype(x_RD.dtype) * x_RD
            hidden_RD = jnp.where(stop_R[:, None], out_RD, x_RD)
        # 4. Stopping slots: the unique last layer, the head, the token.
        st, hidden_RD = run(st, c.num_blocks - 1, jnp.full_like(st.loop_R, last_layer), stop_R,
                            hidden_RD)  # fmt: skip
        token_R = jnp.argmax(model.exit_logits(hidden_RD[:, None])[:, 0], -1).astype(jnp.int32)
        st = st.replace(first_RD=first_RD, depth_R=depth_R, gate_R=gate_R)
        return finish_tick(spec, st, running_R, stop_R, token_R, hidden_RD, c.eos_token_id, fill)

    return serve(tick, state)
