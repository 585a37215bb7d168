"""Mixture-of-Recursions with a key/value cache: step-by-step decoding, and the dense reference.

Dimension keys: B batch, C chunk of positions, T cache length, D width, R recursions (N_r).

One function, `routed_layers`, runs a chunk of C positions (at cache positions offset_B + c)
through the whole MoR stack against a `MoRCache`: the unique first layer, the routed recursions of
the middle block, the unique last layer. Every row runs every recursion (fixed shapes); a row's
update is kept only where the router keeps it, and attention is masked to the keys that exist:

* kv "recursion": recursion r's layers cache keys/values at every written position, but
  `MoRCache.active[r - 1]` marks the positions whose token ran recursion r, and queries at
  recursion r read only those (and none after their own position). A token skipped by recursion r
  has no keys/values there, as in the paper's recursion-wise caching.
* kv "share": recursion 1 (every token) writes its layers' keys/values; recursion r > 1 reads
  recursion 1's of the same block layer and writes nothing.

Two uses of the same code:
* `mor_forward_dense`: the teacher-forced pass as one chunk of T positions on an empty cache of
  length T — the reference of `mor.mor_forward`'s gathered pass (topk or causal routing).
* `MoRModel`, the decoding protocol (`protocol.py`) registered for `MoRConfig`: prefill and one
  token per step with causal routing, so every decoder that runs the full depth (greedy,
  sampling, beam search) decodes a MoR model. Routing at decode time reads only the token's own
  hidden state, so step-by-step decoding equals `mor_forward_dense(routing="causal")`. It computes
  every recursion for every row (what a batch of one-token steps must do); the depth-wise engine
  (`decoding/mor_depthwise.py`) is where routed depth saves compute. Early-exit decoders (FREE,
  CALM, static) ask for layer ranges inside the stack and are refused: a MoR token's depth is its
  router's, not a confidence threshold's.

    >>> from free_jax.models.mor import TINY, MoRConfig, init_mor_params
    >>> config = MoRConfig(**TINY, num_layers=5, num_loops=3)
    >>> params = init_mor_params(config, jax.random.key(0))
    >>> out = mor_forward_dense(config, params, jnp.ones((2, 6), jnp.int32), routing="causal")
    >>> out.logits.shape, [int(k.sum()) for k in out.kept]
    ((2, 6, 64), [12, 12, 0])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from free_jax.models import attention as attn
from free_jax.models.cache import LayerCache, write_chunk
from free_jax.models.lm import prefill
from free_jax.models.lm_layers import DecoderBlock
from free_jax.models.mor import (
    MoRConfig,
    MoROutput,
    Runner,
    init_mor_params,
    mor_output,
    teacher_forced_start,
)
from free_jax.models.mor_routers import (
    causal_route,
    expert_gate,
    expert_logits,
    rank_keep,
    token_route,
)
from free_jax.models.protocol import DecodeContext, register_family
from free_jax.models.recursive import layer_params

__all__ = ["MoRCache", "MoRModel", "RoutedOutput", "mor_forward_dense", "routed_layers"]


@struct.dataclass
class MoRCache:
    """Keys/values of every effective layer and which positions each recursion ran.

    Attributes:
      layers: L `LayerCache`s [B, H, T, K], one per effective layer (kv "share": the layers of
        recursions 2..N_r are allocated but never written or read).
      active: N_r arrays [B, T] bool: position t's token ran recursion r (kv "recursion": its
        keys/values at recursion r's layers exist). Written with the chunk; never-written
        positions are False.
    """

    layers: tuple[LayerCache, ...]
    active: tuple[jax.Array, ...]

    @property
    def max_length(self) -> int:
        return self.layers[0].key_BHTK.shape[2]


def init_mor_cache(config: MoRConfig, batch: int, length: int) -> MoRCache:
    shape = (batch, config.num_kv_heads, length, config.head_dim)
    zeros = lambda: jnp.zeros(shape, config.compute_dtype)
    return MoRCache(
        layers=tuple(LayerCache(zeros(), zeros()) for _ in range(config.num_layers)),
        active=tuple(jnp.zeros((batch, length), bool) for _ in range(config.num_loops)),
    )


@struct.dataclass
class RoutedOutput:
    """What `routed_layers` decided for the chunk (R = N_r recursions).

    Attributes:
      router_logits: expert-choice: R arrays [B, C] float32; token-choice: one [B, C, R].
      kept: R arrays [B, C] bool, the rows recursion r updated (nested).
      depth: [B, C] int32 token-choice depths (expert-choice: the number of recursions kept).
    """

    router_logits: tuple[jax.Array, ...] | jax.Array
    kept: tuple[jax.Array, ...]
    depth: jax.Array


def _write_rows(old_BT: jax.Array, rows_BC: jax.Array, offset_B: jax.Array) -> jax.Array:
    """`cache.write_chunk` for [B, T] flags: rows_BC at positions offset_B + c."""
    return write_chunk(old_BT[:, None, :, None], rows_BC[:, None, :, None], offset_B)[:, 0, :, 0]


def _recursion(run: Runner, r: int, x_BCD, positions_BC, kept_BC, cache: MoRCache, offset_B):
    """The K' middle blocks of recursion r on every row; returns (f(x) [B, C, D], cache)."""
    c, (b, _, _) = run.c, x_BCD.shape
    t = cache.max_length
    keys_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    causal_B1CT = attn.causal_mask(positions_BC, keys_BT)
    layers, active = list(cache.layers), list(cache.active)
    active[r - 1] = _write_rows(active[r - 1], kept_BC, offset_B)
    for j in range(c.loop_width):
        layer = 1 + (r - 1) * c.loop_width + j
        if c.kv == "recursion":
            mask_B1CT = causal_B1CT & active[r - 1][:, None, None, :]
            x_BCD, layers[layer] = run.block(
                layer, x_BCD, positions_BC, mask_B1CT, layers[layer], offset_B
            )
        elif r == 1:
            x_BCD, layers[layer] = run.block(
                layer, x_BCD, positions_BC, causal_B1CT, layers[layer], offset_B
            )
        else:
            # Offset T writes nothing (`cache.write_chunk` drops rows past the end): the block
            # reads recursion 1's keys/values of its block layer untouched.
            x_BCD, _ = run.block(
                layer, x_BCD, positions_BC, causal_B1CT, layers[1 + j], jnp.full((b,), t, jnp.int32)
            )
    return x_BCD, MoRCache(layers=tuple(layers), active=tuple(active))


def _expert(run: Runner, hidden_BCD, positions_BC, cache, offset_B, routing):
    c, (b, n, _) = run.c, hidden_BCD.shape
    kept_BC = jnp.ones((b, n), bool)
    all_logits, all_kept = [], []
    for r, k in enumerate(c.keep_counts(n), start=1):
        if routing == "causal":
            logits_BC, run_BC = causal_route(c, run.params["routers"], r, hidden_BCD)
            kept_BC = kept_BC & run_BC
        else:  # training-time top-k over the chunk (the whole sequence in `mor_forward_dense`)
            logits_BC = expert_logits(run.params["routers"], r, hidden_BCD)
            kept_BC = rank_keep(logits_BC, kept_BC, k)
        f_BCD, cache = _recursion(run, r, hidden_BCD, positions_BC, kept_BC, cache, offset_B)
        weight_BC = jnp.where(kept_BC, expert_gate(c, logits_BC), 0.0).astype(f_BCD.dtype)
        hidden_BCD = hidden_BCD + weight_BC[..., None] * f_BCD
        all_logits.append(logits_BC)
        all_kept.append(kept_BC)
    depth_BC = sum(k.astype(jnp.int32) for k in all_kept)
    return hidden_BCD, cache, RoutedOutput(tuple(all_logits), tuple(all_kept), depth_BC)


def _token(run: Runner, hidden_BCD, positions_BC, cache, offset_B):
    c = run.c
    logits_BCR, depth_BC, gate_BC = token_route(c, run.params["routers"], hidden_BCD)
    state_BCD, out_BCD, all_kept = hidden_BCD, hidden_BCD, []
    for r in range(1, c.num_loops + 1):
        active_BC = depth_BC >= r
        f_BCD, cache = _recursion(run, r, state_BCD, positions_BC, active_BC, cache, offset_B)
        # Recursions before the token's last pass the block output on; the last adds its gated
        # output to the recursions' input h^1.
        update_BCD = hidden_BCD + gate_BC[..., None].astype(f_BCD.dtype) * f_BCD
        out_BCD = jnp.where((depth_BC == r)[..., None], update_BCD, out_BCD)
        state_BCD = jnp.where((depth_BC > r)[..., None], f_BCD, state_BCD)
        all_kept.append(active_BC)
    return out_BCD, cache, RoutedOutput(logits_BCR, tuple(all_kept), depth_BC)


def routed_layers(run: Runner, hidden_BCD, cache: MoRCache, offset_B, routing: str = "causal"):
    """The whole stack on a chunk of embedded tokens at positions offset_B + c.

    Returns (hidden after the last layer [B, C, D], updated cache, `RoutedOutput`). `routing` is
    "causal" (per position, what decoding does) or "topk" (expert-choice's training-time top-k
    over the chunk; meaningful only for a whole sequence in one chunk).
    """
    c, (b, n, _) = run.c, hidden_BCD.shape
    positions_BC = offset_B.astype(jnp.int32)[:, None] + jnp.arange(n, dtype=jnp.int32)
    keys_BT = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32), (b, cache.max_length))
    causal_B1CT = attn.causal_mask(positions_BC, keys_BT)
    layers = list(cache.layers)
    hidden_BCD, layers[0] = run.block(0, hidden_BCD, positions_BC, causal_B1CT, layers[0], offset_B)
    cache = cache.replace(layers=tuple(layers))
    if c.router == "expert_choice":
        hidden_BCD, cache, routed = _expert(run, hidden_BCD, positions_BC, cache, offset_B, routing)
    else:
        hidden_BCD, cache, routed = _token(run, hidden_BCD, positions_BC, cache, offset_B)
    last = c.num_layers - 1
    layers = list(cache.layers)
    hidden_BCD, layers[last] = run.block(
        last, hidden_BCD, positions_BC, causal_B1CT, layers[last], offset_B
    )
    return hidden_BCD, cache.replace(layers=tuple(layers)), routed


def mor_forward_dense(
    config: MoRConfig,
    params,
    tokens_BT: jax.Array,
    *,
    deterministic: bool = True,
    rng: jax.Array | None = None,
    routing: str = "topk",
) -> MoROutput:
    """The reference of `mor.mor_forward`: the sequence as one chunk through `routed_layers` on an
    empty cache of length T (every token runs every recursion, O(N_r T) block rows; attention
    masked to the active keys; updates masked; top-k found by counting, `rank_keep`)."""
    run, hidden_BTD, _ = teacher_forced_start(
        "mor_forward_dense", config, params, tokens_BT, deterministic, rng, routing
    )
    b, t = tokens_BT.shape
    hidden_BTD, _, routed = routed_layers(
        run, hidden_BTD, init_mor_cache(config, b, t), jnp.zeros((b,), jnp.int32), routing
    )
    logits_BTV = run.lm("exit_logits", hidden_BTD)
    return mor_output(config, logits_BTV, routed.router_logits, routed.kept, routed.depth)


# ============================================================ the decoding protocol


class MoRModel:
    """The (unbound) MoR model for `protocol.register_family`: `bind_params` gives the bound
    object with the protocol's methods (`BoundMoR`)."""

    def __init__(self, config: MoRConfig):
        self.config = config

    def bind_params(self, params) -> BoundMoR:
        return BoundMoR(self.config, params)


class BoundMoR:
    """A MoR model bound to its parameters: the `protocol.DecodingModel` methods (causal routing,
    every layer range but the whole stack refused)."""

    def __init__(self, config: MoRConfig, params):
        self.config, self.params = config, params
        self._run = Runner(config, params, True, None)

    def init_cache(self, batch: int, length: int) -> MoRCache:
        return init_mor_cache(self.config, batch, length)

    def start(self, inputs_BS, lengths_B, *, extra_length: int, num_layers: int | None = None):
        """Prefills right-padded prompts (as `DecoderLM.start`) through the routed stack."""
        self._check_depth(num_layers)
        return prefill(self, self.config, inputs_BS, lengths_B, extra_length, None)

    def embed(self, tokens_BC: jax.Array, offset_B: jax.Array) -> jax.Array:
        positions_BC = offset_B.astype(jnp.int32)[:, None] + jnp.arange(tokens_BC.shape[1])
        return self._run.lm(lambda m, x, p: m._embed(x, p), tokens_BC, positions_BC)

    def layers(
        self, hidden_BCD, *, start: int, end: int, cache: MoRCache,
        context: DecodeContext | None = None, offset_B: jax.Array,
    ) -> tuple[jax.Array, MoRCache]:  # fmt: skip
        """The whole routed stack (start 0, end L) on a chunk; see `routed_layers`."""
        del context
        if (start, end) != (0, self.config.num_layers):
            self._check_depth(end if start == 0 else -1)
        hidden_BCD, cache, _ = routed_layers(self._run, hidden_BCD, cache, offset_B, "causal")
        return hidden_BCD, cache

    def final_norm(self, hidden_BTD: jax.Array) -> jax.Array:
        return self._run.lm("final_norm", hidden_BTD)

    def exit_logits(self, hidden_BTD: jax.Array, layer: int | None = None) -> jax.Array:
        """Logits [B, T, V] of the final exit (the only one a MoR model has)."""
        if layer is not None and layer != self.config.num_layers:
            self._check_depth(layer)
        return self._run.lm("exit_logits", hidden_BTD)

    def layer_kv(self, hidden_BCD, layer: int, offset_B):
        """Keys/values [B, H, C, K] effective layer `layer` would cache at offset_B + c."""
        positions_BC = offset_B.astype(jnp.int32)[:, None] + jnp.arange(hidden_BCD.shape[1])
        return DecoderBlock(self.config.base).apply(
            {"params": layer_params(self.config, self.params, layer)}, hidden_BCD, positions_BC,
            method="kv",
        )  # fmt: skip

    def _check_depth(self, layers: int | None) -> None:
        if layers is not None and layers != self.config.num_layers:
            raise ValueError(
                f"a Mixture-of-Recursions model runs its whole routed stack (L="
                f"{self.config.num_layers} effective layers) per token; got a request for "
                f"{layers} (early-exit decoders such as FREE, CALM and static exit do not apply: "
                "the routers choose each token's depth; use GreedySpec, sampling or beam search, "
                "or the depth-wise engine `free_jax.decoding.mor_depthwise`)"
            )


register_family(MoRConfig, MoRModel, init=init_mor_params)
