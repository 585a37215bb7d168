"""Recursive decoder-only models: K unique blocks looped B times, optionally relaxed by per-layer LoRA.

Relaxed Recursive Transformers (Bae et al., ICLR 2025) turn a decoder of L layers into K shared
blocks run B times (L effective layers), so that tokens at different depths can share one block
call (`free_jax.decoding.depthwise`). Two sharing schemes (layer l = 0..L-1 uses block
`config.block_of(l)`):

* ``cycle``: K = L / B, layer l uses block l mod K; loop j is layers [jK, (j+1)K).
* ``middle_cycle``: the first and last layers keep their own blocks, the L - 2 middle layers cycle
  over K' = (L - 2) / B shared blocks (K = K' + 2); loop 0 is the first layer and the first K'
  middle layers, the last loop ends with the last layer.

    >>> c = RecursiveConfig(**TINY, num_layers=6, num_loops=3)
    >>> c.num_blocks, [c.block_of(l) for l in range(6)], c.loop_exit_layers
    (2, [0, 1, 0, 1, 0, 1], (2, 4))
    >>> m = RecursiveConfig(**TINY, num_layers=8, num_loops=3, sharing="middle_cycle")
    >>> m.num_blocks, [m.block_of(l) for l in range(8)], m.loop_exit_layers
    (4, [0, 1, 2, 1, 2, 1, 2, 3], (3, 5))

**Relaxation** (rank r > 0): every layer l adds its own low-rank update to each linear map of its
block, W_l = W_block + A_l @ B_l (A_l [in, r], B_l [r, out]), and its own full update to each
vector parameter (norm scales, biases), v_l = v_block + delta_l. At rank r >= min(in, out) of every
map the relaxed model can equal any L-layer model exactly; at rank 0 (no relaxation) it is the pure
recursive model, every parameter of a layer shared with the other layers of its block.

**Parameter counts**, with E the embeddings, final norm and LM head, and per block M matrix and v
vector parameters (`count_recursive_params`):

    vanilla (L layers):  E + L * (M + v)
    recursive:           E + K * (M + v)
    relaxed, rank r:     E + K * (M + v) + L * (r * sum over maps of (in + out) + v)

Parameters: the vanilla tree with `decoder/layers_l` replaced by `decoder/blocks_k`, plus (r > 0)
`relax`, which mirrors one block's tree with every leaf stacked over the L layers: a kernel
[in, out] becomes {"lora_a": [L, in, r], "lora_b": [L, r, out]}, a vector [n] a delta [L, n].

Teacher-forced passes and the decoding protocol run the vanilla `DecoderLM` on materialised
per-layer weights (`materialise`), so every decoder in `free_jax.decoding` works on a recursive
model and gradients reach the shared blocks and the adapters through the merge. The depth-wise
engine instead runs one block over rows at different layers (`rows_block`), adding each row's
adapter unmerged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from free_jax.models.cache import LayerCache
from free_jax.models.lm import DecoderLM, init_lm_params
from free_jax.models.lm_config import LMConfig
from free_jax.models.lm_layers import INIT_STDDEV, DecoderBlock, Dense
from free_jax.models.protocol import register_family

SHARING = ("cycle", "middle_cycle")

# A tiny Llama for doctests and tests.
TINY = dict(
    vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, max_position_embeddings=128,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip

__all__ = [
    "SHARING",
    "RecursiveConfig",
    "RecursiveLM",
    "count_recursive_params",
    "init_recursive_params",
    "materialise",
    "rows_block",
]


@dataclasses.dataclass(frozen=True)
class RecursiveConfig(LMConfig):
    """An `LMConfig` (L = `num_layers` effective layers) whose layers share K blocks.

    Attributes:
      sharing: "cycle" or "middle_cycle" (see the module docstring).
      num_loops: B, how many times the shared blocks run; B = 1 is the vanilla model.
      lora_rank: r of the per-layer relaxation; 0 is the pure recursive model.
      (every `LMConfig` field, as for the vanilla model; FREE's default S is the first loop's end.)
    """

    sharing: str = "cycle"
    num_loops: int = 1
    lora_rank: int = 0

    def __post_init__(self):
        super().__post_init__()
        fail = lambda why: (_ for _ in ()).throw(ValueError(f"RecursiveConfig: {why}"))
        if self.sharing not in SHARING:
            fail(f"sharing={self.sharing!r} is not one of {SHARING}")
        if not isinstance(self.num_loops, int) or self.num_loops < 1:
            fail(f"num_loops={self.num_loops!r} must be an integer >= 1")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            fail(f"lora_rank={self.lora_rank!r} must be an integer >= 0")
        looped = self.num_layers - 2 * self.unique_ends
        if looped < self.num_loops or looped % self.num_loops:
            fail(
                f"sharing={self.sharing!r} loops {looped} of num_layers={self.num_layers} layers; "
                f"that must be a positive multiple of num_loops={self.num_loops}"
            )

    # ------------------------------------------------------------------ layout
    @property
    def base(self) -> LMConfig:
        """The vanilla config with the same L layers (what `materialise` feeds)."""
        names = {f.name for f in dataclasses.fields(LMConfig)}
        return LMConfig(**{n: getattr(self, n) for n in names})

    @property
    def unique_ends(self) -> int:
        """Unique layers at each end of the stack (1 for middle_cycle, 0 for cycle): the first
        looped layer's index, and what the layer arithmetic below offsets by."""
        return 1 if self.sharing == "middle_cycle" else 0

    @property
    def loop_width(self) -> int:
        """K' layers of one loop through the shared blocks (K for cycle, K - 2 for middle_cycle)."""
        return (self.num_layers - 2 * self.unique_ends) // self.num_loops

    @property
    def num_blocks(self) -> int:
        """K unique blocks."""
        return self.loop_width + 2 * self.unique_ends

    def block_of(self, layer: int) -> int:
        """The block layer `layer` (0-based) runs."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} is outside [0, {self.num_layers})")
        if self.sharing == "cycle":
            return layer % self.loop_width
        if layer == 0:
            return 0
        if layer == self.num_layers - 1:
            return self.num_blocks - 1
        return 1 + (layer - 1) % self.loop_width

    def loop_of(self, layer: int) -> int:
        """The loop j (0-based) that layer `layer` belongs to."""
        return min(max(layer - self.unique_ends, 0) // self.loop_width, self.num_loops - 1)

    @property
    def loop_exit_layers(self) -> tuple[int, ...]:
        """1-based layer counts at the end of loops 0..B-2: where loop-boundary exits sit."""
        return tuple(
            self.unique_ends + (j + 1) * self.loop_width for j in range(self.num_loops - 1)
        )

    @property
    def shallow_layer(self) -> int:
        if self.shallow_exit_layer is None and self.num_loops > 1:
            return self.loop_exit_layers[0]
        return super().shallow_layer


# ============================================================ parameters


def _is_pair(_, node) -> bool:
    return isinstance(node, dict) and "lora_a" in node


def _block_ref(config: RecursiveConfig, rng: jax.Array):
    """Random parameters of a vanilla model with K layers: one block's tree, embeddings, head."""
    return init_lm_params(config.base.replace(num_layers=config.num_blocks), rng)


def init_recursive_params(config: RecursiveConfig, rng: jax.Array):
    """Random parameters: blocks as a vanilla model initialises layers; adapters start at zero
    effect (A random, B zero; vector deltas zero)."""
    block_rng, lora_rng = jax.random.split(rng)
    ref = _block_ref(config, block_rng)
    decoder = {k: v for k, v in ref["decoder"].items() if not k.startswith("layers_")}
    for k in range(config.num_blocks):
        decoder[f"blocks_{k}"] = ref["decoder"][f"layers_{k}"]
    params = {**ref, "decoder": decoder}
    if config.lora_rank:
        params["relax"] = zero_relaxation(config, ref["decoder"]["layers_0"], lora_rng)
    return params


def zero_relaxation(config: RecursiveConfig, block, rng: jax.Array):
    """A relaxation that changes nothing: A ~ N(0, 0.02) [L, in, r], B = 0, vector deltas 0."""
    flat = traverse_util.flatten_dict(block)
    out, num_layers, r = {}, config.num_layers, config.lora_rank
    for key, path in zip(jax.random.split(rng, len(flat)), sorted(flat)):
        leaf = flat[path]
        if path[-1] == "kernel":
            fan_in, fan_out = leaf.shape
            a = INIT_STDDEV * jax.random.normal(key, (num_layers, fan_in, r), leaf.dtype)
            out[path] = {"lora_a": a, "lora_b": jnp.zeros((num_layers, r, fan_out), leaf.dtype)}
        else:
            out[path] = jnp.zeros((num_layers, *leaf.shape), leaf.dtype)
    return traverse_util.unflatten_dict(out)


def layer_params(config: RecursiveConfig, params, layer: int):
    """The merged weights of effective layer `layer`: its block plus its own relaxation."""
    block = params["decoder"][f"blocks_{config.block_of(layer)}"]
    if "relax" not in params:
        return block
    relax = traverse_util.flatten_dict(params["relax"], is_leaf=_is_pair)
    merged = {}
    for path, leaf in traverse_util.flatten_dict(block).items():
        delta = relax[path]
        if isinstance(delta, dict):
            low = jnp.dot(
                delta["lora_a"][layer].astype(jnp.float32),
                delta["lora_b"][layer].astype(jnp.float32),
            )
            merged[path] = (leaf.astype(jnp.float32) + low).astype(leaf.dtype)
        else:
            merged[path] = (leaf + delta[layer].astype(leaf.dtype)).astype(leaf.dtype)
    return traverse_util.unflatten_dict(merged)


def materialise(config: RecursiveConfig, params):
    """The vanilla L-layer parameter tree this recursive model computes (`DecoderLM(config.base)`)."""
    decoder = {k: v for k, v in params["decoder"].items() if not k.startswith("blocks_")}
    for layer in range(config.num_layers):
        decoder[f"layers_{layer}"] = layer_params(config, params, layer)
    return {**{k: v for k, v in params.items() if k != "relax"}, "decoder": decoder}


def count_recursive_params(config: RecursiveConfig, params=None) -> dict[str, int]:
    """{"total", "blocks", "relax", "vanilla"}: parameter counts (see the module docstring); from
    shapes alone when `params` is None."""
    if params is None:
        params = jax.eval_shape(lambda r: init_recursive_params(config, r), jax.random.key(0))
    size = lambda tree: int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
    blocks = sum(size(params["decoder"][f"blocks_{k}"]) for k in range(config.num_blocks))
    relax = size(params.get("relax", {}))
    total = size(params)
    per_block = size(params["decoder"]["blocks_0"])
    return {
        "total": total,
        "blocks": blocks,
        "relax": relax,
        "vanilla": total - blocks - relax + config.num_layers * per_block,
    }


# ============================================================ the model


class RecursiveLM:
    """The (unbound) recursive model: `protocol.bind` calls `bind_params`; `apply` is the
    teacher-forced pass with `DecoderLM.__call__`'s arguments."""

    def __init__(self, config: RecursiveConfig):
        self.config = config

    def bind_params(self, params) -> DecoderLM:
        """A bound `DecoderLM` on the materialised weights: every protocol method."""
        return DecoderLM(self.config.base).bind({"params": materialise(self.config, params)})

    def apply(self, params, *args, rngs=None, method=None, **kwargs):
        """`DecoderLM(base).apply` on the materialised weights (gradients reach blocks and relax)."""
        return DecoderLM(self.config.base).apply(
            {"params": materialise(self.config, params)}, *args, rngs=rngs or {}, method=method,
            **kwargs,
        )  # fmt: skip


register_family(RecursiveConfig, RecursiveLM, init=init_recursive_params)


# ============================================================ rows at different layers


def _row_interceptor(lora_row: dict[tuple[str, ...], dict]):
    """Adds x @ A @ B (this row's adapter) to each adapted Dense of a block applied standalone."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        y = next_fun(*args, **kwargs)
        if not isinstance(module, Dense) or context.method_name != "__call__":
            return y
        pair = lora_row.get(tuple(module.scope.path) + ("kernel",))
        if pair is None:
            return y
        x = args[0].astype(module.dtype)
        low = jnp.dot(jnp.dot(x, pair["lora_a"].astype(module.dtype)), pair["lora_b"])
        return y + low.astype(y.dtype)

    return interceptor


def rows_block(
    config: RecursiveConfig,
    params,
    block: int,
    layer_R: jax.Array,
    hidden_RCD: jax.Array,
    cache: LayerCache,
    offset_R: jax.Array,
    *,
    keys_valid_RT: jax.Array | None = None,
    write_R: jax.Array | None = None,
) -> tuple[jax.Array, LayerCache]:
    """Block `block` over R rows, row r as effective layer layer_R[r] (its own relaxation).

    Row r's chunk of C positions sits at cache positions offset_R[r] + c; `cache` holds each row's
    keys/values of that layer [R, H, T, K] (gathered by the caller). The shared matrices multiply
    all rows at once; each row adds its own adapter unmerged (x A_l) B_l and its own vector deltas,
    which is what lets rows at different loops share the call. Returns (hidden [R, C, D], the
    rows' caches with the chunk written).

    Mixture-of-Recursions rows (`decoding/mor_depthwise.py`) also give `keys_valid_RT` [R, T]
    (the only keys a row may read besides causality: recursion-wise caching) and `write_R` [R]
    (False: the row reads its cache as it is and writes nothing, recursive KV sharing).
    """
    c = config
    shared = params["decoder"][f"blocks_{block}"]
    relax = traverse_util.flatten_dict(params.get("relax", {}), is_leaf=_is_pair)
    flat_block = traverse_util.flatten_dict(shared)
    vectors = {p: relax[p][layer_R] for p in flat_block if relax and p[-1] != "kernel"}
    pairs = {
        p: {"lora_a": relax[p]["lora_a"][layer_R], "lora_b": relax[p]["lora_b"][layer_R]}
        for p in flat_block
        if relax and p[-1] == "kernel"
    }
    module = DecoderBlock(c.base)
    t = cache.key_BHTK.shape[2]

    r = hidden_RCD.shape[0]
    valid_RT = jnp.ones((r, t), bool) if keys_valid_RT is None else keys_valid_RT
    write_R = jnp.ones((r,), bool) if write_R is None else write_R

    def one_row(vectors_r, pairs_r, x_CD, key_HTK, value_HTK, offset, valid_T, write):
        row_params = dict(flat_block)
        for p, delta in vectors_r.items():
            row_params[p] = (flat_block[p] + delta.astype(flat_block[p].dtype)).astype(
                flat_block[p].dtype
            )
        positions_1C = offset + jnp.arange(x_CD.shape[0], dtype=jnp.int32)[None]
        mask_11CT = ((jnp.arange(t)[None, :] <= positions_1C[0][:, None]) & valid_T)[None, None]
        # Offset T writes nothing (`cache.write_chunk` drops rows past the end).
        write_at = jnp.where(write, offset, t)
        with nn.intercept_methods(_row_interceptor(pairs_r)):
            y_1CD, new = module.apply(
                {"params": traverse_util.unflatten_dict(row_params)}, x_CD[None], positions_1C,
                mask_11CT, LayerCache(key_HTK[None], value_HTK[None]), write_at[None],
            )  # fmt: skip
        return y_1CD[0], new.key_BHTK[0], new.value_BHTK[0]

    hidden_RCD, key_RHTK, value_RHTK = jax.vmap(one_row)(
        vectors, pairs, hidden_RCD, cache.key_BHTK, cache.value_BHTK, offset_R.astype(jnp.int32),
        valid_RT, write_R,
    )  # fmt: skip
    return hidden_RCD, LayerCache(key_RHTK, value_RHTK)


def rows_layer_kv(
    config: RecursiveConfig, params, layer: int, hidden_RCD: jax.Array, offset_R: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Keys/values [R, H, C, K] effective layer `layer` caches for `hidden_RCD` (state copying)."""
    block = DecoderBlock(config.base)
    positions_RC = offset_R.astype(jnp.int32)[:, None] + jnp.arange(hidden_RCD.shape[1])
    return block.apply(
        {"params": layer_params(config, params, layer)}, hidden_RCD, positions_RC, method="kv"
    )


def loop_layers(config: RecursiveConfig) -> Sequence[tuple[int, ...]]:
    """Per loop j, its effective layers (0-based), e.g. cycle L=6, B=3: ((0, 1), (2, 3), (4, 5))."""
    loops: list[list[int]] = [[] for _ in range(config.num_loops)]
    for layer in range(config.num_layers):
        loops[config.loop_of(layer)].append(layer)
    return tuple(tuple(x) for x in loops)
