"""Full-size LM presets: published parameter counts under `jax.eval_shape`, hub configs parsed.

Parameter counts, from the architecture (V vocab, D width, L layers, F MLP width, P positions):
* Pythia (untied, biases everywhere, two layer norms per layer):
  2VD + L(4D + 3D^2 + 3D + D^2 + D + 2DF + F + D) + 2D
  70m: V=50304 D=512 L=6 F=2048 -> 70,426,624; 160m: D=768 L=12 -> 162,322,944;
  410m: D=1024 L=24 -> 405,334,016.
* GPT-2 (tied): VD + PD + L(same layer as Pythia) + 2D, V=50257 P=1024 -> 124,439,808.
* Llama-style (tied, no biases, GQA with Hkv heads of width K, gated MLP):
  VD + L(2D + D*H*K + 2*D*Hkv*K + H*K*D + 3DF) + D
  SmolLM-135M: V=49152 D=576 L=30 H=9 Hkv=3 K=64 F=1536 -> 134,515,008;
  Llama-3.2-1B: V=128256 D=2048 L=16 H=32 Hkv=8 K=64 F=8192 -> 1,235,814,400.
"""

import jax
import pytest

from free_jax.models.lm import lm_param_shapes
from free_jax.models.lm_config import LM_PRESETS, LMConfig, lm_preset
from free_jax.models.t5 import count_params

PUBLISHED = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "gpt2": 124_439_808,
    "smollm-135m": 134_515_008,
    "llama-3.2-1b": 1_235_814_400,
}


def _formula(c: LMConfig) -> int:
    """The counts above, written out from the architecture (independent of the module)."""
    d, f, v = c.d_model, c.d_ff, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    norm = d * (2 if c.norm == "layer" else 1)
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv + d if c.attention_bias else 0)
    mlp = (3 if c.gated_mlp else 2) * d * f + (
        (2 if c.gated_mlp else 1) * f + d if c.mlp_bias else 0
    )
    total = v * d + c.num_layers * (2 * norm + attn + mlp) + norm
    total += 0 if c.tie_word_embeddings else d * v
    total += c.max_position_embeddings * d if c.positions == "learned" else 0
    return total


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_presets_have_the_published_parameter_count(name):
    config = lm_preset(name)
    assert _formula(config) == PUBLISHED[name]
    assert count_params(lm_param_shapes(config)) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(LM_PRESETS))
def test_every_preset_builds_and_round_trips_through_json(name):
    config = lm_preset(name)
    assert LMConfig.from_json(config.to_json()) == config
    assert hash(LMConfig.from_json(config.to_json())) == hash(config)
    assert LMConfig.from_hf_dict(config.to_hf_dict()).replace(dropout_rate=0.0) == config
    if name.startswith("tiny"):
        assert count_params(lm_param_shapes(config)) == _formula(config)


# config.json of the published checkpoints, as on the hub.
HUB_CONFIGS = {
    "pythia-70m": {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "gelu", "hidden_size": 512, "initializer_range": 0.02,
        "intermediate_size": 2048, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
        "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 6,
        "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
        "use_parallel_residual": True, "vocab_size": 50304,
    },
    "gpt2": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
        "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "vocab_size": 50257,
    },
    "smollm-135m": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 2048,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
        "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": 49152,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 128256,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_config_json_parses_to_the_preset(name):
    config = LMConfig.from_hf_dict(HUB_CONFIGS[name])
    expected = lm_preset(name, dropout_rate=0.1) if name == "gpt2" else lm_preset(name)
    assert config == expected


def test_transformers_5_rope_parameters_parse_like_classic_keys():
    classic = dict(HUB_CONFIGS["llama-3.2-1b"])
    scaling = classic.pop("rope_scaling")
    v5 = {**classic, "rope_parameters": {**scaling, "rope_theta": classic.pop("rope_theta")}}
    assert LMConfig.from_hf_dict(v5) == lm_preset("llama-3.2-1b")
    neox = dict(HUB_CONFIGS["pythia-70m"])
    neox.pop("rotary_pct"), neox.pop("rotary_emb_base")
    neox["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000,
        "partial_rotary_factor": 0.25,
    }
    assert LMConfig.from_hf_dict(neox) == lm_preset("pythia-70m")


def test_hf_config_errors_name_the_source_and_key():
    with pytest.raises(ValueError, match=r"cfg.json: model_type='mistral' is not"):
        LMConfig.from_hf_dict({"model_type": "mistral"}, source="cfg.json")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['n_head'\]"):
        LMConfig.from_hf_dict({"model_type": "gpt2", "vocab_size": 5, "n_embd": 4, "n_layer": 2})
    bad = {**HUB_CONFIGS["gpt2"], "scale_attn_by_inverse_layer_idx": True}
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        LMConfig.from_hf_dict(bad)
    yarn = {**HUB_CONFIGS["smollm-135m"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        LMConfig.from_hf_dict(yarn)
    with pytest.raises(ValueError, match=r"hidden_act='relu2' is not supported"):
        LMConfig.from_hf_dict({**HUB_CONFIGS["smollm-135m"], "hidden_act": "relu2"})
    gqa = {**HUB_CONFIGS["smollm-135m"], "num_key_value_heads": 2}
    with pytest.raises(ValueError, match=r"config.json: LMConfig.num_kv_heads=2 must divide"):
        LMConfig.from_hf_dict(gqa)
    with pytest.raises(ValueError, match=r"LMConfig.num_kv_heads=2 cannot be written"):
        lm_preset("tiny-gpt2", num_heads=4, num_kv_heads=2, head_dim=9).to_hf_dict()


def test_shallow_layer_defaults_to_a_quarter_of_the_depth():
    assert [lm_preset(n).shallow_layer for n in ("pythia-70m", "gpt2", "llama-3.2-1b")] == [2, 3, 4]
    assert lm_preset("tiny-llama", num_layers=2).shallow_layer == 1


def test_eval_shape_needs_no_memory():
    # The biggest preset's embedding alone is 1 GiB in float32; eval_shape allocates nothing.
    shapes = lm_param_shapes(lm_preset("llama-3.2-1b"))
    leaf = shapes["token_embedder"]["embedding"]
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (128256, 2048)
