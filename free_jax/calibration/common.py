"""What every threshold estimator shares: the result record, input checks, fallbacks, JSON files.

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
import json
import math
import os
import warnings
from typing import Any

import numpy as np

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

# Bumped when the threshold.json layout changes; load_threshold refuses other versions.
JSON_FORMAT = "free_jax.threshold/v1"


class CalibrationWarning(UserWarning):
    """Degenerate calibration data: NaNs dropped, or a fallback threshold used."""


class ThresholdFileError(ValueError):
    """A threshold.json that cannot be read; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class BetaParams:
    """Parameters of one Beta component, density c**(alpha-1) (1-c)**(beta-1) / B(alpha, beta)."""

    alpha: float
    beta: float

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


@dataclasses.dataclass(frozen=True)
class ThresholdResult:
    """One calibrated threshold and how it was obtained.

    Attributes:
      threshold: what the decoder should use (exit at the shallow layer when `conf > threshold`).
      estimator: "moments" (FREE's closed form), "bmm-svi" or "bmm-nuts" (NumPyro Beta mixture).
      zeta: the posterior-probability level the threshold was read at.
      n, n_agree, n_disagree: valid pairs used (after dropping NaNs) and their split by label.
      n_dropped: pairs dropped because the confidence or the label was NaN.
      interval: (lo, hi) posterior interval of the threshold holding `interval_mass` of the mass
        (Beta-mixture estimators only; None for "moments"). On a fallback it is (0.0, 1.0): the
        data do not constrain the threshold at all.
      interval_mass: e.g. 0.9 for the 5-95% interval.
      agree, disagree: fitted Beta components (posterior means for the Beta mixture); None on a
        fallback.
      agree_weight: mixture weight of the agree component (0.5 for "moments": equal priors).
      fallback: True when the threshold is the fallback value rather than a fit.
      fallback_reason: why, in words (None when no fallback).
      curve_c, curve_p: the posterior P(agree | c) the threshold was read from, on a grid over
        [0, 1] (empty on a fallback); kept so plots and reports show exactly what was used.
      seed: PRNG seed of a stochastic fit (None for "moments").
      notes: anything else a reader of the result should know (e.g. swapped components).
    """

    threshold: float
    estimator: str
    zeta: float
    n: int
    n_agree: int
    n_disagree: int
    n_dropped: int = 0
    interval: tuple[float, float] | None = None
    interval_mass: float | None = None
    agree: BetaParams | None = None
    disagree: BetaParams | None = None
    agree_weight: float | None = None
    fallback: bool = False
    fallback_reason: str | None = None
    curve_c: tuple[float, ...] = ()
    curve_p: tuple[float, ...] = ()
    seed: int | None = None
    notes: tuple[str, ...] = ()

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the layout of threshold.json)."""

        def params(p: BetaParams | None):
            return None if p is None else {"alpha": p.alpha, "beta": p.beta}

        return {
            "format": JSON_FORMAT,
            "threshold": self.threshold,
            "interval": None if self.interval is None else list(self.interval),
            "interval_mass": self.interval_mass,
            "estimator": self.estimator,
            "zeta": self.zeta,
            "counts": {
                "n": self.n,
                "n_agree": self.n_agree,
                "n_disagree": self.n_disagree,
                "n_dropped": self.n_dropped,
            },
            "params": {
                "agree": params(self.agree),
                "disagree": params(self.disagree),
                "agree_weight": self.agree_weight,
            },
            "fallback": {"used": self.fallback, "reason": self.fallback_reason},
            "curve": {"c": list(self.curve_c), "p": list(self.curve_p)},
            "seed": self.seed,
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        # allow_nan=False: a NaN that slipped through is a bug, and strict JSON readers reject it.
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> ThresholdResult:
        """Inverse of `to_dict`; raises ThresholdFileError naming `source` and the bad field."""
        return _parse_result(d, source)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> ThresholdResult:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ThresholdFileError(f"{source}: not valid JSON ({e})") from e
        return _parse_result(d, source)


def save_threshold(path: str | os.PathLike, result: ThresholdResult) -> None:
    """Writes `result` as JSON to `path` (creating parent directories)."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    text = result.to_json()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def load_threshold(path: str | os.PathLike) -> ThresholdResult:
    """Reads a threshold.json written by `save_threshold`.

    Raises:
      FileNotFoundError: no such file.
      ThresholdFileError (a ValueError): malformed JSON or a missing / mistyped field; the message
        names the file and the field, e.g. "runs/x/threshold.json: field 'counts.n' must be an
        integer, got '12'".
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return ThresholdResult.from_json(text, source=path)


# -------------------------------------------------------------------- JSON parsing helpers
_MISSING = object()


def _field(d: Any, dotted: str, source: str, *, optional: bool = False) -> Any:
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            raise ThresholdFileError(f"{source}: field '{dotted}': expected an object above it")
        cur = cur.get(part, _MISSING)
        if cur is _MISSING:
            if optional:
                return None
            raise ThresholdFileError(f"{source}: missing field '{dotted}'")
    return cur


def _as_float(v: Any, dotted: str, source: str, *, lo=None, hi=None, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ThresholdFileError(f"{source}: field '{dotted}' must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ThresholdFileError(f"{source}: field '{dotted}' must be in [{lo}, {hi}], got {v!r}")
    return float(v)


def _as_int(v: Any, dotted: str, source: str, *, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ThresholdFileError(
            f"{source}: field '{dotted}' must be a non-negative integer, got {v!r}"
        )
    return int(v)


def _as_params(v: Any, dotted: str, source: str) -> BetaParams | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ThresholdFileError(f"{source}: field '{dotted}' must be an object or null, got {v!r}")
    a = _as_float(v.get("alpha"), f"{dotted}.alpha", source, lo=0.0)
    b = _as_float(v.get("beta"), f"{dotted}.beta", source, lo=0.0)
    return BetaParams(a, b)


def _as_floats(v: Any, dotted: str, source: str) -> tuple[float, ...]:
    if not isinstance(v, list):
        raise ThresholdFileError(f"{source}: field '{dotted}' must be a list, got {v!r}")
    return tuple(_as_float(x, f"{dotted}[{i}]", source) for i, x in enumerate(v))


def _parse_result(d: Any, source: str) -> ThresholdResult:
    if not isinstance(d, dict):
        raise ThresholdFileError(f"{source}: expected a JSON object, got {type(d).__name__}")
    fmt = _field(d, "format", source)
    if fmt != JSON_FORMAT:
        raise ThresholdFileError(f"{source}: field 'format' must be {JSON_FORMAT!r}, got {fmt!r}")
    estimator = _field(d, "estimator", source)
    if not isinstance(estimator, str):
        raise ThresholdFileError(f"{source}: field 'estimator' must be a string, got {estimator!r}")
    interval = _field(d, "interval", source, optional=True)
    if interval is not None:
        if not (isinstance(interval, list) and len(interval) == 2):
            raise ThresholdFileError(
                f"{source}: field 'interval' must be [lo, hi] or null, got {interval!r}"
            )
        lo = _as_float(interval[0], "interval[0]", source, lo=0.0, hi=1.0)
        hi = _as_float(interval[1], "interval[1]", source, lo=0.0, hi=1.0)
        if lo > hi:
            raise ThresholdFileError(f"{source}: field 'interval' has lo > hi: {interval!r}")
        interval = (lo, hi)
    reason = _field(d, "fallback.reason", source, optional=True)
    used = _field(d, "fallback.used", source)
    if not isinstance(used, bool):
        raise ThresholdFileError(
            f"{source}: field 'fallback.used' must be true/false, got {used!r}"
        )
    notes = _field(d, "notes", source, optional=True) or []
    if not (isinstance(notes, list) and all(isinstance(s, str) for s in notes)):
        raise ThresholdFileError(f"{source}: field 'notes' must be a list of strings")
    curve_c = _as_floats(_field(d, "curve.c", source, optional=True) or [], "curve.c", source)
    curve_p = _as_floats(_field(d, "curve.p", source, optional=True) or [], "curve.p", source)
    if len(curve_c) != len(curve_p):
        raise ThresholdFileError(f"{source}: fields 'curve.c' and 'curve.p' differ in length")
    return ThresholdResult(
        threshold=_as_float(_field(d, "threshold", source), "threshold", source, lo=0.0, hi=1.0),
        estimator=estimator,
        zeta=_as_float(_field(d, "zeta", source), "zeta", source, lo=0.0, hi=1.0),
        n=_as_int(_field(d, "counts.n", source), "counts.n", source),
        n_agree=_as_int(_field(d, "counts.n_agree", source), "counts.n_agree", source),
        n_disagree=_as_int(_field(d, "counts.n_disagree", source), "counts.n_disagree", source),
        n_dropped=_as_int(
            _field(d, "counts.n_dropped", source, optional=True) or 0, "counts.n_dropped", source
        ),
        interval=interval,
        interval_mass=_as_float(
            _field(d, "interval_mass", source, optional=True),
            "interval_mass",
            source,
            lo=0.0,
            hi=1.0,
            allow_none=True,
        ),
        agree=_as_params(_field(d, "params.agree", source, optional=True), "params.agree", source),
        disagree=_as_params(
            _field(d, "params.disagree", source, optional=True), "params.disagree", source
        ),
        agree_weight=_as_float(
            _field(d, "params.agree_weight", source, optional=True),
            "params.agree_weight",
            source,
            lo=0.0,
            hi=1.0,
            allow_none=True,
        ),
        fallback=used,
        fallback_reason=None if reason is None else str(reason),
        curve_c=curve_c,
        curve_p=curve_p,
        seed=_as_int(_field(d, "seed", source, optional=True), "seed", source, allow_none=True),
        notes=tuple(notes),
    )


# -------------------------------------------------------------------- input checks
@dataclasses.dataclass(frozen=True)
class CleanData:
    """Validated pairs. conf_N is clipped into [EPS, 1 - EPS]; agree_N is bool."""

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


def clean_inputs(confidences: Any, agree: Any, *, stacklevel: int = 3) -> CleanData:
    """Validates and flattens (confidences, agree); drops NaN pairs with a warning.

    Both arguments may have any shape as long as the shapes are equal (e.g. [B, T] records); they
    are flattened together. `agree` may be bool, or numbers that are 0/1 (or NaN, dropped).

    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")      # "dropped 1 of 3 ... pairs containing NaN"
    ...     d = clean_inputs([0.0, 0.5, float("nan")], [1, 0, 1])
    >>> d.conf_N, d.agree_N, d.n_dropped
    (array([1.e-04, 5.e-01]), array([ True, False]), 1)
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
    conf = conf.reshape(-1)
    lab = lab.reshape(-1)
    bad = ~np.isnan(conf) & ((conf < 0.0) | (conf > 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"confidences must lie in [0, 1]; {int(bad.sum())} value(s) outside, first at flat "
            f"index {i}: {conf[i]!r}"
        )
    if lab.dtype == np.bool_:
        lab_nan = np.zeros(lab.shape, bool)
        lab_bool = lab
    else:
        lab_nan = np.isnan(lab)
        bad = ~lab_nan & (lab != 0.0) & (lab != 1.0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"agree must be booleans or 0/1; {int(bad.sum())} value(s) are not, first at flat "
                f"index {i}: {lab[i]!r}"
            )
        lab_bool = lab == 1.0
    drop = np.isnan(conf) | lab_nan
    n_dropped = int(drop.sum())
    if n_dropped:
        warnings.warn(
            f"dropped {n_dropped} of {conf.size} (confidence, agree) pairs containing NaN",
            CalibrationWarning,
            stacklevel=stacklevel,
        )
    keep = ~drop
    return CleanData(
        conf_N=np.clip(conf[keep], EPS, 1.0 - EPS), agree_N=lab_bool[keep], n_dropped=n_dropped
    )


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
    zeta: float,
    fallback_threshold: float,
    with_interval: bool,
    seed: int | None = None,
    stacklevel: int = 3,
) -> ThresholdResult:
    """A fallback result, announced with a CalibrationWarning."""
    warnings.warn(
        f"{estimator}: {reason}; using the fallback threshold {fallback_threshold}",
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
