"""Continuous depth-wise batching: R slots of a recursive model share each call of its looped blocks.

A recursive model (`free_jax.models.recursive`) runs the same K blocks in every loop, so tokens at
different loops can go through one block call, each row with its own layer's adapter and cache
layer. Each *tick* runs one loop over all R slots (the prologue/epilogue blocks of a
middle_cycle model run for every slot and count only for slots in the first/last loop). At the
end of its loop a slot may exit (confidence above the traced threshold, or its last loop): it takes
the head, emits a token and starts loop 0 of its next token. A finished request leaves its slot
to the next request of the queue at once, so no slot waits for a deeper neighbour or a longer
request. One `jax.lax.while_loop` with fixed shapes, compiled once per static spec.

`synchronized=True` runs the same ticks the way a batch of ordinary early exit runs: a slot that
exited waits until every slot of the batch has exited (the batch steps while any member needs the
next loop), and the batch is refilled only when all its requests are done. Both modes produce the
same tokens; only the tick counts differ.

Keys/values of the loops a token skipped (`DepthwiseSpec.skipped_kv`):
* "copy_state": computed from the exit hidden state by each skipped layer's own key/value maps
  (CALM's state copying). Exact for a token whose hidden state would not have changed in the
  skipped loops (saturation); for any other token an approximation, as in CALM.
* "share_loop0": copied from the loop-0 layer that runs the same block (recursive KV sharing); a
  unique last layer (middle_cycle) falls back to state copying. Exact for a model trained to read
  loop-0 keys/values at every loop (Mixture-of-Recursions' KV sharing); cheaper: no compute.
Neither matters when no token exits early (the never-exit threshold reproduces greedy decoding).

Each request's cache lives in one row of a request store [Q + 1, L, H, T, K], the last row a
scratch row that empty slots and masked writes go to, so a refill copies nothing.

    result = depthwise_decode(config, params, prompts_QS, lengths_Q,
                              DepthwiseSpec(slots=8, max_new_tokens=32), threshold=0.9)
    result.tokens_QN, result.exit_loop_QN, result.ticks
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from free_jax.decoding.confidence import exit_confidence, exits
from free_jax.decoding.specs import DepthwiseSpec
from free_jax.models.cache import LayerCache
from free_jax.models.mor import MoRConfig
from free_jax.models.protocol import bind
from free_jax.models.recursive import RecursiveConfig, rows_block, rows_layer_kv

__all__ = ["DepthwiseResult", "DepthwiseState", "depthwise_decode", "tick_plan"]


@struct.dataclass
class DepthwiseState:
    """The engine's loop state (R slots, Q requests, L layers, N new tokens per request).

    Attributes:
      request_R: [R] int32 request each slot serves; Q (the scratch row) when empty.
      position_R: [R] int32 cache position of the slot's current input token.
      token_R: [R] int32 the slot's current input token.
      loop_R: [R] int32 the loop the slot runs next (0 .. B-1).
      hidden_RD: [R, D] the slot's hidden state after its last loop.
      count_R: [R] int32 tokens emitted for the slot's request.
      waiting_R: [R] bool exited and waiting for the batch (synchronized mode only).
      next_request: [] int32 the queue's next request.
      key_QLHTK, value_QLHTK: [Q + 1, L, H, T, K] the request store.
      tokens_QN: [Q + 1, N] int32 emitted tokens (pad after EOS).
      exit_loop_QN: [Q + 1, N] int32 the loop each token exited at (-1: not emitted).
      ticks: [] int32 loop calls so far (each over all R slots).
      busy: [] int32 slot-loops that advanced a token (ticks x R minus idle and waiting slots).
    """

    request_R: jax.Array
    position_R: jax.Array
    token_R: jax.Array
    loop_R: jax.Array
    hidden_RD: jax.Array
    count_R: jax.Array
    waiting_R: jax.Array
    next_request: jax.Array
    key_QLHTK: jax.Array
    value_QLHTK: jax.Array
    tokens_QN: jax.Array
    exit_loop_QN: jax.Array
    ticks: jax.Array
    busy: jax.Array


@struct.dataclass
class DepthwiseResult:
    """What the engine returns.

    Attributes:
      tokens_QN: [Q, N] int32 each request's tokens, pad after its EOS.
      exit_loop_QN: [Q, N] int32 loop (0-based) each token exited at; -1 where none was emitted.
      ticks: [] int32 loop calls (block calls per tick: `len(tick_plan(config))`).
      busy: [] int32 slot-loops that advanced a token.
    """

    tokens_QN: jax.Array
    exit_loop_QN: jax.Array
    ticks: jax.Array
    busy: jax.Array

    def num_tokens(self) -> int:
        return int(np.sum(np.asarray(self.exit_loop_QN) >= 0))


def tick_plan(config: RecursiveConfig) -> tuple[tuple[int, str], ...]:
    """The block calls of one tick: (block, role), role "all" (every slot), "first" (only slots in
    loop 0) or "last" (only slots in the last loop).

    >>> from free_jax.models.recursive import TINY
    >>> tick_plan(RecursiveConfig(**TINY, num_layers=6, num_loops=3))
    ((0, 'all'), (1, 'all'))
    >>> tick_plan(RecursiveConfig(**TINY, num_layers=8, num_loops=3, sharing="middle_cycle"))
    ((0, 'first'), (1, 'all'), (2, 'all'), (3, 'last'))
    """
    if config.sharing == "cycle":
        return tuple((k, "all") for k in range(config.loop_width))
    middle = tuple((1 + k, "all") for k in range(config.loop_width))
    return ((0, "first"), *middle, (config.num_blocks - 1, "last"))


def _layer_R(config: RecursiveConfig, index: int, role: str, loop_R: jax.Array) -> jax.Array:
    """Effective layer of the tick's `index`-th block call for slots at loop_R."""
    if role == "first":
        return jnp.zeros_like(loop_R)
    if role == "last":
        return jnp.full_like(loop_R, config.num_layers - 1)
    first = config.unique_ends
    return first + loop_R * config.loop_width + (index - first)


def _skipped_source(config: RecursiveConfig, layer: int) -> int | None:
    """The loop-0 layer running `layer`'s block ("share_loop0"), or None (a unique last layer)."""
    if config.sharing == "middle_cycle" and layer == config.num_layers - 1:
        return None
    first = config.unique_ends
    return first + (layer - first) % config.loop_width


def depthwise_decode(
    config: RecursiveConfig,
    params,
    prompts_QS,
    lengths_Q=None,
    spec: DepthwiseSpec | None = None,
    *,
    threshold=2.0,
) -> DepthwiseResult:
    """Greedy decoding of Q right-padded prompts through R slots (see the module docstring).

    Args:
      config, params: a recursive model (`RecursiveConfig`); a Mixture-of-Recursions model
        (`MoRConfig`) goes to `mor_depthwise.routed_decode`, its routers in place of a threshold.
      prompts_QS: [Q, S] int prompts in queue order; lengths_Q: [Q] their lengths (None: S).
      spec: slots, new tokens per request, mode, skipped-loop keys/values, measure (None: the
        defaults, `DepthwiseSpec()`).
      threshold: exit when the loop-boundary confidence is above it (traced: a new value does
        not recompile); the default 2.0 never exits early.
    """
    if not isinstance(config, RecursiveConfig):
        raise TypeError(
            f"depthwise_decode needs a RecursiveConfig model, got {type(config).__name__}"
        )
    spec = DepthwiseSpec() if spec is None else spec
    if isinstance(config, MoRConfig):  # the routers decide: `mor_depthwise.py`
        if not (isinstance(threshold, float | int) and threshold == 2.0):
            raise ValueError(
                "depthwise_decode: a Mixture-of-Recursions model's routers choose each token's "
                f"depth; threshold={threshold!r} does not apply (leave it out)"
            )
        from free_jax.decoding.mor_depthwise import routed_decode  # imports this module

        return routed_decode(config, params, prompts_QS, lengths_Q, spec)
    if not isinstance(threshold, jax.core.Tracer):
        value = np.asarray(threshold, np.float32)
        if value.shape != () or np.isnan(value):
            raise ValueError(
                f"depthwise_decode: threshold must be a real scalar, got {threshold!r}"
            )
    prompts_QS = jnp.asarray(prompts_QS, jnp.int32)
    q, s = prompts_QS.shape
    lengths_Q = jnp.full((q,), s, jnp.int32) if lengths_Q is None else jnp.asarray(lengths_Q)
    return _decode(config, spec, params, prompts_QS, lengths_Q.astype(jnp.int32),
                   jnp.asarray(threshold, jnp.float32))  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(config, spec, params, prompts_QS, lengths_Q, threshold) -> DepthwiseResult:
    c = config
    model, _, fill, store = open_store(c, params, prompts_QS, lengths_Q, spec)
    q = prompts_QS.shape[0]
    plan = tick_plan(c)
    last_loop = c.num_loops - 1
    state = DepthwiseState(**store, hidden_RD=jnp.zeros((spec.slots, c.d_model), c.compute_dtype))

    def tick(st: DepthwiseState) -> DepthwiseState:
        running_R = (st.request_R < q) & ~st.waiting_R
        embedded_RD = model.embed(st.token_R[:, None], st.position_R)[:, 0]
        hidden_RD = jnp.where((st.loop_R == 0)[:, None], embedded_RD, st.hidden_RD)
        for index, (block, role) in enumerate(plan):
            layer_R = _layer_R(c, index, role, st.loop_R)
            applies_R = running_R
            if role == "first":
                applies_R = applies_R & (st.loop_R == 0)
            elif role == "last":
                applies_R = applies_R & (st.loop_R == last_loop)
            st, hidden_RD = store_block(c, params, st, block, layer_R, applies_R, hidden_RD)
        exit_layer = c.loop_exit_layers[0] if c.num_loops > 1 else c.num_layers
        logits_RV, conf_R = exit_confidence(model, spec.measure, hidden_RD, layer=exit_layer)
        final_R = st.loop_R == last_loop
        exit_R = running_R & (final_R | exits(conf_R, threshold))
        early_R = exit_R & ~final_R
        token_R = jnp.argmax(logits_RV, axis=-1).astype(jnp.int32)
        st = _fill_skipped(c, spec, params, st, early_R, hidden_RD)
        return finish_tick(spec, st, running_R, exit_R, token_R, hidden_RD, c.eos_token_id, fill)

    return serve(tick, state)


def with_scratch(x_Q_):
    """x with one zero row appended: the scratch request row (index Q)."""
    return jnp.concatenate([x_Q_, jnp.zeros_like(x_Q_[:1])], axis=0)


def open_store(config, params, prompts_QS, lengths_Q, spec: DepthwiseSpec):
    """What both engines (this one and `mor_depthwise`) start from: the bound model, its
    prefilled cache, `fill` (a slot's fields when it takes request r) and the fields their states
    share, with the first R requests in the slots (Q: empty)."""
    c, n, slots = config, spec.max_new_tokens, spec.slots
    q = prompts_QS.shape[0]
    model = bind(c, params)
    context, cache = model.start(prompts_QS, lengths_Q, extra_length=n)
    stack = lambda name: with_scratch(
        jnp.stack([getattr(lay, name) for lay in cache.layers], axis=1)
    )
    first_Q, base_Q = with_scratch(context.first_token_B), with_scratch(context.base_B)

    def fill(request_R):
        return dict(
            request_R=request_R, position_R=base_Q[request_R], token_R=first_Q[request_R],
            loop_R=jnp.zeros_like(request_R), count_R=jnp.zeros_like(request_R),
        )  # fmt: skip

    first = jnp.arange(slots, dtype=jnp.int32)
    store = dict(
        **fill(jnp.where(first < q, first, q)),
        waiting_R=jnp.zeros((slots,), bool),
        next_request=jnp.asarray(min(slots, q), jnp.int32),
        key_QLHTK=stack("key_BHTK"), value_QLHTK=stack("value_BHTK"),
        tokens_QN=jnp.full((q + 1, n), c.pad_token_id, jnp.int32),
        exit_loop_QN=jnp.full((q + 1, n), -1, jnp.int32),
        ticks=jnp.zeros((), jnp.int32), busy=jnp.zeros((), jnp.int32),
    )  # fmt: skip
    return model, cache, fill, store


def write_store(st, rows_R, layer_R, key_RHK, value_RHK):
    """Keys/values [R, H, K] into the request store at (row, layer, the slot's position)."""
    return st.replace(
        key_QLHTK=st.key_QLHTK.at[rows_R, layer_R, :, st.position_R].set(key_RHK),
        value_QLHTK=st.value_QLHTK.at[rows_R, layer_R, :, st.position_R].set(value_RHK),
    )


def store_block(config, params, st, block, layer_R, applies_R, hidden_RD, *, read_R=None,
                keys_valid_RT=None, write_R=None):  # fmt: skip
    """Block `block` on every slot (row i as effective layer layer_R[i], `rows_block`), reading
    the request store at layer read_R (default layer_R) and writing the slot's new keys/values at
    layer_R where it applies (and `write_R` allows; the others go to the scratch row). Returns
    (state, hidden [R, D] updated where the block applies)."""
    q = st.tokens_QN.shape[0] - 1
    rows_R = jnp.where(applies_R, st.request_R, q)
    read_R = layer_R if read_R is None else read_R
    gathered = LayerCache(st.key_QLHTK[rows_R, read_R], st.value_QLHTK[rows_R, read_R])
    new_RCD, new = rows_block(
        config, params, block, layer_R, hidden_RD[:, None], gathered, st.position_R,
        keys_valid_RT=keys_valid_RT, write_R=write_R,
    )  # fmt: skip
    at_R1111 = st.position_R[:, None, None, None]
    pick = lambda x_RHTK: jnp.take_along_axis(x_RHTK, at_R1111, axis=2)[:, :, 0]
    writes_R = applies_R if write_R is None else applies_R & write_R
    rows_R = jnp.where(writes_R, st.request_R, q)
    st = write_store(st, rows_R, layer_R, pick(new.key_BHTK), pick(new.value_BHTK))
    return st, jnp.where(applies_R[:, None], new_RCD[:, 0], hidden_RD)


def serve(tick, state) -> DepthwiseResult:
    """Ticks until every request is served (this engine's and `mor_depthwise`'s loop)."""
    q = state.tokens_QN.shape[0] - 1

    def cond(st):
        return jnp.any(st.request_R < q) | (st.next_request < q)

    final = jax.lax.while_loop(cond, tick, state)
    return DepthwiseResult(
        tokens_QN=final.tokens_QN[:q], exit_loop_QN=final.exit_loop_QN[:q], ticks=final.ticks,
        busy=final.busy,
    )  # fmt: skip


def finish_tick(spec: DepthwiseSpec, st, running_R, exit_R, token_R, hidden_RD, eos: int, fill):
    """The end of a tick (this engine's and `mor_depthwise`'s): exiting slots emit their token
    and start the next one at loop 0, the others advance a loop, then `refill`."""
    q, n = st.tokens_QN.shape[0] - 1, st.tokens_QN.shape[1]
    rows_R = jnp.where(exit_R, st.request_R, q)
    column_R = jnp.minimum(st.count_R, n - 1)
    st = st.replace(
        tokens_QN=st.tokens_QN.at[rows_R, column_R].set(token_R),
        exit_loop_QN=st.exit_loop_QN.at[rows_R, column_R].set(st.loop_R),
    )
    count_R = st.count_R + exit_R
    done_R = exit_R & ((token_R == eos) | (count_R >= n))
    going_R = running_R & ~exit_R
    st = st.replace(
        hidden_RD=hidden_RD,
        loop_R=jnp.where(exit_R, 0, jnp.where(going_R, st.loop_R + 1, st.loop_R)),
        token_R=jnp.where(exit_R, token_R, st.token_R),
        position_R=st.position_R + exit_R,
        count_R=count_R,
        ticks=st.ticks + 1,
        busy=st.busy + jnp.sum(running_R),
    )
    return refill(spec, st, exit_R, done_R, q, fill)


def refill(spec: DepthwiseSpec, st: DepthwiseState, exit_R, done_R, q: int, fill):
    """Waiting (synchronized mode) and the queue: who takes which request next."""
    request_R = jnp.where(done_R, q, st.request_R)
    if spec.synchronized:
        # A slot that exited waits until no slot of the batch is mid-token; a finished slot stays
        # empty until the whole batch is done, then the next R requests come in together.
        waiting_R = (st.waiting_R | exit_R) & (request_R < q)
        mid_token_R = (request_R < q) & ~waiting_R
        waiting_R = jnp.where(jnp.any(mid_token_R), waiting_R, False)
        empty = ~jnp.any(request_R < q)
        take_R = jnp.full_like(done_R, empty)
    else:
        waiting_R = st.waiting_R
        take_R = request_R >= q
    rank_R = jnp.cumsum(take_R) - 1
    new_R = st.next_request + rank_R
    new_R = jnp.where(take_R & (new_R < q), new_R, request_R).astype(jnp.int32)
    refilled_R = take_R & (new_R < q)
    fresh = fill(new_R)
    keep = lambda old, new: jnp.where(refilled_R, new, old)
    return st.replace(
        request_R=jnp.where(refilled_R, new_R, request_R),
        position_R=keep(st.position_R, fresh["position_R"]),
        token_R=keep(st.token_R, fresh["token_R"]),
        loop_R=keep(st.loop_R, fresh["loop_R"]),
        count_R=keep(st.count_R, fresh["count_R"]),
        waiting_R=waiting_R & ~refilled_R,
        next_request=jnp.minimum(st.next_request + jnp.sum(take_R), q).astype(jnp.int32),
    )


def _fill_skipped(c, spec, params, st, early_R, hidden_RD):
    """Keys/values at the exiting tokens' positions for the layers of the loops they skipped."""
    q = st.tokens_QN.shape[0] - 1
    layers = range(c.loop_exit_layers[0], c.num_layers) if c.num_loops > 1 else ()
    skipped = lambda layer: early_R & (jnp.asarray(c.loop_of(layer)) > st.loop_R)

    def fill(st):
        for layer in layers:
            rows_R = jnp.where(skipped(layer), st.request_R, q)
            layer_R = jnp.full_like(rows_R, layer)
            source = _skipped_source(c, layer) if spec.skipped_kv == "share_loop0" else None
            if source is None:
                key, value = rows_layer_kv(c, params, layer, hidden_RD[:, None], st.position_R)
                key_RHK, value_RHK = key[:, :, 0], value[:, :, 0]
            else:
                key_RHK = st.key_QLHTK[rows_R, source, :, st.position_R]
                value_RHK = st.value_QLHTK[rows_R, source, :, st.position_R]
            st = write_store(st, rows_R, layer_R, key_RHK, value_RHK)
        return st

    if not layers:
        return st
    return jax.lax.cond(jnp.any(early_R), fill, lambda st: st, st)
