"""Properties of the decoder-only LM on tiny presets of each family.

Cached equals uncached (token by token and by chunks), split layer ranges equal the whole range,
ragged batched prompts equal each prompt alone, exits equal running the first k layers, layer_kv
equals what the cache holds, packed rows equal their segments alone; plus shapes and errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.checkpoints.naming import flatten, to_params
from free_jax.models.lm import DecoderLM, lm_param_shapes
from free_jax.models.lm_config import LMConfig, lm_preset
from free_jax.models.protocol import bind
from free_jax.models.t5 import count_params

FAMILIES = ["tiny-llama", "tiny-neox", "tiny-gpt2"]
ATOL = 2e-5


@functools.cache
def _model(name: str, **overrides):
    """A bound model with random parameters everywhere (biases and norm scales included).

    Drawn with numpy over `lm_param_shapes`: compiling the random initialiser costs seconds.
    """
    config = lm_preset(name, **overrides)
    rng = np.random.default_rng(0)
    flat = flatten(lm_param_shapes(config))
    params = {
        k: (1.0 if k.endswith("/scale") else 0.0) + 0.2 * rng.standard_normal(v.shape)
        for k, v in flat.items()
    }
    params = to_params(params, config)
    return config, bind(config, params)


class _Jitted:
    """The model's protocol methods under `jax.jit` (eager op-by-op dispatch is slow on CPU);
    `test_cached_step_is_the_same_under_jit` checks jitted equals eager."""

    def __init__(self, model):
        self.model = model
        self.embed = jax.jit(model.embed)
        self.exit_logits = jax.jit(model.exit_logits)
        self._layers = jax.jit(
            lambda h, cache, offset_B, start, end: model.layers(
                h, start=start, end=end, cache=cache, offset_B=offset_B
            ),
            static_argnums=(3, 4),
        )
        self._start = jax.jit(
            lambda p, n, extra: model.start(p, n, extra_length=extra), static_argnums=(2,)
        )
        self._forward = jax.jit(
            lambda t, exits, seg, pos: model(
                t, exit_layers=exits, segment_ids_BT=seg, positions_BT=pos, return_hidden=True
            ),
            static_argnums=(1,),
        )

    def __getattr__(self, name):  # everything else runs eagerly
        return getattr(self.model, name)

    def layers(self, hidden, *, start, end, cache, offset_B, context=None):
        return self._layers(hidden, cache, jnp.asarray(offset_B), start, end)

    def start(self, prompt, lengths, *, extra_length):
        return self._start(jnp.asarray(prompt), lengths, extra_length)

    def __call__(self, tokens, exit_layers=(), segment_ids_BT=None, positions_BT=None, **_):
        return self._forward(jnp.asarray(tokens), tuple(exit_layers), segment_ids_BT, positions_BT)


@functools.cache
def _fast(name: str):
    config, model = _model(name)
    return config, _Jitted(model)


def _tokens(config, shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, size=shape))


def _close(a, b, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


# ------------------------------------------------------------------ cached = uncached


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_steps_and_chunk_equal_teacher_forced(name):
    config, model = _fast(name)
    b, s, t = 2, 5, 11
    tokens_BT = _tokens(config, (b, t))
    teacher_BTV = model(tokens_BT).logits
    context, cache = model.start(tokens_BT[:, :s], None, extra_length=t - s)
    np.testing.assert_array_equal(context.first_token_B, tokens_BT[:, s - 1])
    np.testing.assert_array_equal(context.base_B, [s - 1, s - 1])
    L = config.num_decoder_layers
    # One chunk of every remaining position.
    offset_B = context.base_B
    hidden, _ = model.layers(
        model.embed(tokens_BT[:, s - 1 :], offset_B), start=0, end=L, cache=cache,
        context=context, offset_B=offset_B,
    )  # fmt: skip
    _close(model.exit_logits(hidden), teacher_BTV[:, s - 1 :])
    # Token by token.
    for pos in range(s - 1, t):
        offset_B = jnp.full((b,), pos)
        hidden, cache = model.layers(
            model.embed(tokens_BT[:, pos : pos + 1], offset_B), start=0, end=L, cache=cache,
            context=context, offset_B=offset_B,
        )  # fmt: skip
        _close(model.exit_logits(hidden)[:, 0], teacher_BTV[:, pos])


@pytest.mark.parametrize("name", FAMILIES)
def test_split_layer_ranges_equal_the_whole(name):
    config, model = _fast(name)
    tokens_BT = _tokens(config, (2, 6), seed=1)
    L = config.num_decoder_layers
    _, cache = model.start(tokens_BT, None, extra_length=3)
    offset_B = jnp.array([2, 5])
    x = model.embed(tokens_BT[:, :3], offset_B)
    whole, whole_cache = model.layers(x, start=0, end=L, cache=cache, offset_B=offset_B)
    hidden, part = x, cache
    for a, b in ((0, 1), (1, L - 1), (L - 1, L)):
        hidden, part = model.layers(hidden, start=a, end=b, cache=part, offset_B=offset_B)
    _close(hidden, whole)
    for got, want in zip(jax.tree_util.tree_leaves(part), jax.tree_util.tree_leaves(whole_cache)):
        _close(got, want)


@pytest.mark.parametrize("name", FAMILIES)
def test_ragged_batch_equals_each_prompt_alone(name):
    config, model = _fast(name)
    lengths = [7, 4, 1]
    prompts = _tokens(config, (3, 7), seed=2)
    # Padding is arbitrary, even outside the vocabulary.
    padded = np.array(prompts)
    for row, n in enumerate(lengths):
        padded[row, n:] = [-3, config.vocab_size + 5, 9, 0, 1, 2, 3][: 7 - n]
    L = config.num_decoder_layers
    steps = 3

    def greedy(prompt_BS, lengths_B):
        context, cache = model.start(jnp.asarray(prompt_BS), lengths_B, extra_length=steps)
        token_B, offset_B, logits, tokens = context.first_token_B, context.base_B, [], []
        for _ in range(steps):
            hidden, cache = model.layers(
                model.embed(token_B[:, None], offset_B), start=0, end=L, cache=cache,
                offset_B=offset_B,
            )  # fmt: skip
            step = model.exit_logits(hidden)[:, 0]
            logits.append(step)
            token_B, offset_B = jnp.argmax(step, -1), offset_B + 1
            tokens.append(token_B)
        return jnp.stack(logits, 1), jnp.stack(tokens, 1)

    batched, tokens = greedy(padded, jnp.array(lengths))
    for row, n in enumerate(lengths):
        # Alone, teacher-forced on the prompt and the tokens the batch chose.
        alone = jnp.concatenate([prompts[row, :n], tokens[row, :-1]])[None]
        _close(batched[row], model(alone).logits[0, n - 1 :])
    # And alone through the cache, for the shortest prompt.
    _close(batched[2], greedy(prompts[2:, :1], None)[0][0])


@pytest.mark.parametrize("name", FAMILIES)
def test_exit_logits_equal_running_the_first_k_layers(name):
    config, model = _fast(name)
    tokens_BT = _tokens(config, (2, 6), seed=3)
    out = model(tokens_BT, exit_layers=(1, 2, 3), return_hidden=True)
    assert len(out.hidden) == config.num_decoder_layers
    _close(model.exit_logits(out.hidden[-1]), out.logits)
    cache = model.init_cache(2, 6)
    zero_B = jnp.zeros((2,), jnp.int32)
    for k in (1, 2, 3):
        hidden, _ = model.layers(
            model.embed(tokens_BT, zero_B), start=0, end=k, cache=cache, offset_B=zero_B
        )
        _close(model.exit_logits(hidden), out.exit_logits[k])
        _close(model.exit_logits(out.hidden[k - 1]), out.exit_logits[k])
        assert out.exit_logits[k].dtype == jnp.float32
    _close(model.final_norm(out.hidden[0]), model.decoder.final_norm(out.hidden[0]))


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_kv_equals_what_the_cache_holds(name):
    config, model = _fast(name)
    b, c = 2, 3
    offset_B = jnp.array([0, 4])
    tokens_BC = _tokens(config, (b, c), seed=4)
    cache = model.init_cache(b, 8)
    hidden = model.embed(tokens_BC, offset_B)
    for layer in range(config.num_decoder_layers):
        key, value = model.layer_kv(hidden, layer, offset_B)
        assert key.shape == (b, config.num_kv_heads, c, config.head_dim)
        new_hidden, cache = model.layers(
            hidden, start=layer, end=layer + 1, cache=cache, offset_B=offset_B
        )
        for row, start in enumerate(np.asarray(offset_B)):
            written = cache.layers[layer]
            _close(written.key_BHTK[row, :, start : start + c], key[row])
            _close(written.value_BHTK[row, :, start : start + c], value[row])
        hidden = new_hidden


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_segments_equal_each_sequence_alone(name):
    config, model = _fast(name)
    first, second = _tokens(config, (1, 5), seed=5), _tokens(config, (1, 4), seed=6)
    packed = jnp.concatenate([first, second, jnp.zeros((1, 2), jnp.int32)], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 2])
    positions = jnp.array([list(range(5)) + list(range(4)) + [0, 0]])
    out = model(packed, segment_ids_BT=segments, positions_BT=positions).logits
    assert np.isfinite(np.asarray(out)).all()
    _close(out[0, :5], model(first).logits[0])
    _close(out[0, 5:9], model(second).logits[0])


def test_cached_step_is_the_same_under_jit():
    config, model = _model("tiny-llama")
    tokens_BT = _tokens(config, (2, 6), seed=7)
    context, cache = model.start(tokens_BT, jnp.array([6, 3]), extra_length=2)

    def step(cache, token_B, offset_B):
        hidden, cache = model.layers(
            model.embed(token_B[:, None], offset_B), start=0, end=4, cache=cache, offset_B=offset_B
        )
        return model.exit_logits(hidden), cache

    eager, _ = step(cache, context.first_token_B, context.base_B)
    jitted, _ = jax.jit(step)(cache, context.first_token_B, context.base_B)
    _close(jitted, eager, atol=1e-5)
    start = jax.jit(lambda p, n: model.start(p, n, extra_length=2))
    jit_context, jit_cache = start(tokens_BT, jnp.array([6, 3]))
    np.testing.assert_array_equal(jit_context.base_B, context.base_B)
    _close(jit_cache.layers[3].key_BHTK, cache.layers[3].key_BHTK, atol=1e-5)


def test_long_prompts_prefill_in_chunks(monkeypatch):
    import free_jax.models.lm as lm

    config, model = _model("tiny-neox")
    tokens_BT = _tokens(config, (1, 9), seed=8)
    start = lambda: jax.jit(lambda p: model.start(p, None, extra_length=1))(tokens_BT)
    _, whole = start()
    monkeypatch.setattr(lm, "PREFILL_CHUNK", 3)  # 8 prefill positions: chunks of 3, 3, 2
    _, chunked = start()
    for got, want in zip(jax.tree_util.tree_leaves(chunked), jax.tree_util.tree_leaves(whole)):
        _close(got, want)


# ------------------------------------------------------------------ shapes and trees


def test_parameter_tree_names_and_gqa_shapes():
    config = lm_preset("tiny-llama")
    flat = {k: v.shape for k, v in flatten(lm_param_shapes(config)).items()}
    d, k = config.d_model, config.head_dim
    assert flat["decoder/layers_0/attention/query/kernel"] == (d, 6 * k)
    assert flat["decoder/layers_0/attention/key/kernel"] == (d, 2 * k)
    assert flat["decoder/layers_0/attention/value/kernel"] == (d, 2 * k)
    assert flat["decoder/layers_0/attention/out/kernel"] == (6 * k, d)
    assert flat["decoder/layers_3/mlp/wi_0/kernel"] == (d, config.d_ff)
    assert flat["decoder/layers_3/mlp/wi_1/kernel"] == (d, config.d_ff)
    assert flat["decoder/logits_dense/kernel"] == (d, config.vocab_size)
    assert flat["decoder/final_norm/scale"] == (d,)
    assert not any(name.endswith("bias") for name in flat)
    assert count_params(lm_param_shapes(config)) == sum(int(np.prod(s)) for s in flat.values())
    model = DecoderLM(config)
    cache = jax.eval_shape(lambda: model.init_cache(3, 10))
    assert cache.layers[0].key_BHTK.shape == (3, 2, 10, k)
    assert len(cache.layers) == 4

    gpt2 = {k: v.shape for k, v in flatten(lm_param_shapes(lm_preset("tiny-gpt2"))).items()}
    assert gpt2["position_embedder/embedding"] == (64, 36)
    assert "decoder/logits_dense/kernel" not in gpt2  # tied
    assert gpt2["decoder/layers_0/mlp/wi/bias"] == (144,)
    assert gpt2["decoder/layers_0/attention/out/bias"] == (36,)
    assert gpt2["decoder/layers_0/pre_mlp_norm/bias"] == (36,)
    neox = flatten(lm_param_shapes(lm_preset("tiny-neox")))
    assert "position_embedder/embedding" not in neox


def test_learned_positions_past_the_table_are_clipped():
    config, model = _model("tiny-gpt2")
    tokens = _tokens(config, (1, 2))
    far = model.embed(tokens, jnp.array([1000]))
    last = model.embed(tokens, jnp.array([config.max_position_embeddings - 1]))
    _close(far[:, 0], last[:, 0])


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
    config32, model32 = _model("tiny-llama")
    config16 = lm_preset("tiny-llama", dtype="bfloat16")
    model16 = _Jitted(bind(config16, model32.variables["params"]))
    tokens = _tokens(config32, (1, 6))
    out16 = model16(tokens).logits
    assert out16.dtype == jnp.float32
    _, cache = model16.start(tokens, None, extra_length=1)
    assert cache.layers[0].key_BHTK.dtype == jnp.bfloat16
    out32 = _fast("tiny-llama")[1](tokens).logits
    # bfloat16 keeps ~3 significant digits: a sanity bound on the dtype plumbing, not parity.
    assert np.abs(np.asarray(out16 - out32)).max() < 0.1 * np.abs(np.asarray(out32)).max()


# ------------------------------------------------------------------ errors


def test_errors_name_the_field_or_range():
    config, model = _model("tiny-llama")
    tokens = _tokens(config, (2, 4))
    with pytest.raises(ValueError, match=r"exit layer=4 is outside the valid range \[1, 4\)"):
        model(tokens, exit_layers=(4,))
    cache = model.init_cache(2, 4)
    zero = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"range \[2, 5\) is not inside \[0, 4\]"):
        model.layers(model.embed(tokens, zero), start=2, end=5, cache=cache, offset_B=zero)
    with pytest.raises(ValueError, match=r"layer_kv: layer=4"):
        model.layer_kv(model.embed(tokens, zero), 4, zero)
    with pytest.raises(ValueError, match=r"lengths_B must be \[B=2\] ints in \[1, S=4\]"):
        model.start(tokens, jnp.array([0, 2]), extra_length=1)
    with pytest.raises(ValueError, match=r"lengths_B must be"):
        model.start(tokens, jnp.array([5, 2]), extra_length=1)
    with pytest.raises(ValueError, match=r"num_layers=5"):
        model.start(tokens, None, extra_length=1, num_layers=5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(tokens + config.vocab_size)
    with pytest.raises(ValueError, match=r"LMConfig.num_kv_heads=3 must divide num_heads=8"):
        LMConfig(d_model=64, num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"LMConfig.rotary_pct=0.1"):
        LMConfig(d_model=64, num_heads=4, rotary_pct=0.1)
    with pytest.raises(ValueError, match=r"LMConfig.norm='batch'"):
        LMConfig(norm="batch")
    with pytest.raises(ValueError, match=r"LMConfig.shallow_exit_layer=8"):
        LMConfig(num_layers=8, shallow_exit_layer=8)
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported"):
        LMConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown LM preset"):
        lm_preset("pythia-7b")


def test_start_with_fewer_layers_leaves_the_rest_empty():
    config, model = _model("tiny-llama")
    _, cache = model.start(_tokens(config, (1, 5)), None, extra_length=1, num_layers=2)
    assert np.abs(np.asarray(cache.layers[1].key_BHTK[:, :, :4])).sum() > 0
    assert np.abs(np.asarray(cache.layers[2].key_BHTK)).sum() == 0
