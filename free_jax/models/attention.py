"""T5 attention pieces: relative position buckets, masks, and attention over explicit keys/values.

T5 attention has no 1/sqrt(K) scaling (it is folded into the initialisation) and a learned scalar
bias per (head, relative-position bucket), computed by the first layer and shared by all layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

NEG_INF = -1e10  # finite so fully masked rows (padding queries) give a uniform, not NaN, softmax


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of `key_position - query_position`.

    Half the buckets (all of them when causal) hold exact small distances; the rest grow
    logarithmically up to `max_distance`. In the causal decoder, keys after the query share bucket 0.

    >>> relative_position_bucket(jnp.array([-3, 0, 2]), False, 8, 20)
    Array([3, 0, 0], dtype=int32)
    """
    ret = jnp.zeros_like(relative_position, dtype=jnp.int32)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (relative_position > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(relative_position)
    else:
        n = jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # Same float32 op order as the reference implementations, so bucket edges agree exactly.
    scaled = (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    )
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return ret + jnp.where(is_small, n, large).astype(jnp.int32)


class RelativePositionBias(nn.Module):
    """Learned bias per head and bucket: `rel_embedding` [H, num_buckets] (t5x layout)."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_pos_BQ: jax.Array, key_pos_BK: jax.Array) -> jax.Array:
        """Returns bias_BHQK (float32) for the given absolute positions."""
        table_HN = self.param(
            "rel_embedding",
            nn.initializers.normal(stddev=1.0),
            (self.num_heads, self.num_buckets),
            self.param_dtype,
        )
        rel_BQK = key_pos_BK[:, None, :] - query_pos_BQ[:, :, None]
        bucket_BQK = relative_position_bucket(
            rel_BQK, self.bidirectional, self.num_buckets, self.max_distance
        )
        # A gather per bucket index; one-hot matmul would cost Q*K*N*H flops for no gain.
        bias_BQKH = jnp.take(table_HN.T.astype(jnp.float32), bucket_BQK, axis=0)
        return jnp.transpose(bias_BQKH, (0, 3, 1, 2))


def padding_mask(query_valid_BQ: jax.Array, key_valid_BK: jax.Array) -> jax.Array:
    """[B, 1, Q, K] true where a valid query may look at a valid key."""
    return (query_valid_BQ[:, :, None] & key_valid_BK[:, None, :])[:, None]


def causal_mask(query_pos_BQ: jax.Array, key_pos_BK: jax.Array) -> jax.Array:
    """[B, 1, Q, K] true where the key is not after the query."""
    return (key_pos_BK[:, None, :] <= query_pos_BQ[:, :, None])[:, None]


def segment_mask(query_seg_BQ: jax.Array, key_seg_BK: jax.Array) -> jax.Array:
    """[B, 1, Q, K] true within one packed segment (segment 0 is padding)."""
    same = query_seg_BQ[:, :, None] == key_seg_BK[:, None, :]
    return (same & (key_seg_BK[:, None, :] > 0))[:, None]


def attend(
    query_BHQK: jax.Array,
    key_BHTK: jax.Array,
    value_BHTK: jax.Array,
    bias_BHQT: jax.Array | None,
    mask_B1QT: jax.Array | None,
) -> jax.Array:
    """Softmax attention in float32; returns [B, H, Q, K] in the query dtype."""
    scores = jnp.einsum("bhqk,bhtk->bhqt", query_BHQK, key_BHTK, preferred_element_type=jnp.float32)
    if bias_BHQT is not None:
        scores = scores + bias_BHQT
    if mask_B1QT is not None:
        scores = jnp.where(mask_B1QT, scores, NEG_INF)
    weights = jax.nn.softmax(scores, axis=-1).astype(value_BHTK.dtype)
    return jnp.einsum("bhqt,bhtk->bhqk", weights, value_BHTK)
