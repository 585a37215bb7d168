"""Full-model decoding, one token per step: greedy and temperature / top-k sampling.

Also the shared single-exit loop that static exit (`static.py`) reuses with fewer layers.

Example:
    result = greedy_decode(config, params, inputs_BS, max_decode_len=32)
    result.tokens      # [B, 32], 0 after EOS
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from free_jax.decoding import confidence as conf_lib
from free_jax.decoding.state import (
    DecodeResult,
    SingleExitState,
    decode_setup,
    result_from_log,
    run_layers,
    start_fields,
)

# picks the next token [B] from the exit's logits [B, V] at a (traced) step
Picker = Callable[[jax.Array, jax.Array], jax.Array]


def argmax_picker(logits_BV: jax.Array, step: jax.Array) -> jax.Array:
    del step
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def sampling_picker(rng: jax.Array, temperature, top_k: int) -> Picker:
    """Samples from softmax(logits / temperature), restricted to the top_k logits when top_k > 0."""

    def pick(logits_BV, step):
        logits_BV = logits_BV / jnp.asarray(temperature, jnp.float32)
        if top_k > 0:
            kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
            logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
        key = jax.random.fold_in(rng, step)
        return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)

    return pick


def single_exit_decode(
    config,
    params,
    inputs_BS: jax.Array,
    *,
    max_decode_len: int,
    input_lengths_B=None,
    num_layers: int | None = None,
    picker: Picker = argmax_picker,
    measure: str = "softmax_margin",
    max_lengths_B=None,
    confidence_params=None,
) -> DecodeResult:
    """Every token leaves after the first `num_layers` decoder layers (default: all of them).

    Args:
      config, params: the model (any registered family).
      inputs_BS: [B, S] int32 encoder tokens, 0 is padding (T5), or right-padded prompts
        (decoder-only).
      max_decode_len: N, static.
      input_lengths_B: [B] prompt lengths (decoder-only; None: full rows).
      num_layers: static exit layer k in [1, L]; the cache holds only these k layers.
      picker: argmax (greedy) or a sampler.
      measure: confidence reported per token (see `confidence.py`).
      max_lengths_B: optional [B] per-example maximum lengths (<= N).
      confidence_params: `ConfidenceHead` parameters for measure "learned".
    Returns:
      `DecodeResult` with exit_layer = k for every produced token.
    """
    conf_lib.check_measure(measure)
    num_layers = config.num_decoder_layers if num_layers is None else num_layers
    if not 1 <= num_layers <= config.num_decoder_layers:
        raise ValueError(f"exit layer {num_layers} outside [1, {config.num_decoder_layers}]")
    setup = decode_setup(
        config, params, inputs_BS, max_decode_len, max_lengths_B,
        input_lengths_B=input_lengths_B, num_layers=num_layers,
    )  # fmt: skip
    model, ctx, b, n, max_len_B = setup.model, setup.ctx, setup.batch, setup.length, setup.max_len_B
    state = SingleExitState(
        **start_fields(setup),
        step=jnp.zeros((), jnp.int32),
        cache=setup.cache,
        batch_layers=jnp.zeros((), jnp.int32),
        layers_B=jnp.zeros((b,), jnp.int32),
    )

    def cond(s: SingleExitState):
        return (s.step < n) & ~jnp.all(s.done_B)

    def body(s: SingleExitState) -> SingleExitState:
        active_B = ~s.done_B
        offset_B = ctx.base_B + s.step
        h0_B1D = model.embed(s.last_token_B[:, None], offset_B)
        hidden_B1D, prev_B1D, cache = run_layers(
            model, h0_B1D, 0, num_layers, cache=s.cache, ctx=ctx, offset_B=offset_B,
            need_prev=measure == "hidden_cosine",
        )  # fmt: skip
        logits_BV, conf_B = conf_lib.exit_confidence(
            model, measure, hidden_B1D[:, 0],
            None if prev_B1D is None else prev_B1D[:, 0], confidence_params, layer=num_layers,
        )  # fmt: skip
        token_B = picker(logits_BV, s.step)
        step_B = jnp.full((b,), s.step, jnp.int32)
        log = s.log.write(step_B, active_B, token_B, jnp.full((b,), num_layers), conf_B)
        done_B = s.done_B | (token_B == config.eos_token_id) | (s.step + 1 >= max_len_B)
        return SingleExitState(
            step=s.step + 1,
            last_token_B=token_B,
            cache=cache,
            log=log,
            done_B=done_B,
            batch_layers=s.batch_layers + num_layers,
            layers_B=s.layers_B + num_layers * active_B.astype(jnp.int32),
        )

    final = jax.lax.while_loop(cond, body, state)
    deep = num_layers == config.num_decoder_layers
    return result_from_log(
        final.log,
        num_deep_passes=final.log.lengths() if deep else jnp.zeros((b,), jnp.int32),
        layers_computed=final.layers_B,
        batch_layers_computed=final.batch_layers,
        num_steps=final.step,
    )


def greedy_decode(config, params, inputs_BS, *, max_decode_len: int, **kw):
    """Full-model greedy decoding; see `single_exit_decode` for the options."""
    return single_exit_decode(config, params, inputs_BS, max_decode_len=max_decode_len, **kw)


def sample_decode(
    config,
    params,
    inputs_BS,
    *,
    max_decode_len: int,
    rng: jax.Array,
    temperature=1.0,
    top_k: int = 0,
    **kw,
) -> DecodeResult:
    """Full-model temperature / top-k sampling (`top_k` static, `temperature` may be traced).

    top_k=1 is greedy decoding whatever the temperature.
    """
    return single_exit_decode(
        config, params, inputs_BS, max_decode_len=max_decode_len,
        picker=sampling_picker(rng, temperature, top_k), **kw,
    )  # fmt: skip
