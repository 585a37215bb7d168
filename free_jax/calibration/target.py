"""Target-accuracy threshold (Valade et al.): the loosest threshold whose exits are accurate enough.

Among the tokens that would exit at λ (confidence strictly above λ, the decoder's rule), the share
that agrees with the final layer is

    acc(λ) = #{c > λ and agree} / #{c > λ}

and the threshold is the lowest λ in [0, 1] with at least one exiting calibration token and
acc(λ) >= target. The exit set only changes at observed confidences, so the candidates are 0 and the
distinct confidences (λ = c_(j) lets exactly the tokens above c_(j) exit); acc need not be monotone
in λ, and the rule reads acc at λ itself, not "at λ and everything above".

This is a point estimate on the calibration set, with no guarantee on new data: with few exiting
tokens acc(λ) is noisy and the loosest passing λ is picked from many, so it is optimistic. For a
stated guarantee use Learn-then-Test (ltt.py). When no λ reaches the target, or the data are too few,
the result is NEVER_EXIT (`math.inf`) with a CalibrationWarning and `fallback=True`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from free_jax.calibration.common import (
    MIN_POINTS,
    NEVER_EXIT,
    clean_inputs,
    fallback_result,
)
from free_jax.calibration.result import ThresholdResult


def _check_target(target: Any) -> float:
    if isinstance(target, bool) or not isinstance(target, int | float | np.floating):
        raise ValueError(f"target must be a number in (0, 1], got {target!r}")
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target!r}")
    return float(target)


def exit_accuracy(conf_N: np.ndarray, agree_N: np.ndarray, thresholds: Any) -> tuple:
    """(exiting counts, agreeing exiting counts) at each threshold (exit: conf > threshold).

    >>> exit_accuracy(np.array([0.2, 0.5, 0.9]), np.array([False, True, True]), [0.0, 0.2, 0.9])
    (array([3, 2, 0]), array([2, 2, 0]))
    """
    order = np.argsort(conf_N, kind="stable")
    sorted_N = conf_N[order]
    # agree_above[i]: agreeing tokens among sorted_N[i:]
    agree_above = np.r_[np.cumsum(agree_N[order][::-1])[::-1], 0]
    start = np.searchsorted(sorted_N, np.asarray(thresholds, np.float64), side="right")
    return sorted_N.size - start, agree_above[start]


def fit_target_accuracy_threshold(
    confidence: Any, agree: Any, *, target: float, min_points: int = MIN_POINTS
) -> ThresholdResult:
    """Lowest threshold at which the exiting calibration tokens agree at least `target` of the time.

    Args:
      confidence: shallow confidences in [0, 1], any shape (flattened); not clipped.
      agree: same shape; True / 1 where the shallow argmax equals the final layer's.
      target: required accuracy of the exiting tokens, in (0, 1].
      min_points: fewer valid pairs than this gives NEVER_EXIT with a warning.

    Returns:
      ThresholdResult with estimator "target_accuracy", `target`, zeta None; a note gives the exit
      share and the accuracy reached at the threshold.

    Example: sorted by confidence the labels are 0 0 1 0 1 1 1 1 1 1. Above 0.2 eight tokens exit,
    seven agreeing (0.875 >= 0.85); above 0.1 nine, seven agreeing (0.78); above 0 all ten (0.7):
      >>> conf = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
      >>> agree = [0, 0, 1, 0, 1, 1, 1, 1, 1, 1]
      >>> fit_target_accuracy_threshold(conf, agree, target=0.85).threshold
      0.2
    """
    target = _check_target(target)
    data = clean_inputs(confidence, agree, clip=False)
    fields = {"target": target}
    reason = None
    if data.n == 0:
        reason = "no valid (confidence, agree) pairs"
    elif data.n < min_points:
        reason = f"only {data.n} valid pairs, fewer than min_points={min_points}"
    if reason is None:
        candidates = np.unique(np.r_[0.0, data.conf_N])  # ascending: loosest first
        exiting, agreeing = exit_accuracy(data.conf_N, data.agree_N, candidates)
        # A division, not agreeing >= target * exiting: 7 / 10 rounds to the double 0.7 exactly,
        # while 0.7 * 10 rounds above 7.
        accuracy = np.divide(agreeing, exiting, out=np.zeros(exiting.shape), where=exiting > 0)
        passing = (exiting > 0) & (accuracy >= target)
        if not passing.any():
            best = accuracy.max()
            reason = f"no threshold reaches target accuracy {target:g} (best {best:.4g})"
    if reason is not None:
        return fallback_result(
            "target_accuracy", reason, data, zeta=None, fallback_threshold=NEVER_EXIT,
            with_interval=False, **fields,
        )  # fmt: skip
    j = int(np.argmax(passing))
    note = (
        f"{exiting[j]} of {data.n} calibration tokens exit ({exiting[j] / data.n:.1%}); "
        f"{accuracy[j]:.4g} of them agree (target {target:g}); a point estimate, "
        "with no guarantee on new data"
    )
    return ThresholdResult(
        threshold=float(candidates[j]), estimator="target_accuracy", zeta=None, n=data.n,
        n_agree=data.n_agree, n_disagree=data.n_disagree, n_dropped=data.n_dropped,
        notes=(note,), **fields,
    )  # fmt: skip
