"""LoRA: merged weights equal the unmerged low-rank forward; a fresh adapter is the identity;
training touches only the adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from free_jax.models import T5, init_params, preset
from free_jax.training.lora import LoraConfig, init_lora, lora_interceptor, merge_lora


@pytest.fixture(scope="module")
def setup():
    config = preset("tiny")
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    enc = rng.integers(2, 128, (2, 7)).astype(np.int32)
    dec = rng.integers(2, 128, (2, 5)).astype(np.int32)
    return config, params, enc, dec


def _forward(config):
    return jax.jit(lambda p, e, d: T5(config).apply({"params": p}, e, d, exit_layers=(1,)))


def test_adapters_cover_every_projection_and_mlp_kernel(setup):
    config, params, _, _ = setup
    lora = init_lora(params, LoraConfig(rank=4, alpha=8), jax.random.key(1))
    modules = {k[:-1] for k in traverse_util.flatten_dict(lora)}
    names = {m[-1] for m in modules}
    assert names == {"query", "key", "value", "out", "wi_0", "wi_1", "wo"}
    # 2 encoder layers x (4 attention + 3 MLP) + 4 decoder layers x (8 attention + 3 MLP)
    assert len(modules) == 2 * 7 + 4 * 11
    assert not any(m[-1] == "logits_dense" for m in modules)
    a = lora["decoder"]["layers_0"]["self_attention"]["query"]
    assert a["lora_a"].shape == (32, 4) and a["lora_b"].shape == (4, 24)


def test_fresh_adapter_leaves_the_model_unchanged(setup):
    config, params, enc, dec = setup
    lora = init_lora(params, LoraConfig(rank=4, alpha=8), jax.random.key(1))
    merged = merge_lora(params, lora, 2.0)
    fwd = _forward(config)
    np.testing.assert_array_equal(fwd(merged, enc, dec).logits, fwd(params, enc, dec).logits)


def test_merged_forward_equals_unmerged_low_rank_forward(setup):
    config, params, enc, dec = setup
    cfg = LoraConfig(rank=4, alpha=16)
    lora = init_lora(params, cfg, jax.random.key(1))
    # Non-zero B so that the adapters matter.
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), lora)
    merged = _forward(config)(merge_lora(params, lora, cfg.scale), enc, dec)

    @jax.jit
    def unmerged(p, lo, e, d):
        with nn.intercept_methods(lora_interceptor(lo, cfg.scale)):
            return T5(config).apply({"params": p}, e, d, exit_layers=(1,))

    out = unmerged(params, lora, enc, dec)
    base = _forward(config)(params, enc, dec)
    assert float(jnp.abs(merged.logits - base.logits).max()) > 1e-2  # adapters changed things
    np.testing.assert_allclose(merged.logits, out.logits, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(merged.exit_logits[1], out.exit_logits[1], atol=2e-4, rtol=2e-4)


def test_merge_is_w_plus_scaled_product(setup):
    _, params, _, _ = setup
    lora = init_lora(params, LoraConfig(rank=2, alpha=6, targets=("wo",)), jax.random.key(3))
    lora = jax.tree.map(lambda x: jnp.ones_like(x), lora)
    merged = merge_lora(params, lora, 3.0)
    w = params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]
    got = merged["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]
    np.testing.assert_allclose(got, w + 3.0 * 2.0, rtol=1e-6)  # (A @ B)_ij = rank * 1 * 1
    same = merged["decoder"]["layers_1"]["mlp"]["wi_0"]["kernel"]
    np.testing.assert_array_equal(same, params["decoder"]["layers_1"]["mlp"]["wi_0"]["kernel"])


def test_gradients_reach_only_the_adapters(setup):
    config, params, enc, dec = setup
    cfg = LoraConfig(rank=2, alpha=4)
    lora = init_lora(params, cfg, jax.random.key(1))

    def loss(lo, base):
        out = T5(config).apply({"params": merge_lora(base, lo, cfg.scale)}, enc, dec)
        return jnp.mean(out.logits**2)

    g_lora, g_base = jax.jit(jax.grad(loss, argnums=(0, 1)))(lora, params)
    # B starts at zero, so A gets no gradient at step 0 but B does.
    assert any(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g_lora))
    assert jax.tree.structure(g_lora) == jax.tree.structure(lora)
    del g_base  # the trainer differentiates the adapters only; the base stays frozen
