"""Pure model code: T5 and decoder-only LMs with early exits, an explicit KV cache, and the protocol
every decoder uses (`protocol.py`). Imports nothing else of free_jax."""

from free_jax.models import mor_cached  # noqa: E402,F401  (registers the MoR family)
from free_jax.models.cache import CrossKV, DecoderCache, LayerCache, init_cache, write_chunk
from free_jax.models.config import PRESETS, T5Config, preset
from free_jax.models.headed import HeadedConfig, HeadedModel
from free_jax.models.lm import DecoderLM, LMOutput
from free_jax.models.lm_config import LM_PRESETS, LMConfig, lm_preset
from free_jax.models.protocol import (
    DecodeContext,
    DecodingModel,
    bind,
    init_params,
    model_for,
    param_shapes,
    register_family,
)
from free_jax.models.t5 import T5, T5Output, count_params

__all__ = [
    "LM_PRESETS",
    "HeadedConfig",
    "HeadedModel",
    "DecoderLM",
    "LMConfig",
    "LMOutput",
    "lm_preset",
    "PRESETS",
    "T5",
    "CrossKV",
    "DecodeContext",
    "DecodingModel",
    "DecoderCache",
    "LayerCache",
    "T5Config",
    "T5Output",
    "bind",
    "count_params",
    "init_cache",
    "init_params",
    "model_for",
    "param_shapes",
    "register_family",
    "preset",
    "write_chunk",
]
