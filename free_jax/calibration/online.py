"""Online threshold estimation while a stream decodes: refit after each batch, then freeze.

FREE (models/deploying_t5.py) keeps every (confidence, agree) record harvested so far and, at the
start of each new example, refits its Beta mixture on all of them and replaces the threshold;
after 300 refits the threshold is frozen. Until the first fit it uses the static threshold from
the config.
`OnlineThreshold` is that loop's host-side state, batch-wise:

    online = OnlineThreshold("moments", initial_threshold=0.9, max_refits=300)
    for batch in stream:
        out = decode(params, batch, jnp.float32(online.threshold))   # traced: no recompile
        online.update(out.confidences[out.mask], out.agree[out.mask], num_examples=len(batch))

It is pure host code (numpy + the estimators); the decoder receives the threshold as a traced scalar
argument, so a new value never triggers a recompile. Pass it the same way every time (e.g. always
`jnp.float32(...)`): switching between a Python float and an array changes the abstract type.

Rules:
  * a refit runs after every `update` that brings new valid records, on all records so far;
  * a refit that falls back (degenerate data: e.g. no disagreeing token yet) keeps the threshold in
    force (the initial one until the first successful fit); its warning is recorded in the history
    rather than re-emitted, because early fallbacks are expected during warm-up;
  * after `max_refits` refits, or once `max_examples` examples were seen, the object freezes: later
    updates are ignored and the threshold no longer changes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from free_jax.calibration.common import (
    FALLBACK_THRESHOLD,
    CalibrationWarning,
    check_fallback,
    clean_inputs,
)
from free_jax.calibration.estimators import FitFn, resolve_estimator
from free_jax.calibration.result import ThresholdResult

# FREE refits for the first 300 examples (bmm_update_max_iter).
PAPER_MAX_REFITS = 300


@dataclasses.dataclass(frozen=True)
class RefitRecord:
    """One refit.

    Attributes:
      refit: 1-based index of the refit.
      examples_seen: examples counted when it ran.
      n: valid records it was fitted on.
      fit_threshold: what the estimator returned (the fallback value when `fallback`).
      threshold: the threshold in force after it (unchanged when `fallback`).
      interval: the estimator's interval, if any.
      fallback: the estimator fell back; `reason` says why.
    """

    refit: int
    examples_seen: int
    n: int
    fit_threshold: float
    threshold: float
    interval: tuple[float, float] | None
    fallback: bool
    reason: str | None


class OnlineThreshold:
    """Refits a threshold from streaming agreement records, then freezes.

    Args:
      estimator: a name in `estimators.ESTIMATORS` ("moments", FREE's closed form and the paper's
        choice; "svi", "nuts"; "ltt" and "target_accuracy" with their levels in `fit_kwargs`,
        though refitted online "ltt" carries no certificate), or a callable
        `(confidences, agree, zeta=...) -> ThresholdResult`.
      initial_threshold: in force until the first successful fit (FREE: the static threshold).
      max_refits: freeze after this many refits (paper: 300, one per example).
      max_examples: also freeze once this many examples were seen (None: no such cap).
      zeta: passed to the estimator.
      fit_kwargs: extra keyword arguments for the estimator (e.g. {"seed": 1, "svi_steps": 1000},
        {"epsilon": 0.05, "delta": 0.1}).

    Example:
      >>> online = OnlineThreshold("moments", initial_threshold=0.8, max_refits=2)
      >>> online.threshold
      0.8
      >>> online.update([0.9, 0.95, 0.2, 0.3] * 5, [1, 1, 0, 0] * 5)
      0.6333333333333333
      >>> online.num_refits, online.frozen
      (1, False)
    """

    def __init__(
        self,
        estimator: str | FitFn = "moments",
        *,
        initial_threshold: float = FALLBACK_THRESHOLD,
        max_refits: int = PAPER_MAX_REFITS,
        max_examples: int | None = None,
        zeta: float = 0.4,
        fit_kwargs: dict[str, Any] | None = None,
    ):
        if max_refits < 0:
            raise ValueError(f"max_refits must be >= 0, got {max_refits!r}")
        if max_examples is not None and max_examples < 0:
            raise ValueError(f"max_examples must be >= 0 or None, got {max_examples!r}")
        self._fit = resolve_estimator(estimator, zeta=zeta, **dict(fit_kwargs or {}))
        self._threshold = check_fallback(initial_threshold)
        self.initial_threshold = self._threshold
        self.max_refits = int(max_refits)
        self.max_examples = max_examples
        self.history: list[RefitRecord] = []
        self.result: ThresholdResult | None = None  # last successful fit
        self.examples_seen = 0
        self._conf: list[np.ndarray] = []
        self._agree: list[np.ndarray] = []
        self._frozen = False
        self._check_caps()

    # ---------------------------------------------------------------- state
    @property
    def threshold(self) -> float:
        """The threshold the decoder should use next (a Python float)."""
        return self._threshold

    @property
    def num_refits(self) -> int:
        return len(self.history)

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def num_records(self) -> int:
        return int(sum(c.size for c in self._conf))

    def freeze(self) -> None:
        """Stops refitting now; the current threshold stays."""
        self._frozen = True

    def _check_caps(self) -> None:
        if self.num_refits >= self.max_refits:
            self._frozen = True
        if self.max_examples is not None and self.examples_seen >= self.max_examples:
            self._frozen = True

    # ---------------------------------------------------------------- update
    def update(self, confidences: Any, agree: Any, num_examples: int = 1) -> float:
        """Adds one batch of agreement records, refits unless frozen; returns the new threshold.

        Args:
          confidences, agree: the batch's records, equal shapes (validated as in the estimators:
            malformed input raises ValueError before anything is stored; NaN pairs are dropped).
          num_examples: how many examples the batch covered (counts toward `max_examples`).
        """
        if self._frozen:
            return self._threshold
        data = clean_inputs(confidences, agree)
        self.examples_seen += int(num_examples)
        if data.n:
            self._conf.append(data.conf_N)
            self._agree.append(data.agree_N)
            self._refit()
        self._check_caps()
        return self._threshold

    def _refit(self) -> None:
        conf = np.concatenate(self._conf)
        agree = np.concatenate(self._agree)
        with warnings.catch_warnings():
            # Warm-up fallbacks are expected; they are kept in the history instead.
            warnings.simplefilter("ignore", CalibrationWarning)
            result = self._fit(conf, agree)
        if not result.fallback:
            self._threshold = float(result.threshold)
            self.result = result
        self.history.append(
            RefitRecord(
                refit=self.num_refits + 1,
                examples_seen=self.examples_seen,
                n=result.n,
                fit_threshold=float(result.threshold),
                threshold=self._threshold,
                interval=result.interval,
                fallback=result.fallback,
                reason=result.fallback_reason,
            )
        )

    def __repr__(self) -> str:
        return (
            f"OnlineThreshold(threshold={self._threshold:.4g}, refits={self.num_refits}/"
            f"{self.max_refits}, examples={self.examples_seen}, records={self.num_records}, "
            f"frozen={self._frozen})"
        )
