"""Self-supervised exit heads (Valade 2024): a norm and an LM head of their own on chosen layers.

FREE and CALM train the whole model so that every exit can read the one shared final norm and LM
head. Valade's early exits leave the pretrained model untouched instead: each chosen decoder layer l
gets a head of its own,

    logits_l = norm_l(hidden_l) @ kernel_l        norm_l: the family's final norm (RMS or layer
                                                  norm), kernel_l: [D, V]

trained to imitate the model's own final distribution (`free_jax.training`, loss kind
"exit_heads"). The heads are a separate parameter tree, so a file of heads is small (about
n * D * V numbers) and loads beside any copy of its backbone:

    {"head_3": {"norm": {"scale": [D] (, "bias": [D])}, "kernel": [D, V]}, "head_6": ...}

A fresh head starts as the model's final norm and LM head (a tied model: the embedding transposed;
T5 v1.0 folds its d_model**-0.5 rescaling into the kernel), so on layer L it reproduces the model's
own logits, and on an earlier layer it starts where the shared-head exits of FREE/CALM start.

    >>> from free_jax.models.lm import init_lm_params, lm_preset
    >>> config = lm_preset("tiny-llama")          # L = 4, D = 48, V = 160
    >>> layers = default_exit_head_layers(config.num_decoder_layers, 2)
    >>> layers
    (1, 3)
    >>> heads = init_exit_heads(config, init_lm_params(config, jax.random.key(0)), layers)
    >>> sorted(heads), heads["head_1"]["kernel"].shape, exit_head_param_count(config, layers)
    (['head_1', 'head_3'], (48, 160), 15456)
    >>> head_logits(config, heads, 3, jnp.ones((2, 5, 48))).shape
    (2, 5, 160)

Works for T5 (heads on decoder layers) and the decoder-only families; see `forward`'s hidden states
(`T5Output.decoder_hidden`, `LMOutput.hidden`) for what a head reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import serialization, traverse_util

from free_jax.models.config import T5Config
from free_jax.models.layers import RMSNorm
from free_jax.models.lm_config import LMConfig
from free_jax.models.lm_layers import INIT_STDDEV
from free_jax.models.lm_layers import norm as lm_norm

__all__ = [
    "ExitHead",
    "ExitHeads",
    "choose_exit_head_layers",
    "default_exit_head_layers",
    "exit_head_layers",
    "exit_head_param_count",
    "head_logits",
    "init_exit_heads",
    "load_exit_heads",
    "save_exit_heads",
]

# What a saved file holds besides the heads: the backbone's shape, checked on load.
_FORMAT = "free_jax.exit_heads/1"


# ============================================================ which layers


def default_exit_head_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """`count` layers spread evenly over a decoder of `num_layers` (L): the interior points of
    `np.linspace(0, L, count + 2)`, rounded (numpy rounds halves to even).

    Worked example: L = 24, count = 4 -> linspace(0, 24, 6) = [0, 4.8, 9.6, 14.4, 19.2, 24]
    -> interior [4.8, 9.6, 14.4, 19.2] -> (5, 10, 14, 19). The spacing L / (count + 1) is at least
    1 for any count in [1, L - 1], so the layers are distinct and inside [1, L).

    >>> default_exit_head_layers(24, 4), default_exit_head_layers(12, 3), default_exit_head_layers(4, 3)
    ((5, 10, 14, 19), (3, 6, 9), (1, 2, 3))
    """
    if not isinstance(count, int | np.integer) or not 1 <= count < num_layers:
        raise ValueError(
            f"exit heads: count={count!r} must be an int in [1, {num_layers - 1}] for a decoder "
            f"of {num_layers} layers (one head per intermediate layer at most)"
        )
    points = np.linspace(0, num_layers, count + 2)[1:-1]
    return tuple(int(x) for x in np.round(points))


def choose_exit_head_layers(num_layers: int, heads: int | Sequence[int]) -> tuple[int, ...]:
    """The sorted intermediate layers that get heads: `heads` is a count (spread evenly by
    `default_exit_head_layers`) or the layers themselves, each in [1, L).

    >>> choose_exit_head_layers(12, 3), choose_exit_head_layers(12, (9, 2))
    ((3, 6, 9), (2, 9))
    """
    if isinstance(heads, int | np.integer):
        return default_exit_head_layers(num_layers, int(heads))
    layers = tuple(sorted(int(x) for x in heads))
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"exit heads: layers {tuple(heads)} must be non-empty and distinct")
    for layer in layers:
        if not 1 <= layer < num_layers:
            raise ValueError(
                f"exit heads: layer {layer} is outside [1, {num_layers}) for a decoder of "
                f"{num_layers} layers (the top layer already has the model's own head)"
            )
    return layers


def exit_head_layers(heads_params: Mapping) -> tuple[int, ...]:
    """The layers a heads tree has heads for, sorted: {"head_3": ..., "head_1": ...} -> (1, 3)."""
    layers = []
    for name in heads_params:
        prefix, _, number = str(name).partition("_")
        if prefix != "head" or not number.isdigit():
            raise ValueError(f"exit heads: {name!r} is not a head name ('head_<layer>')")
        layers.append(int(number))
    return tuple(sorted(layers))


# ============================================================ modules


def _num_layers(config) -> int:
    if not isinstance(config, T5Config | LMConfig):
        raise TypeError(f"exit heads support T5Config and LMConfig, got {type(config).__name__}")
    return config.num_decoder_layers


def _check_layer(config, layer: int) -> None:
    """A head may sit on any decoder layer 1..L (L only to compare with the model's own head)."""
    num_layers = _num_layers(config)
    if not isinstance(layer, int | np.integer) or not 1 <= layer <= num_layers:
        raise ValueError(f"exit head layer {layer!r} is outside [1, {num_layers}]")


class ExitHead(nn.Module):
    """One head: the family's final norm (`norm`), then `kernel` [D, V]; float32 logits.

    Like the model's own exit, the product runs in the compute dtype; unlike it (T5), no dropout.
    """

    config: T5Config | LMConfig

    @nn.compact
    def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
        c = self.config
        if isinstance(c, T5Config):
            normed_BTD = RMSNorm(
                c.layer_norm_epsilon, c.compute_dtype, c.weights_dtype, name="norm"
            )(hidden_BTD)
            stddev = c.d_model**-0.5
        else:
            normed_BTD = lm_norm(c, name="norm")(hidden_BTD)
            stddev = INIT_STDDEV
        kernel_DV = self.param(
            "kernel", nn.initializers.normal(stddev), (c.d_model, c.vocab_size), c.weights_dtype
        )
        dtype = c.compute_dtype
        return jnp.dot(normed_BTD.astype(dtype), kernel_DV.astype(dtype)).astype(jnp.float32)


class ExitHeads(nn.Module):
    """The heads of `layers` as one module: params {"head_<l>": ExitHead params}.

    Called on {layer: hidden [B, T, D]} (the layer's output before any norm), it returns
    {layer: float32 logits [B, T, V]} for every layer of `layers`.
    """

    config: T5Config | LMConfig
    layers: tuple[int, ...]

    @nn.compact
    def __call__(self, hidden_by_layer: Mapping[int, jax.Array]) -> dict[int, jax.Array]:
        return {
            layer: ExitHead(self.config, name=f"head_{layer}")(hidden_by_layer[layer])
            for layer in self.layers
        }


def head_logits(config, heads_params, layer: int, hidden_BTD: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of the head on `layer` for that layer's output `hidden_BTD`."""
    _check_layer(config, layer)
    name = f"head_{layer}"
    if name not in heads_params:
        raise KeyError(f"no exit head on layer {layer}; heads on {exit_head_layers(heads_params)}")
    return ExitHead(config).apply({"params": heads_params[name]}, hidden_BTD)


def exit_head_param_count(config, layers: Sequence[int]) -> int:
    """Numbers in the heads of `layers`: per head D * V (kernel) + D (RMS norm scale), or
    + 2 * D (layer norm scale and bias)."""
    norm_size = 2 if isinstance(config, LMConfig) and config.norm == "layer" else 1
    return len(tuple(layers)) * (config.d_model * config.vocab_size + norm_size * config.d_model)


def _head_shapes(config) -> dict:
    """{"norm": {...}, "kernel": ...} ShapeDtypeStructs of one head (no memory)."""
    hidden = jax.ShapeDtypeStruct((1, 1, config.d_model), config.compute_dtype)
    return jax.eval_shape(ExitHead(config).init, jax.random.key(0), hidden)["params"]


# ============================================================ from the backbone


def init_exit_heads(config, backbone_params, layers: Sequence[int]):
    """Heads on `layers`, each a copy of the backbone's final norm and LM head.

    Args:
      config: the backbone's `T5Config` or `LMConfig`.
      backbone_params: its parameter tree (what `init_params` / the loaders return).
      layers: decoder layers in [1, L] (see `choose_exit_head_layers` for training).
    Returns:
      {"head_<l>": {"norm": ..., "kernel": [D, V]}} in the config's parameter dtype. Every leaf is
      a fresh array (no buffer shared with the backbone, which a donated train state forbids).
    """
    layers = tuple(sorted(int(x) for x in layers))
    for layer in layers:
        _check_layer(config, layer)
    decoder = backbone_params.get("decoder", {})
    norm_name = "decoder_norm" if isinstance(config, T5Config) else "final_norm"
    try:
        norm = decoder[norm_name]
        if config.tie_word_embeddings:
            kernel = jnp.asarray(backbone_params["token_embedder"]["embedding"]).T
            if isinstance(config, T5Config):  # T5 v1.0 rescales before its tied head
                kernel = kernel * (config.d_model**-0.5)
        else:
            kernel = decoder["logits_dense"]["kernel"]
    except KeyError as e:
        raise ValueError(
            f"exit heads: the backbone parameters lack {e} (the final norm or LM head of a "
            f"{type(config).__name__})"
        ) from e
    head = {"norm": dict(norm), "kernel": kernel}
    want = _head_shapes(config)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), head)
    if got != jax.tree.map(lambda x: x.shape, want):
        raise ValueError(f"exit heads: the backbone's final norm and head have shapes {got}")
    dtype = config.weights_dtype
    copy = lambda x: jnp.array(x, dtype=dtype, copy=True)
    return {f"head_{layer}": jax.tree.map(copy, head) for layer in layers}


# ============================================================ files


def save_exit_heads(path: str | os.PathLike, config, heads_params) -> Path:
    """Writes heads to one msgpack file (atomically: a temporary file, then a rename).

    The file holds the heads tree and the backbone's L, D and V, which `load_exit_heads` checks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exit_head_layers(heads_params)  # names are head_<l>
    record = {
        "format": _FORMAT,
        "num_layers": _num_layers(config),
        "d_model": config.d_model,
        "vocab_size": config.vocab_size,
        "heads": jax.tree.map(np.asarray, jax.device_get(heads_params)),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(record))
    tmp.replace(path)  # never leave half a file under the real name
    return path


def load_exit_heads(path: str | os.PathLike, config=None):
    """Heads saved by `save_exit_heads`; with `config`, checked against that backbone and cast to
    its parameter dtype. Errors name the file and the layer or shape that does not fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exit heads {path}: no such file")
    try:
        record = serialization.msgpack_restore(path.read_bytes())
        if record.get("format") != _FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {_FORMAT!r}")
        heads = record["heads"]
        layers = exit_head_layers(heads)
    except Exception as e:  # msgpack, or a file that is not ours
        raise ValueError(f"{path}: not a file of exit heads ({e})") from e
    if config is None:
        return jax.tree.map(jnp.asarray, heads)
    num_layers = _num_layers(config)
    if int(record["num_layers"]) != num_layers:
        raise ValueError(
            f"{path}: heads for a decoder of {int(record['num_layers'])} layers, but the model "
            f"has {num_layers}"
        )
    want = traverse_util.flatten_dict(_head_shapes(config), sep="/")
    for layer in layers:
        if not 1 <= layer <= num_layers:
            raise ValueError(f"{path}: head on layer {layer}, outside [1, {num_layers}]")
        got = traverse_util.flatten_dict(heads[f"head_{layer}"], sep="/")
        if got.keys() != want.keys():
            raise ValueError(
                f"{path}: head on layer {layer} holds {sorted(got)}, the model's heads "
                f"{sorted(want)}"
            )
        for name, struct in want.items():
            if tuple(np.shape(got[name])) != struct.shape:
                raise ValueError(
                    f"{path}: head on layer {layer}: {name} has shape {np.shape(got[name])}, "
                    f"the model needs {struct.shape} (d_model={config.d_model}, "
                    f"vocab_size={config.vocab_size})"
                )
    return jax.tree.map(lambda x: jnp.asarray(x, config.weights_dtype), heads)
