"""Full-model greedy, sampling, beam search and static exit against teacher-forced references."""

import jax
import numpy as np
import pytest
from decode_testlib import (
    CONFIG,
    EOS,
    SEEDS,
    L,
    N,
    encoder_tokens,
    naive_greedy,
    replicate,
    teacher_forced,
    with_eos,
)

from free_jax.decoding import make_decoder


def _greedy():
    return make_decoder(CONFIG, method="greedy", max_decode_len=N)


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_equals_naive_loop_over_teacher_forced_model(seed):
    enc, params = encoder_tokens(seed), with_eos(seed)
    out = _greedy()(params, enc)
    want = naive_greedy(params, enc)
    np.testing.assert_array_equal(out.tokens, want)
    lengths = np.asarray(out.lengths)
    np.testing.assert_array_equal(lengths, [_length(row) for row in want])
    produced = np.arange(N)[None] < lengths[:, None]
    np.testing.assert_array_equal(np.asarray(out.exit_layer), np.where(produced, L, 0))
    np.testing.assert_array_equal(out.layers_computed, L * lengths)
    np.testing.assert_array_equal(out.num_deep_passes, lengths)
    assert int(out.batch_layers_computed) == L * lengths.max() == L * int(out.num_steps)
    for row, length in enumerate(lengths):  # per-example EOS, then padding
        assert want[row, length - 1] == EOS or length == N
        assert (want[row, length:] == 0).all()


def test_some_examples_end_early():
    lengths = [np.asarray(_greedy()(with_eos(s), encoder_tokens(s)).lengths) for s in SEEDS]
    assert len({int(x) for ls in lengths for x in ls}) >= 3


def test_per_example_max_lengths():
    enc, params = encoder_tokens(1), with_eos(1)
    _greedy()(params, enc)  # compiled for this shape (other test files may share the decoder)
    traced = _greedy().trace_count
    max_lengths = np.array([2, N, 5])
    out = _greedy()(params, enc, max_lengths=max_lengths)
    np.testing.assert_array_equal(out.tokens, naive_greedy(params, enc, max_lengths=max_lengths))
    assert (np.asarray(out.lengths) <= max_lengths).all()
    # a new max_lengths value is a traced argument
    assert _greedy().trace_count == traced


def test_batch_equals_each_example_alone():
    enc, params = encoder_tokens(2), with_eos(2)
    batch = _greedy()(params, enc)
    for row in range(3):
        np.testing.assert_array_equal(
            batch.tokens[row], _greedy()(params, replicate(enc, row)).tokens[0]
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_static_exit_equals_truncated_model(seed):
    enc, params = encoder_tokens(seed), with_eos(seed)
    static = make_decoder(CONFIG, method="static", max_decode_len=N, exit_layer=2)
    out = static(params, enc)
    want = naive_greedy(params, enc, exit_layer=2)
    np.testing.assert_array_equal(out.tokens, want)
    produced = np.arange(N)[None] < np.array([_length(row) for row in want])[:, None]
    np.testing.assert_array_equal(np.asarray(out.exit_layer), np.where(produced, 2, 0))
    np.testing.assert_array_equal(out.layers_computed, 2 * np.asarray(out.lengths))
    np.testing.assert_array_equal(out.num_deep_passes, [0, 0, 0])
    for row in range(3):
        alone = static(params, replicate(enc, row))
        np.testing.assert_array_equal(out.tokens[row], alone.tokens[0])


@pytest.mark.parametrize("seed", SEEDS)
def test_beam_one_and_top_k_one_sampling_equal_greedy(seed):
    enc, params = encoder_tokens(seed), with_eos(seed)
    greedy = _greedy()(params, enc)
    beam = make_decoder(CONFIG, method="beam", max_decode_len=N, beam_size=1)(params, enc)
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_array_equal(beam.lengths, greedy.lengths)
    sample = make_decoder(CONFIG, method="sample", max_decode_len=N, top_k=1)
    out = sample(params, enc, rng=jax.random.key(seed), temperature=2.0)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_beam_scores_are_teacher_forced_log_probabilities():
    enc, params = encoder_tokens(0), with_eos(0)
    beam = make_decoder(CONFIG, method="beam", max_decode_len=N, beam_size=3)
    for alpha in (0.0, 0.6):
        out = beam(params, enc, length_penalty=alpha)
        scores = np.asarray(out.beam_scores)
        assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
        for k in range(3):
            tokens = np.asarray(out.beam_tokens[:, k])
            logp = np.asarray(jax.nn.log_softmax(teacher_forced(params, enc, tokens).logits))
            picked = np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
            lengths = np.array([_length(row) for row in tokens])
            summed = np.where(np.arange(N) < lengths[:, None], picked, 0).sum(axis=1)
            normalised = summed / ((5 + lengths) / 6) ** alpha
            np.testing.assert_allclose(scores[:, k], normalised, rtol=1e-4, atol=1e-4)
        # distinct beams per example
        assert all(len({tuple(b) for b in np.asarray(out.beam_tokens[i])}) == 3 for i in range(3))
    assert beam.trace_count == 1  # length_penalty is traced


def _length(tokens):
    eos = np.flatnonzero(tokens == EOS)
    return int(eos[0]) + 1 if eos.size else N


def test_top_k_sampling_stays_in_the_top_k():
    enc, params = encoder_tokens(1), with_eos(1)
    sample = make_decoder(CONFIG, method="sample", max_decode_len=N, top_k=3)
    outs = [sample(params, enc, rng=jax.random.key(i)).tokens for i in range(3)]
    np.testing.assert_array_equal(outs[0], sample(params, enc, rng=jax.random.key(0)).tokens)
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])
    for tokens in outs:
        tokens = np.asarray(tokens)
        logits = np.asarray(teacher_forced(params, enc, tokens).logits)
        top3 = np.argsort(-logits, axis=-1)[..., :3]
        produced = np.arange(N)[None] < np.array([_length(r) for r in tokens])[:, None]
        assert ((top3 == tokens[..., None]).any(-1) | ~produced).all()
