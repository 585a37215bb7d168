"""Pure model code: T5 with early exits and an explicit KV cache. Imports nothing else of free_jax."""

from free_jax.models.cache import CrossKV, DecoderCache, LayerCache, init_cache, write_chunk
from free_jax.models.config import PRESETS, T5Config, preset
from free_jax.models.t5 import T5, T5Output, count_params, init_params, param_shapes

__all__ = [
    "PRESETS",
    "T5",
    "CrossKV",
    "DecoderCache",
    "LayerCache",
    "T5Config",
    "T5Output",
    "count_params",
    "init_cache",
    "init_params",
    "param_shapes",
    "preset",
    "write_chunk",
]
