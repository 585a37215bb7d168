"""OnlineThreshold: initial threshold, refit count, freezing, and no recompiles downstream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.calibration import OnlineThreshold, fit_moments_threshold
from free_jax.calibration.bmm import _svi_samples


def _batch(n, seed, disagree_mu=0.3, w=0.7):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < w
    c = np.where(y, rng.beta(8.0, 2.0, n), rng.beta(7 * disagree_mu, 7 * (1 - disagree_mu), n))
    return c, y


def test_initial_threshold_until_first_successful_fit():
    online = OnlineThreshold("moments", initial_threshold=0.8, max_refits=10)
    assert online.threshold == 0.8 and online.num_refits == 0 and not online.frozen
    # Warm-up: only agreeing tokens so far, the fit falls back and the initial threshold stays.
    online.update(np.linspace(0.5, 1.0, 30), np.ones(30, bool))
    assert online.threshold == 0.8 and online.num_refits == 1
    assert online.history[0].fallback and "no disagreeing" in online.history[0].reason
    assert online.result is None
    c, y = _batch(200, 0)
    online.update(c, y)
    assert online.num_refits == 2 and not online.history[1].fallback
    assert online.threshold == online.history[1].fit_threshold != 0.8
    assert online.result.n == 230  # refits use every record so far


def test_refits_stated_number_of_times_then_freezes():
    online = OnlineThreshold("moments", initial_threshold=0.9, max_refits=5)
    batches = [_batch(100, s, disagree_mu=0.15 + 0.05 * s) for s in range(8)]
    seen = []
    for i, (c, y) in enumerate(batches):
        seen.append(online.update(c, y))
        assert online.frozen == (i >= 4)
    assert online.num_refits == 5 and len(online.history) == 5
    assert [h.refit for h in online.history] == [1, 2, 3, 4, 5]
    # Frozen at the fit on the first five batches; later batches change nothing.
    c5 = np.concatenate([c for c, _ in batches[:5]])
    y5 = np.concatenate([y for _, y in batches[:5]])
    assert online.threshold == fit_moments_threshold(c5, y5).threshold
    assert seen[5:] == [online.threshold] * 3
    assert online.num_records == 500 and online.examples_seen == 5


def test_max_examples_cap_and_empty_batches():
    online = OnlineThreshold("moments", max_refits=100, max_examples=10)
    online.update(np.zeros(0), np.zeros(0, bool), num_examples=4)  # nothing new: no refit
    assert online.num_refits == 0 and online.examples_seen == 4
    online.update(*_batch(100, 1), num_examples=4)
    assert online.num_refits == 1 and not online.frozen
    online.update(*_batch(100, 2), num_examples=4)  # 12 >= 10 examples
    assert online.frozen and online.num_refits == 2


def test_malformed_batch_raises_and_stores_nothing():
    online = OnlineThreshold("moments")
    with pytest.raises(ValueError, match="same shape"):
        online.update([0.5, 0.6], [1])
    assert online.num_records == 0 and online.examples_seen == 0 and online.num_refits == 0


def test_bad_estimator_name():
    with pytest.raises(ValueError, match="estimator must be"):
        OnlineThreshold("em")


def test_jitted_decoder_compiles_once_across_refits():
    traces = []

    @jax.jit
    def decoder_stand_in(conf_N, threshold):
        traces.append(None)  # runs only while tracing
        return conf_N > threshold  # the exit rule: leave at the shallow layer above threshold

    online = OnlineThreshold("moments", initial_threshold=0.9, max_refits=6)
    used = []
    for s in range(9):
        c, y = _batch(64, s, disagree_mu=0.15 + 0.05 * s)  # drifting data: thresholds move
        used.append(online.threshold)
        exits = decoder_stand_in(jnp.asarray(c, jnp.float32), jnp.float32(online.threshold))
        assert exits.shape == (64,)
        online.update(c, y)
    assert online.frozen and online.num_refits == 6
    assert len(set(used)) >= 3  # the decoder really saw different thresholds ...
    assert len(traces) == 1  # ... and was traced (compiled) once


def test_svi_refits_reuse_one_compiled_program():
    # The NumPyro estimator sees the data only through sufficient statistics, so refits on a
    # growing record set hit the same compiled SVI program.
    online = OnlineThreshold("svi", initial_threshold=0.9, max_refits=3, fit_kwargs={"seed": 3})
    online.update(*_batch(100, 0))
    size = _svi_samples._cache_size()
    for s in (1, 2):
        online.update(*_batch(150 * s, s))
    assert _svi_samples._cache_size() == size
    assert online.frozen and online.num_refits == 3 and online.history[-1].interval is not None
    assert online.result.estimator == "bmm-svi" and online.result.n == 550
