"""Losses against hand computation on tiny tensors, FREE's teacher choice and dynamic alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.models import init_params, preset
from free_jax.training import losses
from free_jax.training.losses import (
    LossConfig,
    calm_loss,
    ce_loss,
    compute_loss,
    cross_entropy,
    distillation_loss,
    dynamic_alignment,
    free_loss,
    teacher_layers,
)


def _np_ce(logits, target):
    logits = np.asarray(logits, np.float64)
    return float(np.log(np.exp(logits).sum()) - logits[target])


# B=1, T=3, V=3; the third position is padding (weight 0) and must not count.
LOGITS_A = np.array([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [9.0, -9.0, 0.0]]], np.float32)
LOGITS_B = np.array([[[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 9.0]]], np.float32)
TARGETS = np.array([[0, 1, 2]], np.int32)
WEIGHTS = np.array([[1.0, 1.0, 0.0]], np.float32)


def test_cross_entropy_is_weighted_mean_over_real_tokens():
    want = (_np_ce(LOGITS_A[0, 0], 0) + _np_ce(LOGITS_A[0, 1], 1)) / 2
    got, z = cross_entropy(LOGITS_A, TARGETS, WEIGHTS)
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(z) == 0.0


def test_z_loss_is_weighted_mean_of_squared_log_partition():
    log_z = [np.log(np.exp(LOGITS_A[0, t].astype(np.float64)).sum()) for t in range(2)]
    _, z = cross_entropy(LOGITS_A, TARGETS, WEIGHTS, z_loss=1e-2)
    assert float(z) == pytest.approx(1e-2 * (log_z[0] ** 2 + log_z[1] ** 2) / 2, rel=1e-6)


def test_all_padding_batch_gives_zero_not_nan():
    got, _ = cross_entropy(LOGITS_A, TARGETS, np.zeros_like(WEIGHTS))
    assert float(got) == 0.0


def test_ce_loss_accuracy():
    _, metrics = ce_loss(LOGITS_A, TARGETS, WEIGHTS)
    # argmax: position 0 -> 0 (right), position 1 -> 1 (right); position 2 is padding.
    assert float(metrics["acc_deep"]) == 1.0


def test_calm_weights_layers_by_depth():
    ce_a = (_np_ce(LOGITS_A[0, 0], 0) + _np_ce(LOGITS_A[0, 1], 1)) / 2
    ce_b = (_np_ce(LOGITS_B[0, 0], 0) + _np_ce(LOGITS_B[0, 1], 1)) / 2
    total, metrics = calm_loss({1: LOGITS_A, 2: LOGITS_B}, TARGETS, WEIGHTS, shallow_layer=1)
    assert float(total) == pytest.approx((1 * ce_a + 2 * ce_b) / 3, rel=1e-6)
    assert float(metrics["ce_shallow"]) == pytest.approx(ce_a, rel=1e-6)
    assert float(metrics["ce_deep"]) == pytest.approx(ce_b, rel=1e-6)


def test_free_loss_by_hand():
    """S=1, L=2, one student, one teacher: total = (1*CE_S + 2*CE_L)/3 + alpha * MSE."""
    student = np.array([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]], np.float32)
    teacher = np.array([[[0.0, 0.0], [1.0, 1.0], [-5.0, 7.0]]], np.float32)
    # Per-token mean over D of squared differences: (1+0)/2 = 0.5, (1+1)/2 = 1; pad ignored.
    mse = (0.5 + 1.0) / 2
    ce_s = (_np_ce(LOGITS_A[0, 0], 0) + _np_ce(LOGITS_A[0, 1], 1)) / 2
    ce_l = (_np_ce(LOGITS_B[0, 0], 0) + _np_ce(LOGITS_B[0, 1], 1)) / 2
    total, metrics = free_loss(
        LOGITS_A, LOGITS_B, [student], [teacher], TARGETS, WEIGHTS,
        shallow_layer=1, num_layers=2, alpha=0.5,
    )  # fmt: skip
    assert float(metrics["kd"]) == pytest.approx(mse, rel=1e-6)
    assert float(total) == pytest.approx((ce_s + 2 * ce_l) / 3 + 0.5 * mse, rel=1e-6)
    assert float(metrics["ce_shallow"]) == pytest.approx(ce_s, rel=1e-6)
    assert float(metrics["ce_deep"]) == pytest.approx(ce_l, rel=1e-6)
    assert float(metrics["acc_shallow"]) == 1.0
    assert float(metrics["acc_deep"]) == 0.0  # B: argmax 1 at position 0, a tie -> 0 at 1


def test_dynamic_alignment_worked_example():
    mse = jnp.array([[1.0, 5.0, 6.0], [4.0, 2.0, 3.0], [9.0, 1.0, 2.0]])
    np.testing.assert_array_equal(dynamic_alignment(mse), [0, 0, 1])


def test_dynamic_alignment_is_greedy_from_the_last_teacher():
    # Independent argmins would be [2, 2]; the last teacher takes 2, so the first must go lower.
    mse = jnp.array([[3.0, 2.0, 1.0], [9.0, 9.0, 0.0]])
    np.testing.assert_array_equal(dynamic_alignment(mse), [1, 2])
    # The last teacher may take the shallowest student; everyone before repeats it.
    mse = jnp.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_array_equal(dynamic_alignment(mse), [0, 0, 0])


def test_dynamic_alignment_matches_a_brute_force_reference():
    """Against a plain-Python transcription of the rule on random error tables."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        t, s = rng.integers(1, 6), rng.integers(1, 6)
        mse = rng.random((t, s))
        picks, bound = [], s
        for row in mse[::-1]:
            allowed = [i for i in np.argsort(row, kind="stable") if i < bound]
            bound = allowed[0] if allowed else bound
            picks.append(bound)
        np.testing.assert_array_equal(dynamic_alignment(jnp.asarray(mse)), picks[::-1])


def test_distillation_uses_aligned_pairs_and_stops_teacher_gradients():
    w = np.ones((1, 1), np.float32)
    students = [jnp.full((1, 1, 2), v) for v in (0.0, 1.0, 2.0)]
    teachers = [jnp.full((1, 1, 2), v) for v in (2.1, 0.2)]
    # teacher 1 (0.2) -> student 0 (err 0.04); teacher 0 (2.1): nothing below 0 -> student 0 (4.41)
    kd, picks = distillation_loss(students, teachers, w)
    np.testing.assert_array_equal(picks, [0, 0])
    assert float(kd) == pytest.approx((0.04 + 4.41) / 2, rel=1e-5)

    grad_t = jax.grad(lambda t: distillation_loss(students, [t, teachers[1]], w)[0])(teachers[0])
    assert float(jnp.abs(grad_t).sum()) == 0.0
    grad_s = jax.grad(lambda s: distillation_loss([s, *students[1:]], teachers, w)[0])(students[0])
    assert float(jnp.abs(grad_s).sum()) > 0.0


def test_teacher_layers_match_the_reference_table_and_generalise():
    assert teacher_layers(12, 3) == (4, 8, 12)
    assert teacher_layers(24, 4) == (6, 12, 18, 24)
    assert teacher_layers(24, 8) == tuple(range(3, 25, 3))
    assert teacher_layers(24, 10) == (3, 6, 8, 11, 13, 16, 18, 20, 22, 24)
    assert teacher_layers(8, 2) == (4, 8)
    for num_layers in range(2, 49):
        for shallow in range(1, num_layers):
            t = teacher_layers(num_layers, shallow)
            assert len(t) == shallow and t[-1] == num_layers
            assert all(b > a for a, b in zip(t, t[1:]))
            assert all(layer > j for j, layer in enumerate(t, start=1))
    with pytest.raises(ValueError):
        teacher_layers(4, 4)


def test_loss_config_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        LossConfig(kind="kd")


@pytest.fixture(scope="module")
def tiny():
    config = preset("tiny", shallow_exit_layer=1)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {
        "encoder_input_tokens": rng.integers(2, 128, (2, 5)).astype(np.int32),
        "decoder_input_tokens": rng.integers(2, 128, (2, 6)).astype(np.int32),
        "decoder_target_tokens": rng.integers(2, 128, (2, 6)).astype(np.int32),
        "decoder_loss_weights": np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.float32),
    }
    return config, params, batch


# Eager flax runs op by op; jitting keeps these tests fast.
_compute_loss = jax.jit(compute_loss, static_argnums=(0, 1), static_argnames=("deterministic",))


def test_compute_loss_kinds_agree_with_each_other(tiny):
    config, params, batch = tiny
    _, free = _compute_loss(config, LossConfig(kind="free"), params, batch)
    _, calm = _compute_loss(config, LossConfig(kind="calm"), params, batch)
    _, ce = _compute_loss(config, LossConfig(kind="ce"), params, batch)
    assert float(free["ce_deep"]) == pytest.approx(float(ce["ce_deep"]), rel=1e-6)
    assert float(free["ce_shallow"]) == pytest.approx(float(calm["ce_layer1"]), rel=1e-6)
    layer_ce = [float(calm[f"ce_layer{i}"]) for i in range(1, 5)]
    assert float(calm["loss"]) == pytest.approx(np.dot([1, 2, 3, 4], layer_ce) / 10, rel=1e-6)
    s, big_l = 1, 4
    want = (s * free["ce_shallow"] + big_l * free["ce_deep"]) / (s + big_l) + 0.5 * free["kd"]
    assert float(free["loss"]) == pytest.approx(float(want), rel=1e-6)


def test_compute_loss_kd_reads_normalised_states(tiny):
    """KD with L=4, S=1: student layer 1 against teacher layer 4, both after the final norm."""
    config, params, batch = tiny
    from free_jax.models import T5

    def normed(model, enc, dec):
        out = model(enc, dec, return_hidden=True)
        return [model.decoder.final(h) for h in out.decoder_hidden]

    states = jax.jit(lambda p, enc, dec: T5(config).apply({"params": p}, enc, dec, method=normed))(
        params, batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    )
    diff = np.asarray(states[0] - states[3], np.float64)
    per_token = (diff**2).mean(-1)
    w = batch["decoder_loss_weights"]
    _, metrics = _compute_loss(config, LossConfig(kind="free"), params, batch)
    assert float(metrics["kd"]) == pytest.approx((per_token * w).sum() / w.sum(), rel=1e-5)


def test_compute_loss_is_jittable_with_dropout(tiny):
    config, params, batch = tiny
    config = config.replace(dropout_rate=0.1)
    fn = jax.jit(
        lambda p, b, r: compute_loss(config, LossConfig(), p, b, rng=r, deterministic=False)[0]
    )
    a, b = fn(params, batch, jax.random.key(1)), fn(params, batch, jax.random.key(2))
    assert np.isfinite(float(a)) and float(a) != float(b)
    assert losses.LOSS_KINDS == ("free", "calm", "ce", "exit_heads", "loop_exits")


@pytest.mark.slow
def test_bfloat16_compute_gives_a_close_finite_loss(tiny):
    config, params, batch = tiny
    loss32, _ = _compute_loss(config, LossConfig(), params, batch)
    loss16, metrics = _compute_loss(config.replace(dtype="bfloat16"), LossConfig(), params, batch)
    assert metrics["ce_deep"].dtype == jnp.float32  # logits and losses stay in float32
    assert float(loss16) == pytest.approx(float(loss32), abs=0.05)
