"""free_jax: early-exit decoding (FREE, CALM, static exit) for T5 and decoder-only LMs in JAX/Flax.

What a user reaches for, importable from here (loaded on first use, so `import free_jax` stays
cheap):

    from free_jax import load_hf, decode, FreeSpec
    config, params = load_hf("path/to/pythia-70m")            # T5, Llama, GPT-NeoX or GPT-2
    out = decode(config, params, prompts_BS, FreeSpec(), max_decode_len=64, threshold=0.9,
                 prompt_lengths=lengths_B)

Models: `T5`, `T5Config`, `preset`; `DecoderLM`, `LMConfig`, `lm_preset`; `init_params`.
Checkpoints: `load_hf`, `save_hf`, `load_t5x`, `load_params`, `save_params`.
Decoding: `decode`, `make_decoder` and the specs `GreedySpec`, `SampleSpec`, `BeamSpec`,
`StaticSpec`, `CalmSpec`, `FreeSpec`.
Thresholds: `fit_moments_threshold`, `fit_bmm_threshold`, `fit_ltt_threshold` (a finite-sample
guarantee), `fit_target_accuracy_threshold`, `OnlineThreshold`, `load_threshold`.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "free_jax.models": ("T5", "T5Config", "preset", "init_params", "param_shapes", "count_params"),
    "free_jax.models.lm_config": ("LMConfig", "lm_preset", "LM_PRESETS"),
    "free_jax.models.lm": ("DecoderLM",),
    "free_jax.models.recursive": ("RecursiveConfig",),
    "free_jax.models.recursive_convert": ("to_recursive",),
    "free_jax.decoding.depthwise": ("depthwise_decode",),
    "free_jax.checkpoints": ("load_hf", "save_hf", "load_t5x", "load_params", "save_params"),
    "free_jax.decoding": (
        "decode", "make_decoder", "GreedySpec", "SampleSpec", "BeamSpec", "StaticSpec",
        "CalmSpec", "FreeSpec", "DepthwiseSpec",
    ),
    "free_jax.calibration": (
        "fit_moments_threshold", "fit_bmm_threshold", "fit_ltt_threshold",
        "fit_target_accuracy_threshold", "OnlineThreshold", "load_threshold",
    ),
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'free_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
