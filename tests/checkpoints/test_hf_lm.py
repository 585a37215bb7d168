"""Parity with transformers' Llama, GPT-NeoX and GPT-2 on tiny random checkpoints.

Each case is saved with `save_pretrained` (the installed transformers' on-disk layout), loaded with
`load_hf_lm`, and compared on a right-padded batch at the real positions (fp32, atol 1e-4).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_lm_testlib import (  # noqa: E402
    build_hf_model,
    hf_logits,
    load_hf_model,
    make_hf_checkpoint,
    right_padded_batch,
)

from free_jax.checkpoints.hf_lm import load_hf_lm, read_hf_tensors, save_hf_lm  # noqa: E402
from free_jax.models.lm import DecoderLM  # noqa: E402

LLAMA3 = {
    "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
    "original_max_position_embeddings": 64,
}  # fmt: skip
# name -> (family, config overrides, what the case covers)
CASES = {
    "llama_gqa_untied": ("llama", {}),  # 6 query heads over 2 key/value heads
    "llama_tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=3)),
    "llama_bias_head_dim": (
        "llama",
        dict(
            attention_bias=True,
            mlp_bias=True,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=10,
            rope_theta=500.0,
        ),
    ),  # fmt: skip
    "llama3_scaling": (
        "llama",
        dict(
            rope_scaling=LLAMA3,
            head_dim=8,
            num_attention_heads=3,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        ),
    ),  # fmt: skip
    "neox_quarter_parallel": ("gpt_neox", {}),
    "neox_half_sequential_tied": (
        "gpt_neox",
        dict(
            rotary_pct=0.5,
            use_parallel_residual=False,
            tie_word_embeddings=True,
            hidden_act="gelu_new",
        ),
    ),  # fmt: skip
    "gpt2": ("gpt2", {}),
    "gpt2_untied_gelu": ("gpt2", dict(tie_word_embeddings=False, activation_function="gelu")),
}
ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, HF logits of the padded batch, tokens, lengths); built once."""
    root = tmp_path_factory.mktemp("hf_lm")
    out = {}
    for name, (family, kw) in CASES.items():
        path = make_hf_checkpoint(family, root / name, **kw)
        model = load_hf_model(path)  # what transformers reads back, not what it built
        tokens, lengths = right_padded_batch(model.config.vocab_size)
        out[name] = (path, hf_logits(model, tokens, lengths), tokens, lengths)
    return out


def _our_logits(config, params, tokens):
    apply = jax.jit(lambda p, t: DecoderLM(config).apply({"params": p}, t).logits)
    return np.asarray(apply(params, jnp.asarray(tokens)))


def _assert_real_positions_close(ours, theirs, lengths):
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(ours[row, :n], theirs[row, :n], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, checkpoints):
    path, theirs, tokens, lengths = checkpoints[name]
    config, params = load_hf_lm(path)
    family, kw = CASES[name]
    assert config.family == family
    assert config.tie_word_embeddings == kw.get("tie_word_embeddings", family == "gpt2")
    assert np.abs(theirs).max() > 0.5  # the random model is far from uniform
    _assert_real_positions_close(_our_logits(config, params, tokens), theirs, lengths)


def test_the_cases_cover_what_they_claim(checkpoints):
    configs = {name: load_hf_lm(checkpoints[name][0])[0] for name in CASES}
    assert configs["llama_gqa_untied"].num_kv_heads == 2
    assert configs["llama_gqa_untied"].num_heads == 6
    assert configs["llama_bias_head_dim"].head_dim * 4 != configs["llama_bias_head_dim"].d_model
    assert dict(configs["llama3_scaling"].rope_scaling)["factor"] == 4.0
    assert configs["neox_quarter_parallel"].rotary_ndims == 2  # head width 8
    assert configs["neox_half_sequential_tied"].rotary_ndims == 4
    assert not configs["neox_half_sequential_tied"].parallel_residual
    assert configs["gpt2_untied_gelu"].activation == "gelu"


def test_sharded_checkpoint_loads_the_same(tmp_path, checkpoints):
    path, theirs, tokens, lengths = checkpoints["llama_gqa_untied"]
    sharded = make_hf_checkpoint("llama", tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config, params = load_hf_lm(sharded)
    _, reference = load_hf_lm(path)  # same seed and config: the same weights
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _assert_real_positions_close(_our_logits(config, params, tokens), theirs, lengths)


@pytest.mark.parametrize(
    "name",
    ["llama_bias_head_dim", "llama3_scaling", "neox_half_sequential_tied", "gpt2_untied_gelu"],
)
def test_save_hf_lm_round_trips_through_transformers(name, tmp_path, checkpoints):
    path, _, tokens, lengths = checkpoints[name]
    config, params = load_hf_lm(path, shallow_exit_layer=2)
    saved = save_hf_lm(tmp_path / "saved", config, params)
    reloaded = load_hf_model(saved)
    ours = _our_logits(config, params, tokens)
    _assert_real_positions_close(ours, hf_logits(reloaded, tokens, lengths), lengths)
    config_back, _ = load_hf_lm(saved)
    assert config_back == config.replace(shallow_exit_layer=None)


def test_prefixless_gpt2_and_tied_head_copies_load(tmp_path, checkpoints):
    from safetensors.numpy import save_file

    path, theirs, tokens, lengths = checkpoints["gpt2"]
    tensors, _, _ = read_hf_tensors(path)
    renamed = {k.removeprefix("transformer."): np.array(v) for k, v in tensors.items()}
    renamed["lm_head.weight"] = renamed["wte.weight"].copy()  # a tied head stored anyway
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))  # an old mask buffer
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(renamed, str(tmp_path / "model.safetensors"))
    config, params = load_hf_lm(tmp_path)
    _assert_real_positions_close(_our_logits(config, params, tokens), theirs, lengths)


def test_bfloat16_checkpoints_load():
    # Hub Llama-3 / SmolLM2 weights are bfloat16, which safetensors.numpy cannot represent.
    import tempfile
    from pathlib import Path

    model = build_hf_model("llama").to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config, params = load_hf_lm(Path(tmp))
    embedding = params["token_embedder"]["embedding"]
    assert embedding.dtype == jnp.float32
    expected = model.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(np.asarray(embedding), expected)


# ------------------------------------------------------------------ errors


def _rewrite(checkpoints, name, tmp_path, edit):
    from safetensors.numpy import save_file

    path = checkpoints[name][0]
    tensors, _, _ = read_hf_tensors(path)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_tensor_names_the_tensor_parameter_and_file(tmp_path, checkpoints):
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    path = _rewrite(checkpoints, "neox_quarter_parallel", tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError) as err:
        load_hf_lm(path)
    message = str(err.value)
    assert name in message
    assert "decoder/layers_1/attention/query/kernel" in message
    assert str(path / "model.safetensors") in message


def test_wrong_shape_names_both_shapes(tmp_path, checkpoints):
    name = "model.layers.2.self_attn.k_proj.weight"

    def edit(tensors):
        tensors[name] = np.zeros((12, 24), np.float32)  # 3 key/value heads of 4, not 2

    path = _rewrite(checkpoints, "llama_gqa_untied", tmp_path, edit)
    with pytest.raises(ValueError) as err:
        load_hf_lm(path)
    message = str(err.value)
    assert name in message and "decoder/layers_2/attention/key/kernel" in message
    assert "(12, 24)" in message and "(8, 24)" in message
    assert str(path / "model.safetensors") in message


def test_unknown_tensors_are_reported(tmp_path, checkpoints):
    def edit(tensors):
        tensors["model.layers.0.self_attn.rotary_mix.weight"] = np.zeros((2,), np.float32)

    path = _rewrite(checkpoints, "llama_tied", tmp_path, edit)
    with pytest.raises(ValueError, match="rotary_mix"):
        load_hf_lm(path)
