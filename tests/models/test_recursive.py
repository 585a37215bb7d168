"""Recursive models: layer maps, initialisation sources, relaxation exactness, parameter counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.models import bind, init_params
from free_jax.models.configs import config_from_json
from free_jax.models.lm import DecoderLM, init_lm_params
from free_jax.models.lm_config import LMConfig, lm_preset
from free_jax.models.recursive import (
    TINY,
    RecursiveConfig,
    RecursiveLM,
    count_recursive_params,
    layer_params,
    loop_layers,
)
from free_jax.models.recursive_convert import init_sources, tie_groups, to_recursive


@pytest.mark.parametrize(
    "sharing, layers, loops, blocks_of_layers, exits",
    [
        ("cycle", 6, 3, [0, 1, 0, 1, 0, 1], (2, 4)),
        ("cycle", 6, 2, [0, 1, 2, 0, 1, 2], (3,)),
        ("cycle", 4, 1, [0, 1, 2, 3], ()),
        ("middle_cycle", 8, 3, [0, 1, 2, 1, 2, 1, 2, 3], (3, 5)),
        ("middle_cycle", 6, 2, [0, 1, 2, 1, 2, 3], (3,)),
        ("middle_cycle", 5, 3, [0, 1, 1, 1, 2], (2, 3)),
    ],
)
def test_layer_maps(sharing, layers, loops, blocks_of_layers, exits):
    c = RecursiveConfig(**TINY, num_layers=layers, num_loops=loops, sharing=sharing)
    assert [c.block_of(i) for i in range(layers)] == blocks_of_layers
    assert c.loop_exit_layers == exits
    assert c.num_blocks == max(blocks_of_layers) + 1
    # Loops partition the layers in order, and a loop ends where its exit sits.
    flat = [i for loop in loop_layers(c) for i in loop]
    assert flat == list(range(layers))
    assert tuple(loop[-1] + 1 for loop in loop_layers(c)[:-1]) == exits
    if loops > 1:
        assert c.shallow_layer == exits[0]


@pytest.mark.parametrize(
    "sharing, layers, loops, init, sources",
    [
        ("cycle", 6, 3, "stepwise", ((0,), (5,))),
        ("cycle", 6, 3, "lower", ((0,), (1,))),
        ("cycle", 6, 3, "average", ((0, 2, 4), (1, 3, 5))),
        ("cycle", 9, 3, "stepwise", ((0,), (4,), (8,))),
        ("cycle", 8, 2, "stepwise", ((0,), (2,), (5,), (7,))),
        ("middle_cycle", 8, 3, "stepwise", ((0,), (1,), (6,), (7,))),
        ("middle_cycle", 8, 3, "lower", ((0,), (1,), (2,), (7,))),
        ("middle_cycle", 8, 3, "average", ((0,), (1, 3, 5), (2, 4, 6), (7,))),
    ],
)
def test_init_sources(sharing, layers, loops, init, sources):
    c = RecursiveConfig(**TINY, num_layers=layers, num_loops=loops, sharing=sharing)
    assert init_sources(c, init) == sources
    assert init_sources(c, "average") == tie_groups(c)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_layers=7.*num_loops=3"):
        RecursiveConfig(**TINY, num_layers=7, num_loops=3)
    with pytest.raises(ValueError, match="sharing='ring'"):
        RecursiveConfig(**TINY, num_layers=6, num_loops=3, sharing="ring")
    with pytest.raises(ValueError, match="lora_rank=-1"):
        RecursiveConfig(**TINY, num_layers=6, num_loops=3, lora_rank=-1)
    with pytest.raises(ValueError, match="init='top'"):
        to_recursive(LMConfig(**TINY, num_layers=6), {}, num_loops=3, init="top")


def _family(name: str, layers: int) -> LMConfig:
    return lm_preset(name).replace(num_layers=layers)


# Each family's layout (biases, layer norms, parallel residual, learned positions) with one scheme.
@pytest.mark.parametrize(
    "family, sharing, loops, init",
    [
        ("tiny-llama", "cycle", 3, "stepwise"),
        pytest.param("tiny-neox", "cycle", 2, "average", marks=pytest.mark.slow),
        pytest.param("tiny-gpt2", "middle_cycle", 2, "lower", marks=pytest.mark.slow),
    ],
)
def test_full_rank_relaxation_equals_the_original(family, sharing, loops, init):
    lm_config = _family(family, 6)
    lm_params = init_lm_params(lm_config, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, lm_config.vocab_size)
    want = DecoderLM(lm_config).apply({"params": lm_params}, tokens).logits
    full_rank = max(lm_config.d_model, lm_config.d_ff)
    config, params = to_recursive(
        lm_config, lm_params, sharing=sharing, num_loops=loops, init=init, lora_rank=full_rank
    )
    got = RecursiveLM(config).apply(params, tokens).logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # A lower rank is a different (recursive-ish) model: the test above is not vacuous.
    config, params = to_recursive(
        lm_config, lm_params, sharing=sharing, num_loops=loops, init=init, lora_rank=1
    )
    assert float(jnp.abs(RecursiveLM(config).apply(params, tokens).logits - want).max()) > 1e-3


def test_rank_zero_is_the_pure_recursive_model():
    lm_config = _family("tiny-llama", 6)
    lm_params = init_lm_params(lm_config, jax.random.key(1))
    config, pure = to_recursive(lm_config, lm_params, num_loops=3, init="average")
    assert "relax" not in pure
    for layer in range(6):  # every layer runs its block's weights, unchanged
        block = pure["decoder"][f"blocks_{config.block_of(layer)}"]
        assert jax.tree.all(jax.tree.map(np.array_equal, layer_params(config, pure, layer), block))
    # A relaxation whose updates are all zero is the same model.
    relaxed_config = config.replace(lora_rank=4)
    relaxed = init_params(relaxed_config, jax.random.key(3))
    relaxed = {**pure, "relax": relaxed["relax"]}  # A random, B = 0, vector deltas 0
    tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, lm_config.vocab_size)
    np.testing.assert_array_equal(
        RecursiveLM(relaxed_config).apply(relaxed, tokens).logits,
        RecursiveLM(config).apply(pure, tokens).logits,
    )


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("sharing, layers", [("cycle", 6), ("middle_cycle", 8)])
def test_parameter_counts_follow_the_formulas(rank, sharing, layers):
    c = RecursiveConfig(**TINY, num_layers=layers, num_loops=3, sharing=sharing, lora_rank=rank)
    d, f, heads, kv, k = c.d_model, c.d_ff, c.num_heads, c.num_kv_heads, c.head_dim
    maps = [(d, heads * k), (d, kv * k), (d, kv * k), (heads * k, d), (d, f), (d, f), (f, d)]
    matrices = sum(i * o for i, o in maps)  # M: q, k, v, o, gate, up, down
    vectors = 2 * d  # v: the two RMS norm scales (Llama has no biases)
    embeddings = c.vocab_size * d + d + d * c.vocab_size  # table, final norm, untied head
    counts = count_recursive_params(c)
    assert counts["vanilla"] == embeddings + layers * (matrices + vectors)
    assert counts["blocks"] == c.num_blocks * (matrices + vectors)
    assert counts["relax"] == layers * (rank * sum(i + o for i, o in maps) + vectors) * (rank > 0)
    assert counts["total"] == embeddings + counts["blocks"] + counts["relax"]
    params = init_params(c, jax.random.key(0))
    assert count_recursive_params(c, params) == counts


def test_json_round_trip_and_protocol_decode():
    c = RecursiveConfig(**TINY, num_layers=6, num_loops=3, lora_rank=2)
    assert config_from_json(c.to_json()) == c
    params = init_params(c, jax.random.key(0))
    model = bind(c, params)  # the decoders' view: the materialised vanilla model
    context, cache = model.start(jnp.ones((2, 3), jnp.int32), None, extra_length=2)
    assert len(cache.layers) == 6 and context.base_B.tolist() == [2, 2]


def test_relaxation_leaves_shard_like_their_block_with_a_leading_layer_axis():
    from free_jax.models import param_shapes
    from free_jax.partitioning import param_logical_axes

    c = RecursiveConfig(**TINY, num_layers=6, num_loops=3, lora_rank=2)
    axes = param_logical_axes(param_shapes(c))
    block, relax = axes["decoder"]["blocks_0"], axes["relax"]
    kernel = block["mlp"]["wo"]["kernel"]
    assert relax["mlp"]["wo"]["kernel"] == {
        "lora_a": (None, kernel[0], None),
        "lora_b": (None, None, kernel[1]),
    }
    assert relax["pre_mlp_norm"]["scale"] == (None, *block["pre_mlp_norm"]["scale"])
