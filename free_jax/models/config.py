"""T5 configuration and named presets.

`T5Config` is a frozen, hashable dataclass so it can be a static argument of `jax.jit`.
Presets follow the published checkpoints' shapes (Raffel et al. 2020; T5 v1.1; FLAN-T5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from free_jax.models.exit_config import ExitConfig
from free_jax.models.field_types import check_field_types

_ACTIVATIONS = ("relu", "gated-gelu", "gelu", "gated-relu", "gated-silu")


@dataclasses.dataclass(frozen=True)
class T5Config(ExitConfig):
    """Shapes and options of an encoder-decoder T5.

    Attributes:
      vocab_size: V, rows of the shared token embedding.
      d_model: D, width of the residual stream.
      d_kv: K, width of one attention head.
      d_ff: width of the MLP hidden layer.
      num_heads: H.
      num_encoder_layers, num_decoder_layers: depth of each stack (L is the decoder's).
      relative_attention_num_buckets, relative_attention_max_distance: T5 relative position buckets.
      dropout_rate: applied after embeddings, every sub-layer and the final norms when training.
      layer_norm_epsilon: RMS norm epsilon.
      feed_forward_proj: "relu" (T5 v1.0) or "gated-gelu" (v1.1, FLAN-T5, mT5); also "gated-relu",
        "gated-silu", "gelu".
      tie_word_embeddings: v1.0 ties the LM head to the embedding and scales logits by D**-0.5.
      dtype: activation (compute) dtype, "float32" or "bfloat16".
      param_dtype: parameter storage dtype.
      shallow_exit_layer: FREE's S, the decoder layer after which the shallow exit sits (1 <= S < L).
        None means "a quarter of L, at least 1" (FREE's choice for T5: S = L/4 rounded).
      pad_token_id, eos_token_id, decoder_start_token_id: T5 conventions (0, 1, 0).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    shallow_exit_layer: int | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        check_field_types(self)  # `--gin.model_config.d_ff="abc"` names the field
        if self.feed_forward_proj not in _ACTIVATIONS:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r}; expected one of {_ACTIVATIONS}"
            )
        for field in ("dtype", "param_dtype"):
            value = getattr(self, field)
            if value not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"T5Config.{field}={value!r}; expected float32, bfloat16 or float16"
                )
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_decoder_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"T5Config.{field} must be >= 1, got {getattr(self, field)}")
        if self.shallow_exit_layer is not None:
            self.check_exit_layer(self.shallow_exit_layer, what="T5Config.shallow_exit_layer")

    # ------------------------------------------------------------------ derived
    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        return self.feed_forward_proj.removeprefix("gated-")

    # ---------------------------------------------------------- Hugging Face
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> T5Config:
        """Builds a config from a Hugging Face `config.json` dictionary."""
        required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing} for a T5 config")
        proj = hf.get("feed_forward_proj", "relu")
        if proj == "gated-gelu_new":  # some community exports spell it this way
            proj = "gated-gelu"
        # transformers >= 5 always ties the LM head to the embedding and records T5 v1.0's logit
        # scaling apart as `scale_decoder_outputs`; older configs (and the hub's FLAN-T5) say
        # `tie_word_embeddings: false` for an untied, unscaled head. Ours ties iff it scales; a tied
        # but unscaled head loads as an untied head holding a copy of the embedding.
        tied = hf.get("tie_word_embeddings", True) and hf.get("scale_decoder_outputs", True)
        return cls(
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            d_kv=hf["d_kv"],
            d_ff=hf["d_ff"],
            num_heads=hf["num_heads"],
            num_encoder_layers=hf["num_layers"],
            num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            dropout_rate=hf.get("dropout_rate", 0.1),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=proj,
            tie_word_embeddings=bool(tied),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            eos_token_id=hf.get("eos_token_id", 1) if hf.get("eos_token_id") is not None else 1,
            decoder_start_token_id=hf.get("decoder_start_token_id", 0) or 0,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "t5",
            "architectures": ["T5ForConditionalGeneration"],
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_heads": self.num_heads,
            "num_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "dropout_rate": self.dropout_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": self.feed_forward_proj,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.tie_word_embeddings,
            "is_encoder_decoder": True,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
        }


def _v10(d_model, d_ff, heads, layers):
    return dict(
        vocab_size=32128, d_model=d_model, d_kv=64, d_ff=d_ff, num_heads=heads,
        num_encoder_layers=layers, num_decoder_layers=layers,
        feed_forward_proj="relu", tie_word_embeddings=True,
    )  # fmt: skip


def _v11(d_model, d_ff, heads, layers, d_kv=64):
    return dict(
        vocab_size=32128, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads,
        num_encoder_layers=layers, num_decoder_layers=layers,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip


PRESETS: dict[str, dict[str, Any]] = {
    "t5-small": _v10(512, 2048, 8, 6),
    "t5-base": _v10(768, 3072, 12, 12),
    "t5-large": _v10(1024, 4096, 16, 24),
    "t5-v1_1-small": _v11(512, 1024, 6, 8),
    "t5-v1_1-base": _v11(768, 2048, 12, 12),
    "t5-v1_1-large": _v11(1024, 2816, 16, 24),
    "flan-t5-small": _v11(512, 1024, 6, 8),
    "flan-t5-base": _v11(768, 2048, 12, 12),
    "flan-t5-large": _v11(1024, 2816, 16, 24),
    # The demo model's shape (gin_configs/models/demo_small.gin): 4 + 8 layers, S = 2.
    "demo-small": dict(
        vocab_size=4000,
        d_model=256,
        d_kv=32,
        d_ff=512,
        num_heads=8,
        num_encoder_layers=4,
        num_decoder_layers=8,
        shallow_exit_layer=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=True,
    ),  # fmt: skip
    # Tests: odd head count and few buckets exercise the shape logic cheaply.
    "tiny": dict(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_heads=3,
        num_encoder_layers=2,
        num_decoder_layers=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
    ),  # fmt: skip
}


def preset(name: str, **overrides: Any) -> T5Config:
    """A named preset, e.g. `preset("flan-t5-small", shallow_exit_layer=2)`."""
    if name.removeprefix("google/") in PRESETS:
        name = name.removeprefix("google/")
    if name not in PRESETS:
        raise ValueError(f"unknown T5 preset {name!r}; known presets: {sorted(PRESETS)}")
    return T5Config(**{**PRESETS[name], **overrides})
