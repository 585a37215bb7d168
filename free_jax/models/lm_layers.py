"""Building blocks of the decoder-only LM: norms, biased dense kernels, grouped attention, MLP, layer.

Parameter names (which checkpoints, LoRA and the sharding rules match on):
`pre_attention_norm/{scale[,bias]}`, `attention/{query,key,value,out}/{kernel[,bias]}` with 2-D
kernels [in, out], `pre_mlp_norm/...`, `mlp/{wi_0,wi_1,wo}` (gated) or `mlp/{wi,wo}`.

Dimension keys: B batch, C chunk (query positions), T key positions, D width, H key/value heads,
G query heads per key/value head, N = H * G query heads (query head h * G + g reads key/value
head h, as Hugging Face's `repeat_kv` orders them), K head width, F MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from free_jax.models.attention import NEG_INF
from free_jax.models.cache import LayerCache, write_layer
from free_jax.models.lm_config import LMConfig
from free_jax.models.rotary import apply_rotary, inverse_frequencies

# transformers' initializer_range for all three families.
INIT_STDDEV = 0.02


class Norm(nn.Module):
    """RMS norm (scale only) or layer norm (scale and bias); statistics in float32."""

    kind: str
    epsilon: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        d = x_BTD.shape[-1]
        x32 = x_BTD.astype(jnp.float32)
        scale_D = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        if self.kind == "rms":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
            return (y * scale_D.astype(jnp.float32)).astype(self.dtype)
        bias_D = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(
            jnp.mean(centred * centred, axis=-1, keepdims=True) + self.epsilon
        )
        return (y * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(self.dtype)


class Dense(nn.Module):
    """x @ kernel (+ bias) with a 2-D kernel [in, out]."""

    features: int
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.normal(INIT_STDDEV),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def norm(c: LMConfig, name: str | None = None) -> Norm:
    return Norm(c.norm, c.norm_eps, c.compute_dtype, c.weights_dtype, name=name)


def dense(c: LMConfig, features: int, use_bias: bool, name: str | None = None) -> Dense:
    return Dense(features, use_bias, c.compute_dtype, c.weights_dtype, name=name)


def attend(query_BHGCK, key_BHTK, value_BHTK, mask_B1CT) -> jax.Array:
    """Grouped softmax attention, scores and softmax in float32; returns [B, H, G, C, K]."""
    scale = np.float32(query_BHGCK.shape[-1] ** -0.5)
    scores_BHGCT = jnp.einsum(
        "bhgck,bhtk->bhgct", query_BHGCK, key_BHTK, preferred_element_type=jnp.float32
    )
    scores_BHGCT = jnp.where(mask_B1CT[:, :, None], scores_BHGCT * scale, NEG_INF)
    weights = jax.nn.softmax(scores_BHGCT, axis=-1).astype(value_BHTK.dtype)
    return jnp.einsum("bhgct,bhtk->bhgck", weights, value_BHTK)


class Attention(nn.Module):
    """Causal self-attention with grouped key/value heads and rotary (or no) positions."""

    config: LMConfig

    def setup(self):
        c = self.config
        self.query = dense(c, c.num_heads * c.head_dim, c.attention_bias)
        self.key = dense(c, c.num_kv_heads * c.head_dim, c.attention_bias)
        self.value = dense(c, c.num_kv_heads * c.head_dim, c.attention_bias)
        self.out = dense(c, c.d_model, c.attention_bias)

    def _rotate(self, x_BHCK: jax.Array, positions_BC: jax.Array) -> jax.Array:
        c = self.config
        if c.positions != "rotary":
            return x_BHCK
        inv_freq = inverse_frequencies(c.rotary_ndims, c.rope_theta, c.rope_scaling)
        return apply_rotary(x_BHCK, positions_BC, inv_freq)

    def kv(self, x_BCD: jax.Array, positions_BC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys (rotated) and values [B, H, C, K] of normalised inputs: what the cache holds."""
        c = self.config
        b, n, _ = x_BCD.shape
        heads = lambda y: y.reshape(b, n, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        return self._rotate(heads(self.key(x_BCD)), positions_BC), heads(self.value(x_BCD))

    def __call__(
        self,
        x_BCD: jax.Array,
        positions_BC: jax.Array,
        mask_B1CT: jax.Array,
        cache: LayerCache | None,
        offset_B: jax.Array | None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Attends over the chunk itself (cache None) or over the cache after writing the chunk."""
        c = self.config
        b, n, _ = x_BCD.shape
        query_BNCK = self.query(x_BCD).reshape(b, n, c.num_heads, c.head_dim).transpose(0, 2, 1, 3)
        query_BNCK = self._rotate(query_BNCK, positions_BC)
        groups = c.num_heads // c.num_kv_heads
        query_BHGCK = query_BNCK.reshape(b, c.num_kv_heads, groups, n, c.head_dim)
        key_BHCK, value_BHCK = self.kv(x_BCD, positions_BC)
        if cache is not None:
            cache = write_layer(cache, key_BHCK, value_BHCK, offset_B)
            key_BHCK, value_BHCK = cache.key_BHTK, cache.value_BHTK
        out_BHGCK = attend(query_BHGCK, key_BHCK, value_BHCK, mask_B1CT)
        out_BCF = out_BHGCK.transpose(0, 3, 1, 2, 4).reshape(b, n, c.num_heads * c.head_dim)
        return self.out(out_BCF), cache


_ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
}


class MLP(nn.Module):
    """act(x wi) wo, or the gated act(x wi_0) * (x wi_1) wo."""

    config: LMConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        c = self.config
        act = _ACTIVATIONS[c.activation]
        if c.gated_mlp:
            gate_BTF = act(dense(c, c.d_ff, c.mlp_bias, "wi_0")(x_BTD))
            h_BTF = gate_BTF * dense(c, c.d_ff, c.mlp_bias, "wi_1")(x_BTD)
        else:
            h_BTF = act(dense(c, c.d_ff, c.mlp_bias, "wi")(x_BTD))
        return dense(c, c.d_model, c.mlp_bias, "wo")(h_BTF)


class DecoderBlock(nn.Module):
    """One pre-norm layer: sequential (x + attn, then + mlp) or NeoX's parallel residual."""

    config: LMConfig

    def setup(self):
        c = self.config
        self.pre_attention_norm = norm(c)
        self.attention = Attention(c)
        self.pre_mlp_norm = norm(c)
        self.mlp = MLP(c)
        self.dropout = nn.Dropout(c.dropout_rate)

    def kv(self, x_BCD: jax.Array, positions_BC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The keys/values [B, H, C, K] this layer caches for inputs `x_BCD` (CALM copies these)."""
        return self.attention.kv(self.pre_attention_norm(x_BCD), positions_BC)

    def __call__(
        self,
        x_BCD: jax.Array,
        positions_BC: jax.Array,
        mask_B1CT: jax.Array,
        cache: LayerCache | None = None,
        offset_B: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, LayerCache | None]:
        drop = lambda y: self.dropout(y, deterministic=deterministic)
        attn_BCD, cache = self.attention(
            self.pre_attention_norm(x_BCD), positions_BC, mask_B1CT, cache, offset_B
        )
        if self.config.parallel_residual:
            return x_BCD + drop(attn_BCD) + drop(self.mlp(self.pre_mlp_norm(x_BCD))), cache
        x_BCD = x_BCD + drop(attn_BCD)
        return x_BCD + drop(self.mlp(self.pre_mlp_norm(x_BCD))), cache
