"""T5 building blocks: RMS norm, dense kernels in t5x layout, multi-head attention, MLP, layers.

Parameter names follow t5x (`attention/query/kernel` stored as a 2-D [D, H*K] matrix), so T5X
checkpoints map one to one and Hugging Face tensors map with a transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from free_jax.models import attention as attn
from free_jax.models.cache import CrossKV, LayerCache, write_layer
from free_jax.models.config import T5Config


def _normal(stddev: float):
    return nn.initializers.normal(stddev=stddev)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

    epsilon: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.initializers.ones, (x_BTD.shape[-1],), self.param_dtype)
        x32 = x_BTD.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * scale_D.astype(jnp.float32)).astype(self.dtype)


class Dense(nn.Module):
    """x @ kernel with a 2-D kernel [in, out], no bias (T5 has none)."""

    features: int
    stddev: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", _normal(self.stddev), (x.shape[-1], self.features), self.param_dtype
        )
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class MultiHeadAttention(nn.Module):
    """Projections of one attention block; the keys/values it attends over are passed in."""

    config: T5Config

    def setup(self):
        c = self.config
        inner = c.num_heads * c.d_kv
        dense = lambda n, s: Dense(n, s, c.compute_dtype, c.weights_dtype)
        # Hugging Face's T5 initialisation (the published recipe).
        self.query = dense(inner, (c.d_model * c.d_kv) ** -0.5)
        self.key = dense(inner, c.d_model**-0.5)
        self.value = dense(inner, c.d_model**-0.5)
        self.out = dense(c.d_model, inner**-0.5)

    def _heads(self, x_BTF: jax.Array) -> jax.Array:
        b, t, _ = x_BTF.shape
        return x_BTF.reshape(b, t, self.config.num_heads, self.config.d_kv).transpose(0, 2, 1, 3)

    def project_kv(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, H, T, K] of (already normalised) inputs."""
        return self._heads(self.key(x_BTD)), self._heads(self.value(x_BTD))

    def __call__(self, x_BQD, key_BHTK, value_BHTK, bias_BHQT, mask_B1QT) -> jax.Array:
        query_BHQK = self._heads(self.query(x_BQD))
        out_BHQK = attn.attend(query_BHQK, key_BHTK, value_BHTK, bias_BHQT, mask_B1QT)
        b, _, q, _ = out_BHQK.shape
        return self.out(out_BHQK.transpose(0, 2, 1, 3).reshape(b, q, -1))


class MLP(nn.Module):
    """ReLU MLP (T5 v1.0) or gated variant (v1.1: gelu(wi_0 x) * wi_1 x)."""

    config: T5Config

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        dense = lambda n, s, name: Dense(n, s, c.compute_dtype, c.weights_dtype, name=name)
        act = {
            "relu": nn.relu,
            "gelu": lambda x: nn.gelu(x, approximate=True),  # HF's "gelu_new"
            "silu": nn.silu,
        }[c.activation]
        if c.is_gated:
            h = act(dense(c.d_ff, c.d_model**-0.5, "wi_0")(x_BTD))
            h = h * dense(c.d_ff, c.d_model**-0.5, "wi_1")(x_BTD)
        else:
            h = act(dense(c.d_ff, c.d_model**-0.5, "wi")(x_BTD))
        h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
        return dense(c.d_model, c.d_ff**-0.5, "wo")(h)


def _norm(c: T5Config, name: str) -> RMSNorm:
    return RMSNorm(c.layer_norm_epsilon, c.compute_dtype, c.weights_dtype, name=name)


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x_BSD, bias_BHSS, mask_B1SS, deterministic: bool):
        c = self.config
        drop = nn.Dropout(c.dropout_rate)
        h = _norm(c, "pre_attention_layer_norm")(x_BSD)
        attention = MultiHeadAttention(c, name="attention")
        k, v = attention.project_kv(h)
        x_BSD = x_BSD + drop(attention(h, k, v, bias_BHSS, mask_B1SS), deterministic=deterministic)
        h = _norm(c, "pre_mlp_layer_norm")(x_BSD)
        return x_BSD + drop(MLP(c, name="mlp")(h, deterministic), deterministic=deterministic)


class DecoderLayer(nn.Module):
    """Self-attention (over a cache or the chunk itself), cross-attention, MLP."""

    config: T5Config

    def setup(self):
        c = self.config
        self.pre_self_attention_layer_norm = _norm(c, "pre_self_attention_layer_norm")
        self.self_attention = MultiHeadAttention(c)
        self.pre_cross_attention_layer_norm = _norm(c, "pre_cross_attention_layer_norm")
        self.encoder_decoder_attention = MultiHeadAttention(c)
        self.pre_mlp_layer_norm = _norm(c, "pre_mlp_layer_norm")
        self.mlp = MLP(c)
        self.dropout = nn.Dropout(c.dropout_rate)

    def self_kv(self, x_BCD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This layer's self-attention keys/values [B, H, C, K] for inputs x (CALM copies these)."""
        return self.self_attention.project_kv(self.pre_self_attention_layer_norm(x_BCD))

    def cross_kv(self, encoded_BSD: jax.Array) -> CrossKV:
        k, v = self.encoder_decoder_attention.project_kv(encoded_BSD)
        return CrossKV(key_BHSK=k, value_BHSK=v)

    def __call__(
        self,
        x_BCD: jax.Array,
        *,
        cache: LayerCache | None,
        offset_B: jax.Array | None,
        self_bias_BHCT: jax.Array,
        self_mask_B1CT: jax.Array,
        cross: CrossKV,
        cross_mask_B1CS: jax.Array,
        deterministic: bool = True,
    ) -> tuple[jax.Array, LayerCache | None]:
        drop = lambda y: self.dropout(y, deterministic=deterministic)
        h = self.pre_self_attention_layer_norm(x_BCD)
        k, v = self.self_attention.project_kv(h)
        if cache is not None:
            cache = write_layer(cache, k, v, offset_B)
            k, v = cache.key_BHTK, cache.value_BHTK
        x_BCD = x_BCD + drop(self.self_attention(h, k, v, self_bias_BHCT, self_mask_B1CT))
        h = self.pre_cross_attention_layer_norm(x_BCD)
        x_BCD = x_BCD + drop(
            self.encoder_decoder_attention(
                h, cross.key_BHSK, cross.value_BHSK, None, cross_mask_B1CS
            )
        )
        h = self.pre_mlp_layer_norm(x_BCD)
        return x_BCD + drop(self.mlp(h, deterministic)), cache
