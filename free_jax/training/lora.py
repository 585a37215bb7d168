"""LoRA (Hu et al. 2021) as a parameter transform: frozen base kernels plus trained low-rank factors.

For every targeted kernel W [in, out] (t5x layout, so `x @ W`):

    W_merged = W + (alpha / r) * A @ B,    A: [in, r] random,  B: [r, out] zeros at the start

so a fresh adapter leaves the model unchanged. Training differentiates only the adapter tree; the
model always runs on merged weights (`merge_lora`), which for T5 sizes costs one extra [in, r] x
[r, out] product per kernel and step, small next to the batch's matmuls. FREE fine-tunes its large
models this way with r = 64, alpha = 128 on q, k, v, o and the MLP kernels.

    lora = init_lora(params, LoraConfig(rank=64, alpha=128), jax.random.key(0))
    merged = merge_lora(params, lora, LoraConfig(rank=64, alpha=128).scale)

The adapter tree mirrors the parameter tree down to each targeted module:
`lora["decoder"]["layers_3"]["self_attention"]["query"] == {"lora_a": A, "lora_b": B}` (T5), or
`lora["decoder"]["layers_3"]["attention"]["query"]` (a decoder-only model, whose parameters have only
the decoder stack: the default stacks fit both families).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from free_jax.models.field_types import check_field_types
from free_jax.models.layers import Dense

# Module names of the attention projections (q, k, v, o) and MLP kernels in the t5x layout.
DEFAULT_TARGETS = ("query", "key", "value", "out", "wi", "wi_0", "wi_1", "wo")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters, and their rank and scale.

    Attributes:
      rank: r, inner width of A @ B.
      alpha: the merged update is scaled by alpha / r.
      targets: module names whose `kernel` is adapted (see DEFAULT_TARGETS).
      stacks: "encoder", "decoder" or both; a stack the model lacks (a decoder-only model's
        encoder) adapts nothing.
    """

    rank: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    stacks: tuple[str, ...] = ("encoder", "decoder")

    def __post_init__(self):
        check_field_types(self)
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def is_target(self, path: tuple[str, ...]) -> bool:
        """`path` names a module, e.g. ("decoder", "layers_0", "mlp", "wo")."""
        return len(path) >= 2 and path[0] in self.stacks and path[-1] in self.targets


def init_lora(params, config: LoraConfig, rng: jax.Array) -> dict[str, Any]:
    """Adapters for every targeted 2-D kernel of `params`.

    A is uniform in +-1/sqrt(in) (the usual Kaiming-style start), B is zero, in the kernel's dtype.
    """
    flat = traverse_util.flatten_dict(params)
    kernels = sorted(k for k in flat if k[-1] == "kernel" and config.is_target(k[:-1]))
    if not kernels:
        raise ValueError(f"LoRA targets {config.targets} match no kernel of the parameters")
    adapters = {}
    for key, path in zip(jax.random.split(rng, len(kernels)), kernels):
        kernel = flat[path]
        fan_in, fan_out = kernel.shape
        bound = fan_in**-0.5
        adapters[path[:-1] + ("lora_a",)] = jax.random.uniform(
            key, (fan_in, config.rank), kernel.dtype, -bound, bound
        )
        adapters[path[:-1] + ("lora_b",)] = jnp.zeros((config.rank, fan_out), kernel.dtype)
    return traverse_util.unflatten_dict(adapters)


def merge_lora(params, lora, scale: float):
    """Parameters with each adapted kernel replaced by W + scale * A @ B (same tree, same dtypes).

    `scale` is `LoraConfig.scale` (alpha / r). The merged tree is an ordinary T5 parameter tree:
    decoding and evaluation need nothing LoRA-specific.
    """
    flat = dict(traverse_util.flatten_dict(params))
    for module, pair in traverse_util.flatten_dict(lora, is_leaf=_is_pair).items():
        kernel = flat[module + ("kernel",)]
        delta = jnp.dot(pair["lora_a"].astype(jnp.float32), pair["lora_b"].astype(jnp.float32))
        flat[module + ("kernel",)] = (kernel.astype(jnp.float32) + scale * delta).astype(
            kernel.dtype
        )
    return traverse_util.unflatten_dict(flat)


def _is_pair(_, node) -> bool:
    return isinstance(node, dict) and "lora_a" in node


def lora_interceptor(lora, scale: float):
    """A flax method interceptor that adds scale * (x @ A) @ B to each adapted Dense's output.

    This is the unmerged LoRA forward; `merge_lora` must agree with it (tests check that):

        with nn.intercept_methods(lora_interceptor(lora, scale)):
            out = T5(config).apply({"params": params}, enc, dec)
    """
    flat = traverse_util.flatten_dict(lora, is_leaf=_is_pair)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, Dense) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        pair = flat.get(tuple(module.scope.path))
        y = next_fun(*args, **kwargs)
        if pair is None:
            return y
        x = args[0].astype(module.dtype)
        low = jnp.dot(jnp.dot(x, pair["lora_a"].astype(module.dtype)), pair["lora_b"])
        return y + (scale * low).astype(y.dtype)

    return interceptor


def count_lora_params(lora) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(lora)))
