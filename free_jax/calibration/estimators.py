"""Every token-level threshold estimator by name: the one table that `calibrate` (ESTIMATOR in
calibrate.gin) and `OnlineThreshold` resolve names through.

    fit = resolve_estimator("ltt", zeta=0.4, epsilon=0.05, delta=0.1)   # zeta: not read by "ltt"
    result = fit(confidences, agree)

A run supplies all its levels (zeta, epsilon, delta, target) whatever the estimator; each estimator
reads the ones it needs and a missing one (None) is an error naming it. The sequence-level
Learn-then-Test (`fit_ltt_sequence_threshold`) takes [B, T] records rather than flat pairs and is
not in the table.

Refitting online (`OnlineThreshold`) works with every entry, but a threshold chosen by many looks
at a growing record set carries no Learn-then-Test certificate: certify once, offline.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from free_jax.calibration.bmm import fit_bmm_threshold
from free_jax.calibration.ltt import fit_ltt_threshold
from free_jax.calibration.moments import fit_moments_threshold
from free_jax.calibration.result import ThresholdResult
from free_jax.calibration.target import fit_target_accuracy_threshold

FitFn = Callable[..., ThresholdResult]


@dataclasses.dataclass(frozen=True)
class Estimator:
    """One entry of the table.

    Attributes:
      fit: `(confidences, agree, **levels, **fixed, **fit_kwargs) -> ThresholdResult`.
      levels: the run levels it reads, each required ("zeta"; "epsilon", "delta"; "target").
      fixed: keyword arguments the name implies (e.g. method="svi").
      seeded: takes a PRNG `seed`.
      summary: one line for help texts.
    """

    fit: FitFn
    levels: tuple[str, ...]
    fixed: tuple[tuple[str, Any], ...] = ()
    seeded: bool = False
    summary: str = ""


ESTIMATORS: dict[str, Estimator] = {
    "moments": Estimator(
        fit_moments_threshold, ("zeta",), summary="FREE's closed form (the paper's estimator)"
    ),
    "svi": Estimator(
        fit_bmm_threshold, ("zeta",), (("method", "svi"),), seeded=True,
        summary="NumPyro Beta mixture, SVI, with a posterior interval",
    ),
    "nuts": Estimator(
        fit_bmm_threshold, ("zeta",), (("method", "nuts"),), seeded=True,
        summary="NumPyro Beta mixture, NUTS, with a posterior interval",
    ),
    "ltt": Estimator(
        fit_ltt_threshold, ("epsilon", "delta"),
        summary="Learn-then-Test: P(share of tokens exiting and disagreeing > epsilon) <= delta",
    ),
    "target_accuracy": Estimator(
        fit_target_accuracy_threshold, ("target",),
        summary="loosest threshold whose exiting tokens agree at least `target` of the time",
    ),
}  # fmt: skip


def resolve_estimator(
    estimator: str | FitFn,
    *,
    zeta: float | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    target: float | None = None,
    seed: int | None = None,
    **fit_kwargs: Any,
) -> FitFn:
    """`(confidences, agree) -> ThresholdResult` for a name in ESTIMATORS, or a callable.

    A callable receives the levels that are not None, `seed` if given, and `fit_kwargs`.

    >>> resolve_estimator("ltt", epsilon=0.05, delta=0.1).keywords
    {'epsilon': 0.05, 'delta': 0.1}
    """
    given = {"zeta": zeta, "epsilon": epsilon, "delta": delta, "target": target}
    if callable(estimator):
        kwargs = {k: v for k, v in given.items() if v is not None}
        if seed is not None:
            kwargs["seed"] = seed
        return functools.partial(estimator, **kwargs, **fit_kwargs)
    entry = ESTIMATORS.get(estimator) if isinstance(estimator, str) else None
    if entry is None:
        raise ValueError(
            f"estimator must be one of {sorted(ESTIMATORS)} or a callable, got {estimator!r}"
        )
    missing = [k for k in entry.levels if given[k] is None]
    if missing:
        raise ValueError(f"estimator {estimator!r} needs {' and '.join(missing)}, got None")
    kwargs = {k: given[k] for k in entry.levels}
    if entry.seeded and seed is not None:
        kwargs["seed"] = seed
    return functools.partial(entry.fit, **kwargs, **dict(entry.fixed), **fit_kwargs)


def fit_threshold(
    confidences: Any, agree: Any, estimator: str | FitFn, **kwargs: Any
) -> ThresholdResult:
    """Fits `estimator` (a name in ESTIMATORS or a callable); kwargs as in `resolve_estimator`."""
    return resolve_estimator(estimator, **kwargs)(confidences, agree)
