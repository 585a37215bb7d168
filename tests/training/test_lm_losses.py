"""FREE / CALM / CE on a decoder-only model: a hand computation from the model's own outputs,
gradients into the shallow layers, and packed rows scoring like the same examples unpacked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.models import init_params
from free_jax.models.lm import DecoderLM
from free_jax.models.lm_config import lm_preset
from free_jax.training.losses import LossConfig, compute_loss, exit_losses, teacher_layers

_compute_loss = jax.jit(compute_loss, static_argnums=(0, 1), static_argnames=("deterministic",))


@pytest.fixture(scope="module")
def tiny():
    """tiny-llama (L=4) with S=2, and a [2, 6] batch whose second row ends in padding."""
    config = lm_preset("tiny-llama", shallow_exit_layer=2)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (2, 7)).astype(np.int32)
    tokens[1, 5:] = 0
    weights = np.array([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], np.float32)  # prompt, target, pad
    batch = {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": weights,
    }
    return config, params, batch


def _ce(logits, targets, weights):
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits).sum(-1))
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return ((log_z - picked) * weights).sum() / weights.sum()


def test_free_loss_equals_a_hand_computation_from_the_lm_output(tiny):
    config, params, batch = tiny
    s, big_l = 2, 4
    assert teacher_layers(big_l, s) == (2, 4)

    def outputs(model, tokens):
        out = model(tokens, exit_layers=(s,), return_hidden=True)
        return out.logits, out.exit_logits[s], [model.final_norm(h) for h in out.hidden]

    deep, shallow, normed = jax.jit(
        lambda p, t: DecoderLM(config).apply({"params": p}, t, method=outputs)
    )(params, batch["decoder_input_tokens"])
    targets, w = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    ce_s, ce_l = _ce(shallow, targets, w), _ce(deep, targets, w)

    def mse(a, b):
        per_token = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean(-1)
        return (per_token * w).sum() / w.sum()

    # Students: layers 1, 2. Teachers: layers 2, 4. The deepest teacher picks its closest
    # student; the one before must pick a shallower student (or repeat student 0).
    errors = [[mse(normed[st], normed[te - 1]) for st in (0, 1)] for te in (2, 4)]
    last_pick = int(np.argmin(errors[1]))
    first_pick = 0
    kd = (errors[0][first_pick] + errors[1][last_pick]) / 2
    want = (s * ce_s + big_l * ce_l) / (s + big_l) + 0.5 * kd

    total, metrics = _compute_loss(config, LossConfig(kind="free", kd_alpha=0.5), params, batch)
    assert float(metrics["ce_shallow"]) == pytest.approx(ce_s, rel=1e-5)
    assert float(metrics["ce_deep"]) == pytest.approx(ce_l, rel=1e-5)
    assert float(metrics["kd"]) == pytest.approx(kd, rel=1e-4)
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert [float(metrics["kd_align_0"]), float(metrics["kd_align_1"])] == [first_pick, last_pick]


def test_every_kind_is_finite_and_they_agree(tiny):
    config, params, batch = tiny
    results = {k: _compute_loss(config, LossConfig(kind=k), params, batch) for k in ("free", "calm", "ce")}  # fmt: skip
    for kind, (loss, metrics) in results.items():
        assert np.isfinite(float(loss)), kind
        assert all(np.isfinite(float(v)) for v in metrics.values()), kind
    free, calm, ce = (results[k][1] for k in ("free", "calm", "ce"))
    assert float(free["ce_deep"]) == pytest.approx(float(ce["ce_deep"]), rel=1e-6)
    assert float(free["ce_shallow"]) == pytest.approx(float(calm["ce_layer2"]), rel=1e-6)
    layer_ce = [float(calm[f"ce_layer{i}"]) for i in range(1, 5)]
    assert float(calm["loss"]) == pytest.approx(np.dot([1, 2, 3, 4], layer_ce) / 10, rel=1e-6)
    sums = jax.jit(exit_losses, static_argnums=0)(config, params, batch)
    for i in range(1, 5):
        assert float(sums[f"ce_layer{i}"] / sums["weight"]) == pytest.approx(layer_ce[i - 1], rel=1e-5)  # fmt: skip


def _layer_grad_norms(config, loss_config, params, batch, metric="loss"):
    def f(p):
        return compute_loss(config, loss_config, p, batch)[1][metric]

    grads = jax.jit(jax.grad(f))(params)
    return [
        float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(grads["decoder"][f"layers_{i}"])))
        for i in range(config.num_decoder_layers)
    ]


def test_gradients_reach_the_shallow_layers_and_the_shallow_exit_stops_at_s(tiny):
    config, params, batch = tiny
    norms = _layer_grad_norms(config, LossConfig(kind="free"), params, batch)
    assert all(n > 0 for n in norms), norms
    # The shallow exit reads layers 1..S only: its CE sends nothing into layers S+1..L.
    shallow = _layer_grad_norms(config, LossConfig(kind="free"), params, batch, "ce_shallow")
    assert shallow[0] > 0 and shallow[1] > 0 and shallow[2] == shallow[3] == 0.0


def test_packed_row_scores_like_the_same_examples_unpacked(tiny):
    """Segment ids and positions reach the model: two examples packed in one row give the losses
    of the same two examples in two rows."""
    config, params, _ = tiny
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, config.vocab_size, 5), rng.integers(3, config.vocab_size, 4)
    wa, wb = np.array([0, 1, 1, 1], np.float32), np.array([0, 1, 1], np.float32)
    packed = {
        "decoder_input_tokens": np.concatenate([a[:-1], b[:-1], [0]])[None].astype(np.int32),
        "decoder_target_tokens": np.concatenate([a[1:], b[1:], [0]])[None].astype(np.int32),
        "decoder_loss_weights": np.concatenate([wa, wb, [0]])[None],
        "decoder_segment_ids": np.array([[1, 1, 1, 1, 2, 2, 2, 0]], np.int32),
        "decoder_positions": np.array([[0, 1, 2, 3, 0, 1, 2, 0]], np.int32),
    }
    unpacked = {
        "decoder_input_tokens": np.array([a[:-1], np.append(b[:-1], 0)], np.int32),
        "decoder_target_tokens": np.array([a[1:], np.append(b[1:], 0)], np.int32),
        "decoder_loss_weights": np.array([wa, np.append(wb, 0)], np.float32),
    }
    for kind in ("free", "calm"):
        got, m1 = _compute_loss(config, LossConfig(kind=kind), params, packed)
        want, m2 = _compute_loss(config, LossConfig(kind=kind), params, unpacked)
        assert float(got) == pytest.approx(float(want), rel=1e-5), kind
        assert float(m1["ce_deep"]) == pytest.approx(float(m2["ce_deep"]), rel=1e-5), kind
