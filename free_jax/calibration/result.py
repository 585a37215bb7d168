"""The calibration result record, `ThresholdResult`, and its file format, threshold.json.

`calibrate` writes one with `save_threshold`; `evaluate` and `generate` read it with
`load_threshold`. A malformed file raises `ThresholdFileError` naming the file and the field, so a
hand-edited or truncated threshold.json never silently becomes a threshold.

Layout (v2; v1 files, written before the Learn-then-Test and target-accuracy estimators, still
load): "threshold" is a number in [0, 1] or the string "inf" (never exit: no confidence is strictly
above it; strict JSON has no infinity); "zeta" and "target" are the level the threshold was read at,
null where the estimator has none; "guarantee" is null or, for Learn-then-Test, {"epsilon", "delta",
"pvalue", "tested": {"threshold": [...], "pvalue": [...], "risk": [...]}}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# Bumped when the threshold.json layout changes; load_threshold refuses versions it does not know.
JSON_FORMAT = "free_jax.threshold/v2"
# v1 lacks "target" and "guarantee" and has a finite threshold and zeta; it reads as v2 with nulls.
READABLE_FORMATS = ("free_jax.threshold/v1", JSON_FORMAT)


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
      threshold: what the decoder should use (exit at the shallow layer when `conf > threshold`);
        `math.inf` (NEVER_EXIT) when nothing may exit.
      estimator: "moments" (FREE's closed form), "bmm-svi" or "bmm-nuts" (NumPyro Beta mixture),
        "ltt" or "ltt-sequence" (Learn-then-Test), "target_accuracy".
      zeta: the posterior-probability level the threshold was read at (None for the estimators
        that read no posterior: "ltt", "ltt-sequence", "target_accuracy").
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
      target: "target_accuracy" only: the share of exiting calibration tokens that must agree.
      epsilon, delta: Learn-then-Test only: with probability >= 1 - delta over the calibration
        draw, the risk at `threshold` is <= epsilon (see ltt.py for which risk).
      pvalue: Learn-then-Test only: "binomial" (exact tail) or "hoeffding_bentkus".
      tested_thresholds, tested_pvalues, tested_risks: Learn-then-Test only: the grid thresholds in
        the order tested (strictest first), each one's p-value and empirical risk, up to and
        including the first that was not rejected (the last entry, unless all were rejected).
    """

    threshold: float
    estimator: str
    zeta: float | None
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
    target: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    pvalue: str | None = None
    tested_thresholds: tuple[float, ...] = ()
    tested_pvalues: tuple[float, ...] = ()
    tested_risks: tuple[float, ...] = ()

    @property
    def never_exit(self) -> bool:
        """True when no token can exit (threshold infinite)."""
        return self.threshold == math.inf

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the layout of threshold.json)."""

        def params(p: BetaParams | None):
            return None if p is None else {"alpha": p.alpha, "beta": p.beta}

        guarantee = None
        if self.epsilon is not None or self.delta is not None:
            guarantee = {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "pvalue": self.pvalue,
                "tested": {
                    "threshold": list(self.tested_thresholds),
                    "pvalue": list(self.tested_pvalues),
                    "risk": list(self.tested_risks),
                },
            }
        return {
            "format": JSON_FORMAT,
            "threshold": "inf" if self.never_exit else self.threshold,
            "interval": None if self.interval is None else list(self.interval),
            "interval_mass": self.interval_mass,
            "estimator": self.estimator,
            "zeta": self.zeta,
            "target": self.target,
            "guarantee": guarantee,
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
    if fmt not in READABLE_FORMATS:
        raise ThresholdFileError(
            f"{source}: field 'format' must be one of {READABLE_FORMATS!r}, got {fmt!r}"
        )
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
    threshold = _field(d, "threshold", source)
    if threshold == "inf":
        threshold = math.inf
    elif isinstance(threshold, str):
        raise ThresholdFileError(
            f"{source}: field 'threshold' must be a finite number or \"inf\", got {threshold!r}"
        )
    else:
        threshold = _as_float(threshold, "threshold", source, lo=0.0, hi=1.0)
    return ThresholdResult(
        threshold=threshold,
        estimator=estimator,
        zeta=_as_float(_field(d, "zeta", source), "zeta", source, lo=0.0, hi=1.0, allow_none=True),
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
        target=_as_float(
            _field(d, "target", source, optional=True),
            "target",
            source,
            lo=0.0,
            hi=1.0,
            allow_none=True,
        ),
        **_parse_guarantee(_field(d, "guarantee", source, optional=True), source),
    )


def _parse_guarantee(g: Any, source: str) -> dict[str, Any]:
    """The Learn-then-Test fields of ThresholdResult from the "guarantee" block (None: absent)."""
    if g is None:
        return {}
    if not isinstance(g, dict):
        raise ThresholdFileError(
            f"{source}: field 'guarantee' must be an object or null, got {g!r}"
        )
    pvalue = g.get("pvalue")
    if pvalue is not None and not isinstance(pvalue, str):
        raise ThresholdFileError(
            f"{source}: field 'guarantee.pvalue' must be a string, got {pvalue!r}"
        )
    tested = {}
    for key in ("threshold", "pvalue", "risk"):
        dotted = f"guarantee.tested.{key}"
        values = _field({"guarantee": g}, dotted, source, optional=True)
        values = _as_floats(values or [], dotted, source)
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ThresholdFileError(f"{source}: field '{dotted}' must hold numbers in [0, 1]")
        tested[key] = values
    if len({len(v) for v in tested.values()}) > 1:
        raise ThresholdFileError(
            f"{source}: fields 'guarantee.tested.threshold', '.pvalue' and '.risk' differ in length"
        )
    level = {}
    for key in ("epsilon", "delta"):
        level[key] = _as_float(
            g.get(key), f"guarantee.{key}", source, lo=0.0, hi=1.0, allow_none=True
        )
    return {
        **level,
        "pvalue": pvalue,
        "tested_thresholds": tested["threshold"],
        "tested_pvalues": tested["pvalue"],
        "tested_risks": tested["risk"],
    }
