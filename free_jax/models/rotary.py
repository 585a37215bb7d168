"""Rotary position embeddings (RoPE) in the rotate-half convention of Hugging Face's Llama and NeoX.

Only the first `R = int(K * rotary_pct)` dims of each query/key head rotate (NeoX's partial
rotary); dim i < R/2 pairs with dim i + R/2 at frequency `inv_freq[i]`:

    x'[i]       = x[i] cos(p w_i) - x[i + R/2] sin(p w_i)
    x'[i + R/2] = x[i + R/2] cos(p w_i) + x[i] sin(p w_i)

The inverse frequencies are a config constant computed in numpy float32 with the same operations
as transformers, so both sides rotate by the same angles.

    >>> inverse_frequencies(4, 10000.0)
    array([1.  , 0.01], dtype=float32)
    >>> x_BHCK = jnp.ones((1, 1, 1, 4))
    >>> apply_rotary(x_BHCK, jnp.zeros((1, 1), jnp.int32), inverse_frequencies(4, 1e4))[0, 0, 0]
    Array([1., 1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LLAMA3_KEYS = ("factor", "high_freq_factor", "low_freq_factor", "original_max_position_embeddings")


def normalise_llama3_scaling(value: Any) -> tuple[tuple[str, float], ...] | None:
    """Llama-3 scaling as a sorted, hashable tuple of (key, value) pairs; None stays None.

    Accepts a dict (with an optional `rope_type: "llama3"`) or (key, value) pairs (JSON's lists).

    >>> normalise_llama3_scaling({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
    ...     "high_freq_factor": 4, "original_max_position_embeddings": 8192})
    (('factor', 8.0), ('high_freq_factor', 4.0), ('low_freq_factor', 1.0), ('original_max_position_embeddings', 8192))
    """
    if value is None:
        return None
    items = dict(value)
    kind = items.pop("rope_type", items.pop("type", "llama3"))
    if kind != "llama3":
        raise ValueError(
            f"LMConfig.rope_scaling: rope_type {kind!r} is not supported (only 'llama3')"
        )
    missing = [k for k in LLAMA3_KEYS if k not in items]
    extra = sorted(set(items) - set(LLAMA3_KEYS))
    if missing or extra:
        raise ValueError(
            f"LMConfig.rope_scaling needs exactly {list(LLAMA3_KEYS)}; missing {missing}, "
            f"unexpected {extra}"
        )
    out = {}
    for key in LLAMA3_KEYS:
        number = items[key]
        out[key] = int(number) if key == "original_max_position_embeddings" else float(number)
        if out[key] <= 0:
            raise ValueError(f"LMConfig.rope_scaling[{key!r}]={number!r} must be > 0")
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError("LMConfig.rope_scaling: high_freq_factor must exceed low_freq_factor")
    return tuple(out.items())


def inverse_frequencies(
    rotary_ndims: int, theta: float, scaling: tuple[tuple[str, float], ...] | None = None
) -> np.ndarray:
    """[R/2] float32 inverse frequencies, with Llama-3's scaling when given.

    Llama-3 keeps high frequencies (wavelength under original_length / high_freq_factor), divides
    low ones (wavelength over original_length / low_freq_factor) by `factor`, and interpolates
    smoothly in between.
    """
    exponent = np.arange(0, rotary_ndims, 2, dtype=np.int64).astype(np.float32) / np.float32(
        rotary_ndims
    )
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    s = dict(scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_length = s["original_max_position_embeddings"]
    wavelength = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelength > old_length / low, inv_freq / np.float32(factor), inv_freq)
    smooth = (old_length / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < old_length / high) & ~(wavelength > old_length / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """[-x2, x1] for x = [x1, x2] split in halves along the last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x_BHCK: jax.Array, positions_BC: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates the first 2 * len(inv_freq) dims of every head of `x_BHCK` by its position.

    Angles are computed in float32 and cos/sin cast to x's dtype (as transformers does).
    """
    rotary = 2 * inv_freq.shape[0]
    angles_BCR = positions_BC.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles_BCR = jnp.concatenate([angles_BCR, angles_BCR], axis=-1)
    cos_B1CR = jnp.cos(angles_BCR)[:, None].astype(x_BHCK.dtype)
    sin_B1CR = jnp.sin(angles_BCR)[:, None].astype(x_BHCK.dtype)
    x_rot, x_pass = x_BHCK[..., :rotary], x_BHCK[..., rotary:]
    x_rot = x_rot * cos_B1CR + rotate_half(x_rot) * sin_B1CR
    return jnp.concatenate([x_rot, x_pass], axis=-1) if x_pass.shape[-1] else x_rot
