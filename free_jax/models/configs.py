"""Reading any family's config back from the JSON free_jax writes (`config.to_json()`)."""

from __future__ import annotations

import json

from free_jax.models.config import T5Config
from free_jax.models.lm_config import LMConfig
from free_jax.models.mor import MoRConfig
from free_jax.models.mor_cached import MoRModel  # noqa: F401  (registers the MoR family)
from free_jax.models.recursive import RecursiveConfig


def config_from_json(text: str, source: str = "<json>") -> T5Config | LMConfig:
    """A `MoRConfig` when the JSON names a "router", a `RecursiveConfig` when it names a "sharing",
    an `LMConfig` when it names a "family", else a `T5Config` (every T5 export and run directory
    written before decoder-only models existed).

    >>> type(config_from_json(LMConfig().to_json())).__name__, type(config_from_json("{}")).__name__
    ('LMConfig', 'T5Config')
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON: {e}") from e
    if isinstance(data, dict) and "router" in data:
        return MoRConfig.from_json(text, source=source)
    if isinstance(data, dict) and "sharing" in data:
        return RecursiveConfig.from_json(text, source=source)
    if isinstance(data, dict) and "family" in data:
        return LMConfig.from_json(text, source=source)
    return T5Config.from_json(text, source=source)


def describe_config(config) -> str:
    """One line naming the family and the shapes that matter for early exit."""
    heads = getattr(config, "head_layers", None)
    if heads is not None:  # a HeadedConfig: the backbone, then its heads
        return f"{describe_config(config.base)} + exit heads on layers {tuple(heads)}"
    if isinstance(config, MoRConfig):
        return (
            f"Mixture-of-Recursions ({config.router}, kv {config.kv}) {describe_config(config.base)}"
            f" as 1 + {config.num_loops} x {config.loop_width} + 1 layers"
        )
    if isinstance(config, RecursiveConfig):
        return (
            f"recursive {config.sharing} {describe_config(config.base)} as "
            f"{config.num_blocks} blocks x {config.num_loops} loops, LoRA rank {config.lora_rank}"
        )
    if isinstance(config, LMConfig):
        return (
            f"{config.family} d_model={config.d_model} heads={config.num_heads}/"
            f"{config.num_kv_heads} kv L={config.num_decoder_layers} S={config.shallow_layer} "
            f"V={config.vocab_size}"
        )
    return (
        f"T5 d_model={config.d_model} heads={config.num_heads} encoder={config.num_encoder_layers} "
        f"decoder L={config.num_decoder_layers} S={config.shallow_layer} V={config.vocab_size}"
    )
