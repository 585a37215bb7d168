"""Every decoder on decoder-only models (Llama, GPT-NeoX, GPT-2 shapes): the properties the T5
decoders satisfy, on ragged right-padded prompts."""

import numpy as np
import pytest
from lm_testlib import FAMILIES, N, config, naive_greedy, params, prompts

from free_jax.decoding import CalmSpec, FreeSpec, GreedySpec, StaticSpec, decode, make_decoder


def run(name, spec, threshold=None, tokens=None, lengths=None):
    if tokens is None:
        tokens, lengths = prompts(name)
    return decode(
        config(name), params(name), tokens, spec, max_decode_len=N, threshold=threshold,
        prompt_lengths=lengths,
    )  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_greedy_equals_rerunning_the_full_model(name):
    tokens, lengths = prompts(name)
    out = run(name, GreedySpec())
    for row in range(3):
        want = naive_greedy(name, params(name), tokens[row, : lengths[row]])
        assert np.asarray(out.tokens)[row].tolist() == want


def test_static_exit_equals_rerunning_the_truncated_model():
    name = "tiny-llama"  # the same loop as greedy, with fewer layers: one family suffices
    tokens, lengths = prompts(name)
    out = run(name, StaticSpec(exit_layer=2))
    for row in range(3):
        want = naive_greedy(name, params(name), tokens[row, : lengths[row]], exit_layer=2)
        assert np.asarray(out.tokens)[row].tolist() == want


# Llama-shaped in `make test`; the other families' decoding paths are also covered there by
# test_hf_lm_generate (greedy and lossless on each family); all three run in `make test-slow`.
SLOW_OTHERS = ["tiny-llama", *(pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES[1:])]


@pytest.mark.parametrize("name", SLOW_OTHERS)
def test_never_exit_free_and_calm_equal_greedy(name):
    greedy = np.asarray(run(name, GreedySpec()).tokens)
    for spec in (FreeSpec(window=4), CalmSpec()):
        out = run(name, spec, threshold=1.0)
        np.testing.assert_array_equal(np.asarray(out.tokens), greedy)


@pytest.mark.parametrize("name", SLOW_OTHERS)
def test_lossless_equals_greedy_where_many_tokens_exit(name):
    greedy = np.asarray(run(name, GreedySpec()).tokens)
    plain = run(name, FreeSpec(window=4), threshold=0.05)
    assert plain.exit_rate(config(name).num_decoder_layers) > 0.3
    lossless = run(name, FreeSpec(window=4, lossless=True), threshold=0.05)
    np.testing.assert_array_equal(np.asarray(lossless.tokens), greedy)
    assert lossless.exit_rate(config(name).num_decoder_layers) > 0.1


@pytest.mark.parametrize("spec", [FreeSpec(window=4), CalmSpec(), GreedySpec()], ids=str)
def test_ragged_batch_equals_each_prompt_alone(spec):
    name = "tiny-llama"
    tokens, lengths = prompts(name)
    threshold = None if isinstance(spec, GreedySpec) else 0.3
    batch = np.asarray(run(name, spec, threshold).tokens)
    for row in range(3):
        # alone, with other garbage after the prompt (one compile for the three rows)
        alone = np.full((1, tokens.shape[1]), 7, np.int32)
        alone[0, : lengths[row]] = tokens[row, : lengths[row]]
        one = run(name, spec, threshold, alone, lengths[row : row + 1])
        assert np.asarray(one.tokens)[0].tolist() == batch[row].tolist()


def test_a_new_threshold_does_not_retrace():
    name = "tiny-neox"
    tokens, lengths = prompts(name)
    decoder = make_decoder(config(name), FreeSpec(window=4), max_decode_len=N)
    decoder(params(name), tokens, 0.1, prompt_lengths=lengths).tokens.block_until_ready()
    traced = decoder.trace_count
    for threshold in (0.2, 0.5, 0.9):
        decoder(params(name), tokens, threshold, prompt_lengths=lengths).tokens.block_until_ready()
    decoder(params(name), tokens, 0.3, prompt_lengths=[1, 3, 5]).tokens.block_until_ready()
    assert decoder.trace_count == traced
