"""A trained decoder-only model becomes a recursive one: which layers tie, how the shared blocks start,
and the truncated-SVD relaxation (Relaxed Recursive Transformers, Bae et al., ICLR 2025).

    >>> from free_jax.models.recursive import TINY
    >>> c = RecursiveConfig(**TINY, num_layers=6, num_loops=3)
    >>> tie_groups(c)                          # block k -> the layers that run it
    ((0, 2, 4), (1, 3, 5))
    >>> init_sources(c, "stepwise"), init_sources(c, "lower")
    (((0,), (5,)), ((0,), (1,)))
    >>> init_sources(c, "average")
    ((0, 2, 4), (1, 3, 5))
    >>> m = RecursiveConfig(**TINY, num_layers=8, num_loops=3, sharing="middle_cycle")
    >>> init_sources(m, "stepwise")            # first and last unique; middle at fixed intervals
    ((0,), (1,), (6,), (7,))

Initialisations of block k (a block's layers keep their own vectors only under relaxation):
  "stepwise"  layers at fixed intervals of the looped span, its first and last kept;
  "average"   the mean of the layers tied to block k;
  "lower"     the first K layers of the looped span;
  "random"    a fresh random init (the baseline every other init should beat).

Relaxation at rank r: layer l's update of a kernel is the rank-r truncated SVD of W_l - W_block,
split as A = U sqrt(S), B = sqrt(S) V^T; its vector deltas are v_l - v_block exactly.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from free_jax.models.lm_config import LMConfig
from free_jax.models.recursive import RecursiveConfig, init_recursive_params

INITS = ("stepwise", "average", "lower", "random")

__all__ = ["INITS", "init_sources", "tie_groups", "to_recursive"]


def tie_groups(config: RecursiveConfig) -> tuple[tuple[int, ...], ...]:
    """Per block k, the effective layers (0-based) that run it."""
    groups: list[list[int]] = [[] for _ in range(config.num_blocks)]
    for layer in range(config.num_layers):
        groups[config.block_of(layer)].append(layer)
    return tuple(tuple(g) for g in groups)


def _spread(first: int, last: int, count: int) -> list[int]:
    """`count` layers from [first, last] at fixed intervals, both ends kept (count 1: first)."""
    if count == 1:
        return [first]
    return [int(round(first + i * (last - first) / (count - 1))) for i in range(count)]


def init_sources(config: RecursiveConfig, init: str) -> tuple[tuple[int, ...], ...]:
    """Per block k, the original layers whose weights (averaged) initialise it."""
    if init not in INITS or init == "random":
        raise ValueError(f"init={init!r}: expected one of {INITS[:-1]} (random has no sources)")
    if init == "average":
        return tie_groups(config)
    L, width = config.num_layers, config.loop_width
    middle = config.sharing == "middle_cycle"
    first, last = (1, L - 2) if middle else (0, L - 1)
    if init == "stepwise":
        picks = _spread(first, last, width)
    else:  # lower
        picks = list(range(first, first + width))
    if middle:
        picks = [0, *picks, L - 1]
    return tuple((p,) for p in picks)


def to_recursive(
    lm_config: LMConfig,
    lm_params,
    *,
    sharing: str = "cycle",
    num_loops: int,
    init: str = "stepwise",
    lora_rank: int = 0,
    rng: jax.Array | None = None,
) -> tuple[RecursiveConfig, dict]:
    """(config, params) of the recursive version of a trained vanilla model.

    Args:
      lm_config, lm_params: the trained model (`DecoderLM` parameters).
      sharing, num_loops, lora_rank: see `RecursiveConfig`.
      init: how the shared blocks start (`INITS`).
      rng: for "random" (blocks and adapters) and the adapters of a random relaxation.
    """
    if type(lm_config) is not LMConfig:
        raise TypeError(f"to_recursive converts an LMConfig model, got {type(lm_config).__name__}")
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {INITS}")
    fields = {f: getattr(lm_config, f) for f in lm_config.__dataclass_fields__}
    fields["shallow_exit_layer"] = None  # the loop boundaries decide the exits now
    config = RecursiveConfig(**fields, sharing=sharing, num_loops=num_loops, lora_rank=lora_rank)
    rng = jax.random.key(0) if rng is None else rng
    if init == "random":
        return config, init_recursive_params(config, rng)
    decoder = lm_params["decoder"]
    layer_tree = lambda i: traverse_util.flatten_dict(decoder[f"layers_{i}"])
    blocks = []
    for sources in init_sources(config, init):
        trees = [layer_tree(i) for i in sources]
        blocks.append(
            {
                p: np.mean([np.asarray(t[p], np.float32) for t in trees], axis=0).astype(
                    np.asarray(trees[0][p]).dtype
                )
                for p in trees[0]
            }  # fmt: skip
        )
    new_decoder = {k: v for k, v in decoder.items() if not k.startswith("layers_")}
    for k, block in enumerate(blocks):
        new_decoder[f"blocks_{k}"] = traverse_util.unflatten_dict(block)
    params = {**lm_params, "decoder": new_decoder}
    if lora_rank:
        params["relax"] = _svd_relaxation(config, decoder, blocks)
    return config, jax.tree.map(np.asarray, params)


def _svd_relaxation(config: RecursiveConfig, decoder, blocks) -> dict:
    """Per layer: rank-r SVD of each kernel's residual to its block, exact vector deltas."""
    r = config.lora_rank
    out: dict = {}
    for path in blocks[0]:
        per_layer = []
        for layer in range(config.num_layers):
            own = traverse_util.flatten_dict(decoder[f"layers_{layer}"])[path]
            own = np.asarray(own, np.float32)
            shared = np.asarray(blocks[config.block_of(layer)][path], np.float32)
            per_layer.append(own - shared)
        dtype = np.asarray(blocks[0][path]).dtype
        if path[-1] != "kernel":
            out[path] = np.stack(per_layer).astype(dtype)
            continue
        a_list, b_list = [], []
        for residual in per_layer:
            u, s, vt = np.linalg.svd(residual, full_matrices=False)
            k = min(r, s.size)
            root = np.sqrt(s[:k])
            a = np.zeros((residual.shape[0], r), np.float32)
            b = np.zeros((r, residual.shape[1]), np.float32)
            a[:, :k] = u[:, :k] * root
            b[:k] = root[:, None] * vt[:k]
            a_list.append(a)
            b_list.append(b)
        out[path] = {
            "lora_a": np.stack(a_list).astype(dtype),
            "lora_b": np.stack(b_list).astype(dtype),
        }
    return traverse_util.unflatten_dict(out)
