"""Explicit key/value caches: pytrees passed into the decoder and returned updated.

Self-attention caches are written a chunk of C positions at a time at a per-example offset:
C=1 is ordinary incremental decoding, C>1 is FREE's synchronized parallel pass over stacked tokens.

Worked example (B=2, T=6, C=2): offsets [0, 3] write chunk rows into positions
  example 0: [x x . . . .]      example 1: [. . . x x .]
Positions that were never written hold zeros; causal masking keeps them from being read.

A write should fit (`offset + C <= T`); rows past the end are dropped, so callers that must keep
whole chunks near the end allocate `T` with a slack of C.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from free_jax.models.config import T5Config


@struct.dataclass
class LayerCache:
    """Self-attention keys and values of one decoder layer.

    Attributes:
      key_BHTK: [B, H, T, K] keys of positions 0..T-1.
      value_BHTK: [B, H, T, K] values.
    """

    key_BHTK: jax.Array
    value_BHTK: jax.Array


@struct.dataclass
class CrossKV:
    """Cross-attention keys and values of one decoder layer, computed once per input.

    Attributes:
      key_BHSK: [B, H, S, K].
      value_BHSK: [B, H, S, K].
    """

    key_BHSK: jax.Array
    value_BHSK: jax.Array


@struct.dataclass
class DecoderCache:
    """Every decoder layer's self-attention cache.

    Attributes:
      layers: a tuple of L `LayerCache`s, one per decoder layer.
    """

    layers: tuple[LayerCache, ...]

    @property
    def max_length(self) -> int:
        return self.layers[0].key_BHTK.shape[2]

    def replace_layers(self, start: int, new_layers: tuple[LayerCache, ...]) -> DecoderCache:
        layers = list(self.layers)
        layers[start : start + len(new_layers)] = new_layers
        return DecoderCache(layers=tuple(layers))


def init_cache(config: T5Config, batch_size: int, max_length: int, dtype=None) -> DecoderCache:
    """Zero caches for `batch_size` sequences of up to `max_length` decoder positions."""
    dtype = dtype or config.compute_dtype
    shape = (batch_size, config.num_heads, max_length, config.d_kv)
    return DecoderCache(
        layers=tuple(
            LayerCache(key_BHTK=jnp.zeros(shape, dtype), value_BHTK=jnp.zeros(shape, dtype))
            for _ in range(config.num_decoder_layers)
        )
    )


def write_chunk(cache_BHTK: jax.Array, chunk_BHCK: jax.Array, offset_B: jax.Array) -> jax.Array:
    """Writes `chunk_BHCK` into positions [offset_b, offset_b + C) of each example's cache.

    >>> cache = jnp.zeros((2, 1, 4, 1)); chunk = jnp.ones((2, 1, 2, 1))
    >>> write_chunk(cache, chunk, jnp.array([0, 2]))[:, 0, :, 0]
    Array([[1., 1., 0., 0.],
           [0., 0., 1., 1.]], dtype=float32)

    Written as one elementwise select over the cache rather than a per-example
    `dynamic_update_slice`: vmapped with per-example offsets the latter lowers to a scatter that
    XLA:CPU surrounds with several full copies of the cache per layer and step, which cost more
    than the layer itself on small models. The select updates the cache buffer in place. Rows that
    would land past the end are dropped (never shifted).
    """
    chunk_BHCK = chunk_BHCK.astype(cache_BHTK.dtype)
    c, t = chunk_BHCK.shape[2], cache_BHTK.shape[2]
    row_BT = jnp.arange(t, dtype=jnp.int32)[None, :] - offset_B.astype(jnp.int32)[:, None]
    hit_BT = (row_BT >= 0) & (row_BT < c)
    if c == 1:
        rows_BHTK = chunk_BHCK  # broadcasts over T
    else:
        idx_B1T1 = jnp.clip(row_BT, 0, c - 1)[:, None, :, None]
        rows_BHTK = jnp.take_along_axis(chunk_BHCK, idx_B1T1, axis=2)
    return jnp.where(hit_BT[:, None, :, None], rows_BHTK, cache_BHTK)


def write_layer(
    layer: LayerCache, key_BHCK: jax.Array, value_BHCK: jax.Array, offset_B: jax.Array
) -> LayerCache:
    return LayerCache(
        key_BHTK=write_chunk(layer.key_BHTK, key_BHCK, offset_B),
        value_BHTK=write_chunk(layer.value_BHTK, value_BHCK, offset_B),
    )


def select_layer(keep_B: jax.Array, new: LayerCache, old: LayerCache) -> LayerCache:
    """Per example, the new cache where `keep_B` is true and the old one elsewhere."""
    pick = lambda a, b: jnp.where(keep_B[:, None, None, None], a, b)
    return LayerCache(
        key_BHTK=pick(new.key_BHTK, old.key_BHTK), value_BHTK=pick(new.value_BHTK, old.value_BHTK)
    )
