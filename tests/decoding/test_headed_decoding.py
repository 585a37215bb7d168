"""Decoders on a backbone with self-supervised exit heads (`models/headed.py`): the exits read the
trained heads where they exist, through the unchanged protocol."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_testlib import N, config, naive_greedy, params, prompts

from free_jax.decoding import FreeSpec, GreedySpec, StaticSpec, decode
from free_jax.models import DecoderLM, HeadedConfig
from free_jax.models.exit_heads import head_logits, init_exit_heads

NAME = "tiny-llama"
LAYERS = (1, 2)


@functools.lru_cache
def headed(perturb: float = 0.5):
    """(HeadedConfig, params) with heads on layers 1 and 2, moved away from the shared head."""
    base, backbone = config(NAME), params(NAME)
    heads = init_exit_heads(base, backbone, LAYERS)
    rng = np.random.default_rng(7)
    for name in heads:
        kernel = np.asarray(heads[name]["kernel"])
        heads[name]["kernel"] = jnp.asarray(
            kernel + perturb * rng.normal(size=kernel.shape) * kernel.std()
        )
    return HeadedConfig(base=base, head_layers=LAYERS), {"backbone": backbone, "exit_heads": heads}


def run(spec, threshold=None, perturb=0.5):
    c, p = headed(perturb)
    tokens, lengths = prompts(NAME)
    return np.asarray(
        decode(c, p, tokens, spec, max_decode_len=N, threshold=threshold, prompt_lengths=lengths).tokens
    )  # fmt: skip


def naive_head_greedy(prompt, layer: int):
    """Greedy on the head of `layer`, re-running the teacher-forced backbone every step."""
    c, p = headed()
    base = config(NAME)
    forward = jax.jit(
        lambda b, t: DecoderLM(base).apply({"params": b}, t, return_hidden=True).hidden[layer - 1]
    )
    seq, out = list(prompt), []
    for _ in range(N):
        padded = np.zeros((1, len(prompt) + N), np.int32)
        padded[0, : len(seq)] = seq
        hidden = forward(p["backbone"], jnp.asarray(padded))
        token = int(jnp.argmax(head_logits(base, p["exit_heads"], layer, hidden)[0, len(seq) - 1]))
        out.append(token)
        seq.append(token)
        if token == base.eos_token_id:
            break
    return out + [0] * (N - len(out))


def test_static_exit_reads_the_head_on_its_layer():
    tokens, lengths = prompts(NAME)
    got = run(StaticSpec(exit_layer=1))
    for row in range(3):
        assert got[row].tolist() == naive_head_greedy(tokens[row, : lengths[row]], 1)
    # the heads were moved away from the shared head, and the decoder followed them
    shared = [
        naive_greedy(NAME, params(NAME), tokens[r, : lengths[r]], exit_layer=1) for r in range(3)
    ]
    assert got.tolist() != shared


def test_fresh_heads_reproduce_the_shared_head_exits():
    tokens, lengths = prompts(NAME)
    base = decode(config(NAME), params(NAME), tokens, StaticSpec(exit_layer=2), max_decode_len=N,
                  prompt_lengths=lengths)  # fmt: skip
    np.testing.assert_array_equal(
        run(StaticSpec(exit_layer=2), perturb=0.0), np.asarray(base.tokens)
    )


def test_free_with_heads_never_exit_and_lossless_equal_greedy():
    greedy = run(GreedySpec())
    np.testing.assert_array_equal(run(FreeSpec(window=4), threshold=1.0), greedy)
    np.testing.assert_array_equal(run(FreeSpec(window=4, lossless=True), threshold=0.05), greedy)


def test_headed_config_delegates_and_checks():
    c, p = headed()
    assert c.shallow_layer == 1 and c.num_decoder_layers == config(NAME).num_decoder_layers
    assert c.replace(shallow_exit_layer=2).shallow_layer == 2
    assert c.replace(shallow_exit_layer=2).head_layers == LAYERS
    with pytest.raises(ValueError, match="head_layers"):
        HeadedConfig(base=config(NAME), head_layers=(0,))
    with pytest.raises(ValueError, match=r"no head for layer\(s\) \[3\]"):
        decode(HeadedConfig(base=config(NAME), head_layers=(1, 3)), p, prompts(NAME)[0],
               GreedySpec(), max_decode_len=N, prompt_lengths=prompts(NAME)[1])  # fmt: skip
