"""Adaptive exit threshold from (shallow confidence, agree) records.

  fit_moments_threshold   FREE's closed form (method-of-moments Beta fits, 10-point grid)
  fit_bmm_threshold       NumPyro labelled Beta mixture (SVI or NUTS), with a posterior interval
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
    CalibrationWarning,
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

__all__ = [
    "EPS",
    "FALLBACK_THRESHOLD",
    "MIN_POINTS",
    "BetaParams",
    "CalibrationWarning",
    "OnlineThreshold",
    "RefitRecord",
    "ThresholdFileError",
    "ThresholdResult",
    "fit_bmm_threshold",
    "fit_moments_threshold",
    "load_threshold",
    "plot_calibration",
    "save_threshold",
]
