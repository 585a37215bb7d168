"""Tiny decoder-only models and slow-but-obvious references for the decoder-only decoding tests.

Random weights (numpy draws, no compile) of the tiny presets, edited like `decode_testlib`'s T5 so
that early exiting happens the way it does in trained models: the deep layers' residual branches
are scaled down (the deep exit mostly agrees with the shallow one) and the head is scaled up
(confidences spread over (0, 1)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.models import param_shapes
from free_jax.models.lm import DecoderLM
from free_jax.models.lm_config import lm_preset

FAMILIES = ("tiny-llama", "tiny-neox", "tiny-gpt2")
N = 8


@functools.lru_cache
def config(name: str):
    return lm_preset(name, shallow_exit_layer=1)


@functools.lru_cache
def params(name: str, seed: int = 0, deep_scale: float = 0.3, head_scale: float = 4.0):
    c = config(name)
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        key = jax.tree_util.keystr(path)
        if "scale" in key:
            return np.ones(shape.shape, np.float32)
        if "bias" in key:
            return rng.normal(0.0, 0.02, size=shape.shape).astype(np.float32)
        std = shape.shape[0] ** -0.5 if "kernel" in key else 1.0
        return rng.normal(0.0, std, size=shape.shape).astype(np.float32)

    p = jax.tree_util.tree_map_with_path(draw, param_shapes(c))
    for i in range(c.shallow_layer, c.num_decoder_layers):
        layer = p["decoder"][f"layers_{i}"]
        layer["attention"]["out"]["kernel"] *= deep_scale
        layer["mlp"]["wo"]["kernel"] *= deep_scale
    if c.tie_word_embeddings:
        p["token_embedder"]["embedding"] *= head_scale
    else:
        p["decoder"]["logits_dense"]["kernel"] *= head_scale
    return jax.tree_util.tree_map(jnp.asarray, p)


def prompts(name: str, seed: int = 0):
    """Right-padded prompts [3, 6] (padding holds arbitrary ids) and their lengths [6, 2, 4]."""
    c = config(name)
    rng = np.random.default_rng(50 + seed)
    tokens = rng.integers(2, c.vocab_size, size=(3, 6)).astype(np.int32)
    return tokens, np.array([6, 2, 4], np.int32)


@functools.lru_cache
def _forward(name: str):
    c = config(name)
    return jax.jit(
        lambda p, t: DecoderLM(c).apply(
            {"params": p}, t, exit_layers=tuple(range(1, c.num_decoder_layers))
        )
    )


def naive_greedy(name: str, p, prompt: np.ndarray, *, exit_layer: int | None = None, n: int = N):
    """Greedy by re-running the teacher-forced model on prompt + output every step (one example).

    The sequence is padded to one fixed width (a causal model's logits at a position do not depend
    on what follows it), so the forward pass compiles once.
    """
    c = config(name)
    seq = list(np.asarray(prompt))
    width = len(seq) + n
    out = []
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(seq)] = seq
        res = _forward(name)(p, jnp.asarray(padded))
        logits = res.logits if exit_layer is None else res.exit_logits[exit_layer]
        token = int(jnp.argmax(logits[0, len(seq) - 1]))
        out.append(token)
        seq.append(token)
        if token == c.eos_token_id:
            break
    return out + [0] * (n - len(out))
