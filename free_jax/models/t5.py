"""T5 encoder-decoder with early exits and an explicit KV cache.

Two ways in:
* `T5.__call__` — the whole model, teacher-forced (training, scoring, parity tests); returns the deep
  logits and, for any requested exit layers, the logits of those exits.
* The piecewise methods decoders compose, all pure (caches in, caches out):
  `encode` -> `precompute_cross` once per input; then per step `embed_decoder`,
  `decode_layers(start, end)` for any layer range [start, end), and `exit_logits`.

Every exit, shallow or deep, goes through the same final RMS norm and LM head (FREE's shallow-deep
module adds no parameters).

Example:
    model = T5(preset("tiny"))
    params = model.init(jax.random.key(0), enc_BS, dec_BT)["params"]
    out = model.apply({"params": params}, enc_BS, dec_BT, exit_layers=(1,))
    out.logits          # [B, T, V] deep
    out.exit_logits[1]  # [B, T, V] after decoder layer 1
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from free_jax.models import attention as attn
from free_jax.models.cache import CrossKV, DecoderCache, init_cache
from free_jax.models.config import T5Config
from free_jax.models.layers import DecoderLayer, Dense, EncoderLayer, RMSNorm
from free_jax.models.protocol import DecodeContext, check_tokens, register_family


@struct.dataclass
class EncoderMemory:
    """T5's `DecodeContext.memory`: what decoder layers read from the encoder.

    Attributes:
      cross: per decoder layer `CrossKV` [B, H, S, K].
      encoder_mask_BS: [B, S] bool, true on real (non-pad) encoder tokens.
    """

    cross: tuple[CrossKV, ...]
    encoder_mask_BS: jax.Array


@struct.dataclass
class T5Output:
    """Teacher-forced outputs.

    Attributes:
      logits: [B, T, V] float32 deep (top-layer) logits.
      exit_logits: {layer: [B, T, V]} for each requested exit layer.
      decoder_hidden: per decoder layer l = 1..L, its output [B, T, D] before the final norm
        (empty unless `return_hidden=True`; the FREE distillation loss reads these).
      encoded: [B, S, D] encoder output.
    """

    logits: jax.Array
    exit_logits: dict[int, jax.Array]
    decoder_hidden: tuple[jax.Array, ...]
    encoded: jax.Array


def _positions(length: int, batch: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


class Encoder(nn.Module):
    config: T5Config

    def setup(self):
        c = self.config
        self.relpos_bias = RelativeBias(c, bidirectional=True)
        self.layers = [EncoderLayer(c) for _ in range(c.num_encoder_layers)]
        self.encoder_norm = RMSNorm(c.layer_norm_epsilon, c.compute_dtype, c.weights_dtype)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x_BSD, valid_BS, segment_ids_BS, positions_BS, deterministic):
        mask = attn.padding_mask(valid_BS, valid_BS)
        if segment_ids_BS is not None:
            mask = mask & attn.segment_mask(segment_ids_BS, segment_ids_BS)
        bias = self.relpos_bias(positions_BS, positions_BS)
        x_BSD = self.dropout(x_BSD, deterministic=deterministic)
        for layer in self.layers:
            x_BSD = layer(x_BSD, bias, mask, deterministic)
        return self.dropout(self.encoder_norm(x_BSD), deterministic=deterministic)


def RelativeBias(c: T5Config, bidirectional: bool) -> attn.RelativePositionBias:
    return attn.RelativePositionBias(
        num_buckets=c.relative_attention_num_buckets,
        max_distance=c.relative_attention_max_distance,
        num_heads=c.num_heads,
        bidirectional=bidirectional,
        param_dtype=c.weights_dtype,
        name="relpos_bias",
    )


class Decoder(nn.Module):
    """Decoder layers, the shared final norm and (when untied) the LM head."""

    config: T5Config

    def setup(self):
        c = self.config
        self.relpos_bias = RelativeBias(c, bidirectional=False)
        self.layers = [DecoderLayer(c) for _ in range(c.num_decoder_layers)]
        self.decoder_norm = RMSNorm(c.layer_norm_epsilon, c.compute_dtype, c.weights_dtype)
        self.dropout = nn.Dropout(c.dropout_rate)
        if not c.tie_word_embeddings:
            self.logits_dense = Dense(
                c.vocab_size, c.d_model**-0.5, c.compute_dtype, c.weights_dtype
            )

    def position_bias(self, query_pos_BQ, key_pos_BK):
        return self.relpos_bias(query_pos_BQ, key_pos_BK)

    def final(self, hidden_BTD, deterministic: bool = True):
        return self.dropout(self.decoder_norm(hidden_BTD), deterministic=deterministic)

    def head(self, normed_BTD):
        return self.logits_dense(normed_BTD)

    def cross_kv(self, encoded_BSD) -> tuple[CrossKV, ...]:
        return tuple(layer.cross_kv(encoded_BSD) for layer in self.layers)

    def self_kv(self, hidden_BCD, layer: int):
        return self.layers[layer].self_kv(hidden_BCD)

    def run(self, hidden_BCD, start, end, *, cache, offset_B, bias, mask, cross, cross_mask, det):
        """Layers [start, end); returns (hidden after each of them, updated cache layers)."""
        outputs, new_cache = [], []
        for i in range(start, end):
            hidden_BCD, layer_cache = self.layers[i](
                hidden_BCD,
                cache=None if cache is None else cache.layers[i],
                offset_B=offset_B,
                self_bias_BHCT=bias,
                self_mask_B1CT=mask,
                cross=cross[i],
                cross_mask_B1CS=cross_mask,
                deterministic=det,
            )
            outputs.append(hidden_BCD)
            new_cache.append(layer_cache)
        return outputs, new_cache


class T5(nn.Module):
    """T5 v1.0 / v1.1 / FLAN-T5 / mT5 with early exits; see the module docstring."""

    config: T5Config

    def setup(self):
        c = self.config
        self.token_embedder = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=nn.initializers.normal(stddev=1.0),
            dtype=c.compute_dtype,
            param_dtype=c.weights_dtype,
        )
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.embed_dropout = nn.Dropout(c.dropout_rate)

    # ------------------------------------------------------------------ pieces
    def encode(
        self,
        encoder_tokens_BS: jax.Array,
        *,
        segment_ids_BS: jax.Array | None = None,
        positions_BS: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Encoder output [B, S, D]; token 0 is padding."""
        check_tokens(encoder_tokens_BS, self.config.vocab_size, "encoder_tokens")
        b, s = encoder_tokens_BS.shape
        valid_BS = encoder_tokens_BS != self.config.pad_token_id
        if segment_ids_BS is not None:
            valid_BS = segment_ids_BS > 0
        positions_BS = _positions(s, b) if positions_BS is None else positions_BS
        x_BSD = self.token_embedder(encoder_tokens_BS)
        return self.encoder(x_BSD, valid_BS, segment_ids_BS, positions_BS, deterministic)

    def precompute_cross(self, encoded_BSD: jax.Array) -> tuple[CrossKV, ...]:
        """Each decoder layer's cross-attention keys/values, computed once per input."""
        return self.decoder.cross_kv(encoded_BSD)

    def embed_decoder(self, tokens_BC: jax.Array, deterministic: bool = True) -> jax.Array:
        """Decoder input hidden states [B, C, D] (the input of layer 0)."""
        return self.embed_dropout(self.token_embedder(tokens_BC), deterministic=deterministic)

    def decode_layers(
        self,
        hidden_BCD: jax.Array,
        *,
        start: int,
        end: int,
        cache: DecoderCache,
        cross: Sequence[CrossKV],
        encoder_mask_BS: jax.Array,
        offset_B: jax.Array,
        query_valid_BC: jax.Array | None = None,
    ) -> tuple[jax.Array, DecoderCache]:
        """Runs decoder layers [start, end) on a chunk of C positions per example.

        Chunk row c of example b sits at position offset_B[b] + c. Its keys/values are written into
        `cache` there, and it attends causally to cache positions <= its own. Rows past an example's
        real tokens may hold anything: they are written (later overwritten) but never read by an
        earlier position.

        Args:
          hidden_BCD: the input of layer `start` for each chunk row.
          start, end: static layer range, 0 <= start < end <= L.
          cache: every layer's cache; only layers [start, end) are read and updated.
          cross: `precompute_cross` output.
          encoder_mask_BS: true on real encoder tokens.
          offset_B: int32 position of each example's first chunk row.
          query_valid_BC: optional; rows marked false get a uniform (harmless) attention.
        Returns:
          (hidden after layer end-1 [B, C, D], updated cache).
        """
        if not 0 <= start < end <= self.config.num_decoder_layers:
            raise ValueError(
                f"decode_layers range [{start}, {end}) is not inside [0, "
                f"{self.config.num_decoder_layers}]"
            )
        b, c, _ = hidden_BCD.shape
        query_pos_BC = offset_B.astype(jnp.int32)[:, None] + jnp.arange(c, dtype=jnp.int32)
        key_pos_BT = _positions(cache.max_length, b)
        bias = self.decoder.position_bias(query_pos_BC, key_pos_BT)
        mask = attn.causal_mask(query_pos_BC, key_pos_BT)
        if query_valid_BC is None:
            query_valid_BC = jnp.ones((b, c), bool)
        cross_mask = attn.padding_mask(query_valid_BC, encoder_mask_BS)
        outputs, new_layers = self.decoder.run(
            hidden_BCD, start, end, cache=cache, offset_B=offset_B, bias=bias, mask=mask,
            cross=cross, cross_mask=cross_mask, det=True,
        )  # fmt: skip
        return outputs[-1], cache.replace_layers(start, tuple(new_layers))

    def exit_logits(
        self, hidden_BTD: jax.Array, deterministic: bool = True, *, layer: int | None = None
    ) -> jax.Array:
        """Logits [B, T, V] (float32) of any exit: shared final norm, then the LM head (the same
        for every `layer`; a model with exit heads, `models/headed.py`, answers per layer)."""
        del layer
        normed = self.decoder.final(hidden_BTD, deterministic)
        if self.config.tie_word_embeddings:
            # T5 v1.0 rescales before the tied head (Mesh TensorFlow's convention).
            logits = self.token_embedder.attend(normed * (self.config.d_model**-0.5))
        else:
            logits = self.decoder.head(normed)
        return logits.astype(jnp.float32)

    def layer_self_kv(self, hidden_BCD: jax.Array, layer: int) -> tuple[jax.Array, jax.Array]:
        """Keys/values [B, H, C, K] layer `layer` would cache for inputs `hidden_BCD`.

        CALM's state copying fills skipped layers' caches with these, from the exited hidden state.
        """
        return self.decoder.self_kv(hidden_BCD, layer)

    # ------------------------------------------------- decoding protocol
    # (free_jax.models.protocol: what every decoder calls; T5's context is its encoder output)
    def start(
        self,
        inputs_BS: jax.Array,
        lengths_B: jax.Array | None = None,
        *,
        extra_length: int,
        num_layers: int | None = None,
    ) -> tuple[DecodeContext, DecoderCache]:
        """Encodes `inputs_BS` (0 is padding; `lengths_B` is not needed and ignored) and returns
        the context with empty caches of `extra_length` positions for the first `num_layers`
        decoder layers (default all)."""
        del lengths_B
        c = self.config
        b = inputs_BS.shape[0]
        memory = EncoderMemory(
            cross=self.precompute_cross(self.encode(inputs_BS)),
            encoder_mask_BS=inputs_BS != c.pad_token_id,
        )
        context = DecodeContext(
            first_token_B=jnp.full((b,), c.decoder_start_token_id, jnp.int32),
            base_B=jnp.zeros((b,), jnp.int32),
            memory=memory,
        )
        cache = self.init_cache(b, extra_length)
        if num_layers is not None:
            cache = DecoderCache(layers=cache.layers[:num_layers])
        return context, cache

    def init_cache(self, batch: int, length: int) -> DecoderCache:
        return init_cache(self.config, batch, length)

    def embed(self, tokens_BC: jax.Array, offset_B: jax.Array | None = None) -> jax.Array:
        """Decoder input embeddings (T5's positions enter through the attention bias)."""
        del offset_B
        return self.embed_decoder(tokens_BC)

    def layers(self, hidden_BCD, *, start, end, cache, context: DecodeContext, offset_B):
        """`decode_layers` reading the encoder memory from `context`."""
        return self.decode_layers(
            hidden_BCD, start=start, end=end, cache=cache, cross=context.memory.cross,
            encoder_mask_BS=context.memory.encoder_mask_BS, offset_B=offset_B,
        )  # fmt: skip

    def final_norm(self, hidden_BTD: jax.Array) -> jax.Array:
        return self.decoder.final(hidden_BTD)

    def layer_kv(self, hidden_BCD: jax.Array, layer: int, offset_B=None):
        del offset_B  # relative positions: T5's keys do not depend on where they sit
        return self.layer_self_kv(hidden_BCD, layer)

    # ------------------------------------------------------------ whole model
    def __call__(
        self,
        encoder_tokens_BS: jax.Array,
        decoder_tokens_BT: jax.Array,
        *,
        exit_layers: Sequence[int] = (),
        encoder_segment_ids_BS: jax.Array | None = None,
        decoder_segment_ids_BT: jax.Array | None = None,
        encoder_positions_BS: jax.Array | None = None,
        decoder_positions_BT: jax.Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ) -> T5Output:
        """Teacher-forced forward pass; `decoder_tokens_BT` are the decoder *inputs* (shifted right)."""
        c = self.config
        exit_layers = tuple(exit_layers)
        for layer in exit_layers:
            c.check_exit_layer(layer)
        check_tokens(decoder_tokens_BT, c.vocab_size, "decoder_tokens")
        encoded_BSD = self.encode(
            encoder_tokens_BS,
            segment_ids_BS=encoder_segment_ids_BS,
            positions_BS=encoder_positions_BS,
            deterministic=deterministic,
        )
        b, t = decoder_tokens_BT.shape
        if encoder_segment_ids_BS is not None:
            encoder_valid_BS = encoder_segment_ids_BS > 0
        else:
            encoder_valid_BS = encoder_tokens_BS != c.pad_token_id
        pos_BT = _positions(t, b) if decoder_positions_BT is None else decoder_positions_BT
        bias = self.decoder.position_bias(pos_BT, pos_BT)
        mask = attn.causal_mask(_positions(t, b), _positions(t, b))
        if decoder_segment_ids_BT is not None:
            mask = mask & attn.segment_mask(decoder_segment_ids_BT, decoder_segment_ids_BT)
            cross_mask = attn.segment_mask(decoder_segment_ids_BT, encoder_segment_ids_BS)
        else:
            cross_mask = attn.padding_mask(jnp.ones((b, t), bool), encoder_valid_BS)
        hidden_BTD = self.embed_decoder(decoder_tokens_BT, deterministic)
        outputs, _ = self.decoder.run(
            hidden_BTD, 0, c.num_decoder_layers, cache=None, offset_B=None, bias=bias, mask=mask,
            cross=self.decoder.cross_kv(encoded_BSD), cross_mask=cross_mask, det=deterministic,
        )  # fmt: skip
        return T5Output(
            logits=self.exit_logits(outputs[-1], deterministic),
            exit_logits={k: self.exit_logits(outputs[k - 1], deterministic) for k in exit_layers},
            decoder_hidden=tuple(outputs) if return_hidden else (),
            encoded=encoded_BSD,
        )


def init_params(config: T5Config, rng: jax.Array, batch: int = 1, length: int = 4):
    """Random parameters for `config` (a pytree under 'params')."""
    tokens = jnp.ones((batch, length), jnp.int32)
    return T5(config).init(rng, tokens, tokens)["params"]


register_family(T5Config, T5, init=init_params)


def param_shapes(config: T5Config):
    """Parameter shapes without allocating memory (`jax.eval_shape`)."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
