"""Thresholds with a finite-sample guarantee: Learn-then-Test with fixed-sequence testing.

Learn-then-Test (Angelopoulos, Bates, Candès, Jordan and Lei 2021, "Learn then Test: Calibrating
predictive algorithms to achieve risk control") turns the choice of a threshold into multiple
hypothesis testing. Here the risk of a threshold λ is, for `fit_ltt_threshold`,

    R(λ) = P(c > λ and not agree)

the share of ALL tokens that leave at the shallow layer (the decoder's rule: `c > λ`, strictly)
AND differ from the full model's prediction at that position. The estimator returns λ̂ with

    P_calibration( R(λ̂) <= epsilon ) >= 1 - delta

over the draw of n i.i.d. calibration records. R(λ) only falls as λ rises (fewer tokens exit), which
makes fixed-sequence testing the natural procedure: on a grid fixed before seeing the data, ordered
strictest first, λ_1 > λ_2 > ..., test H_j: R(λ_j) > epsilon in turn at level delta each, stop at
the first H_j that is not rejected, and return the lowest rejected λ (the last one before the stop).
Fixed-sequence testing controls the family-wise error at delta for any order fixed in advance, so
P(some rejected λ has R(λ) > epsilon) <= delta; and since R is monotone, every λ at or above λ̂ is
safe too. A finer grid costs nothing in validity (no Bonferroni split), only in compute.

p-values. The loss of a record at λ is 1[c > λ and not agree], a Bernoulli(R(λ)) variable, so the
number of losses K is Binomial(n, R(λ)). Under H_j (R > epsilon) K is stochastically larger than
Binomial(n, epsilon), hence

    p = P(Binomial(n, epsilon) <= k)                       ("binomial", the default)

is a valid p-value, exact for 0/1 losses and never less powerful than the alternatives. The
Hoeffding-Bentkus p-value of the paper, min(exp(-n h(min(k/n, epsilon), epsilon)), e P(Binomial(n,
epsilon) <= k)) with h the Bernoulli relative entropy, is offered as "hoeffding_bentkus" for
comparison with published numbers; it is at least as large (more conservative) for 0/1 losses.

Nothing certified. If even the strictest grid threshold is not rejected (too few records: with no
loss at all p = (1 - epsilon)^n, so at least log(delta) / log(1 - epsilon) records are needed, 45 at
epsilon = 0.05, delta = 0.1), the result is NEVER_EXIT (`math.inf`, written "inf" in
threshold.json) with a CalibrationWarning and `fallback=True`: never a guess. Likewise when no record
agrees (every exit would be a disagreement; a certificate would only spend epsilon on errors) or
there are no valid records. NaN pairs are dropped with a warning, as by every estimator (which is
harmless only if NaNs occur independently of the loss).

What the guarantee does not promise:
  * it is marginal over calibration draws: for delta of the calibration sets the risk may exceed
    epsilon, and one run cannot tell which;
  * it is about agreement with the full model at that position, not about task quality;
  * it assumes calibration and deployment tokens are i.i.d. draws from one distribution. Tokens
    within a sequence are not independent, and the records come from the full model's greedy path
    (calibration decodes with nothing exiting), while a deployed decoder that departed from it
    continues on another path. `fit_ltt_sequence_threshold` controls a per-sequence risk instead,
    whose i.i.d. assumption (examples drawn independently) is the realistic one.

Sequence level. `fit_ltt_sequence_threshold` controls the share of outputs that differ from full
greedy. Per calibration sequence, with (c_t, agree_t) recorded along the full model's greedy path,

    s = max over positions t with not agree_t of c_t      (-inf when every position agrees)

and the sequence differs at λ iff s > λ. Why: as long as every earlier token equals full greedy's,
the decoder sees the calibration run's prefix and so (up to floating point) the same c_t and the
same shallow and deep predictions; the output departs at the first position where an exiting token
disagrees, and what happens after that no longer matters. (The hint "minimum over disagreeing
positions" would be the event that ALL disagreeing tokens exit; one suffices, hence the maximum.)
This is exact for plain FREE up to numerics, conservative with FreeSpec.rollback (a rolled-back
token can only bring the output back to greedy) and not covered with FreeSpec.position_temp (the
threshold then depends on the position) or when calibration and deployment compute confidences
differently (dtype, batch composition, window, maximum length). The guarantee: with probability
>= 1 - delta over the calibration examples, P(output != full greedy) <= epsilon for a new example
from the same distribution.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy.special import bdtr, xlogy

from free_jax.calibration.common import (
    NEVER_EXIT,
    CalibrationWarning,
    CleanData,
    check_arrays,
    clean_inputs,
    fallback_result,
)
from free_jax.calibration.result import ThresholdResult

PVALUES = ("binomial", "hoeffding_bentkus")
# Default grid: 1.0, 0.999, ..., 0.0 (strictest first), the Beta mixture's resolution.
GRID_POINTS = 1001


# -------------------------------------------------------------------- p-values and the test
def default_grid() -> np.ndarray:
    """[1001] float64: 1.0, 0.999, ..., 0.001, 0.0 (exact k / 1000, strictest first)."""
    return np.arange(GRID_POINTS - 1, -1, -1, dtype=np.float64) / (GRID_POINTS - 1)


def ltt_pvalues(losses: Any, n: int, epsilon: float, method: str = "binomial") -> np.ndarray:
    """p-values for H: R > epsilon from `losses` (counts, any shape) out of n 0/1 losses.

    >>> ltt_pvalues([0, 1, 5], 45, 0.05).round(4)      # (1 - 0.05)^45 = 0.0994
    array([0.0994, 0.335 , 0.9761])
    >>> bool(ltt_pvalues(1, 45, 0.05, "hoeffding_bentkus") >= ltt_pvalues(1, 45, 0.05))
    True
    """
    k = np.asarray(losses, dtype=np.float64)
    binomial = bdtr(k, n, epsilon)
    if method == "binomial":
        return binomial
    if method != "hoeffding_bentkus":
        raise ValueError(f"pvalue must be one of {PVALUES}, got {method!r}")
    a = np.minimum(k / n, epsilon)
    relative_entropy = xlogy(a, a / epsilon) + xlogy(1.0 - a, (1.0 - a) / (1.0 - epsilon))
    return np.minimum(np.minimum(np.exp(-n * relative_entropy), math.e * binomial), 1.0)


def fixed_sequence(pvalues_G: Any, delta: float) -> np.ndarray:
    """How many grid points fixed-sequence testing rejects: the leading run of p <= delta.

    Works on the last axis of any shape ([..., G] -> [...]).

    >>> fixed_sequence([[0.01, 0.05, 0.2, 0.01], [0.3, 0.01, 0.01, 0.01]], 0.1)
    array([2, 0])
    """
    rejected = np.asarray(pvalues_G) <= delta
    return np.cumprod(rejected, axis=-1).sum(axis=-1)


def exceedances(scores_N: np.ndarray, grid_G: np.ndarray) -> np.ndarray:
    """[G] int: how many scores lie strictly above each grid threshold (the decoder's `c > λ`).

    >>> exceedances(np.array([0.2, 0.5, 0.5, -np.inf]), np.array([1.0, 0.5, 0.2, 0.0]))
    array([0, 0, 2, 3])
    """
    sorted_N = np.sort(scores_N)
    return sorted_N.size - np.searchsorted(sorted_N, grid_G, side="right")


def min_records(epsilon: float, delta: float) -> int:
    """Fewest records any certificate needs: with no loss at all, p = (1 - epsilon)^n <= delta.

    >>> min_records(0.05, 0.1)
    45
    """
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


# -------------------------------------------------------------------- argument checks
def _check_level(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | np.floating) or not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {v!r}")
    return float(v)


def _check_grid(grid: Any) -> np.ndarray:
    """The grid as float64, strictest first, duplicates removed; finite values in [0, 1]."""
    if grid is None:
        return default_grid()
    try:
        g = np.asarray(grid, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"grid must be an array of thresholds in [0, 1]: {e}") from e
    if g.size == 0 or not np.all(np.isfinite(g)) or g.min() < 0.0 or g.max() > 1.0:
        raise ValueError(f"grid must be a non-empty array of thresholds in [0, 1], got {grid!r}")
    # Sorting a grid fixed before seeing the data keeps the test valid; the order is what matters.
    return np.unique(g)[::-1]


# -------------------------------------------------------------------- the procedure
def _certify(
    estimator: str,
    loss_scores_N: np.ndarray,
    data: CleanData,
    *,
    epsilon: float,
    delta: float,
    grid: Any,
    pvalue: str,
    unit: str,
    need_agree: bool,
) -> ThresholdResult:
    """Fixed-sequence LTT on losses 1[score > λ]; `data` supplies the counts of the result."""
    if pvalue not in PVALUES:
        raise ValueError(f"pvalue must be one of {PVALUES}, got {pvalue!r}")
    grid_G = _check_grid(grid)
    level = {"epsilon": epsilon, "delta": delta, "pvalue": pvalue}
    n = data.n
    if n == 0:
        reason = f"no valid {unit}s"
        return fallback_result(
            estimator, reason, data, zeta=None, fallback_threshold=NEVER_EXIT,
            with_interval=False, stacklevel=4, **level,
        )  # fmt: skip
    losses_G = exceedances(loss_scores_N, grid_G)
    p_G = ltt_pvalues(losses_G, n, epsilon, pvalue)
    rejected = int(fixed_sequence(p_G, delta))
    tested = slice(0, min(rejected + 1, grid_G.size))
    level.update(
        tested_thresholds=tuple(float(v) for v in grid_G[tested]),
        tested_pvalues=tuple(float(v) for v in p_G[tested]),
        tested_risks=tuple(float(v) for v in losses_G[tested] / n),
    )
    reason = None
    if need_agree and data.n_agree == 0:
        reason = (
            f"no agreeing {unit} (every exit would be a disagreement; a certificate would only "
            "spend epsilon on errors)"
        )
    elif rejected == 0:
        reason = (
            f"the strictest grid threshold {grid_G[0]:g} has {losses_G[0]} loss(es) in {n} "
            f"{unit}s, p = {p_G[0]:.4g} > delta = {delta:g}"
        )
        if losses_G[0] == 0:
            reason += (
                f": fewer {unit}s than any certificate needs (at least "
                f"{min_records(epsilon, delta)} at epsilon = {epsilon:g}, delta = {delta:g})"
            )
    if reason is not None:
        return fallback_result(
            estimator, reason, data, zeta=None, fallback_threshold=NEVER_EXIT,
            with_interval=False, stacklevel=4, **level,
        )  # fmt: skip
    threshold = float(grid_G[rejected - 1])
    notes = (
        f"with probability >= {1 - delta:g} over the calibration draw, the share of {unit}s that "
        f"{'leave early and disagree with' if unit == 'token' else 'differ from'} the full model "
        f"is <= {epsilon:g} at this threshold (empirical {losses_G[rejected - 1] / n:.4g})",
    )
    if rejected == grid_G.size:
        notes += ("every grid threshold was certified; a lower grid might certify more",)
    return ThresholdResult(
        threshold=threshold, estimator=estimator, zeta=None, n=n, n_agree=data.n_agree,
        n_disagree=data.n_disagree, n_dropped=data.n_dropped, notes=notes, **level,
    )  # fmt: skip


def fit_ltt_threshold(
    confidence: Any,
    agree: Any,
    *,
    epsilon: float,
    delta: float,
    grid: Any = None,
    pvalue: str = "binomial",
) -> ThresholdResult:
    """Lowest grid threshold certified by Learn-then-Test: P(R(λ̂) <= epsilon) >= 1 - delta.

    R(λ) = P(conf > λ and not agree): the share of all tokens that exit and disagree with the full
    model. See the module docstring for the procedure and what is (not) guaranteed.

    Args:
      confidence: shallow confidences in [0, 1], any shape (flattened); not clipped.
      agree: same shape; True / 1 where the shallow argmax equals the deep argmax.
      epsilon: the risk level, in (0, 1).
      delta: the allowed probability that the calibration draw gives a threshold whose risk
        exceeds epsilon, in (0, 1).
      grid: candidate thresholds in [0, 1], fixed before seeing the data (tested strictest first;
        any order given is sorted); None: 1.0, 0.999, ..., 0.0.
      pvalue: "binomial" (exact tail, the default) or "hoeffding_bentkus".

    Returns:
      ThresholdResult with estimator "ltt", epsilon, delta, pvalue and the tested grid with its
      p-values and empirical risks; NEVER_EXIT (`math.inf`, fallback=True, a CalibrationWarning)
      when nothing can be certified.

    Example: 100 records, the 10 disagreeing ones at 0.155, 0.165, ..., 0.245; a grid of steps of
    0.01. No loss above 0.245, so every threshold from 1.0 down to 0.25 has p = 0.95^100 = 0.006;
    at 0.24 one loss in 100 gives p = 0.037; at 0.23 two give p = 0.118 > 0.1 and the test stops:
      >>> conf = np.r_[np.linspace(0.3, 1.0, 90), 0.155 + np.arange(10) / 100]
      >>> r = fit_ltt_threshold(conf, np.arange(100) < 90, epsilon=0.05, delta=0.1,
      ...                       grid=np.linspace(0.0, 1.0, 101))
      >>> r.threshold, [round(p, 3) for p in r.tested_pvalues[-3:]]
      (0.24, [0.006, 0.037, 0.118])
    """
    epsilon = _check_level("epsilon", epsilon)
    delta = _check_level("delta", delta)
    data = clean_inputs(confidence, agree, clip=False)
    loss_scores = np.where(data.agree_N, -np.inf, data.conf_N)
    return _certify(
        "ltt", loss_scores, data, epsilon=epsilon, delta=delta, grid=grid, pvalue=pvalue,
        unit="token", need_agree=True,
    )  # fmt: skip


# -------------------------------------------------------------------- sequence level
def max_disagree_confidence(confidence_BT: Any, agree_BT: Any, valid_BT: Any = None) -> np.ndarray:
    """[B] per sequence, the largest shallow confidence at a disagreeing valid position.

    The sequence's output differs from full greedy at threshold λ iff this is > λ (see the module
    docstring). -inf where no valid position disagrees; NaN where a valid position has a NaN
    confidence or label (nothing can be said about that sequence).

    >>> max_disagree_confidence([[0.9, 0.3, 0.6], [0.8, 0.7, 0.1]], [[1, 0, 0], [1, 1, 0]],
    ...                         [[1, 1, 1], [1, 1, 0]])
    array([ 0.6, -inf])
    """
    try:
        conf = np.asarray(confidence_BT, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"confidences must be an array of numbers in [0, 1]: {e}") from e
    if conf.ndim != 2:
        raise ValueError(
            f"confidences must be [B, T] (one row per sequence, padded), got shape {conf.shape}"
        )
    agree = np.asarray(agree_BT)
    if agree.shape != conf.shape:
        raise ValueError(
            f"confidences and agree must have the same shape, got confidences {conf.shape} "
            f"and agree {agree.shape}"
        )
    valid = np.ones(conf.shape, bool) if valid_BT is None else np.asarray(valid_BT)
    if valid.shape != conf.shape:
        raise ValueError(
            f"valid must have the shape of confidences {conf.shape}, got {valid.shape}"
        )
    if valid.dtype != np.bool_:
        if not np.isin(valid, (0, 1)).all():
            raise ValueError("valid must be booleans or 0/1")
        valid = valid.astype(bool)
    # Padding is never looked at: masked positions become a harmless agreeing 0.
    conf_BT, agree_BT, nan_BT = check_arrays(
        np.where(valid, conf, 0.0), np.where(valid, agree, True)
    )
    risky_BT = valid & ~agree_BT & ~nan_BT
    scores_B = np.where(risky_BT, conf_BT, -np.inf).max(axis=1, initial=-np.inf)
    return np.where((valid & nan_BT).any(axis=1), np.nan, scores_B)


def fit_ltt_sequence_threshold(
    confidence_BT: Any,
    agree_BT: Any,
    valid_BT: Any = None,
    *,
    epsilon: float,
    delta: float,
    grid: Any = None,
    pvalue: str = "binomial",
) -> ThresholdResult:
    """Learn-then-Test on the share of outputs that differ from full greedy.

    Risk R(λ) = P(output at λ != full greedy) = P(s > λ), s from `max_disagree_confidence`: with
    probability >= 1 - delta over the calibration examples, R(λ̂) <= epsilon for a new example.
    See the module docstring for when "differs iff s > λ" is exact and when it is not.

    Args:
      confidence_BT, agree_BT: [B, T] records of B calibration sequences along the full model's
        greedy path (calibration decodes with nothing exiting), padded to a common T.
      valid_BT: [B, T] which positions are real (None: all). Padding is ignored.
      epsilon, delta, grid, pvalue: as in `fit_ltt_threshold`.

    Returns:
      ThresholdResult with estimator "ltt-sequence"; its counts are sequences: n sequences,
      n_agree with no disagreeing position (never at risk), n_disagree with at least one,
      n_dropped with a NaN at a valid position (dropped with a CalibrationWarning).

    >>> conf = np.tile([[0.9, 0.6]], (60, 1)); agree = np.tile([[True, False]], (60, 1))
    >>> fit_ltt_sequence_threshold(conf, agree, epsilon=0.05, delta=0.1).threshold
    0.6
    """
    epsilon = _check_level("epsilon", epsilon)
    delta = _check_level("delta", delta)
    scores_B = max_disagree_confidence(confidence_BT, agree_BT, valid_BT)
    dropped = np.isnan(scores_B)
    if dropped.any():
        warnings.warn(
            f"dropped {int(dropped.sum())} of {scores_B.size} sequences with a NaN confidence or "
            "label at a valid position",
            CalibrationWarning,
            stacklevel=2,
        )
    scores_B = scores_B[~dropped]
    data = CleanData(conf_N=scores_B, agree_N=np.isneginf(scores_B), n_dropped=int(dropped.sum()))
    return _certify(
        "ltt-sequence", scores_B, data, epsilon=epsilon, delta=delta, grid=grid, pvalue=pvalue,
        unit="sequence", need_agree=False,
    )  # fmt: skip
