"""NumPyro Beta mixture: likelihood, parameter recovery, interval, SVI vs NUTS, determinism."""

import functools

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy.special import polygamma

from free_jax.calibration import (
    ThresholdResult,
    fit_bmm_threshold,
    load_threshold,
    plot_calibration,
    save_threshold,
)
from free_jax.calibration.bmm import beta_loglik, sufficient_stats, thresholds_per_sample
from free_jax.calibration.common import agree_posterior, threshold_from_curve
from free_jax.calibration.result import BetaParams

# Small NUTS settings (a few hundred draws) keep the test set fast; every NUTS call in this file
# uses the same ones so the chain compiles once.
NUTS_KW = dict(method="nuts", nuts_warmup=200, num_samples=300)

W, AGREE_AB, DISAGREE_AB = 0.7, (8.0, 2.0), (2.0, 5.0)


def _synthetic(n, disagree_ab=DISAGREE_AB, agree_ab=AGREE_AB, w=W, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < w
    c = np.where(y, rng.beta(*agree_ab, n), rng.beta(*disagree_ab, n))
    return c, y


@functools.cache
def _fits():
    c, y = _synthetic(10_000)
    return c, y, fit_bmm_threshold(c, y, method="svi"), fit_bmm_threshold(c, y, **NUTS_KW)


def _fisher_se(a, b, n):
    """Asymptotic standard errors of (alpha, beta) from n Beta(a, b) draws (inverse Fisher)."""
    t = polygamma(1, a + b)
    info = n * np.array([[polygamma(1, a) - t, -t], [-t, polygamma(1, b) - t]])
    return np.sqrt(np.diag(np.linalg.inv(info)))


def test_sufficient_statistic_likelihood_equals_pointwise_sum():
    c, y = _synthetic(300, seed=3)
    c = np.clip(c, 1e-4, 1 - 1e-4)
    a_K, b_K = jnp.array([2.5, 7.0]), jnp.array([4.0, 1.5])
    got = beta_loglik(a_K, b_K, jnp.asarray(sufficient_stats(c, y), jnp.float32))
    for k in (0, 1):
        want = dist.Beta(a_K[k], b_K[k]).log_prob(jnp.asarray(c[y == k])).sum()
        assert float(got[k]) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("which", ["svi", "nuts"])
def test_recovers_synthetic_parameters(which):
    # n = 10k (7k agree / 3k disagree). Tolerance: 4 asymptotic standard errors from the Fisher
    # information at these counts (agree alpha ~0.14, disagree beta ~0.13, w ~0.005). A correct
    # posterior mean misses by more with probability < 1e-4 per parameter; the prior is negligible
    # at this n, and the fit is deterministic given the seed.
    c, y, svi, nuts = _fits()
    r = svi if which == "svi" else nuts
    n1, n0 = int(y.sum()), int((~y).sum())
    for fitted, (a, b), n in ((r.agree, AGREE_AB, n1), (r.disagree, DISAGREE_AB, n0)):
        se_a, se_b = _fisher_se(a, b, n)
        assert abs(fitted.alpha - a) < 4 * se_a, (fitted, a, se_a)
        assert abs(fitted.beta - b) < 4 * se_b, (fitted, b, se_b)
    assert abs(r.agree_weight - W) < 4 * np.sqrt(W * (1 - W) / len(y))
    assert (r.n, r.n_agree, r.n_disagree) == (len(y), n1, n0)
    assert r.estimator == f"bmm-{which}" and not r.fallback


def test_interval_contains_true_threshold():
    # True threshold from the generating parameters, on the estimator's grid.
    # A 99% interval, so that a miss is a real signal (a calibrated posterior misses 1% of seeds).
    c, y, svi, nuts = _fits()
    true_t = _true_threshold(AGREE_AB, DISAGREE_AB, W)
    for r in (svi, nuts):
        lo, hi = r.interval
        assert lo <= r.threshold <= hi
        # At n = 10k the posterior pins the threshold to about +-0.005 (90% interval).
        assert hi - lo < 0.03
    for kw in (dict(method="svi"), NUTS_KW):
        r99 = fit_bmm_threshold(c, y, interval_mass=0.99, **kw)
        assert r99.interval_mass == 0.99
        assert r99.interval[0] <= true_t <= r99.interval[1], (true_t, r99.interval)


def test_svi_agrees_with_nuts():
    # Both read the same posterior. The posterior sd of the threshold is ~0.003 here; the
    # posterior-mean curve averages 300+ draws, so Monte Carlo error of the point is well below
    # the 0.001 grid step; two grid steps allow for that plus the Gaussian-guide approximation.
    _, _, svi, nuts = _fits()
    assert abs(svi.threshold - nuts.threshold) <= 0.002
    assert svi.interval == pytest.approx(nuts.interval, abs=0.003)


def test_deterministic_given_seed():
    c, y = _synthetic(2000, seed=1)
    a = fit_bmm_threshold(c, y, seed=7)
    b = fit_bmm_threshold(c, y, seed=7)
    assert a == b
    other = fit_bmm_threshold(c, y, seed=8)
    assert other.seed == 8 and abs(other.threshold - a.threshold) < 0.01


def _true_threshold(agree_ab, disagree_ab, w, zeta=0.4):
    grid = np.linspace(0, 1, 1001)
    p = agree_posterior(grid, BetaParams(*agree_ab), BetaParams(*disagree_ab), w)
    return threshold_from_curve(grid, p, zeta)


def test_threshold_rises_when_disagree_component_shifts_up():
    # Disagree component Beta(7 mu, 7 (1 - mu)) moving up (mean 0.2 -> 0.3 -> 0.4) below the
    # crossing: true thresholds 0.458, 0.504, 0.539. Each estimate must be within 0.02 of the truth
    # (the posterior sd of the threshold at n = 3000 is ~0.005; 0.02 is 4 sd) and they must rise.
    ts = []
    for mu in (0.2, 0.3, 0.4):
        ab = (7 * mu, 7 * (1 - mu))
        ts.append(fit_bmm_threshold(*_synthetic(3000, disagree_ab=ab)).threshold)
        assert abs(ts[-1] - _true_threshold(AGREE_AB, ab, W)) < 0.02
    assert ts[0] < ts[1] < ts[2]


def test_threshold_rises_when_disagreement_becomes_common():
    # The mixture weight matters here (FREE's equal priors ignore it): same components, more
    # disagreeing tokens, so a given confidence is less likely to mean "agree".
    t_rare = fit_bmm_threshold(*_synthetic(3000, w=0.9)).threshold
    t_common = fit_bmm_threshold(*_synthetic(3000, w=0.4)).threshold
    assert t_rare < t_common


def test_thresholds_per_sample_matches_scalar_rule():
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 11)
    p = np.sort(rng.random((50, 11)), axis=1)
    p[::7] = rng.random((8, 11))  # some non-monotone rows
    want = [threshold_from_curve(grid, row, 0.4) for row in p]
    np.testing.assert_array_equal(thresholds_per_sample(grid, p, 0.4), want)


def test_non_monotone_posterior_uses_upper_region():
    # Agree component with the smaller alpha: P(agree | c) rises again near c = 0. The threshold
    # must be where it stays above zeta up to 1, not that spurious low crossing.
    grid = np.linspace(0, 1, 1001)
    p = agree_posterior(grid, BetaParams(0.6, 0.3), BetaParams(3.0, 3.0), 0.5)
    assert p[1] > 0.4 and p[500] < 0.4
    t = threshold_from_curve(grid, p, 0.4)
    assert t > 0.5 and np.all(p[grid >= t] >= 0.4)


def test_json_file_round_trip_and_plot(tmp_path):
    c, y, svi, _ = _fits()
    save_threshold(tmp_path / "threshold.json", svi)
    back = load_threshold(tmp_path / "threshold.json")
    assert back == svi and isinstance(back, ThresholdResult)
    assert isinstance(back.threshold, float) and len(back.interval) == 2
    path = plot_calibration(back, c, y, tmp_path / "calib.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
