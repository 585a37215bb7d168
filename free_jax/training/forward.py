"""The teacher-forced pass of every model family: the one place training calls a model.

    out = forward(config, params, batch, exit_layers=(2,), normed_layers=(1, 2, 8),
                  hidden_layers=(3,))
    out.logits        [B, T, V] float32, the deep exit
    out.exit_logits   {2: [B, T, V]}
    out.normed        {1: [B, T, D], 2: ..., 8: ...}   layer outputs after the shared final norm
    out.hidden        {3: [B, T, D]}                   layer outputs before any norm (exit heads)

A T5 (`T5Config`) reads `encoder_input_tokens` [B, S] and `decoder_input_tokens` [B, T]; a
decoder-only model (`LMConfig`) reads `decoder_input_tokens` alone, prompt and target in one
sequence (`free_jax.data.lm_pipeline`). Packed rows' segment ids and positions are passed on when
the batch has them. Everything downstream (the FREE, CALM and CE losses, validation losses) sees
only these logits and normalised states, so it is the same for every family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import struct

from free_jax.models import T5, T5Config
from free_jax.models.lm import DecoderLM
from free_jax.models.lm_config import LMConfig
from free_jax.models.mor import MoRConfig, mor_forward
from free_jax.models.recursive import RecursiveConfig, RecursiveLM

ModelConfig = T5Config | LMConfig


@struct.dataclass
class Forward:
    """What one pass gives the losses.

    Attributes:
      logits: [B, T, V] float32 logits of the top layer L.
      exit_logits: {layer k: [B, T, V]} float32 of the requested intermediate exits.
      normed: {layer l: [B, T, D]} outputs of the requested layers (1-based) after the shared
        final norm (T5: and its dropout), which is what the LM head reads.
      hidden: {layer l: [B, T, D]} outputs of the requested layers before any norm, which is
        what a self-supervised exit head (`models.exit_heads`) reads.
      aux: the model's own auxiliary losses (float32 scalars; Mixture-of-Recursions' router
        losses, "total" weighted and ready to add to the loss); empty for other models.
    """

    logits: jax.Array
    exit_logits: dict[int, jax.Array]
    normed: dict[int, jax.Array]
    hidden: dict[int, jax.Array] = struct.field(default_factory=dict)
    aux: dict[str, jax.Array] = struct.field(default_factory=dict)


def intermediate_exits(config: ModelConfig) -> tuple[int, ...]:
    """Layers k < L whose exit logits `forward` can return: all of them, except for a
    Mixture-of-Recursions model, whose tokens leave at depths their routers choose."""
    if isinstance(config, MoRConfig):
        return ()
    return tuple(range(1, config.num_decoder_layers))


# t5x feature names -> keyword of the T5 call.
_T5_PACKING = {
    "encoder_segment_ids": "encoder_segment_ids_BS",
    "decoder_segment_ids": "decoder_segment_ids_BT",
    "encoder_positions": "encoder_positions_BS",
    "decoder_positions": "decoder_positions_BT",
}


def forward(
    config: ModelConfig,
    params,
    batch: Mapping[str, jax.Array],
    *,
    exit_layers: Sequence[int] = (),
    normed_layers: Sequence[int] = (),
    hidden_layers: Sequence[int] = (),
    rng: jax.Array | None = None,
    deterministic: bool = True,
) -> Forward:
    """Runs `config`'s model teacher-forced on `batch` (see the module docstring).

    Args:
      exit_layers: intermediate layers k (1 <= k < L) whose exit logits to return.
      normed_layers: layers l (1 <= l <= L) whose normalised outputs to return (FREE's KD).
      hidden_layers: layers l (1 <= l <= L) whose raw outputs to return (exit heads).
      rng: dropout key, used when `deterministic` is false.
    """
    exit_layers, normed_layers = tuple(exit_layers), tuple(normed_layers)
    hidden_layers = tuple(hidden_layers)
    want_hidden = bool(normed_layers or hidden_layers)
    rngs = {"dropout": rng} if rng is not None else {}
    if isinstance(config, T5Config):

        def run_t5(model: T5, enc_BS, dec_BT, kwargs):
            out = model(
                enc_BS, dec_BT, exit_layers=exit_layers, deterministic=deterministic,
                return_hidden=want_hidden, **kwargs,
            )  # fmt: skip
            normed = {
                i: model.decoder.final(out.decoder_hidden[i - 1], deterministic)
                for i in normed_layers
            }
            hidden = {i: out.decoder_hidden[i - 1] for i in hidden_layers}
            return Forward(out.logits, dict(out.exit_logits), normed, hidden)

        kwargs = {kw: batch[key] for key, kw in _T5_PACKING.items() if key in batch}
        return T5(config).apply(
            {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            kwargs, method=run_t5, rngs=rngs,
        )  # fmt: skip
    if isinstance(config, LMConfig):

        def run_lm(model: DecoderLM, tokens_BT, positions_BT, segment_ids_BT):
            out = model(
                tokens_BT, exit_layers=exit_layers, positions_BT=positions_BT,
                segment_ids_BT=segment_ids_BT, deterministic=deterministic,
                return_hidden=want_hidden,
            )  # fmt: skip
            normed = {i: model.final_norm(out.hidden[i - 1]) for i in normed_layers}
            hidden = {i: out.hidden[i - 1] for i in hidden_layers}
            return Forward(out.logits, dict(out.exit_logits), normed, hidden)

        tokens = batch["decoder_input_tokens"]
        if isinstance(config, MoRConfig):
            return _mor(config, params, batch, exit_layers + normed_layers + hidden_layers,
                        rng, deterministic)  # fmt: skip
        packing = (batch.get("decoder_positions"), batch.get("decoder_segment_ids"))
        if isinstance(config, RecursiveConfig):  # the vanilla pass on materialised weights
            return RecursiveLM(config).apply(params, tokens, *packing, method=run_lm, rngs=rngs)
        return DecoderLM(config).apply(
            {"params": params}, tokens, *packing, method=run_lm, rngs=rngs
        )
    raise TypeError(f"training supports T5Config and LMConfig models, got {type(config).__name__}")


def _mor(config: MoRConfig, params, batch, layers_asked, rng, deterministic) -> Forward:
    """A Mixture-of-Recursions model: training-time (top-k) routing, router losses in `aux`."""
    if layers_asked:
        raise ValueError(
            "a Mixture-of-Recursions model has no exits inside its routed stack (its routers "
            f"choose each token's depth), but the loss asked for layers {sorted(set(layers_asked))}"
            ": train it with LossConfig.kind='ce' (the router losses are added to it)"
        )
    if "decoder_segment_ids" in batch:
        raise ValueError(
            "a Mixture-of-Recursions model trains on unpacked rows (expert-choice top-k ranks the "
            "tokens of a row, which must be one sequence): set DataConfig.pack=False"
        )
    out = mor_forward(
        config, params, batch["decoder_input_tokens"], deterministic=deterministic, rng=rng,
        routing="topk",
    )  # fmt: skip
    return Forward(out.logits, {}, {}, {}, aux=dict(out.aux))
