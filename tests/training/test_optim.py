"""Schedules by hand, gradient clipping and accumulation (optax.MultiSteps)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from free_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule


def test_rsqrt_schedule_ramps_then_decays_as_inverse_sqrt():
    s = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=4), 100)
    got = [float(s(i)) for i in (0, 1, 3, 4, 15)]
    np.testing.assert_allclose(got, [0.25, 0.5, 1.0, np.sqrt(4 / 5), 0.5], rtol=1e-6)


@pytest.mark.parametrize(
    "kind, quarter", [("cosine", 0.1 + 0.45 * (1 + np.cos(np.pi / 4))), ("linear", 0.775)]
)
def test_cosine_and_linear_decay_to_the_end_value(kind, quarter):
    cfg = OptimizerConfig(
        learning_rate=1.0, warmup_steps=0, schedule=kind, end_learning_rate_fraction=0.1
    )
    s = make_schedule(cfg, 12)  # update k (0-based) is at fraction (k + 1) / 12 of the decay
    assert float(s(2)) == pytest.approx(quarter, rel=1e-6)
    assert float(s(5)) == pytest.approx(0.55, rel=1e-6)  # half way, both kinds
    assert float(s(11)) == pytest.approx(0.1, rel=1e-6)
    assert float(s(40)) == pytest.approx(0.1, rel=1e-6)


def test_constant_schedule():
    s = make_schedule(OptimizerConfig(learning_rate=3e-4, schedule="constant"), 10)
    assert float(s(0)) == float(s(9)) == pytest.approx(3e-4)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_clipping_runs_before_the_optimizer(name):
    base = dict(name=name, learning_rate=0.1, schedule="constant")
    params = {"w": jnp.ones(3)}
    grad = {"w": jnp.array([300.0, 400.0, 0.0])}
    clipped_tx, _ = make_optimizer(OptimizerConfig(**base, clip_grad_norm=1.0), 10)
    plain_tx, _ = make_optimizer(OptimizerConfig(**base, clip_grad_norm=None), 10)
    got, _ = clipped_tx.update(grad, clipped_tx.init(params), params)
    want, _ = plain_tx.update({"w": jnp.array([0.6, 0.8, 0.0])}, plain_tx.init(params), params)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_gradient_accumulation_equals_one_step_on_the_mean_gradient(name):
    base = dict(name=name, learning_rate=0.05, schedule="constant", clip_grad_norm=None)
    params = {"w": jnp.arange(6.0).reshape(2, 3) + 1.0}
    g1 = {"w": jnp.ones((2, 3)) * 0.3}
    g2 = {"w": -jnp.arange(6.0).reshape(2, 3) * 0.1}
    one, _ = make_optimizer(OptimizerConfig(**base), 10)
    u, _ = one.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), one.init(params), params)
    want = optax.apply_updates(params, u)

    acc, _ = make_optimizer(OptimizerConfig(**base, grad_accum_steps=2), 20)
    state = acc.init(params)
    u1, state = acc.update(g1, state, params)
    mid = optax.apply_updates(params, u1)
    np.testing.assert_array_equal(mid["w"], params["w"])  # no update after the first batch
    u2, state = acc.update(g2, state, mid)
    np.testing.assert_allclose(optax.apply_updates(mid, u2)["w"], want["w"], rtol=1e-6)


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="adamw"):
        OptimizerConfig(name="sgd")
