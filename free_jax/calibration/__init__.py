"""Adaptive exit threshold from (shallow confidence, agree) records.

  fit_moments_threshold   FREE's closed form (method-of-moments Beta fits, 10-point grid)
  fit_bmm_threshold       NumPyro labelled Beta mixture (SVI or NUTS), with a posterior interval
  fit_ltt_threshold       Learn-then-Test: P(share of tokens exiting and disagreeing > eps) <= delta
  fit_ltt_sequence_threshold   the same for the share of outputs that differ from full greedy
  fit_target_accuracy_threshold   loosest threshold whose exiting tokens reach a target accuracy
  ESTIMATORS / resolve_estimator / fit_threshold   the estimators by name (calibrate, online)
  OnlineThreshold         refit while a stream decodes, then freeze (host side)
  plot_calibration        histograms, fitted densities, P(agree | c), threshold (PNG)
  save_threshold / load_threshold   threshold.json

Works on plain numpy arrays; imports nothing else from free_jax.
"""

from free_jax.calibration.bmm import fit_bmm_threshold
from free_jax.calibration.common import (
    EPS,
    FALLBACK_THRESHOLD,
    MIN_POINTS,
    NEVER_EXIT,
    CalibrationWarning,
)
from free_jax.calibration.estimators import ESTIMATORS, fit_threshold, resolve_estimator
from free_jax.calibration.ltt import (
    fit_ltt_sequence_threshold,
    fit_ltt_threshold,
    max_disagree_confidence,
)
from free_jax.calibration.moments import fit_moments_threshold
from free_jax.calibration.online import OnlineThreshold, RefitRecord
from free_jax.calibration.plots import plot_calibration
from free_jax.calibration.result import (
    BetaParams,
    ThresholdFileError,
    ThresholdResult,
    load_threshold,
    save_threshold,
)
from free_jax.calibration.target import fit_target_accuracy_threshold

__all__ = [
    "EPS",
    "ESTIMATORS",
    "FALLBACK_THRESHOLD",
    "MIN_POINTS",
    "NEVER_EXIT",
    "BetaParams",
    "CalibrationWarning",
    "OnlineThreshold",
    "RefitRecord",
    "ThresholdFileError",
    "ThresholdResult",
    "fit_bmm_threshold",
    "fit_ltt_sequence_threshold",
    "fit_ltt_threshold",
    "fit_moments_threshold",
    "fit_target_accuracy_threshold",
    "fit_threshold",
    "load_threshold",
    "max_disagree_confidence",
    "plot_calibration",
    "resolve_estimator",
    "save_threshold",
]
