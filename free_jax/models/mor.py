"""Mixture-of-Recursions (Bae et al. 2025) on the recursive decoder: a router picks, per token, how
many times the shared middle block runs.

The model is a `RecursiveConfig` with sharing "middle_cycle": a unique first layer, a middle block
of K' layers run N_r = `num_loops` times (recursion r = 1..N_r runs effective layers
1 + (r - 1) K' .. r K'), a unique last layer, final norm and head. Recursion r runs only on the
tokens a router keeps (`mor_routers.py` for the routers):

* expert-choice: recursion r keeps the top k_r = ceil(T (N_r - r + 1) / N_r) tokens of each
  sequence among those kept at r - 1 (k_1 = T: every token runs once). A kept token updates as
      h <- h + g * f(h),   g = alpha * sigmoid(theta_r . h + b_r),
  where f(h) is the output of the K' blocks, residual included (the paper's
  H^{r+1} = g f(H^r, Phi') + H^r; the reference code scatter-adds `block_output * weight` into the
  hidden states). An unkept token's h is unchanged.
* token-choice: the router reads h^1 (entering recursion 1) once and gives the token a depth d in
  1..N_r and gate g (its softmax probability). Recursions 1..d - 1 pass the block output on
  ungated, h^{r+1} = f(h^r), and the last one adds the gated output to the recursions' input,
  h <- h^1 + g * f(h^d) (as the reference code; the gate is the router's only gradient path).

Key/values (`kv`): "recursion" attends, at recursion r, only among the tokens active at r (causal
by original position), so recursion r stores keys/values for its active tokens only; "share" runs
recursion 1 on every token and lets every later recursion's queries (active tokens) read recursion
1's keys/values of the same block layer (all positions <= the query), so only recursion 1 stores.
Stored fraction of a full recursive model's middle-block keys/values with expert-choice top-k
(`MoRConfig.kv_fraction`):

    recursion:  sum_r k_r / (N_r T)   (= (N_r + 1) / (2 N_r) when N_r divides T)
    share:      1 / N_r

    >>> c = MoRConfig(**TINY, num_layers=8, num_loops=3)
    >>> c.keep_counts(6), c.kv_fraction(6), c.replace(kv="share").kv_fraction(6)
    ((6, 4, 2), 0.6666666666666666, 0.3333333333333333)

Two teacher-forced paths compute the same function: `mor_forward` (here) gathers the kept tokens
into a [B, A, D] block input (A = k_r for expert-choice top-k, padded to T where the count depends
on the data) and scatters the update back; `mor_cached.mor_forward_dense` runs every token at every
recursion with attention masked to the active keys and the update masked with `jnp.where` — the
same code that decodes step by step against a cache (the tests' reference).
`routing="causal"` routes each position from its own hidden state (`causal_route`), as decoding
must, instead of the training-time top-k, which depends on later tokens.

Parameters: `init_recursive_params`'s tree plus `routers` (`init_routers`). The decoding protocol
(`protocol.register_family`) is `mor_cached.MoRModel`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from free_jax.models import attention as attn
from free_jax.models.cache import LayerCache
from free_jax.models.lm import DecoderLM
from free_jax.models.lm_layers import DecoderBlock
from free_jax.models.mor_routers import (
    causal_route,
    expert_aux,
    expert_gate,
    expert_logits,
    init_routers,
    token_aux,
    token_route,
    top_k_keep,
)
from free_jax.models.protocol import check_tokens
from free_jax.models.recursive import TINY, RecursiveConfig, init_recursive_params, layer_params

ROUTERS = ("expert_choice", "token_choice")
KV_MODES = ("recursion", "share")
ROUTINGS = ("topk", "causal")

__all__ = [
    "KV_MODES",
    "ROUTERS",
    "ROUTINGS",
    "TINY",
    "MoRConfig",
    "MoROutput",
    "causal_route",
    "init_mor_params",
    "mor_forward",
    "mor_output",
]


@dataclasses.dataclass(frozen=True)
class MoRConfig(RecursiveConfig):
    """A middle-cycle `RecursiveConfig` whose middle block runs a routed number of times per token.

    Attributes:
      router: "expert_choice" (each recursion keeps its top-k tokens) or "token_choice" (each token
        picks its depth once).
      kv: "recursion" (each recursion attends among, and stores keys/values of, its active tokens)
        or "share" (every recursion reads recursion 1's keys/values).
      router_alpha: alpha of the expert-choice gate alpha * sigmoid(logit) (the paper's 0.1).
      router_aux: coefficient of the expert-choice BCE loss that teaches the causal decision.
      balance: coefficient of the token-choice balancing loss.
      router_z: coefficient of the router z-loss (both routers).
      (every `RecursiveConfig` field; sharing must be "middle_cycle", num_loops = N_r in {2, 3, 4},
      lora_rank 0.)
    """

    sharing: str = "middle_cycle"
    num_loops: int = 3
    router: str = "expert_choice"
    kv: str = "recursion"
    router_alpha: float = 0.1
    router_aux: float = 1e-3
    balance: float = 1e-2
    router_z: float = 1e-3

    def __post_init__(self):
        def fail(field: str, why: str):
            raise ValueError(f"MoRConfig.{field}={getattr(self, field)!r} {why}")

        # Checked before the parent's layer arithmetic so a wrong field is named as such.
        if self.sharing != "middle_cycle":
            fail("sharing", "must be 'middle_cycle' (unique first and last layers)")
        if self.num_loops not in (2, 3, 4):
            fail("num_loops", "(N_r, the number of recursions) must be 2, 3 or 4")
        if self.lora_rank != 0:
            fail("lora_rank", "must be 0: MoR shares the middle block without relaxation")
        super().__post_init__()
        if self.router not in ROUTERS:
            fail("router", f"is not one of {ROUTERS}")
        if self.kv not in KV_MODES:
            fail("kv", f"is not one of {KV_MODES}")
        if not self.router_alpha > 0:
            fail("router_alpha", "must be > 0")
        for field in ("router_aux", "balance", "router_z"):
            if not getattr(self, field) >= 0:
                fail(field, "must be >= 0")

    def keep_counts(self, length: int) -> tuple[int, ...]:
        """Static k_r = ceil(T (N_r - r + 1) / N_r), r = 1..N_r: expert-choice top-k sizes."""
        n = self.num_loops
        return tuple(-(-length * (n - r + 1) // n) for r in range(1, n + 1))

    def kv_fraction(self, length: int) -> float:
        """Stored middle-block keys/values of expert-choice top-k over a full recursive model's."""
        if self.kv == "share":
            return 1.0 / self.num_loops
        return sum(self.keep_counts(length)) / (self.num_loops * length)


def init_mor_params(config: MoRConfig, rng: jax.Array):
    """`init_recursive_params`'s tree plus `routers` (see `mor_routers.init_routers`)."""
    model_rng, router_rng = jax.random.split(rng)
    return {**init_recursive_params(config, model_rng), "routers": init_routers(config, router_rng)}


@struct.dataclass
class MoROutput:
    """Teacher-forced outputs of `mor_forward` (R = N_r recursions).

    Attributes:
      logits: [B, T, V] float32.
      aux: auxiliary losses (float32 scalars): expert-choice {"router_bce", "router_z", "total"},
        token-choice {"balance", "router_z", "total"}; "total" is weighted by the config's
        coefficients, ready to add to the LM loss.
      router_logits: R arrays [B, T] float32: expert-choice recursion r's router logit at every
        position (also at unkept ones); token-choice column r - 1 of the one router's logits.
      kept: R arrays [B, T] bool: the tokens recursion r ran on (nested: kept[r] implies kept[r-1]).
      kv_stored: R arrays [B, T] bool: positions whose keys/values recursion r stores (each of the
        K' layers): kept[r] for kv "recursion"; all at r = 1 and none later for "share".
    """

    logits: jax.Array
    aux: dict[str, jax.Array]
    router_logits: tuple[jax.Array, ...]
    kept: tuple[jax.Array, ...]
    kv_stored: tuple[jax.Array, ...]

    @property
    def depth(self) -> jax.Array:
        """[B, T] int32 recursions each token ran."""
        return sum(k.astype(jnp.int32) for k in self.kept)


# ============================================================ pieces shared by both paths


class Runner:
    """What one forward pass threads through its layers: config, params, dropout keys."""

    def __init__(self, config: MoRConfig, params, deterministic: bool, rng):
        if not deterministic and rng is None:
            raise ValueError("mor_forward: deterministic=False needs an rng for dropout")
        self.c, self.params, self.det, self.rng, self.calls = config, params, deterministic, rng, 0

    def rngs(self) -> dict:
        # A fresh dropout key per layer call, in call order (the same in mor_cached's pass).
        self.calls += 1
        return {} if self.det else {"dropout": jax.random.fold_in(self.rng, self.calls)}

    def lm(self, method, *args):
        """A `DecoderLM(base)` method on the embeddings, final norm and head (no layers needed)."""
        outer = {k: v for k, v in self.params.items() if k not in ("decoder", "routers")}
        decoder = {k: v for k, v in self.params["decoder"].items() if not k.startswith("blocks_")}
        return DecoderLM(self.c.base).apply(
            {"params": {**outer, "decoder": decoder}}, *args, method=method, rngs=self.rngs()
        )

    def block(self, layer, x_BAD, positions_BA, mask_B1AT, cache=None, offset_B=None):
        """Effective layer `layer` (`recursive.layer_params`) as a `DecoderBlock`."""
        return DecoderBlock(self.c.base).apply(
            {"params": layer_params(self.c, self.params, layer)}, x_BAD, positions_BA, mask_B1AT,
            cache, offset_B, self.det, rngs=self.rngs(),
        )  # fmt: skip

    def middle(self, recursion, x_BAD, positions_BA, valid_BA, shared):
        """The K' middle blocks of recursion `recursion` on A rows at `positions_BA`.

        `valid_BA` marks the active rows (the others are padding whose outputs the caller drops). kv "recursion": row a attends to valid rows at
        positions <= its own. kv "share": recursion 1 (A = T, positions 0..T-1) writes its keys/
        values into `shared` (returned); later recursions read them: every position <= the row's.
        Returns (f(x) [B, A, D], the shared keys/values per layer).
        """
        c, (b, a, _) = self.c, x_BAD.shape
        t = a if recursion == 1 or c.kv == "recursion" else shared[0].key_BHTK.shape[2]
        all_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        written = []
        for j in range(c.loop_width):
            layer = 1 + (recursion - 1) * c.loop_width + j
            if c.kv == "recursion":
                mask_B1AA = attn.causal_mask(positions_BA, positions_BA) & valid_BA[:, None, None]
                x_BAD, _ = self.block(layer, x_BAD, positions_BA, mask_B1AA)
                continue
            mask_B1AT = attn.causal_mask(positions_BA, all_BT)
            if recursion == 1:
                shape = (b, c.num_kv_heads, t, c.head_dim)
                empty = LayerCache(
                    jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype)
                )
                x_BAD, cache = self.block(
                    layer, x_BAD, positions_BA, mask_B1AT, empty, all_BT[:, 0]
                )
                written.append(cache)
            else:
                # Offset T writes nothing (`cache.write_chunk` drops rows past the end), so the
                # block reads recursion 1's keys/values untouched; its own chunk keys are unused.
                x_BAD, _ = self.block(
                    layer, x_BAD, positions_BA, mask_B1AT, shared[j], jnp.full((b,), t, jnp.int32)
                )
        return x_BAD, tuple(written) if recursion == 1 else shared


def _compact(active_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(positions [B, T], valid [B, T]): the active positions first in ascending order, then the
    rest, so a data-dependent count fits a static shape.

    >>> _compact(jnp.array([[False, True, False, True]]))
    (Array([[1, 3, 0, 2]], dtype=int32), Array([[ True,  True, False, False]], dtype=bool))
    """
    t = active_BT.shape[1]
    order_BT = jnp.argsort(jnp.where(active_BT, 0, t) + jnp.arange(t), axis=1).astype(jnp.int32)
    return order_BT, jnp.take_along_axis(active_BT, order_BT, axis=1)


def _gather(x_BT_, idx_BA):
    """x[b, idx[b, a]] for [B, T] or [B, T, D] arrays."""
    idx = idx_BA if x_BT_.ndim == 2 else idx_BA[..., None]
    return jnp.take_along_axis(x_BT_, idx, axis=1)


# ============================================================ the recursions


def _expert(run: Runner, hidden_BTD, routing: str):
    """Expert-choice recursions; returns (hidden, router logits, kept masks)."""
    c, (b, t, _) = run.c, hidden_BTD.shape
    rows_B1 = jnp.arange(b)[:, None]
    kept_BT = jnp.ones((b, t), bool)
    cand_BP = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    shared, all_logits, all_kept = None, [], []
    for r, k in enumerate(c.keep_counts(t), start=1):
        if routing == "causal":
            logits_BT, run_BT = causal_route(c, run.params["routers"], r, hidden_BTD)
            kept_BT = kept_BT & run_BT
            idx_BA, valid_BA = _compact(kept_BT)
        else:
            logits_BT = expert_logits(run.params["routers"], r, hidden_BTD)
            idx_BA = top_k_keep(logits_BT, cand_BP, k)
            valid_BA, cand_BP = jnp.ones(idx_BA.shape, bool), idx_BA
            kept_BT = jnp.zeros((b, t), bool).at[rows_B1, idx_BA].set(True)
        gate_BT = expert_gate(c, logits_BT)
        f_BAD, shared = run.middle(r, _gather(hidden_BTD, idx_BA), idx_BA, valid_BA, shared)
        weight_BA = jnp.where(valid_BA, _gather(gate_BT, idx_BA), 0.0).astype(f_BAD.dtype)
        hidden_BTD = hidden_BTD.at[rows_B1, idx_BA].add(weight_BA[..., None] * f_BAD)
        all_logits.append(logits_BT)
        all_kept.append(kept_BT)
    return hidden_BTD, tuple(all_logits), tuple(all_kept)


def _token(run: Runner, hidden_BTD):
    """Token-choice recursions; returns (hidden, router logits [B, T, R], depths, kept masks)."""
    c, b = run.c, hidden_BTD.shape[0]
    rows_B1 = jnp.arange(b)[:, None]
    logits_BTR, depth_BT, gate_BT = token_route(c, run.params["routers"], hidden_BTD)
    state_BTD, out_BTD, shared, all_kept = hidden_BTD, hidden_BTD, None, []
    for r in range(1, c.num_loops + 1):
        active_BT = depth_BT >= r
        idx_BA, valid_BA = _compact(active_BT)
        x_BAD = _gather(state_BTD, idx_BA)
        f_BAD, shared = run.middle(r, x_BAD, idx_BA, valid_BA, shared)
        depth_BA = _gather(depth_BT, idx_BA)
        weight_BA = jnp.where(depth_BA == r, _gather(gate_BT, idx_BA), 0.0)
        # out starts as h^1 and each token adds its gated output once, at its last recursion.
        out_BTD = out_BTD.at[rows_B1, idx_BA].add(weight_BA[..., None].astype(f_BAD.dtype) * f_BAD)
        onward_BAD = jnp.where((depth_BA > r)[..., None], f_BAD, x_BAD)
        state_BTD = state_BTD.at[rows_B1, idx_BA].set(onward_BAD)  # idx is a permutation
        all_kept.append(active_BT)
    return out_BTD, logits_BTR, depth_BT, tuple(all_kept)


def teacher_forced_start(what: str, config, params, tokens_BT, deterministic, rng, routing):
    """The checks and embedding both teacher-forced passes (`mor_forward`,
    `mor_cached.mor_forward_dense`, named by `what` in errors) start with; returns (the pass's
    `Runner`, embedded tokens [B, T, D], positions [B, T])."""
    if not isinstance(config, MoRConfig):
        raise TypeError(f"{what}: config must be a MoRConfig, got {type(config).__name__}")
    if routing not in ROUTINGS:
        raise ValueError(f"{what}: routing={routing!r} is not one of {ROUTINGS}")
    check_tokens(tokens_BT, config.vocab_size, "tokens")
    run = Runner(config, params, deterministic, rng)
    b, t = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden_BTD = run.lm(lambda m, x, p: m._embed(x, p, deterministic), tokens_BT, positions_BT)
    return run, hidden_BTD, positions_BT


def _forward(config, params, tokens_BT, deterministic, rng, routing) -> MoROutput:
    c = config
    run, hidden_BTD, positions_BT = teacher_forced_start(
        "mor_forward", c, params, tokens_BT, deterministic, rng, routing
    )
    causal_B1TT = attn.causal_mask(positions_BT, positions_BT)
    hidden_BTD, _ = run.block(0, hidden_BTD, positions_BT, causal_B1TT)
    if c.router == "expert_choice":
        hidden_BTD, router_logits, kept = _expert(run, hidden_BTD, routing)
        depth_BT = None
    else:
        hidden_BTD, router_logits, depth_BT, kept = _token(run, hidden_BTD)
    hidden_BTD, _ = run.block(c.num_layers - 1, hidden_BTD, positions_BT, causal_B1TT)
    return mor_output(c, run.lm("exit_logits", hidden_BTD), router_logits, kept, depth_BT)


def mor_output(config: MoRConfig, logits_BTV, router_logits, kept, depth_BT) -> MoROutput:
    """A pass's `MoROutput` from its routing: the auxiliary losses and the stored keys/values.

    `router_logits`: expert-choice R arrays [B, T], token-choice one [B, T, R] (then `depth_BT`,
    the chosen depths [B, T], feeds the balancing loss).
    """
    c = config
    if c.router == "expert_choice":
        logits, aux = router_logits, expert_aux(c, router_logits, kept)
    else:
        logits = tuple(router_logits[..., r] for r in range(c.num_loops))
        aux = token_aux(c, router_logits, depth_BT)
    if c.kv == "share":
        none_BT = jnp.zeros(kept[0].shape, bool)
        stored = (jnp.ones(kept[0].shape, bool),) + tuple(none_BT for _ in kept[1:])
    else:
        stored = kept
    return MoROutput(logits=logits_BTV, aux=aux, router_logits=logits, kept=kept, kv_stored=stored)


def mor_forward(
    config: MoRConfig,
    params,
    tokens_BT: jax.Array,
    *,
    deterministic: bool = True,
    rng: jax.Array | None = None,
    routing: str = "topk",
) -> MoROutput:
    """Teacher-forced pass with gathered block inputs (see the module docstring).

    routing "topk" is the training-time expert-choice (each sequence's top k_r, which depends on
    later tokens); "causal" routes each position by `causal_route` (what step-by-step decoding can
    do). Token-choice routing is per token either way. `rng` feeds dropout when not
    `deterministic`. Shapes never depend on the data, so the pass jits with `config` static.
    """
    return _forward(config, params, tokens_BT, deterministic, rng, routing)
