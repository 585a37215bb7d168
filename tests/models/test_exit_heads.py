"""Self-supervised exit heads (models/exit_heads.py) and the entropy confidence measure.

A fresh head is the model's own final norm and LM head: on layer L it reproduces the model's logits,
on layer k the shared-head exit k. The heads are a separate, small tree; files round-trip and
reject a backbone they do not fit, naming the file and the layer.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from free_jax.decoding.confidence import (
    MEASURES,
    exit_confidence,
    normalized_entropy_confidence,
)
from free_jax.models import count_params, init_params, lm_preset, preset
from free_jax.models.exit_heads import (
    ExitHeads,
    choose_exit_head_layers,
    default_exit_head_layers,
    exit_head_layers,
    exit_head_param_count,
    head_logits,
    init_exit_heads,
    load_exit_heads,
    save_exit_heads,
)
from free_jax.models.protocol import model_for

# T5 untied (v1.1), T5 tied (v1.0: the head rescales by D**-0.5), Llama (RMS norm, untied),
# GPT-NeoX (layer norm, untied), GPT-2 (layer norm, tied, learned positions).
CONFIGS = {
    "t5": preset("tiny"),
    "t5-tied": preset("tiny", tie_word_embeddings=True),
    "llama": lm_preset("tiny-llama"),
    "neox": lm_preset("tiny-neox"),
    "gpt2": lm_preset("tiny-gpt2"),
}


@functools.cache
def _setup(name):
    """(config, params with random norm scales and biases, teacher-forced outputs with hidden)."""
    config = CONFIGS[name]
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    flat = traverse_util.flatten_dict(params)
    for key, value in flat.items():  # norms that are not identities: copying them must matter
        if key[-1] in ("scale", "bias"):
            flat[key] = jnp.asarray(
                (1.0 if key[-1] == "scale" else 0.0) + 0.3 * rng.standard_normal(value.shape),
                value.dtype,
            )
    params = traverse_util.unflatten_dict(flat)
    tokens = jnp.asarray(rng.integers(2, config.vocab_size, (2, 6)), jnp.int32)
    model = model_for(config)
    exits = tuple(range(1, config.num_decoder_layers))
    if name.startswith("t5"):
        out = model.apply({"params": params}, tokens, tokens, exit_layers=exits, return_hidden=True)
        hidden = out.decoder_hidden
    else:
        out = model.apply({"params": params}, tokens, exit_layers=exits, return_hidden=True)
        hidden = out.hidden
    return config, params, out, hidden


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fresh_heads_reproduce_the_models_own_logits(name):
    config, params, out, hidden = _setup(name)
    num_layers = config.num_decoder_layers
    layers = tuple(range(1, num_layers + 1))
    heads = init_exit_heads(config, params, layers)
    top = head_logits(config, heads, num_layers, hidden[num_layers - 1])
    assert top.dtype == jnp.float32
    np.testing.assert_allclose(top, out.logits, atol=1e-5, rtol=1e-5)
    for layer in layers[:-1]:  # and on layer k the shared-head exit k (FREE/CALM's start)
        got = head_logits(config, heads, layer, hidden[layer - 1])
        np.testing.assert_allclose(got, out.exit_logits[layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["t5", "neox", "gpt2"])
def test_heads_are_a_separate_small_tree(name):
    config, params, _, _ = _setup(name)
    layers = (1, 3)
    heads = init_exit_heads(config, params, layers)
    assert sorted(heads) == ["head_1", "head_3"] and exit_head_layers(heads) == layers
    norm_size = 2 if getattr(config, "norm", "rms") == "layer" else 1  # layer norm has a bias
    d, v = config.d_model, config.vocab_size
    want = len(layers) * (d * v + norm_size * d)
    assert count_params(heads) == exit_head_param_count(config, layers) == want
    # Nothing of the backbone's tree, and no buffer shared with it.
    assert not set(heads) & set(params)
    backbone_ids = {id(x) for x in jax.tree.leaves(params)}
    assert not backbone_ids & {id(x) for x in jax.tree.leaves(heads)}
    assert count_params(heads) < count_params(params)
    # The module builds the same tree, and computes what head_logits computes.
    hidden = {layer: jnp.ones((1, 2, d)) * layer for layer in layers}
    module = ExitHeads(config, layers)
    shapes = jax.eval_shape(module.init, jax.random.key(0), hidden)["params"]
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, heads)
    logits = module.apply({"params": heads}, hidden)
    for layer in layers:
        np.testing.assert_array_equal(
            logits[layer], head_logits(config, heads, layer, hidden[layer])
        )


def test_default_layers_are_evenly_spaced():
    # linspace(0, L, n + 2)[1:-1], rounded half to even
    assert default_exit_head_layers(24, 4) == (5, 10, 14, 19)  # 4.8, 9.6, 14.4, 19.2
    assert default_exit_head_layers(12, 3) == (3, 6, 9)
    assert default_exit_head_layers(4, 3) == (1, 2, 3)  # one per intermediate layer at most
    assert default_exit_head_layers(8, 1) == (4,)
    assert default_exit_head_layers(30, 4) == (6, 12, 18, 24)
    for n in range(1, 24):
        layers = default_exit_head_layers(24, n)
        assert len(set(layers)) == n and 1 <= min(layers) and max(layers) < 24
    assert choose_exit_head_layers(12, [9, 3]) == (3, 9)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="count"):
            default_exit_head_layers(4, bad)
    with pytest.raises(ValueError, match="layer 4 is outside"):
        choose_exit_head_layers(4, (1, 4))
    with pytest.raises(ValueError, match="distinct"):
        choose_exit_head_layers(4, (2, 2))


def test_head_errors():
    config, params, _, _ = _setup("llama")
    heads = init_exit_heads(config, params, (2,))
    with pytest.raises(KeyError, match="no exit head on layer 1; heads on \\(2,\\)"):
        head_logits(config, heads, 1, jnp.ones((1, 1, config.d_model)))
    with pytest.raises(ValueError, match="outside \\[1, 4\\]"):
        init_exit_heads(config, params, (5,))
    with pytest.raises(ValueError, match="lack 'logits_dense'"):
        init_exit_heads(config, {"decoder": {"final_norm": params["decoder"]["final_norm"]}}, (1,))


def test_files_round_trip_and_name_what_does_not_fit(tmp_path):
    config, params, _, hidden = _setup("neox")
    heads = init_exit_heads(config, params, (1, 2))
    heads = jax.tree.map(lambda x: x + 0.01, heads)
    path = save_exit_heads(tmp_path / "sub" / "heads.msgpack", config, heads)
    assert sorted(p.name for p in path.parent.iterdir()) == ["heads.msgpack"]  # no .tmp left
    loaded = load_exit_heads(path, config)
    for a, b in zip(jax.tree.leaves(heads), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        head_logits(config, loaded, 2, hidden[1]), head_logits(config, heads, 2, hidden[1])
    )
    assert jax.tree.map(np.shape, load_exit_heads(path)) == jax.tree.map(np.shape, heads)

    bf16 = config.replace(param_dtype="bfloat16")
    dtypes = {x.dtype for x in jax.tree.leaves(load_exit_heads(path, bf16))}
    assert dtypes == {jnp.dtype("bfloat16")}
    with pytest.raises(ValueError, match=r"heads\.msgpack: head on layer 1: kernel has shape"):
        load_exit_heads(path, config.replace(vocab_size=config.vocab_size + 16))
    with pytest.raises(ValueError, match="heads.msgpack: heads for a decoder of 4 layers"):
        load_exit_heads(path, config.replace(num_layers=6))
    with pytest.raises(ValueError, match="head on layer 1 holds \\['kernel', 'norm/bias'"):
        load_exit_heads(path, lm_preset("tiny-llama", d_model=32, vocab_size=144, head_dim=8))
    with pytest.raises(FileNotFoundError, match="nothing.msgpack"):
        load_exit_heads(tmp_path / "nothing.msgpack")
    (tmp_path / "junk.msgpack").write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match="junk.msgpack: not a file of exit heads"):
        load_exit_heads(tmp_path / "junk.msgpack", config)


# ============================================================ entropy confidence


def test_entropy_confidence_on_hand_made_logits():
    probs = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],  # uniform: H = log 4 -> 0
            [0.5, 0.5, 0.0, 0.0],  # H = log 2 -> 1 - log 2 / log 4 = 0.5
            [1.0, 0.0, 0.0, 0.0],  # one-hot: H = 0 -> 1
            [0.7, 0.1, 0.1, 0.1],
        ]
    )
    with np.errstate(divide="ignore"):
        logits = jnp.asarray(np.log(probs), jnp.float32)  # -inf where p = 0
    h = -(0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1))
    want = [0.0, 0.5, 1.0, 1 - h / np.log(4)]
    conf = normalized_entropy_confidence(logits)
    np.testing.assert_allclose(conf, want, atol=1e-6)
    # Shift-invariant like a softmax, and higher is more confident.
    np.testing.assert_allclose(normalized_entropy_confidence(logits + 7.0), want, atol=1e-6)
    assert conf[2] > conf[1] > conf[3] > conf[0]  # [.7, .1, .1, .1] is flatter than [.5, .5]


def test_entropy_is_a_measure_decoders_accept():
    assert "entropy" in MEASURES
    assert MEASURES[:4] == ("softmax_margin", "softmax_max", "hidden_cosine", "learned")

    class Identity:  # exit logits = the hidden state itself
        exit_logits = staticmethod(lambda h, layer=None: h.astype(jnp.float32))

    hidden = jnp.log(jnp.array([[0.5, 0.5, 1e-30, 1e-30]]))
    logits, conf = exit_confidence(Identity(), "entropy", hidden)
    np.testing.assert_array_equal(logits, hidden)
    np.testing.assert_allclose(conf, [0.5], atol=1e-6)


def test_heads_shard_like_the_lm_head():
    from free_jax.partitioning import param_logical_axes

    config, params, _, _ = _setup("llama")
    axes = param_logical_axes(init_exit_heads(config, params, (2,)))
    assert axes == {"head_2": {"kernel": ("embed", "vocab"), "norm": {"scale": ("embed",)}}}
    assert param_logical_axes(params)["decoder"]["logits_dense"]["kernel"] == ("embed", "vocab")
