"""Decoder-only language model configuration (Llama / SmolLM / Llama-3, GPT-NeoX / Pythia, GPT-2).

`LMConfig` is a frozen, hashable dataclass (a static argument of `jax.jit`), read by the decoders
through the same names as `T5Config`: `num_decoder_layers`, `shallow_layer`, `check_exit_layer`,
`eos_token_id`, `pad_token_id`, `vocab_size`, `replace`, `compute_dtype`, `weights_dtype`.

    >>> config = lm_preset("tiny-llama")
    >>> config.num_decoder_layers, config.num_heads, config.num_kv_heads, config.head_dim
    (4, 6, 2, 8)
    >>> config.shallow_layer
    1
"""

from __future__ import annotations

import dataclasses
from typing import Any

from free_jax.models.exit_config import ExitConfig
from free_jax.models.field_types import check_field_types
from free_jax.models.rotary import LLAMA3_KEYS, normalise_llama3_scaling

FAMILIES = ("llama", "gpt_neox", "gpt2")
_NORMS = ("rms", "layer")
_ACTIVATIONS = ("silu", "gelu", "gelu_new")
_POSITIONS = ("rotary", "learned")
_DTYPES = ("float32", "bfloat16", "float16")

# Hugging Face activation names -> ours ("gelu" is the exact erf form, "gelu_new" the tanh one).
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
}


@dataclasses.dataclass(frozen=True)
class LMConfig(ExitConfig):
    """Shapes and options of a decoder-only transformer with early exits.

    Attributes:
      family: "llama", "gpt_neox" or "gpt2": which Hugging Face layout the checkpoints use.
      vocab_size: V.
      d_model: D, width of the residual stream.
      num_layers: L (also `num_decoder_layers`).
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention); must divide `num_heads`. None means
        `num_heads`; resolved at construction, so `replace(num_heads=...)` keeps the old value.
      head_dim: K, width of one head. None means `d_model // num_heads` (resolved likewise).
      d_ff: MLP hidden width.
      norm: "rms" (Llama: scale only) or "layer" (NeoX, GPT-2: scale and bias).
      norm_eps: the norms' epsilon.
      activation: "silu", "gelu" (exact erf) or "gelu_new" (tanh approximation).
      gated_mlp: act(x W_gate) * (x W_up) (SwiGLU) rather than act(x W_in).
      positions: "rotary" (Llama, NeoX) or "learned" (GPT-2's absolute position table).
      rope_theta: rotary base wavelength.
      rotary_pct: fraction of each head's dims that rotate (NeoX's partial rotary; 1.0 for Llama).
      rope_scaling: None, or Llama-3's "llama3" frequency scaling as a sorted tuple of (key, value)
        pairs: factor, high_freq_factor, low_freq_factor, original_max_position_embeddings. A dict
        is accepted and normalised.
      max_position_embeddings: positions the model was trained for (the table size when learned).
      parallel_residual: x + attn(norm1(x)) + mlp(norm2(x)) (NeoX) instead of two residual steps.
      attention_bias: biases on the query/key/value/out projections.
      mlp_bias: biases on the MLP projections.
      tie_word_embeddings: the LM head is the token embedding transposed (no rescaling).
      dropout_rate: after the embeddings and every sub-layer when training.
      dtype: activation (compute) dtype name; param_dtype: parameter storage dtype name.
      shallow_exit_layer: FREE's S (1 <= S < L); None means round(L / 4) clipped into [1, L).
      pad_token_id, eos_token_id, bos_token_id: special tokens (checkpoints without a pad token
        use the end-of-sequence token as pad, as Hugging Face's `generate` does).
    """

    family: str = "llama"
    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 1408
    norm: str = "rms"
    norm_eps: float = 1e-5
    activation: str = "silu"
    gated_mlp: bool = True
    positions: str = "rotary"
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    max_position_embeddings: int = 2048
    parallel_residual: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    shallow_exit_layer: int | None = None
    pad_token_id: int = 0
    eos_token_id: int = 0
    bos_token_id: int | None = None

    def __post_init__(self):
        def fail(field: str, why: str):
            raise ValueError(f"LMConfig.{field}={getattr(self, field)!r} {why}")

        check_field_types(self)  # `--gin.model_config.norm_eps="x"` names the field

        for field, allowed in (
            ("family", FAMILIES), ("norm", _NORMS), ("activation", _ACTIVATIONS),
            ("positions", _POSITIONS), ("dtype", _DTYPES), ("param_dtype", _DTYPES),
        ):  # fmt: skip
            if getattr(self, field) not in allowed:
                fail(field, f"is not one of {allowed}")
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                fail(field, "must be an integer >= 1")
        # Resolve the derived defaults once so equal models compare (and hash) equal.
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                fail("d_model", f"is not divisible by num_heads={self.num_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        for field in ("num_kv_heads", "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                fail(field, "must be an integer >= 1")
        if self.num_heads % self.num_kv_heads:
            fail("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if not 0.0 < self.rotary_pct <= 1.0:
            fail("rotary_pct", "must be in (0, 1]")
        if self.positions == "rotary":
            if self.rotary_ndims < 2 or self.rotary_ndims % 2:
                fail(
                    "rotary_pct",
                    f"rotates int(head_dim={self.head_dim} * rotary_pct) = {self.rotary_ndims} "
                    "dims; that must be even and >= 2",
                )
            if self.rope_theta <= 0:
                fail("rope_theta", "must be > 0")
        object.__setattr__(self, "rope_scaling", normalise_llama3_scaling(self.rope_scaling))
        if not 0.0 <= self.dropout_rate < 1.0:
            fail("dropout_rate", "must be in [0, 1)")
        for field in ("pad_token_id", "eos_token_id"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
                fail(field, "must be an integer >= 0")
        if self.shallow_exit_layer is not None:
            self.check_exit_layer(self.shallow_exit_layer, what="LMConfig.shallow_exit_layer")

    # ------------------------------------------------------------------ derived
    @property
    def num_decoder_layers(self) -> int:
        return self.num_layers

    @property
    def rotary_ndims(self) -> int:
        """How many leading dims of each query/key head rotate (NeoX: int(K * rotary_pct))."""
        return int(self.head_dim * self.rotary_pct)

    # ---------------------------------------------------------- Hugging Face
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> LMConfig:
        """Builds a config from a Hugging Face `config.json` (llama, gpt_neox or gpt2).

        Reads both the classic hub keys (`rope_theta`, `rope_scaling`, `rotary_pct`,
        `rotary_emb_base`) and what transformers >= 5 writes (`rope_parameters` holding
        `rope_theta`, `partial_rotary_factor` and the scaling fields).
        """
        return _from_hf_dict(cls, hf, source)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers needs to rebuild this model (classic keys)."""
        return _to_hf_dict(self)


# ======================================================= Hugging Face config.json


def _first_id(value: Any, default: int | None) -> int | None:
    """A token id; lists (Llama-3 instruct's several end tokens) give their first entry."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return default if value is None else int(value)


def _activation(hf: dict[str, Any], key: str, default: str, source: str) -> str:
    name = hf.get(key) or default
    if name not in _HF_ACTIVATIONS:
        raise ValueError(
            f"{source}: {key}={name!r} is not supported; use one of {sorted(_HF_ACTIVATIONS)}"
        )
    return _HF_ACTIVATIONS[name]


def _rope(hf: dict[str, Any], source: str, default_pct: float):
    """(rope_theta, rotary_pct, rope_scaling) from classic or transformers >= 5 keys.

    Priority as transformers 5 applies it: the rope dict (`rope_scaling`, else `rope_parameters`),
    then the top-level keys (`rope_theta` / `rotary_emb_base`, `partial_rotary_factor` /
    `rotary_pct`), then the family's defaults.
    """
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    pct = params.get(
        "partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", default_pct))
    )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), float(pct), None
    if kind != "llama3":
        raise ValueError(
            f"{source}: rope type {kind!r} is not supported (only 'default' and 'llama3')"
        )
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    missing = [k for k in LLAMA3_KEYS if params.get(k) is None]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling is missing {missing}")
    return float(theta), float(pct), {k: params[k] for k in LLAMA3_KEYS}


def _llama_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    theta, pct, scaling = _rope(hf, source, 1.0)
    return dict(
        family="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        d_ff=hf["intermediate_size"], norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=_activation(hf, "hidden_act", "silu", source), gated_mlp=True,
        positions="rotary", rope_theta=theta, rotary_pct=pct, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        parallel_residual=False, attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first_id(hf.get("bos_token_id"), None),
        eos_token_id=_first_id(hf.get("eos_token_id"), 2),
    )  # fmt: skip


def _neox_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    theta, pct, scaling = _rope(hf, source, 0.25)
    return dict(
        family="gpt_neox", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], norm="layer", norm_eps=hf.get("layer_norm_eps", 1e-5),
        activation=_activation(hf, "hidden_act", "gelu", source), gated_mlp=False,
        positions="rotary", rope_theta=theta, rotary_pct=pct, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        attention_bias=bool(hf.get("attention_bias", True)), mlp_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout_rate=float(hf.get("hidden_dropout", 0.0)),
        bos_token_id=_first_id(hf.get("bos_token_id"), None),
        eos_token_id=_first_id(hf.get("eos_token_id"), 2),
    )  # fmt: skip


def _gpt2_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    # Options of transformers' GPT-2 that change the maths and that we do not implement.
    for key, supported in (
        ("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):  # fmt: skip
        if bool(hf.get(key, supported)) != supported:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (needs {supported})")
    return dict(
        family="gpt2", vocab_size=hf["vocab_size"], d_model=hf["n_embd"],
        num_layers=hf["n_layer"], num_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"], norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_activation(hf, "activation_function", "gelu_new", source), gated_mlp=False,
        positions="learned", max_position_embeddings=hf.get("n_positions", 1024),
        parallel_residual=False, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout_rate=float(hf.get("resid_pdrop", 0.0)),
        bos_token_id=_first_id(hf.get("bos_token_id"), None),
        eos_token_id=_first_id(hf.get("eos_token_id"), 50256),
    )  # fmt: skip


_HF_READERS = {
    "llama": (_llama_fields, ("vocab_size", "hidden_size", "intermediate_size",
                              "num_hidden_layers", "num_attention_heads")),
    "gpt_neox": (_neox_fields, ("vocab_size", "hidden_size", "intermediate_size",
                                "num_hidden_layers", "num_attention_heads")),
    "gpt2": (_gpt2_fields, ("vocab_size", "n_embd", "n_layer", "n_head")),
}  # fmt: skip


def _from_hf_dict(cls, hf: dict[str, Any], source: str) -> LMConfig:
    model_type = hf.get("model_type")
    if model_type not in _HF_READERS:
        raise ValueError(
            f"{source}: model_type={model_type!r} is not a decoder-only family free_jax reads; "
            f"supported: {sorted(_HF_READERS)}"
        )
    reader, required = _HF_READERS[model_type]
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing} for a {model_type} config")
    fields = reader(hf, source)
    # No pad token (all three families): pad with the end token, as transformers' generate does.
    fields["pad_token_id"] = _first_id(hf.get("pad_token_id"), fields["eos_token_id"])
    try:
        return cls(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _require(config: LMConfig, **expected: Any) -> None:
    for field, value in expected.items():
        if getattr(config, field) != value:
            raise ValueError(
                f"LMConfig.{field}={getattr(config, field)!r} cannot be written as a Hugging Face "
                f"{config.family} config (it needs {field}={value!r})"
            )


def _to_hf_dict(c: LMConfig) -> dict[str, Any]:
    if c.family != "llama":  # NeoX and GPT-2 derive the head width and have no grouped heads
        _require(c, num_kv_heads=c.num_heads, head_dim=c.d_model // c.num_heads, mlp_bias=True)
        _require(c, norm="layer", gated_mlp=False)
    tokens = dict(
        vocab_size=c.vocab_size, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        dtype="float32",
    )  # fmt: skip
    scaling = None if c.rope_scaling is None else {"rope_type": "llama3", **dict(c.rope_scaling)}
    hf_act = {"silu": "silu", "gelu": "gelu", "gelu_new": "gelu_new"}[c.activation]
    if c.family == "llama":
        _require(c, norm="rms", gated_mlp=True, positions="rotary", rotary_pct=1.0)
        _require(c, parallel_residual=False)
        return dict(
            model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=c.d_model,
            intermediate_size=c.d_ff, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            head_dim=c.head_dim, hidden_act=hf_act, rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_theta, rope_scaling=scaling,
            max_position_embeddings=c.max_position_embeddings,
            attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, attention_dropout=0.0,
            **tokens,
        )  # fmt: skip
    if c.family == "gpt_neox":
        _require(c, positions="rotary")
        out = dict(
            model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=c.d_model,
            intermediate_size=c.d_ff, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads, hidden_act=hf_act, layer_norm_eps=c.norm_eps,
            rotary_pct=c.rotary_pct, rotary_emb_base=c.rope_theta,
            max_position_embeddings=c.max_position_embeddings,
            use_parallel_residual=c.parallel_residual, attention_bias=c.attention_bias,
            hidden_dropout=c.dropout_rate, attention_dropout=0.0, **tokens,
        )  # fmt: skip
        if scaling is not None:
            out["rope_scaling"] = scaling
        return out
    _require(c, positions="learned", attention_bias=True, parallel_residual=False)
    return dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=c.d_model,
        n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.d_ff,
        n_positions=c.max_position_embeddings, layer_norm_epsilon=c.norm_eps,
        activation_function=hf_act, resid_pdrop=c.dropout_rate, embd_pdrop=c.dropout_rate,
        attn_pdrop=c.dropout_rate, scale_attn_weights=True, **tokens,
    )  # fmt: skip


# ================================================================== presets


def _pythia(d_model: int, num_layers: int, num_heads: int) -> dict[str, Any]:
    return dict(
        family="gpt_neox", vocab_size=50304, d_model=d_model, num_layers=num_layers,
        num_heads=num_heads, d_ff=4 * d_model, norm="layer", norm_eps=1e-5, activation="gelu",
        gated_mlp=False, positions="rotary", rope_theta=10000.0, rotary_pct=0.25,
        max_position_embeddings=2048, parallel_residual=True, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=0, bos_token_id=0,
    )  # fmt: skip


_GPT2 = dict(
    family="gpt2", norm="layer", norm_eps=1e-5, activation="gelu_new", gated_mlp=False,
    positions="learned", parallel_residual=False, attention_bias=True, mlp_bias=True,
    tie_word_embeddings=True,
)  # fmt: skip

_LLAMA = dict(
    family="llama", norm="rms", norm_eps=1e-5, activation="silu", gated_mlp=True,
    positions="rotary", rotary_pct=1.0, parallel_residual=False, attention_bias=False,
    mlp_bias=False,
)  # fmt: skip

LM_PRESETS: dict[str, dict[str, Any]] = {
    # EleutherAI/pythia-*: untied `embed_out`, vocabulary padded to 50304.
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "gpt2": dict(
        _GPT2,
        vocab_size=50257,
        d_model=768,
        num_layers=12,
        num_heads=12,
        d_ff=3072,
        max_position_embeddings=1024,
        pad_token_id=50256,
        eos_token_id=50256,
        bos_token_id=50256,
    ),  # fmt: skip
    "smollm-135m": dict(
        _LLAMA,
        vocab_size=49152,
        d_model=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        d_ff=1536,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    ),  # fmt: skip
    "llama-3.2-1b": dict(
        _LLAMA,
        vocab_size=128256,
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=(
            ("factor", 32.0),
            ("high_freq_factor", 4.0),
            ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192),
        ),
        tie_word_embeddings=True,
        pad_token_id=128001,
        eos_token_id=128001,
        bos_token_id=128000,
    ),  # fmt: skip
    # Tests: four layers, odd head counts, grouped and partial rotary attention, cheap to run.
    "tiny-llama": dict(
        _LLAMA,
        vocab_size=160,
        d_model=48,
        num_layers=4,
        num_heads=6,
        num_kv_heads=2,
        d_ff=96,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    ),  # fmt: skip
    "tiny-neox": dict(
        _pythia(32, 4, 4),
        vocab_size=144,
        d_ff=64,
        max_position_embeddings=128,
        eos_token_id=1,
        bos_token_id=2,
    ),  # fmt: skip
    "tiny-gpt2": dict(
        _GPT2,
        vocab_size=128,
        d_model=36,
        num_layers=4,
        num_heads=3,
        d_ff=144,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    ),  # fmt: skip
}


def lm_preset(name: str, **overrides: Any) -> LMConfig:
    """A named preset; hub-style names work too.

    >>> lm_preset("EleutherAI/pythia-70m").rotary_ndims
    16
    >>> lm_preset("HuggingFaceTB/SmolLM-135M", shallow_exit_layer=4).shallow_layer
    4
    """
    key = name.split("/")[-1].lower()
    if key not in LM_PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; known presets: {sorted(LM_PRESETS)}")
    return LMConfig(**{**LM_PRESETS[key], **overrides})
