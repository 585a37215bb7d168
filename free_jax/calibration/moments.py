"""FREE's closed-form adaptive threshold: method-of-moments Beta fits read off a coarse grid.

This reproduces what the FREE reference does (util/bmm.py `BetaMixture1D.fit(x, y)` followed by
`predict_proba(0.3, 0.9)`, called from models/deploying_t5.py), so that thresholds match the paper:

1. Clip confidences into [1e-4, 1 - 1e-4].
2. Per component k in {disagree, agree}, a *weighted* method-of-moments Beta fit
       m = sum(w x) / sum(w),  s2 = sum(w (x - m)^2) / sum(w)          (population variance)
       alpha = m (m (1 - m) / s2 - 1),   beta = alpha (1 - m) / m
   The weights are the reference's "supervised responsibilities": a point of component k has weight
   0.2, a point of the other label 1e-4 (the floor of its E-step), each column then normalised. So
   the other label leaks in with relative weight 1e-4 / 0.2 = 5e-4 (LEAK below); we keep the leak
   because it moves the fitted parameters (slightly) and fidelity is the point of this estimator.
3. Equal priors: the mixture weights stay at their initial 0.5 / 0.5 (the supervised fit never
   updates them), so the posterior is f_pos(c) / (f_pos(c) + f_neg(c)).
4. The "positive" component is the one with the larger Beta mean, not the agree label. With sane
   data these coincide; if they do not, the result carries a note.
5. On a 10-point grid `linspace(0.3, 0.9, 10)` count the points where the posterior is strictly
   greater than zeta; the threshold is grid[clip(10 - count, 0, 9)]. This assumes the passing points
   form an upper block of the grid (true when the posterior increases with c); it is the count that
   is used, not the position of the crossing. So the estimator can only return one of 10 values
   between 0.3 and 0.9; with every grid point passing it returns 0.3, with none 0.9.

One deliberate numerical difference from the reference: the posterior is computed as a sigmoid of
the log-odds, so where both Beta densities underflow to 0 (very peaked fits) we still get a number
where the reference's 0 / 0 gives NaN (which counts as "not passing"). On the grid [0.3, 0.9] this
only matters for concentrations in the hundreds.

Where it differs from `fit_bmm_threshold` (NumPyro): no mixture weight (equal priors instead of the
label frequencies), no prior on the Beta parameters, a point estimate without uncertainty, a strict
`>` at zeta, and a 10-point grid on [0.3, 0.9] instead of a fine grid on [0, 1]. See bmm.py.

Cost: O(N) numpy, well under a millisecond at N = 10k.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from free_jax.calibration.common import (
    FALLBACK_THRESHOLD,
    MIN_POINTS,
    agree_posterior,
    check_fallback,
    check_zeta,
    clean_inputs,
    degenerate_reason,
    fallback_result,
)
from free_jax.calibration.result import BetaParams, ThresholdResult

# Reference's supervised responsibilities: own label 1 - lam_r = 0.2, other label floored at 1e-4.
OWN_WEIGHT = 0.2
LEAK_WEIGHT = 1e-4
LEAK = LEAK_WEIGHT / OWN_WEIGHT  # relative weight of the other label's points: 5e-4

# FREE's search grid (predict_proba(0.3, 0.9) with lookup_resolution = 10).
GRID_LO = 0.3
GRID_HI = 0.9
GRID_POINTS = 10

# Resolution of the P(agree | c) curve stored in the result for plots and reports.
CURVE_POINTS = 201


def weighted_beta_moments(x_N: np.ndarray, w_N: np.ndarray) -> BetaParams:
    """Weighted method-of-moments Beta fit (population variance), as in FREE's fit_beta_weighted.

    >>> p = weighted_beta_moments(np.array([0.7, 0.8, 0.9]), np.ones(3))
    >>> round(p.alpha, 6), round(p.beta, 6)    # m = 0.8, s2 = 0.02/3, m(1-m)/s2 = 24
    (18.4, 4.6)
    """
    w = w_N / w_N.sum()
    m = float(np.sum(w * x_N))
    s2 = float(np.sum(w * (x_N - m) ** 2))
    alpha = m * (m * (1.0 - m) / s2 - 1.0)
    beta = alpha * (1.0 - m) / m
    return BetaParams(alpha=float(alpha), beta=float(beta))


def moments_grid() -> np.ndarray:
    return np.linspace(GRID_LO, GRID_HI, GRID_POINTS)


def grid_threshold(pos: BetaParams, neg: BetaParams, zeta: float) -> float:
    """FREE's read-out: count grid points with posterior > zeta, index from the top."""
    grid = moments_grid()
    post = agree_posterior(grid, pos, neg, 0.5)
    count = int(np.sum(post > zeta))
    idx = min(max(0, GRID_POINTS - count), GRID_POINTS - 1)
    return float(grid[idx])


def fit_moments_threshold(
    confidences: Any,
    agree: Any,
    zeta: float = 0.4,
    *,
    min_points: int = MIN_POINTS,
    fallback_threshold: float = FALLBACK_THRESHOLD,
) -> ThresholdResult:
    """FREE's closed-form threshold from (confidence, agree) pairs.

    Args:
      confidences: shallow confidences in [0, 1], any shape (flattened).
      agree: same shape; True / 1 where the shallow argmax equals the deep argmax.
      zeta: posterior level; the paper uses 0.4.
      min_points: fewer valid pairs than this gives the fallback.
      fallback_threshold: returned (with a CalibrationWarning) when the data cannot support a fit.

    Returns:
      ThresholdResult with estimator "moments", one of the 10 grid values in [0.3, 0.9] (or the
      fallback), the two fitted Beta components and agree_weight 0.5 (equal priors).

    Example (hand-checkable: the components mirror each other around 0.5; without the 5e-4
    leak of the other label the alphas would be 18.4 and 4.6):
      >>> r = fit_moments_threshold([.7, .8, .9, .1, .2, .3] * 2, [1, 1, 1, 0, 0, 0] * 2)
      >>> r.threshold, round(r.agree.alpha, 1), round(r.disagree.alpha, 1)
      (0.5, 17.9, 4.5)
    """
    zeta = check_zeta(zeta)
    fallback_threshold = check_fallback(fallback_threshold)
    data = clean_inputs(confidences, agree)
    reason = degenerate_reason(data, min_points)
    if reason is not None:
        return fallback_result(
            "moments",
            reason,
            data,
            zeta=zeta,
            fallback_threshold=fallback_threshold,
            with_interval=False,
        )

    x, y = data.conf_N, data.agree_N
    # Normalising each point's (own, leak) pair as the reference does changes no ratio, so
    # per-component weights are simply 1 for the own label and LEAK for the other.
    agree_p = weighted_beta_moments(x, np.where(y, 1.0, LEAK))
    disagree_p = weighted_beta_moments(x, np.where(y, LEAK, 1.0))
    for name, p in (("agree", agree_p), ("disagree", disagree_p)):
        if not (math.isfinite(p.alpha) and math.isfinite(p.beta) and p.alpha > 0 and p.beta > 0):
            return fallback_result(
                "moments",
                f"method of moments gave invalid {name} parameters {p}",
                data,
                zeta=zeta,
                fallback_threshold=fallback_threshold,
                with_interval=False,
            )

    notes: tuple[str, ...] = ()
    pos, neg = agree_p, disagree_p
    if disagree_p.mean > agree_p.mean:
        # The reference takes the higher-mean component as the positive one; we follow it.
        pos, neg = disagree_p, agree_p
        notes = (
            "disagree component has the higher mean; as in FREE it is used as the positive "
            "component, so the posterior is effectively P(disagree | c)",
        )
    threshold = grid_threshold(pos, neg, zeta)
    curve_c = np.linspace(0.0, 1.0, CURVE_POINTS)
    curve_p = agree_posterior(curve_c, pos, neg, 0.5)
    return ThresholdResult(
        threshold=threshold,
        estimator="moments",
        zeta=zeta,
        n=data.n,
        n_agree=data.n_agree,
        n_disagree=data.n_disagree,
        n_dropped=data.n_dropped,
        agree=agree_p,
        disagree=disagree_p,
        agree_weight=0.5,
        curve_c=tuple(float(v) for v in curve_c),
        curve_p=tuple(float(v) for v in curve_p),
        notes=notes,
    )
