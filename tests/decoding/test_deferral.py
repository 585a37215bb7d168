"""Deferred deep passes (`decoding/deferral.py`): whatever the schedule, batched FREE gives each
example the tokens it gets alone; the policy through the API; the cost model's choices."""

import functools

import jax
import numpy as np
import pytest
from decode_testlib import CONFIG, N, W, encoder_tokens, naive_greedy, threshold_between, with_eos

from free_jax.decoding import FreeSpec, decode, make_decoder
from free_jax.decoding.deferral import StepCosts, plan_deferral, simulate
from free_jax.decoding.free import free_decode


def rows(batch: int) -> np.ndarray:
    """`batch` encoder rows (some padded), from three seeds' inputs."""
    return np.concatenate([encoder_tokens(s) for s in (0, 1, 2)])[:batch]


@functools.partial(jax.jit, static_argnames=("mode",))
def deferred(params, enc, threshold, max_lengths, min_waiting, max_wait, prob, key, mode):
    """FREE with a policy plus a random schedule: the test hook runs the pass early with
    probability `prob` at every step where some example waits."""
    hook = lambda s: jax.random.bernoulli(jax.random.fold_in(key, s.iterations), prob)
    return free_decode(
        CONFIG, params, enc, threshold, max_decode_len=N, window=W, mode=mode,
        rollback_threshold=1.0, max_lengths_B=max_lengths, min_waiting=min_waiting,
        max_wait=max_wait, trigger_hook=hook,
    )  # fmt: skip


def alone(params, enc, threshold, max_lengths, mode):
    """Each example decoded by itself (batch 1), FREE as published."""
    method = "free_lossless" if mode == "lossless" else "free"
    run = make_decoder(
        CONFIG, method=method, max_decode_len=N, window=W, rollback=mode == "rollback"
    )
    return [
        run(
            params,
            enc[r : r + 1],
            threshold,
            max_lengths=max_lengths[r : r + 1],
            rollback_threshold=1.0,
        )  # fmt: skip
        for r in range(enc.shape[0])
    ]


def median_threshold(params, enc):
    out = make_decoder(CONFIG, method="free", max_decode_len=N, window=W)(params, enc, 1.0)
    return threshold_between(np.asarray(out.records.confidence)[np.asarray(out.records.valid)])


@pytest.mark.parametrize(
    "mode, batch",
    [
        pytest.param("plain", 1, marks=pytest.mark.slow),
        pytest.param("plain", 3, marks=pytest.mark.slow),
        ("plain", 8),
        pytest.param("rollback", 8, marks=pytest.mark.slow),
        pytest.param("lossless", 8, marks=pytest.mark.slow),
    ],  # fmt: skip
)
def test_any_schedule_gives_each_example_its_own_free_output(mode, batch):
    params, enc = with_eos(0), rows(batch)
    threshold = median_threshold(params, rows(3))
    max_lengths = np.random.default_rng(batch).integers(3, N + 1, size=batch).astype(np.int32)
    want = alone(params, enc, threshold, max_lengths, mode)
    waited = 0
    # (min_waiting, max_wait, probability the hook forces a pass): pure hook schedules, policies,
    # and FREE as published
    for k, (min_waiting, max_wait, prob) in enumerate(
        [(batch + 1, 10**6, 0.0), (batch + 1, 10**6, 0.3), (2, 3, 0.1), (3, 1, 0.0), (1, 0, 0.0)]
    ):
        out = deferred(params, enc, threshold, max_lengths, min_waiting, max_wait, prob,
                       jax.random.key(k), mode=mode)  # fmt: skip
        for r in range(batch):
            np.testing.assert_array_equal(out.tokens[r], want[r].tokens[0])
            np.testing.assert_array_equal(out.exit_layer[r], want[r].exit_layer[0])
        waited += int(np.asarray(out.wait_steps).sum())
        if (min_waiting, max_wait) == (1, 0):
            assert int(np.asarray(out.wait_steps).sum()) == 0  # no deferral: nobody waits
    if batch > 1:
        assert waited > 0, "some schedule made examples wait"
    if mode == "lossless":
        np.testing.assert_array_equal(
            out.tokens, naive_greedy(params, enc, max_lengths=max_lengths)
        )


def test_the_policy_through_the_api_changes_the_schedule_not_the_output():
    params, enc = with_eos(1), rows(8)
    threshold = median_threshold(params, rows(3))
    now = decode(CONFIG, params, enc, FreeSpec(window=W), max_decode_len=N, threshold=threshold)
    spec = FreeSpec(window=W, min_waiting=4, max_wait=3)
    later = decode(CONFIG, params, enc, spec, max_decode_len=N, threshold=threshold)
    np.testing.assert_array_equal(now.tokens, later.tokens)
    np.testing.assert_array_equal(now.exit_layer, later.exit_layer)
    passes = lambda r: int(np.asarray(r.pass_width_counts).sum())
    assert passes(later) < passes(now), "waiting examples share passes"
    assert 0 < int(np.asarray(later.max_wait).max()) <= 3
    assert int(np.asarray(later.num_served).sum()) >= 1
    # a new policy is a traced value: the same compiled decoder
    run = make_decoder(CONFIG, spec, max_decode_len=N)
    other = make_decoder(CONFIG, FreeSpec(window=W, min_waiting=2, max_wait=9), max_decode_len=N)
    assert run.jitted is other.jitted
    with pytest.raises(ValueError, match="min_waiting must be >= 1"):
        FreeSpec(min_waiting=0)


def test_the_cost_model_defers_only_when_passes_are_dear():
    widths = (1, 2, 4, 8)
    free_pass = StepCosts(shallow=1.0, deep={w: 0.0 for w in widths})
    policy, table = plan_deferral(free_pass, batch=8, exit_rate=0.7, window=8, trials=10)
    assert (policy.min_waiting, policy.max_wait) == (1, 0)  # waiting only wastes shallow steps
    dear = StepCosts(shallow=1.0, deep={w: 20.0 for w in widths})
    policy, table = plan_deferral(dear, batch=8, exit_rate=0.7, window=8, trials=10)
    assert policy.min_waiting >= 4 and table[(1, 0)] > 1.5 * min(table.values())
    none = simulate(1, 0, dear, batch=8, exit_rate=0.7, window=8, trials=10)
    assert none.mean_wait == 0 and none.max_wait == 0
    some = simulate(policy.min_waiting, policy.max_wait, dear, batch=8, exit_rate=0.7, window=8,
                    trials=10)  # fmt: skip
    assert some.served_per_pass > none.served_per_pass and some.passes < none.passes
    with pytest.raises(ValueError, match="cover the window"):
        plan_deferral(StepCosts(1.0, {1: 1.0}), batch=8, exit_rate=0.7, window=8)
