"""What every threshold estimator shares: input checks, fallbacks and the Beta-mixture numerics.

The result record and threshold.json live in `result.py`.

The data are agreement records harvested from FREE's synchronized parallel passes: for every token
that the shallow decoder emitted and the deep decoder later re-scored, a pair

    (c, agree) = (shallow confidence in [0, 1], shallow argmax == deep argmax)

Estimators turn N such pairs into one threshold; the decoder exits at the shallow layer when
`c > threshold` (FREE's rule: `conf <= threshold` keeps the token on the deep path).

Input is checked here once for all estimators:

  * malformed input (shapes differ, confidences outside [0, 1], labels not 0/1, zeta outside (0, 1))
    raises `ValueError` naming the argument;
  * pairs with a NaN confidence or NaN label are dropped, with a `CalibrationWarning`;
  * data that cannot support a fit (too few pairs, no agreeing or no disagreeing tokens, no
    spread in the confidences of a class) give `FALLBACK_THRESHOLD` (or the caller's
    `fallback_threshold`), a `CalibrationWarning`, and a result with `fallback=True` and the
    reason. Never NaN, never a crash.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from free_jax.calibration.result import BetaParams, ThresholdResult

# Confidences are clipped into [EPS, 1 - EPS] before any Beta density is evaluated: a softmax margin
# of exactly 0 or 1 is common (saturated tokens) and the Beta log-density is infinite there. FREE's
# util/bmm.py clips with the same constant.
EPS = 1e-4

# Threshold used when the data cannot support a fit. It is the top of FREE's search grid [0.3, 0.9]:
# the most conservative value the closed-form estimator can return, so a failed calibration sends
# more tokens to the deep decoder (slower, never less accurate) rather than fewer.
FALLBACK_THRESHOLD = 0.9

# Fewer valid pairs than this is treated as "not enough data to fit" (a warning and the fallback).
MIN_POINTS = 10

# The threshold at which no token exits: a token leaves at the shallow layer only when its confidence
# is strictly above the threshold, and nothing is above infinity, whatever the measure (a float32
# cosine can round above 1, so 1.0 would not do). The estimators that promise a level (Learn-then-Test,
# target accuracy) return it when they cannot meet the level: never a guess. threshold.json writes
# it as the string "inf".
NEVER_EXIT = math.inf


class CalibrationWarning(UserWarning):
    """Degenerate calibration data: NaNs dropped, or a fallback threshold used."""


# -------------------------------------------------------------------- input checks
@dataclasses.dataclass(frozen=True)
class CleanData:
    """Validated pairs. conf_N is clipped into [EPS, 1 - EPS] (unless `clip=False`); agree_N is bool."""

    conf_N: np.ndarray
    agree_N: np.ndarray
    n_dropped: int

    @property
    def n(self) -> int:
        return int(self.conf_N.shape[0])

    @property
    def n_agree(self) -> int:
        return int(self.agree_N.sum())

    @property
    def n_disagree(self) -> int:
        return self.n - self.n_agree


def check_zeta(zeta: float) -> float:
    if isinstance(zeta, bool) or not isinstance(zeta, int | float | np.floating):
        raise ValueError(f"zeta must be a number in (0, 1), got {zeta!r}")
    if not 0.0 < float(zeta) < 1.0:
        raise ValueError(f"zeta must be in (0, 1), got {zeta!r}")
    return float(zeta)


def check_fallback(fallback_threshold: float) -> float:
    v = float(fallback_threshold)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"fallback_threshold must be in [0, 1], got {fallback_threshold!r}")
    return v


def check_arrays(confidences: Any, agree: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validates (confidences, agree) and keeps their common shape.

    Returns (conf float64, agree bool, nan bool): `nan` marks entries whose confidence or label is
    NaN (their `conf` / `agree` values are meaningless). Raises ValueError naming the argument for
    mismatched shapes, confidences outside [0, 1] or labels other than 0/1.

    >>> check_arrays([[0.2, float("nan")]], [[1, 0]])
    (array([[0.2, nan]]), array([[ True, False]]), array([[False,  True]]))
    """
    try:
        conf = np.asarray(confidences, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"confidences must be an array of numbers in [0, 1]: {e}") from e
    try:
        lab = np.asarray(agree)
        lab = lab.astype(np.float64) if lab.dtype != np.bool_ else lab
    except (TypeError, ValueError) as e:
        raise ValueError(f"agree must be an array of booleans or 0/1: {e}") from e
    if conf.shape != lab.shape:
        raise ValueError(
            f"confidences and agree must have the same shape, got confidences {conf.shape} "
            f"and agree {lab.shape}"
        )
    bad = ~np.isnan(conf) & ((conf < 0.0) | (conf > 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"confidences must lie in [0, 1]; {int(bad.sum())} value(s) outside, first at flat "
            f"index {i}: {conf.reshape(-1)[i]!r}"
        )
    if lab.dtype == np.bool_:
        return conf, lab, np.isnan(conf)
    lab_nan = np.isnan(lab)
    bad = ~lab_nan & (lab != 0.0) & (lab != 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"agree must be booleans or 0/1; {int(bad.sum())} value(s) are not, first at flat "
            f"index {i}: {lab.reshape(-1)[i]!r}"
        )
    return conf, lab == 1.0, np.isnan(conf) | lab_nan


def clean_inputs(
    confidences: Any, agree: Any, *, clip: bool = True, stacklevel: int = 3
) -> CleanData:
    """Validates and flattens (confidences, agree); drops NaN pairs with a warning.

    Both arguments may have any shape as long as the shapes are equal (e.g. [B, T] records); they
    are flattened together. `agree` may be bool, or numbers that are 0/1 (or NaN, dropped).
    `clip=False` keeps the confidences as given (the estimators that count `conf > threshold`
    exactly, as the decoder does, must not move a 0 or a 1).

    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")      # "dropped 1 of 3 ... pairs containing NaN"
    ...     d = clean_inputs([0.0, 0.5, float("nan")], [1, 0, 1])
    >>> d.conf_N, d.agree_N, d.n_dropped
    (array([1.e-04, 5.e-01]), array([ True, False]), 1)
    """
    conf, lab, drop = check_arrays(confidences, agree)
    conf, lab, drop = conf.reshape(-1), lab.reshape(-1), drop.reshape(-1)
    n_dropped = int(drop.sum())
    if n_dropped:
        warnings.warn(
            f"dropped {n_dropped} of {conf.size} (confidence, agree) pairs containing NaN",
            CalibrationWarning,
            stacklevel=stacklevel,
        )
    keep = ~drop
    conf = np.clip(conf[keep], EPS, 1.0 - EPS) if clip else conf[keep]
    return CleanData(conf_N=conf, agree_N=lab[keep], n_dropped=n_dropped)


def degenerate_reason(data: CleanData, min_points: int = MIN_POINTS) -> str | None:
    """Why `data` cannot support a two-component fit, or None when it can.

    Every estimator needs both classes present and some spread of confidence within each class (the
    method-of-moments variance is a denominator; a zero-spread class makes a Beta likelihood
    unbounded).
    """
    if data.n == 0:
        return "no valid (confidence, agree) pairs"
    if data.n < min_points:
        return f"only {data.n} valid pairs, fewer than min_points={min_points}"
    if data.n_disagree == 0:
        return "no disagreeing tokens (every shallow prediction matched the deep one)"
    if data.n_agree == 0:
        return "no agreeing tokens (no shallow prediction matched the deep one)"
    if np.ptp(data.conf_N) == 0.0:
        return f"all confidences are equal ({data.conf_N[0]:.6g} after clipping)"
    for name, mask in (("agreeing", data.agree_N), ("disagreeing", ~data.agree_N)):
        if np.ptp(data.conf_N[mask]) == 0.0:
            return f"all {name} confidences are equal ({data.conf_N[mask][0]:.6g} after clipping)"
    return None


def fallback_result(
    estimator: str,
    reason: str,
    data: CleanData,
    *,
    zeta: float | None,
    fallback_threshold: float,
    with_interval: bool,
    seed: int | None = None,
    stacklevel: int = 3,
    **fields: Any,
) -> ThresholdResult:
    """A fallback result, announced with a CalibrationWarning; `fields` go to ThresholdResult."""
    what = (
        "returning the never-exit threshold"
        if fallback_threshold == NEVER_EXIT
        else "using the fallback threshold"
    )
    warnings.warn(
        f"{estimator}: {reason}; {what} {fallback_threshold}",
        CalibrationWarning,
        stacklevel=stacklevel,
    )
    return ThresholdResult(
        threshold=float(fallback_threshold),
        estimator=estimator,
        zeta=zeta,
        n=data.n,
        n_agree=data.n_agree,
        n_disagree=data.n_disagree,
        n_dropped=data.n_dropped,
        interval=(0.0, 1.0) if with_interval else None,
        interval_mass=None,
        fallback=True,
        fallback_reason=reason,
        seed=seed,
        **fields,
    )


# -------------------------------------------------------------------- shared numerics
def beta_logpdf(c: np.ndarray, p: BetaParams) -> np.ndarray:
    """log Beta(c; alpha, beta) in float64; c must already lie in (0, 1)."""
    from scipy.special import betaln

    return (p.alpha - 1.0) * np.log(c) + (p.beta - 1.0) * np.log1p(-c) - betaln(p.alpha, p.beta)


def agree_posterior(c: np.ndarray, agree: BetaParams, disagree: BetaParams, w: float) -> np.ndarray:
    """P(agree | c) = w f1(c) / (w f1(c) + (1 - w) f0(c)), computed as a sigmoid of log-odds.

    The sigmoid form never divides 0 by 0: when both densities underflow the log-odds stay finite.
    """
    cc = np.clip(np.asarray(c, np.float64), EPS, 1.0 - EPS)
    log_odds = beta_logpdf(cc, agree) - beta_logpdf(cc, disagree) + math.log(w) - math.log1p(-w)
    return 0.5 * (1.0 + np.tanh(0.5 * log_odds))


def threshold_from_curve(c_G: np.ndarray, p_G: np.ndarray, zeta: float) -> float:
    """Smallest grid confidence from which P(agree | c) stays >= zeta up to c = 1.

    >>> threshold_from_curve(np.array([0.0, 0.5, 1.0]), np.array([0.1, 0.6, 0.9]), 0.4)
    0.5
    >>> threshold_from_curve(np.array([0.0, 0.5, 1.0]), np.array([0.1, 0.2, 0.3]), 0.4)
    1.0

    If even the last grid point is below zeta, 1.0 (never exit: confidences are <= 1).
    """
    below = np.asarray(p_G) < zeta
    if not below.any():
        return float(c_G[0])
    last = int(np.flatnonzero(below)[-1])
    return 1.0 if last == len(c_G) - 1 else float(c_G[last + 1])
