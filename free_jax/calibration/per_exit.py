"""One threshold per exit, for decoders with many exits (self-supervised exit heads).

Records: for every exit j and every calibration position, the exit's confidence and whether its
argmax equals the final layer's there, all on the same positions (a teacher-forced pass over the
full model's outputs: `evaluation.exit_records`). Each exit is fitted on its own records with any
estimator of `estimators.ESTIMATORS`:

* "target_accuracy" (Valade 2024): per exit, the loosest threshold whose exiting tokens agree with
  the final layer at least `target` of the time;
* "ltt": Learn-then-Test per exit at level epsilon / m with confidence 1 - delta / m (Bonferroni).
  The guarantee then covers the cascade. A token that leaves at exit j passed exit j's test, so

      share of tokens that leave early and disagree  <=  sum_j R_j(t_j),
      R_j(t) = P(conf_j > t and exit j disagrees with the final layer),

  and with probability >= 1 - sum_j delta / m = 1 - delta every R_j(t_j) <= epsilon / m at once,
  so the cascade's risk is <= epsilon. What it does not promise: it is marginal over calibration
  draws, about token disagreement with the full model's prediction at each position, on
  positions drawn like the calibration positions (prefixes of full-model outputs), not task
  quality;
* "moments", "svi", "nuts": FREE's estimators per exit at level zeta (no guarantee).

    >>> rng = np.random.default_rng(0)
    >>> conf = rng.uniform(size=(2, 4000)); agree = rng.uniform(size=(2, 4000)) < 0.5 + conf / 2
    >>> r = fit_exit_thresholds(conf, agree, "ltt", exits=(1, 2), epsilon=0.1, delta=0.1)
    >>> r.per_exit[0].epsilon, r.per_exit[0].delta, r.epsilon, len(r.thresholds)
    (0.05, 0.05, 0.1, 2)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from free_jax.calibration.estimators import resolve_estimator
from free_jax.calibration.result import ThresholdFileError, ThresholdResult

FORMAT = "free_jax.exit_thresholds/1"


@dataclasses.dataclass(frozen=True)
class ExitThresholds:
    """Per-exit thresholds and, for "ltt", the cascade's guarantee.

    Attributes:
      exits: the exit layers, increasing.
      per_exit: one `ThresholdResult` per exit (for "ltt" at epsilon / m, delta / m).
      estimator: the estimator's name.
      epsilon, delta: "ltt" only: the cascade's risk level and failure probability.
    """

    exits: tuple[int, ...]
    per_exit: tuple[ThresholdResult, ...]
    estimator: str
    epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self):
        if len(self.exits) != len(self.per_exit):
            raise ValueError(f"{len(self.exits)} exits but {len(self.per_exit)} results")

    @property
    def thresholds(self) -> tuple[float, ...]:
        """What a decoder with `exits` takes as its threshold (1.0 for an exit never used: no
        confidence passes it, as the decoders' rule is `conf > threshold`)."""
        return tuple(1.0 if r.never_exit else float(r.threshold) for r in self.per_exit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "exits": list(self.exits),
            "estimator": self.estimator,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "thresholds": list(self.thresholds),
            "per_exit": [r.to_dict() for r in self.per_exit],
        }


def fit_exit_thresholds(
    confidence_EN: Any,
    agree_EN: Any,
    estimator: str,
    *,
    exits: tuple[int, ...],
    epsilon: float | None = None,
    delta: float | None = None,
    zeta: float | None = None,
    target: float | None = None,
    seed: int | None = 0,
) -> ExitThresholds:
    """Fits each exit's threshold on its own row of records (see the module doc).

    Args:
      confidence_EN, agree_EN: [m, N] per exit, over the same N positions (or a list of m arrays).
      estimator: a name in `ESTIMATORS`.
      exits: the m exit layers (for the record).
      epsilon, delta: "ltt": the cascade's levels (each exit is certified at epsilon/m, delta/m).
      zeta, target: the other estimators' levels.
    """
    m = len(exits)
    conf = [np.asarray(c, np.float64).ravel() for c in confidence_EN]
    agree = [np.asarray(a).ravel() for a in agree_EN]
    if len(conf) != m or len(agree) != m:
        raise ValueError(f"records for {len(conf)} exits, but exits={tuple(exits)!r}")
    levels = dict(zeta=zeta, target=target, seed=seed)
    if estimator == "ltt":
        if epsilon is None or delta is None:
            raise ValueError("estimator 'ltt' needs epsilon and delta, got None")
        levels.update(epsilon=epsilon / m, delta=delta / m)
    fit = resolve_estimator(estimator, **levels)
    per_exit = tuple(fit(c, a) for c, a in zip(conf, agree))
    cascade = (epsilon, delta) if estimator == "ltt" else (None, None)
    return ExitThresholds(tuple(int(e) for e in exits), per_exit, estimator, *cascade)


def save_exit_thresholds(path: str | os.PathLike, result: ExitThresholds) -> None:
    """Writes `result` as JSON (creating parent directories)."""
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")


def load_exit_thresholds(path: str | os.PathLike) -> ExitThresholds:
    """Reads a file written by `save_exit_thresholds`; errors name the file and the field."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ThresholdFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ThresholdFileError(f"{path}: field 'format' must be {FORMAT!r} (per-exit thresholds)")
    try:
        exits = tuple(int(e) for e in d["exits"])
        per_exit = tuple(
            ThresholdResult.from_dict(r, f"{path} per_exit[{i}]")
            for i, r in enumerate(d["per_exit"])
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ThresholdFileError):
            raise
        raise ThresholdFileError(f"{path}: fields 'exits' and 'per_exit' are required ({e})") from e
    levels = {k: d.get(k) for k in ("epsilon", "delta")}
    for k, v in levels.items():
        if v is not None and not (isinstance(v, int | float) and 0 < v < 1 and math.isfinite(v)):
            raise ThresholdFileError(f"{path}: field {k!r} must be in (0, 1) or null, got {v!r}")
    return ExitThresholds(exits, per_exit, str(d.get("estimator", "")), **levels)
