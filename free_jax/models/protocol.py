"""What every model family gives the decoders, and the registry that maps a config to its model.

A decoder (`free_jax.decoding`) sees a model only through these methods of a bound module (or any
object with them); it never names a family. Dimension keys: B batch, S input length, C chunk of
positions, T cache length, D width, H cached (key/value) heads, K head width, V vocabulary.

    context, cache = model.start(inputs_BS, lengths_B, extra_length=T_new, num_layers=L)
    hidden_BCD = model.embed(tokens_BC, offset_B)
    hidden_BCD, cache = model.layers(hidden_BCD, start=a, end=b, cache=cache, context=context,
                                     offset_B=offset_B)
    logits_BCV = model.exit_logits(hidden_BCD, layer=k)  # float32: the exit after layer k (the
                                                     # shared final norm + LM head, or a trained
                                                     # exit head there: models/headed.py)
    normed_BCD = model.final_norm(hidden_BCD)        # the learned confidence head reads this
    key_BHCK, value_BHCK = model.layer_kv(hidden_BCD, layer, offset_B)   # CALM's state copying

`offset_B` is the cache position of each example's first chunk row. Decoders count output
positions from 0 and add `context.base_B` to reach cache positions: for T5 `base_B` is 0 (the
decoder starts empty), for a decoder-only model it is the prompt length minus one (the prompt's
last token is the first decoder input, at that position).

The config a decoder receives must offer: `num_decoder_layers` (L), `shallow_layer` (FREE's
default S), `check_exit_layer(k, what=)`, `eos_token_id`, `pad_token_id`, `vocab_size` and
`replace(**changes)`.

Adding a family is one file in `models/` that defines its config and module and calls
`register_family(ConfigClass, ModuleClass)` at import (plus its loader in `checkpoints/`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from flax import struct

from free_jax.models.cache import DecoderCache


@struct.dataclass
class DecodeContext:
    """What a model computed from its inputs before decoding starts.

    Every leaf has the batch as its leading axis (beam search repeats them per beam).

    Attributes:
      first_token_B: [B] int32 the first decoder input (T5: the decoder start token; a decoder-only
        model: the prompt's last token).
      base_B: [B] int32 cache position of the first decoder input (T5: 0; decoder-only: the prompt
        length minus one).
      memory: the family's own pytree that `layers` reads (T5: `EncoderMemory`, the cross-attention
        keys/values and the encoder mask; decoder-only: None).
    """

    first_token_B: jax.Array
    base_B: jax.Array
    memory: Any = None


class DecodingModel(Protocol):
    """The methods decoders call; see the module docstring for shapes."""

    config: Any

    def start(
        self, inputs_BS: jax.Array, lengths_B: jax.Array | None, *, extra_length: int,
        num_layers: int | None = None,
    ) -> tuple[DecodeContext, DecoderCache]: ...  # fmt: skip

    def init_cache(self, batch: int, length: int) -> DecoderCache: ...

    def embed(self, tokens_BC: jax.Array, offset_B: jax.Array) -> jax.Array: ...

    def layers(
        self, hidden_BCD: jax.Array, *, start: int, end: int, cache: DecoderCache,
        context: DecodeContext, offset_B: jax.Array,
    ) -> tuple[jax.Array, DecoderCache]: ...  # fmt: skip

    def exit_logits(self, hidden_BTD: jax.Array, layer: int | None = None) -> jax.Array: ...

    def final_norm(self, hidden_BTD: jax.Array) -> jax.Array: ...

    def layer_kv(
        self, hidden_BCD: jax.Array, layer: int, offset_B: jax.Array
    ) -> tuple[jax.Array, jax.Array]: ...


def check_tokens(tokens, vocab_size: int, name: str) -> None:
    """Raises before any compute when concrete token ids fall outside [0, vocab_size)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(
            f"{name} holds token ids outside the vocabulary [0, {vocab_size}): "
            f"min {int(arr.min())}, max {int(arr.max())}"
        )


# ============================================================ registry

_FAMILIES: dict[type, type] = {}
_INITS: dict[type, Callable] = {}


def register_family(config_cls: type, module_cls: type, init: Callable | None = None) -> None:
    """Makes `model_for(config)` build `module_cls(config)` for configs of `config_cls`.

    `init(config, rng) -> params` builds random parameters; without it the module is initialised
    on a [1, 4] batch of token ids (`module.init(rng, tokens)`), which fits decoder-only models.
    """
    _FAMILIES[config_cls] = module_cls
    if init is not None:
        _INITS[config_cls] = init


def _family(config) -> type:
    # The most derived registered class wins (a RecursiveConfig is also an LMConfig).
    for config_cls in type(config).__mro__:
        if config_cls in _FAMILIES:
            return config_cls
    known = sorted(c.__name__ for c in _FAMILIES)
    raise TypeError(f"no model family registered for {type(config).__name__}; known: {known}")


def model_for(config) -> Any:
    """The (unbound) module of `config`'s family."""
    return _FAMILIES[_family(config)](config)


def init_params(config, rng: jax.Array):
    """Random parameters of any registered family (a pytree under 'params')."""
    family = _family(config)
    if family in _INITS:
        return _INITS[family](config, rng)
    tokens = jax.numpy.ones((1, 4), jax.numpy.int32)
    return _FAMILIES[family](config).init(rng, tokens)["params"]


def param_shapes(config):
    """Parameter shapes of any registered family, without allocating memory (`jax.eval_shape`)."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def bind(config, params) -> Any:
    """`config`'s model bound to `params`: an object with the `DecodingModel` methods."""
    module = model_for(config)
    if hasattr(module, "bind_params"):  # non-flax models (the decoders' test stub)
        return module.bind_params(params)
    return module.bind({"params": params})
