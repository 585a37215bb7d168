"""`decode` / `make_decoder`: every method, jit once per static configuration, input checks."""

import jax
import numpy as np
import pytest
from decode_testlib import CONFIG, EOS, L, N, W, encoder_tokens, with_eos

from free_jax.decoding import METHODS, BeamResult, DecodeResult, decode, make_decoder

OPTIONS = {
    "greedy": {},
    "sample": dict(top_k=3, rng=jax.random.key(0)),
    "beam": dict(beam_size=3),
    "static": dict(exit_layer=2),
    "calm": dict(threshold=0.3, exit_layer=2),
    "free": dict(threshold=0.3, window=W),
    "free_lossless": dict(threshold=0.3, window=W),
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_the_common_layout(method):
    enc, params = encoder_tokens(1), with_eos(1)
    out = decode(CONFIG, params, enc, method=method, max_decode_len=N, **OPTIONS[method])
    assert isinstance(out, BeamResult if method == "beam" else DecodeResult)
    for field in ("tokens", "exit_layer", "confidence"):
        assert getattr(out, field).shape == (3, N)
    tokens, exit_layer = np.asarray(out.tokens), np.asarray(out.exit_layer)
    lengths = np.asarray(out.lengths)
    for row, length in enumerate(lengths):
        assert (exit_layer[row, :length] >= 1).all() and (exit_layer[row, :length] <= L).all()
        assert (tokens[row, length:] == 0).all() and (exit_layer[row, length:] == 0).all()
        assert length == N or tokens[row, length - 1] == EOS
    assert out.layers_computed.shape == out.num_deep_passes.shape == (3,)


def test_new_thresholds_and_inputs_never_recompile():
    decoder = make_decoder(CONFIG, method="free", max_decode_len=N, window=W)
    assert make_decoder(CONFIG, method="free", max_decode_len=N, window=W) is decoder
    decoder(with_eos(0), encoder_tokens(0), 0.1)
    traced = decoder.trace_count
    for seed, threshold in [(0, 0.2), (1, 0.5), (2, 0.9), (1, -1.0)]:
        out = decoder(with_eos(seed), encoder_tokens(seed), threshold, max_lengths=[3, 4, 5])
        out.tokens.block_until_ready()
    assert decoder.trace_count == traced
    rolling = make_decoder(CONFIG, method="free", max_decode_len=N, window=W, rollback=True)
    rolling(with_eos(0), encoder_tokens(0), 0.1, rollback_threshold=1.0)
    traced = rolling.trace_count
    rolling(with_eos(0), encoder_tokens(0), 0.2, rollback_threshold=3.0)
    assert rolling.trace_count == traced


def test_records_and_exit_rate():
    out = decode(
        CONFIG, with_eos(1), encoder_tokens(1), method="free", max_decode_len=N, threshold=0.3,
        window=W,
    )  # fmt: skip
    conf, agree = out.records.pairs()
    assert conf.shape == agree.shape and conf.size == int(np.asarray(out.records.valid).sum())
    exit_layer = np.asarray(out.exit_layer)
    assert out.exit_rate(L) == pytest.approx((exit_layer == 1).sum() / (exit_layer > 0).sum())


def test_bad_arguments_are_rejected_before_compiling():
    enc, params = encoder_tokens(0), with_eos(0)
    run = lambda **kw: decode(CONFIG, params, enc, max_decode_len=N, **kw)
    with pytest.raises(ValueError, match="unknown decoding method"):
        run(method="topp")
    with pytest.raises(ValueError, match="needs a threshold"):
        run(method="free")
    with pytest.raises(ValueError, match="needs exit_layer"):
        run(method="static")
    with pytest.raises(ValueError, match=r"valid range \[1, 4\)"):
        run(method="static", exit_layer=4)
    with pytest.raises(ValueError, match="rollback applies to method 'free'"):
        run(method="free_lossless", threshold=0.5, rollback_threshold=1.0)
    with pytest.raises(ValueError, match="needs confidence_params"):
        run(method="free", threshold=0.5, measure="learned")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode(CONFIG, params, enc + 200, method="greedy", max_decode_len=N)
