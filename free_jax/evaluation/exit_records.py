"""Every exit's prediction at every position of given outputs, from one teacher-forced pass.

The outputs (e.g. the full model's greedy outputs on a calibration split, or any decoder's outputs
on the test split) are fed back as decoder inputs, and one pass through all L layers gives, at
each position, each exit's confidence and argmax and the final layer's argmax — exactly what the
model computes there when every earlier position went through every layer. Two uses:

* per-exit calibration records (`calibration.per_exit`): exit j agrees where its argmax equals
  the final layer's;
* the risk a guarantee is about, measured: the share of an output's tokens that left early and
  differ from the full model's prediction at that position (`early_disagreement`).

    recs = exit_records(config, params, batch.encoder_tokens_BS, outputs_BN,
                        exits=(2, 4), prompt_lengths_B=batch.prompt_lengths_B)
    recs.confidence_EBN, recs.token_EBN, recs.deep_BN
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from free_jax.decoding import confidence as conf_lib
from free_jax.decoding.state import decode_setup


@struct.dataclass
class ExitRecords:
    """Attributes:
    confidence_EBN: [m, B, N] float32 each exit's confidence at each position.
    token_EBN: [m, B, N] int32 each exit's argmax.
    deep_BN: [B, N] int32 the final layer's argmax.
    """

    confidence_EBN: jax.Array
    token_EBN: jax.Array
    deep_BN: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "exits", "measure"))
def _records(config, params, inputs_BS, outputs_BN, prompt_lengths_B, confidence_params, *,
             exits, measure):  # fmt: skip
    b, n = outputs_BN.shape
    setup = decode_setup(config, params, inputs_BS, n, input_lengths_B=prompt_lengths_B)
    model, ctx = setup.model, setup.ctx
    inputs_BN = jnp.concatenate([ctx.first_token_B[:, None], outputs_BN[:, :-1]], axis=1)
    hidden_BND = model.embed(inputs_BN, ctx.base_B)
    cache, start, conf, tokens = setup.cache, 0, [], []
    flat = lambda x: x.reshape(b * n, *x.shape[2:])
    for layer in (*exits, config.num_decoder_layers):
        hidden_BND, cache = model.layers(
            hidden_BND, start=start, end=layer, cache=cache, context=ctx, offset_B=ctx.base_B
        )
        start = layer
        if layer == config.num_decoder_layers:
            deep = jnp.argmax(model.exit_logits(hidden_BND), axis=-1).astype(jnp.int32)
            break
        logits, c = conf_lib.exit_confidence(
            model, measure, flat(hidden_BND), None, confidence_params, layer=layer
        )
        conf.append(c.reshape(b, n))
        tokens.append(jnp.argmax(logits, axis=-1).astype(jnp.int32).reshape(b, n))
    stack = lambda xs, dtype: jnp.stack(xs) if xs else jnp.zeros((0, b, n), dtype)
    return ExitRecords(stack(conf, jnp.float32), stack(tokens, jnp.int32), deep)


def exit_records(
    config, params, inputs_BS, outputs_BN, *, exits: tuple[int, ...] = (),
    measure: str = "softmax_margin", prompt_lengths_B=None, confidence_params=None,
) -> ExitRecords:  # fmt: skip
    """Teacher-forced exits over `outputs_BN` ([B, N] int32, the tokens after the decoder start or
    the prompt); `exits` may be empty (then only `deep_BN`). Any family; measure "hidden_cosine"
    is not supported (it needs the layer before each exit)."""
    conf_lib.check_measure(measure)
    if measure == "hidden_cosine":
        raise ValueError(
            "exit_records: measure 'hidden_cosine' is not supported; use a logit measure"
        )
    exits = tuple(int(e) for e in exits)
    if exits:
        from free_jax.decoding.free import check_exits

        check_exits(config, exits)
    lengths = None if prompt_lengths_B is None else jnp.asarray(prompt_lengths_B, jnp.int32)
    return _records(
        config, params, jnp.asarray(inputs_BS, jnp.int32), jnp.asarray(outputs_BN, jnp.int32),
        lengths, confidence_params, exits=exits, measure=measure,
    )  # fmt: skip


def padded(outputs: list[np.ndarray], batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length outputs as ([B, N] int32 zero-padded, [B, N] bool valid); rows past the
    outputs (padding examples) are empty."""
    out = np.zeros((batch, length), np.int32)
    valid = np.zeros((batch, length), bool)
    for i, toks in enumerate(outputs):
        k = min(len(toks), length)
        out[i, :k] = toks[:k]
        valid[i, :k] = True
    return out, valid


def early_disagreement(tokens_BN, exit_layer_BN, deep_BN, valid_BN, num_layers: int) -> tuple:
    """(tokens that left early and differ from the full model's prediction there, valid tokens):
    the numerator and denominator of the token-level risk Learn-then-Test bounds."""
    early = np.asarray(valid_BN) & (np.asarray(exit_layer_BN) < num_layers)
    bad = early & (np.asarray(tokens_BN) != np.asarray(deep_BN))
    return int(bad.sum()), int(np.asarray(valid_BN).sum())
