"""FREE's closed-form estimator: hand computations, grid read-out, direction of change, plot."""

import doctest

import numpy as np
import pytest

from free_jax.calibration import (
    ThresholdResult,
    bmm,
    common,
    fit_moments_threshold,
    moments,
    online,
    plot_calibration,
)
from free_jax.calibration.common import agree_posterior
from free_jax.calibration.moments import (
    LEAK,
    grid_threshold,
    moments_grid,
    weighted_beta_moments,
)
from free_jax.calibration.result import BetaParams

AGREE = [0.7, 0.8, 0.9]
DISAGREE = [0.1, 0.2, 0.3]
TINY_C = np.array(AGREE + DISAGREE)
TINY_Y = np.array([1, 1, 1, 0, 0, 0])


def test_weighted_moments_unweighted_hand_values():
    # m = 0.8, s2 = (0.01 + 0 + 0.01) / 3, m (1 - m) / s2 = 0.16 / (0.02 / 3) = 24,
    # alpha = 0.8 * 23 = 18.4, beta = 18.4 * 0.2 / 0.8 = 4.6.
    p = weighted_beta_moments(np.array(AGREE), np.ones(3))
    assert p.alpha == pytest.approx(18.4, rel=1e-12)
    assert p.beta == pytest.approx(4.6, rel=1e-12)


def test_tiny_array_matches_hand_computation():
    # By hand, following FREE's util/bmm.py: responsibilities 0.2 (own label) and 1e-4 (other
    # label, the E-step floor), each point's pair normalised by 0.2001.
    own, leak = 0.2 / 0.2001, 1e-4 / 0.2001
    w = np.array([own] * 3 + [leak] * 3)  # weights of the agree component
    m = np.sum(w * TINY_C) / np.sum(w)  # 0.79970014992...
    s2 = np.sum(w * (TINY_C - m) ** 2) / np.sum(w)  # 0.00684648680...
    alpha = m * (m * (1 - m) / s2 - 1)
    beta = alpha * (1 - m) / m
    assert (alpha, beta) == pytest.approx((17.910016218381273, 4.485898325413839), rel=1e-12)

    r = fit_moments_threshold(TINY_C, TINY_Y, min_points=6)
    assert r.agree.alpha == pytest.approx(alpha, rel=1e-12)
    assert r.agree.beta == pytest.approx(beta, rel=1e-12)
    # The data mirror each other around 0.5, so the disagree fit is the agree fit mirrored.
    assert r.disagree.alpha == pytest.approx(beta, rel=1e-12)
    assert r.disagree.beta == pytest.approx(alpha, rel=1e-12)
    # Equal priors, mirrored components: P(agree | 0.5) = 0.5 > 0.4, while at the grid point
    # below, 0.4333, the log-odds are (a - b) log(0.4333 / 0.5667) = -3.60, P = 0.027 < 0.4.
    # Seven grid points (0.5 ... 0.9) pass: index 10 - 7 = 3, grid[3] = 0.5.
    assert r.threshold == 0.5
    assert r.agree_weight == 0.5 and r.interval is None and not r.fallback
    assert (r.n, r.n_agree, r.n_disagree) == (6, 3, 3)
    assert LEAK == pytest.approx(5e-4)


def test_grid_is_free_grid():
    np.testing.assert_allclose(moments_grid(), np.linspace(0.3, 0.9, 10))


def test_all_grid_points_pass_gives_grid_start():
    # Disagreeing tokens all sit below 0.08: every grid point favours agreement.
    c = np.r_[np.linspace(0.2, 0.9, 50), np.linspace(0.01, 0.08, 50)]
    y = np.r_[np.ones(50), np.zeros(50)]
    r = fit_moments_threshold(c, y)
    assert np.all(agree_posterior(moments_grid(), r.agree, r.disagree, 0.5) > 0.4)
    assert r.threshold == pytest.approx(0.3)


def test_no_grid_point_passes_gives_grid_end():
    # Agreeing tokens all above 0.96: at 0.9 the broad disagree component still dominates.
    c = np.r_[np.linspace(0.96, 0.999, 50), np.linspace(0.01, 0.99, 50)]
    y = np.r_[np.ones(50), np.zeros(50)]
    r = fit_moments_threshold(c, y)
    assert not np.any(agree_posterior(moments_grid(), r.agree, r.disagree, 0.5) > 0.4)
    assert r.threshold == pytest.approx(0.9)


def _synthetic(n, disagree_ab, agree_ab=(8.0, 2.0), w=0.7, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < w
    c = np.where(y, rng.beta(*agree_ab, n), rng.beta(*disagree_ab, n))
    return c, y


def test_threshold_rises_when_disagree_component_shifts_up():
    # Disagree component Beta(7 mu, 7 (1 - mu)) moving up (mean 0.15 -> 0.3 -> 0.45) while staying
    # below the crossing, so its density there grows: the threshold must rise. FREE's read-out of
    # the generating components is 0.5, 0.567, 0.633 (true equal-prior crossings 0.469, 0.553,
    # 0.619, each >= 0.013 from a grid boundary); at n = 4000 the fit lands on the same grid value
    # (checked over 10 seeds, all identical).
    ts = []
    for mu in (0.15, 0.3, 0.45):
        ab = (7 * mu, 7 * (1 - mu))
        ts.append(fit_moments_threshold(*_synthetic(4000, ab)).threshold)
        assert ts[-1] == pytest.approx(grid_threshold(BetaParams(8, 2), BetaParams(*ab), 0.4))
    assert ts[0] < ts[1] < ts[2]


def test_lower_zeta_never_raises_threshold():
    c, y = _synthetic(4000, (2.0, 5.0))
    ts = [fit_moments_threshold(c, y, zeta=z).threshold for z in (0.2, 0.4, 0.6, 0.8)]
    assert ts == sorted(ts)


def test_swapped_components_follow_reference_and_say_so():
    # Disagreeing tokens MORE confident than agreeing ones: FREE treats the higher-mean component
    # as the positive one; we follow it and leave a note.
    c, y = _synthetic(2000, (8.0, 2.0), agree_ab=(2.0, 5.0))
    r = fit_moments_threshold(c, y)
    assert r.disagree.mean > r.agree.mean
    assert any("higher mean" in s for s in r.notes)
    # The curve is that of the higher-mean component, hence increasing in c.
    assert r.curve_p[-10] > r.curve_p[10]


def test_json_round_trip_is_exact():
    r = fit_moments_threshold(*_synthetic(500, (2.0, 5.0)))
    back = ThresholdResult.from_json(r.to_json())
    assert back == r


def test_plot_writes_png(tmp_path):
    c, y = _synthetic(500, (2.0, 5.0))
    r = fit_moments_threshold(c, y)
    path = plot_calibration(r, c, y, tmp_path / "sub" / "calib.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("module", [common, moments, bmm, online], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
