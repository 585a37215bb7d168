"""T5 model: shapes, exits, explicit cache (incremental and chunked), causality, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.models import T5, count_params, init_cache, init_params, param_shapes, preset

CONFIG = preset("tiny")
MODEL = T5(CONFIG)


@functools.lru_cache
def _params():
    return init_params(CONFIG, jax.random.key(0))


def _tokens(seed, shape, low=2):
    return jnp.asarray(np.random.default_rng(seed).integers(low, CONFIG.vocab_size, size=shape))


def _enc():
    enc = np.array(_tokens(1, (3, 9)))
    enc[1, 5:] = 0
    enc[2, 2:] = 0
    return jnp.asarray(enc)


def _apply(method=None, **kwargs):
    return functools.partial(MODEL.apply, {"params": _params()}, method=method, **kwargs)


def test_exit_logits_equal_head_of_hidden_state():
    enc, dec = _enc(), _tokens(2, (3, 7))
    out = _apply(exit_layers=(1, 2), return_hidden=True)(enc, dec)
    assert out.logits.shape == (3, 7, CONFIG.vocab_size)
    assert set(out.exit_logits) == {1, 2}
    assert len(out.decoder_hidden) == CONFIG.num_decoder_layers
    head = _apply(method=T5.exit_logits)
    np.testing.assert_allclose(out.exit_logits[1], head(out.decoder_hidden[0]), rtol=1e-6)
    np.testing.assert_allclose(out.logits, head(out.decoder_hidden[-1]), rtol=1e-6)


def test_no_exits_costs_nothing():
    enc, dec = _enc(), _tokens(2, (3, 7))
    # bind the parameters before tracing: initialising them inside the trace would count too
    apply_none, apply_exit = _apply(), _apply(exit_layers=(2,))
    jaxpr_none = jax.make_jaxpr(lambda e, d: apply_none(e, d).logits)(enc, dec)
    jaxpr_exit = jax.make_jaxpr(lambda e, d: apply_exit(e, d).logits)(enc, dec)
    # Asking for no exit must not trace a single extra head; asking for one adds equations.
    count = lambda j: len(j.jaxpr.eqns)
    assert count(jaxpr_none) < count(jaxpr_exit)
    out = _apply()(enc, dec)
    assert out.exit_logits == {} and out.decoder_hidden == ()


def _incremental(enc, dec, chunk_sizes_per_example=None):
    """Decodes `dec` through the cache, token by token; returns deep logits [B, T, V]."""
    encoded = _apply(method=T5.encode)(enc)
    cross = _apply(method=T5.precompute_cross)(encoded)
    b, t = dec.shape
    cache = init_cache(CONFIG, b, t)
    step = jax.jit(
        lambda h, cache, off: _apply(method=T5.decode_layers)(
            h, start=0, end=CONFIG.num_decoder_layers, cache=cache, cross=cross,
            encoder_mask_BS=enc != 0, offset_B=off,
        )
    )  # fmt: skip
    logits = []
    for i in range(t):
        h = _apply(method=T5.embed_decoder)(dec[:, i : i + 1])
        h, cache = step(h, cache, jnp.full((b,), i, jnp.int32))
        logits.append(_apply(method=T5.exit_logits)(h))
    return jnp.concatenate(logits, axis=1), cache


def test_cached_incremental_equals_uncached():
    enc, dec = _enc(), _tokens(3, (3, 8))
    full = _apply()(enc, dec).logits
    inc, _ = _incremental(enc, dec)
    np.testing.assert_allclose(inc, full, atol=1e-5, rtol=1e-5)


def test_chunked_writes_at_ragged_offsets_equal_token_by_token():
    """C=4 chunks at per-example offsets reproduce token-by-token decoding: same logits, same cache."""
    enc, dec = _enc(), _tokens(4, (3, 8))
    ref_logits, ref_cache = _incremental(enc, dec)
    b, t, c = 3, 8, 4
    offsets = np.array([0, 2, 3])  # ragged: each example's chunk starts elsewhere
    encoded = _apply(method=T5.encode)(enc)
    cross = _apply(method=T5.precompute_cross)(encoded)
    cache = init_cache(CONFIG, b, t + c)  # slack so a chunk near the end still fits
    layers = functools.partial(
        _apply(method=T5.decode_layers), start=0, end=CONFIG.num_decoder_layers, cross=cross,
        encoder_mask_BS=enc != 0,
    )  # fmt: skip
    # Positions before each offset token by token, then one chunk of 4 per example.
    for i in range(offsets.max()):
        h = _apply(method=T5.embed_decoder)(dec[:, i : i + 1])
        # examples whose offset is reached write garbage rows that the chunk overwrites next
        _, cache = layers(h, cache=cache, offset_B=jnp.full((b,), i, jnp.int32))
    idx = offsets[:, None] + np.arange(c)
    chunk_tokens = jnp.take_along_axis(dec, jnp.asarray(idx), axis=1)
    h = _apply(method=T5.embed_decoder)(chunk_tokens)
    h, cache = layers(h, cache=cache, offset_B=jnp.asarray(offsets, jnp.int32))
    chunk_logits = _apply(method=T5.exit_logits)(h)
    want = jnp.take_along_axis(ref_logits, jnp.asarray(idx)[..., None], axis=1)
    np.testing.assert_allclose(chunk_logits, want, atol=1e-5, rtol=1e-5)
    for layer, ref in zip(cache.layers, ref_cache.layers):
        for e in range(b):
            upto = offsets[e] + c
            np.testing.assert_allclose(
                layer.key_BHTK[e, :, :upto], ref.key_BHTK[e, :, :upto], atol=1e-5, rtol=1e-5
            )
            np.testing.assert_allclose(
                layer.value_BHTK[e, :, :upto], ref.value_BHTK[e, :, :upto], atol=1e-5, rtol=1e-5
            )


def test_layer_ranges_compose():
    """Running [0, S) then [S, L) through the cache equals running [0, L) at once."""
    enc, dec = _enc(), _tokens(5, (3, 1))
    encoded = _apply(method=T5.encode)(enc)
    cross = _apply(method=T5.precompute_cross)(encoded)
    h0 = _apply(method=T5.embed_decoder)(dec)
    s, n = CONFIG.shallow_layer, CONFIG.num_decoder_layers
    kw = dict(cross=cross, encoder_mask_BS=enc != 0, offset_B=jnp.zeros(3, jnp.int32))
    cache = init_cache(CONFIG, 3, 4)
    whole, cache_whole = _apply(method=T5.decode_layers)(h0, start=0, end=n, cache=cache, **kw)
    mid, cache_a = _apply(method=T5.decode_layers)(h0, start=0, end=s, cache=cache, **kw)
    top, cache_b = _apply(method=T5.decode_layers)(mid, start=s, end=n, cache=cache_a, **kw)
    np.testing.assert_allclose(top, whole, atol=1e-6)
    for a, b in zip(cache_b.layers, cache_whole.layers):
        np.testing.assert_allclose(a.key_BHTK, b.key_BHTK, atol=1e-6)
    # The shallow exit of `mid` is what the teacher-forced exit at S reports.
    out = _apply(exit_layers=(s,))(enc, dec)
    np.testing.assert_allclose(_apply(method=T5.exit_logits)(mid), out.exit_logits[s], atol=1e-5)


def test_causality_by_perturbation_and_gradient():
    enc, dec = _enc(), _tokens(6, (3, 8))
    base = _apply()(enc, dec).logits
    changed = dec.at[:, 5].set((dec[:, 5] + 7) % CONFIG.vocab_size)
    after = _apply()(enc, changed).logits
    np.testing.assert_array_equal(np.asarray(after[:, :5]), np.asarray(base[:, :5]))
    assert not np.allclose(after[:, 5:], base[:, 5:])

    # Gradient of logits at position 3 w.r.t. the decoder input embeddings is zero after 3.
    h = _apply(method=T5.embed_decoder)(dec)

    def logit_at_3(h_in):
        encoded = _apply(method=T5.encode)(enc)
        cross = _apply(method=T5.precompute_cross)(encoded)
        out, _ = _apply(method=T5.decode_layers)(
            h_in, start=0, end=CONFIG.num_decoder_layers, cache=init_cache(CONFIG, 3, 8),
            cross=cross, encoder_mask_BS=enc != 0, offset_B=jnp.zeros(3, jnp.int32),
        )  # fmt: skip
        return _apply(method=T5.exit_logits)(out)[:, 3].sum()

    grad = jax.grad(logit_at_3)(h)
    assert np.abs(np.asarray(grad[:, 4:])).max() == 0.0
    assert np.abs(np.asarray(grad[:, :4])).max() > 0.0


@pytest.mark.slow  # bf16 decoding of every family runs in the lowering and LM tests
def test_bf16_runs_and_stays_close():
    cfg16 = CONFIG.replace(dtype="bfloat16")
    enc, dec = _enc(), _tokens(7, (3, 5))
    out16 = T5(cfg16).apply({"params": _params()}, enc, dec).logits
    out32 = _apply()(enc, dec).logits
    assert out16.dtype == jnp.float32  # logits are always returned in float32
    # bf16 has an 8-bit mantissa; relative error per op ~4e-3, accumulated over 4+2 layers.
    assert float(jnp.max(jnp.abs(out16 - out32))) < 0.1 * float(jnp.max(jnp.abs(out32)))


def test_dropout_only_in_training():
    cfg = CONFIG.replace(dropout_rate=0.5)
    enc, dec = _enc(), _tokens(8, (3, 5))
    model = T5(cfg)
    a = model.apply({"params": _params()}, enc, dec, deterministic=True).logits
    b = model.apply({"params": _params()}, enc, dec, deterministic=True).logits
    c = model.apply(
        {"params": _params()}, enc, dec, deterministic=False, rngs={"dropout": jax.random.key(1)}
    ).logits
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize(
    "name, expected",
    [("t5-large", 737_668_096), ("flan-t5-large", 783_150_080), ("t5-small", 60_506_624)],
)
def test_full_size_presets_under_eval_shape(name, expected):
    # Counts published for the Hugging Face checkpoints (t5-small 60.5M, t5-large 737.7M, ...).
    assert count_params(param_shapes(preset(name))) == expected


def test_bad_input_rejected_before_compute():
    enc, dec = _enc(), _tokens(2, (3, 7))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 128\).*max 128"):
        _apply()(enc.at[0, 0].set(128), dec)
    with pytest.raises(ValueError, match="decoder_tokens.*min -1"):
        _apply()(enc, dec.at[0, 0].set(-1))
    with pytest.raises(ValueError, match=r"valid range \[1, 4\)"):
        _apply(exit_layers=(4,))(enc, dec)
    with pytest.raises(ValueError, match=r"valid range \[1, 4\)"):
        CONFIG.replace(shallow_exit_layer=0)
    with pytest.raises(ValueError, match="unknown T5 preset"):
        preset("t5-huge")
