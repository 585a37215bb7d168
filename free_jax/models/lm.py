"""Decoder-only language models (Llama / SmolLM / Llama-3, GPT-NeoX / Pythia, GPT-2) with exits.

Two ways in, as for T5:
* `DecoderLM.__call__`: teacher-forced logits of the whole model (training, scoring, parity),
  plus the logits of any requested exit layers.
* The decoding protocol (`free_jax.models.protocol`): `start` prefills a right-padded prompt into
  an explicit cache, then `embed` / `layers(start, end)` / `exit_logits` per step, all pure.

Every exit goes through the same final norm and LM head; a tied head is `normed @ embedding.T`
with no rescaling.

    >>> config = lm_preset("tiny-llama")
    >>> params = init_lm_params(config, jax.random.key(0))
    >>> model = DecoderLM(config).bind({"params": params})
    >>> out = model(jnp.ones((2, 5), jnp.int32), exit_layers=(1,))
    >>> out.logits.shape, out.exit_logits[1].shape
    ((2, 5, 160), (2, 5, 160))
    >>> context, cache = model.start(jnp.ones((2, 5), jnp.int32), jnp.array([5, 3]), extra_length=4)
    >>> context.base_B, cache.max_length, cache.layers[0].key_BHTK.shape
    (Array([4, 2], dtype=int32), 9, (2, 2, 9, 8))
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from free_jax.models import attention as attn
from free_jax.models.cache import DecoderCache, LayerCache
from free_jax.models.lm_config import LMConfig, lm_preset
from free_jax.models.lm_layers import INIT_STDDEV, DecoderBlock, dense, norm
from free_jax.models.protocol import DecodeContext, check_tokens, register_family

# Prompt positions prefilled per pass: bounds the [B, H, C, T] score block of a long prompt.
PREFILL_CHUNK = 256

__all__ = [
    "PREFILL_CHUNK",
    "DecoderLM",
    "prefill",
    "LMOutput",
    "init_lm_params",
    "lm_param_shapes",
    "lm_preset",
]


@struct.dataclass
class LMOutput:
    """Teacher-forced outputs.

    Attributes:
      logits: [B, T, V] float32 deep (top-layer) logits.
      exit_logits: {layer k: [B, T, V] float32} after layer k, through the same norm and head.
      hidden: per layer l = 1..L its output [B, T, D] before the final norm (empty unless
        `return_hidden=True`).
    """

    logits: jax.Array
    exit_logits: dict[int, jax.Array]
    hidden: tuple[jax.Array, ...]


def _arange_BC(offset_B: jax.Array, length: int) -> jax.Array:
    """[B, C] positions offset_B[b] + c."""
    return offset_B.astype(jnp.int32)[:, None] + jnp.arange(length, dtype=jnp.int32)


class DecoderStack(nn.Module):
    """The layers, the shared final norm and (when untied) the LM head: `decoder/...` params."""

    config: LMConfig

    def setup(self):
        c = self.config
        self.layers = [DecoderBlock(c) for _ in range(c.num_layers)]
        self.final_norm = norm(c)
        if not c.tie_word_embeddings:
            self.logits_dense = dense(c, c.vocab_size, use_bias=False)

    def run(self, hidden_BCD, start, end, *, positions_BC, mask_B1CT, cache, offset_B, det):
        """Layers [start, end); returns (each layer's output, each layer's updated cache)."""
        outputs, new_cache = [], []
        for i in range(start, end):
            hidden_BCD, layer_cache = self.layers[i](
                hidden_BCD,
                positions_BC,
                mask_B1CT,
                None if cache is None else cache.layers[i],
                offset_B,
                det,
            )
            outputs.append(hidden_BCD)
            new_cache.append(layer_cache)
        return outputs, new_cache

    def head(self, normed_BTD: jax.Array) -> jax.Array:
        return self.logits_dense(normed_BTD)

    def layer_kv(self, hidden_BCD, layer: int, positions_BC):
        return self.layers[layer].kv(hidden_BCD, positions_BC)


class DecoderLM(nn.Module):
    """A decoder-only transformer with early exits; see the module docstring."""

    config: LMConfig

    def setup(self):
        c = self.config
        embed = lambda rows: nn.Embed(
            rows,
            c.d_model,
            embedding_init=nn.initializers.normal(INIT_STDDEV),
            dtype=c.compute_dtype,
            param_dtype=c.weights_dtype,
        )
        self.token_embedder = embed(c.vocab_size)
        if c.positions == "learned":
            self.position_embedder = embed(c.max_position_embeddings)
        self.decoder = DecoderStack(c)
        self.embed_dropout = nn.Dropout(c.dropout_rate)

    # ------------------------------------------------------------ whole model
    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        exit_layers: Sequence[int] = (),
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ) -> LMOutput:
        """Teacher-forced logits; logits[:, t] predict token t + 1.

        With `segment_ids_BT` (packed rows, 0 = padding) attention stays inside a segment and
        `positions_BT` should restart at 0 in each segment.
        """
        c = self.config
        exit_layers = tuple(exit_layers)
        for layer in exit_layers:
            c.check_exit_layer(layer)
        check_tokens(tokens_BT, c.vocab_size, "tokens")
        b, t = tokens_BT.shape
        index_BT = _arange_BC(jnp.zeros((b,), jnp.int32), t)
        positions_BT = index_BT if positions_BT is None else positions_BT
        mask_B1TT = attn.causal_mask(index_BT, index_BT)
        if segment_ids_BT is not None:
            mask_B1TT = mask_B1TT & attn.segment_mask(segment_ids_BT, segment_ids_BT)
        hidden_BTD = self._embed(tokens_BT, positions_BT, deterministic)
        outputs, _ = self.decoder.run(
            hidden_BTD, 0, c.num_layers, positions_BC=positions_BT, mask_B1CT=mask_B1TT,
            cache=None, offset_B=None, det=deterministic,
        )  # fmt: skip
        return LMOutput(
            logits=self.exit_logits(outputs[-1]),
            exit_logits={k: self.exit_logits(outputs[k - 1]) for k in exit_layers},
            hidden=tuple(outputs) if return_hidden else (),
        )

    def _embed(self, tokens_BC, positions_BC, deterministic: bool = True) -> jax.Array:
        hidden_BCD = self.token_embedder(tokens_BC)
        if self.config.positions == "learned":
            table = self.config.max_position_embeddings
            hidden_BCD = hidden_BCD + self.position_embedder(jnp.clip(positions_BC, 0, table - 1))
        return self.embed_dropout(hidden_BCD, deterministic=deterministic)

    # --------------------------------------------------------------- protocol
    def init_cache(self, batch: int, length: int) -> DecoderCache:
        """Zero caches [B, H, T, K] (H key/value heads) for every layer, in the compute dtype."""
        c = self.config
        shape = (batch, c.num_kv_heads, length, c.head_dim)
        zeros = lambda: jnp.zeros(shape, c.compute_dtype)
        return DecoderCache(
            layers=tuple(
                LayerCache(key_BHTK=zeros(), value_BHTK=zeros()) for _ in range(c.num_layers)
            )
        )

    def start(
        self,
        prompt_BS: jax.Array,
        lengths_B: jax.Array | None,
        *,
        extra_length: int,
        num_layers: int | None = None,
    ) -> tuple[DecodeContext, DecoderCache]:
        """Prefills right-padded prompts; the last prompt token becomes the first decoder input.

        Positions [0, S - 1) go through layers [0, num_layers or L) in chunks of PREFILL_CHUNK, for
        every row: an example's rows at or past its own last token hold garbage that decoding
        overwrites before any query reads them (a query at position p reads keys <= p, and p is
        written before it is read). Padding ids may be anything.

        Example (S = 4, lengths [4, 2]): prefill writes positions 0..2 of both rows; decoding
        starts at base [3, 1] from tokens [prompt[0, 3], prompt[1, 1]].
        """
        return prefill(self, self.config, prompt_BS, lengths_B, extra_length, num_layers)

    def embed(self, tokens_BC: jax.Array, offset_B: jax.Array) -> jax.Array:
        """Layer-0 inputs [B, C, D] of tokens at positions offset_B[b] + c."""
        return self._embed(tokens_BC, _arange_BC(offset_B, tokens_BC.shape[1]))

    def layers(
        self,
        hidden_BCD: jax.Array,
        *,
        start: int,
        end: int,
        cache: DecoderCache,
        context: DecodeContext | None = None,
        offset_B: jax.Array,
    ) -> tuple[jax.Array, DecoderCache]:
        """Runs layers [start, end) on a chunk; row c of example b sits at position offset_B[b] + c.

        Each layer writes the chunk's keys/values into its cache there, then every row attends to
        cache positions <= its own. `context` is unused (decoder-only models keep no memory).
        Returns (hidden after layer end-1 [B, C, D], cache with layers [start, end) updated).
        """
        del context
        if not 0 <= start < end <= self.config.num_layers:
            raise ValueError(
                f"layers: range [{start}, {end}) is not inside [0, {self.config.num_layers}]"
            )
        b, n, _ = hidden_BCD.shape
        positions_BC = _arange_BC(offset_B, n)
        keys_BT = _arange_BC(jnp.zeros((b,), jnp.int32), cache.max_length)
        outputs, new_layers = self.decoder.run(
            hidden_BCD, start, end, positions_BC=positions_BC,
            mask_B1CT=attn.causal_mask(positions_BC, keys_BT), cache=cache, offset_B=offset_B,
            det=True,
        )  # fmt: skip
        return outputs[-1], cache.replace_layers(start, tuple(new_layers))

    def final_norm(self, hidden_BTD: jax.Array) -> jax.Array:
        """The shared final norm (what the learned confidence head reads)."""
        return self.decoder.final_norm(hidden_BTD)

    def exit_logits(self, hidden_BTD: jax.Array, layer: int | None = None) -> jax.Array:
        """Float32 logits [B, T, V] of any exit: final norm, then the (tied or own) LM head (the
        same for every `layer`; a model with exit heads, `models/headed.py`, answers per layer)."""
        del layer
        normed_BTD = self.final_norm(hidden_BTD)
        if self.config.tie_word_embeddings:
            return self.token_embedder.attend(normed_BTD).astype(jnp.float32)
        return self.decoder.head(normed_BTD).astype(jnp.float32)

    def layer_kv(
        self, hidden_BCD: jax.Array, layer: int, offset_B: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Keys/values [B, H, C, K] layer `layer` would cache for `hidden_BCD` at offset_B + c."""
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer_kv: layer={layer} is outside [0, {self.config.num_layers})")
        positions_BC = _arange_BC(offset_B, hidden_BCD.shape[1])
        return self.decoder.layer_kv(hidden_BCD, layer, positions_BC)


def prefill(model, config, prompt_BS, lengths_B, extra_length: int, num_layers: int | None):
    """`DecoderLM.start` for any model with its `init_cache`, `embed` and `layers(start, end)`
    (the Mixture-of-Recursions model prefills the same way)."""
    c = config
    b, s = prompt_BS.shape
    depth = c.num_layers if num_layers is None else num_layers
    if not 0 <= depth <= c.num_layers:
        raise ValueError(f"start: num_layers={depth} is outside [0, {c.num_layers}]")
    if s < 1 or extra_length < 0:
        raise ValueError(
            f"start: needs a prompt length S >= 1 and extra_length >= 0, got {s}, {extra_length}"
        )
    if lengths_B is None:
        lengths_B = jnp.full((b,), s, jnp.int32)
    elif not isinstance(lengths_B, jax.core.Tracer):
        concrete = np.asarray(lengths_B)
        if concrete.shape != (b,) or concrete.min() < 1 or concrete.max() > s:
            raise ValueError(
                f"start: lengths_B must be [B={b}] ints in [1, S={s}], got {concrete.tolist()}"
            )
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    valid_BS = jnp.arange(s)[None, :] < lengths_B[:, None]
    if not isinstance(prompt_BS, jax.core.Tracer) and not isinstance(valid_BS, jax.core.Tracer):
        check_tokens(np.where(valid_BS, prompt_BS, 0), c.vocab_size, "prompt")
    # Padding may hold any int; an id outside the table would embed as NaN, and a NaN key or
    # value poisons every query (0 weight * NaN), so padding is embedded as token 0.
    prompt_BS = jnp.where(valid_BS, prompt_BS, 0)
    cache = model.init_cache(b, s + extra_length)
    for a in range(0, s - 1 if depth else 0, PREFILL_CHUNK):
        offset_B = jnp.full((b,), a, jnp.int32)
        hidden_BCD = model.embed(prompt_BS[:, a : min(a + PREFILL_CHUNK, s - 1)], offset_B)
        _, cache = model.layers(hidden_BCD, start=0, end=depth, cache=cache, offset_B=offset_B)
    last_B = lengths_B - 1
    first_B = jnp.take_along_axis(prompt_BS, last_B[:, None], axis=1)[:, 0]
    return DecodeContext(first_token_B=first_B.astype(jnp.int32), base_B=last_B), cache


def init_lm_params(config: LMConfig, rng: jax.Array, batch: int = 1, length: int = 4):
    """Random parameters for `config` (the tree under 'params')."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    # Jitted: eager initialisation dispatches (and compiles) every op one by one.
    return jax.jit(DecoderLM(config).init)(rng, tokens)["params"]


def lm_param_shapes(config: LMConfig):
    """Parameter shapes without allocating memory (`jax.eval_shape`)."""
    return jax.eval_shape(lambda r: init_lm_params(config, r), jax.random.key(0))


register_family(LMConfig, DecoderLM, init=init_lm_params)
