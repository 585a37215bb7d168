"""CALM (Schuster et al. 2022): a confidence check after every layer from a minimum exit layer.

Per token, layers run one at a time; after layer l (l >= min_exit_layer, l < L) an example whose
confidence is above the (optionally position-decayed) threshold leaves with that layer's token.
The layers it skipped still need key/values at this position for later tokens: CALM copies the
exited hidden state upwards ("state copying"), so skipped layer j caches the keys/values that
`layer_kv(h_exit, j, position)` gives.

In a batch every example exits on its own. Layer l runs (a `lax.cond`) while any example still
needs it; an example that already left keeps its exited hidden state as the input of every higher
layer, so the key/values those layers write for it *are* the copied state — one code path for the
computed and the copied state. Once every example has left, the remaining layers only project
key/values (no attention, no MLP), and their exit heads are skipped.

Example (L=4, min exit 1, B=2): example 0 exits after layer 1, example 1 after layer 3.
  layer 0: run (both)         layer 1: run (both), check: 0 leaves
  layer 2: run (1 needs it; 0 gets its copy)  check: stays     layer 3: run (1), check: 1 leaves
  layers computed: [1, 3]; batch layers computed: 3 (the batch waited, the examples did not).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from free_jax.decoding import confidence as conf_lib
from free_jax.decoding.state import (
    CalmState,
    DecodeResult,
    decode_setup,
    result_from_log,
    start_fields,
)
from free_jax.models.cache import write_layer


def calm_decode(
    config,
    params,
    inputs_BS: jax.Array,
    threshold,
    *,
    max_decode_len: int,
    input_lengths_B=None,
    min_exit_layer: int = 1,
    measure: str = "softmax_margin",
    position_temp=0.0,
    max_lengths_B=None,
    confidence_params=None,
    exits: tuple[int, ...] | None = None,
) -> DecodeResult:
    """CALM early-exit greedy decoding with state copying.

    Args:
      config, params: the model.
      inputs_BS: [B, S] int32 encoder tokens (T5) or right-padded prompts (decoder-only).
      threshold: traced scalar, or [m] one per tested exit; exit when confidence > threshold.
      max_decode_len: N, static.
      input_lengths_B: [B] prompt lengths (decoder-only).
      min_exit_layer: static; the first layer whose exit is tested (1 <= m < L).
      measure: confidence measure (see `confidence.py`).
      position_temp: traced; CALM's threshold decay over positions (0: none).
      max_lengths_B: optional [B] per-example maximum lengths.
      confidence_params: `ConfidenceHead` parameters for measure "learned".
      exits: static; test only after these layers (e.g. the layers with exit heads), each with
        its own threshold; None: every layer from `min_exit_layer`.
    Returns:
      `DecodeResult`; exit_layer per token in [min_exit_layer, L] (in `exits` or L).
    """
    conf_lib.check_measure(measure)
    config.check_exit_layer(min_exit_layer, what="CALM min_exit_layer")
    num_layers = config.num_decoder_layers
    if exits is None:
        exits = tuple(range(min_exit_layer, num_layers))
    else:
        from free_jax.decoding.free import check_exits

        exits = tuple(int(x) for x in exits)
        check_exits(config, exits)
        min_exit_layer = exits[0]
    threshold_E = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (len(exits),))
    setup = decode_setup(
        config, params, inputs_BS, max_decode_len, max_lengths_B, input_lengths_B=input_lengths_B
    )
    model, ctx, b, n, max_len_B = setup.model, setup.ctx, setup.batch, setup.length, setup.max_len_B
    state = CalmState(
        **start_fields(setup),
        step=jnp.zeros((), jnp.int32),
        cache=setup.cache,
        deep_B=jnp.zeros((b,), jnp.int32),
        layers_B=jnp.zeros((b,), jnp.int32),
        batch_layers=jnp.zeros((), jnp.int32),
    )

    def exit_head(hidden_B1D, prev_B1D, layer):
        logits_BV, conf_B = conf_lib.exit_confidence(
            model, measure, hidden_B1D[:, 0], prev_B1D[:, 0], confidence_params, layer=layer
        )
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), conf_B

    def no_head(*_):
        return jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32)

    def body(s: CalmState) -> CalmState:
        step_B = jnp.full((b,), s.step, jnp.int32)
        offset_B = ctx.base_B + s.step
        hidden_B1D = model.embed(s.last_token_B[:, None], offset_B)
        running_B = ~s.done_B
        token_B = jnp.zeros((b,), jnp.int32)
        conf_B = jnp.zeros((b,), jnp.float32)
        exit_layer_B = jnp.full((b,), num_layers, jnp.int32)
        cache = s.cache
        batch_layers = s.batch_layers
        for layer in range(num_layers):
            any_running = jnp.any(running_B)

            def compute(hidden_B1D, cache, layer=layer):
                return model.layers(
                    hidden_B1D, start=layer, end=layer + 1, cache=cache, context=ctx,
                    offset_B=offset_B,
                )  # fmt: skip

            def copy_only(hidden_B1D, cache, layer=layer):
                # Nobody needs this layer: only the copied key/values for later positions.
                key, value = model.layer_kv(hidden_B1D, layer, offset_B)
                new = write_layer(cache.layers[layer], key, value, offset_B)
                return hidden_B1D, cache.replace_layers(layer, (new,))

            new_B1D, cache = jax.lax.cond(any_running, compute, copy_only, hidden_B1D, cache)
            batch_layers = batch_layers + any_running.astype(jnp.int32)
            prev_B1D = hidden_B1D
            hidden_B1D = jnp.where(running_B[:, None, None], new_B1D, hidden_B1D)
            depth = layer + 1
            if depth < num_layers and depth not in exits:
                continue
            head = functools.partial(exit_head, layer=depth)
            tok_B, c_B = jax.lax.cond(any_running, head, no_head, hidden_B1D, prev_B1D)
            if depth < num_layers:
                threshold_B = conf_lib.decayed_threshold(
                    threshold_E[exits.index(depth)], step_B + 1, n, position_temp
                )
                leave_B = running_B & conf_lib.exits(c_B, threshold_B)
            else:
                leave_B = running_B  # the deep exit takes whoever is left
            token_B = jnp.where(leave_B, tok_B, token_B)
            conf_B = jnp.where(leave_B, c_B, conf_B)
            exit_layer_B = jnp.where(leave_B, depth, exit_layer_B)
            running_B = running_B & ~leave_B

        active_B = ~s.done_B
        active_i = active_B.astype(jnp.int32)
        log = s.log.write(step_B, active_B, token_B, exit_layer_B, conf_B)
        done_B = s.done_B | (token_B == config.eos_token_id) | (s.step + 1 >= max_len_B)
        return CalmState(
            step=s.step + 1,
            last_token_B=token_B,
            cache=cache,
            log=log,
            done_B=done_B,
            deep_B=s.deep_B + active_i * (exit_layer_B == num_layers),
            layers_B=s.layers_B + active_i * exit_layer_B,
            batch_layers=batch_layers,
        )

    final = jax.lax.while_loop(lambda s: (s.step < n) & ~jnp.all(s.done_B), body, state)
    return result_from_log(
        final.log,
        num_deep_passes=final.deep_B,
        layers_computed=final.layers_B,
        batch_layers_computed=final.batch_layers,
        num_steps=final.step,
    )
