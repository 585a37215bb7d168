"""Bad input and degenerate data: fallbacks with warnings, ValueErrors naming the argument,
threshold.json errors naming the file and the field."""

import json
import math
import re

import numpy as np
import pytest

from free_jax.calibration import (
    FALLBACK_THRESHOLD,
    CalibrationWarning,
    ThresholdFileError,
    fit_bmm_threshold,
    fit_moments_threshold,
    load_threshold,
    plot_calibration,
    save_threshold,
)

# Fallback paths return before any sampling, so "nuts" costs nothing here; "svi" reuses the
# compiled program of the other test files whenever a real fit happens.
FITS = {
    "moments": fit_moments_threshold,
    "svi": lambda c, y, **kw: fit_bmm_threshold(c, y, method="svi", **kw),
    "nuts": lambda c, y, **kw: fit_bmm_threshold(c, y, method="nuts", **kw),
}


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.7
    return np.where(y, rng.beta(8.0, 2.0, n), rng.beta(2.0, 5.0, n)), y


def _assert_fallback(r, estimator, reason_part, threshold=FALLBACK_THRESHOLD):
    assert r.fallback and reason_part in r.fallback_reason
    assert r.threshold == threshold and isinstance(r.threshold, float)
    if estimator == "moments":
        assert r.interval is None
    else:
        assert r.interval == (0.0, 1.0)  # the data do not constrain the threshold at all
    json.loads(r.to_json())  # strict JSON: no NaN anywhere


DEGENERATE = {
    "no_disagree": (np.linspace(0.1, 0.9, 50), np.ones(50, bool), "no disagreeing tokens"),
    "no_agree": (np.linspace(0.1, 0.9, 50), np.zeros(50, bool), "no agreeing tokens"),
    "too_few": ([0.9, 0.8, 0.2, 0.1, 0.5], [1, 1, 0, 0, 1], "fewer than min_points"),
    "all_equal": (np.full(50, 0.7), np.arange(50) % 2 == 0, "all confidences are equal"),
    "class_equal": (
        np.r_[np.full(25, 1.0), np.linspace(0.1, 0.5, 25)],
        np.r_[np.ones(25, bool), np.zeros(25, bool)],
        "all agreeing confidences are equal",
    ),
    "empty": (np.zeros(0), np.zeros(0, bool), "no valid"),
    "all_nan": (np.full(20, np.nan), np.ones(20, bool), "no valid"),
}


@pytest.mark.parametrize("estimator", list(FITS))
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_data_falls_back_with_warning(estimator, case):
    c, y, reason = DEGENERATE[case]
    with pytest.warns(CalibrationWarning) as record:  # all-NaN also warns about dropped pairs
        r = FITS[estimator](c, y)
    assert any("fallback threshold" in str(w.message) for w in record)
    _assert_fallback(r, estimator, reason)


@pytest.mark.parametrize("estimator", ["moments", "svi"])
def test_custom_fallback_threshold_and_min_points(estimator):
    c, y = _data(30)
    with pytest.warns(CalibrationWarning):
        r = FITS[estimator](c, y, min_points=31, fallback_threshold=0.75)
    _assert_fallback(r, estimator, "min_points=31", threshold=0.75)


@pytest.mark.parametrize("estimator", ["moments", "svi"])
def test_exact_zeros_and_ones_are_clipped_not_nan(estimator):
    c, y = _data()
    c[:40] = 1.0  # saturated margins: common in practice
    c[40:60] = 0.0
    r = FITS[estimator](c, y)
    assert not r.fallback and 0.0 <= r.threshold <= 1.0
    for p in (r.agree, r.disagree):
        assert math.isfinite(p.alpha) and math.isfinite(p.beta) and p.alpha > 0 and p.beta > 0
    assert all(math.isfinite(v) for v in r.curve_p)


@pytest.mark.parametrize("estimator", ["moments", "svi"])
def test_nan_pairs_are_dropped_with_warning(estimator):
    c, y = _data()
    clean = FITS[estimator](c, y)
    c_nan, y_nan = c.copy(), y.astype(float)
    c_nan = np.r_[c_nan, np.nan, 0.5, np.nan]
    y_nan = np.r_[y_nan, 1.0, np.nan, np.nan]
    with pytest.warns(CalibrationWarning, match="dropped 3 of"):
        r = FITS[estimator](c_nan, y_nan)
    assert r.n_dropped == 3 and r.n == clean.n
    assert r.threshold == clean.threshold and r.agree == clean.agree


@pytest.mark.parametrize("estimator", list(FITS))
def test_malformed_input_raises_naming_the_argument(estimator):
    fit = FITS[estimator]
    c, y = _data(50)
    with pytest.raises(ValueError, match="confidences and agree must have the same shape"):
        fit(c, y[:-1])
    for bad in (1.5, -0.1, np.inf):
        c_bad = c.copy()
        c_bad[3] = bad
        with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
            fit(c_bad, y)
    with pytest.raises(ValueError, match="agree must be booleans or 0/1"):
        fit(c, np.where(y, 2, 0))
    with pytest.raises(ValueError, match="confidences must be an array of numbers"):
        fit(["a"] * 50, y)
    with pytest.raises(ValueError, match="zeta"):
        fit(c, y, zeta=1.5)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="method must be one of"):
        fit_bmm_threshold(*_data(50), method="em")


def test_any_equal_shapes_are_flattened():
    c, y = _data(400)
    flat = fit_moments_threshold(c, y)
    assert fit_moments_threshold(c.reshape(20, 20), y.reshape(20, 20)) == flat


# -------------------------------------------------------------------- threshold.json
def test_save_load_fallback_result(tmp_path):
    with pytest.warns(CalibrationWarning):
        r = fit_bmm_threshold(np.full(50, 0.5), np.ones(50, bool))
    save_threshold(tmp_path / "a" / "threshold.json", r)
    assert load_threshold(tmp_path / "a" / "threshold.json") == r


@pytest.fixture
def good_dict():
    return fit_moments_threshold(*_data()).to_dict()


def _write(tmp_path, payload):
    path = tmp_path / "threshold.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_load_reports_invalid_json_with_file_name(tmp_path):
    path = _write(tmp_path, '{"threshold": 0.5,')
    with pytest.raises(ThresholdFileError, match=rf"{re.escape(str(path))}: not valid JSON"):
        load_threshold(path)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("threshold"), "missing field 'threshold'"),
        (lambda d: d.update(threshold="0.5"), "field 'threshold' must be a finite number"),
        (lambda d: d.update(threshold=1.5), r"field 'threshold' must be in \[0.0, 1.0\]"),
        (lambda d: d["counts"].pop("n"), "missing field 'counts.n'"),
        (lambda d: d["counts"].update(n_agree=-1), "field 'counts.n_agree' must be a non-neg"),
        (lambda d: d.update(interval=[0.6, 0.4]), "field 'interval' has lo > hi"),
        (lambda d: d.update(interval=[0.6]), r"field 'interval' must be \[lo, hi\]"),
        (lambda d: d.update(format="other/v0"), "field 'format' must be"),
        (lambda d: d["params"].update(agree={"alpha": 1.0}), "field 'params.agree.beta'"),
        (lambda d: d["fallback"].update(used="no"), "field 'fallback.used'"),
        (lambda d: d["curve"]["p"].pop(), "'curve.c' and 'curve.p' differ in length"),
    ],
)
def test_load_names_file_and_field(tmp_path, good_dict, mutate, field):
    mutate(good_dict)
    path = _write(tmp_path, good_dict)
    with pytest.raises(ThresholdFileError, match=rf"{re.escape(str(path))}: .*{field}"):
        load_threshold(path)


def test_load_rejects_non_object_and_missing_file(tmp_path):
    with pytest.raises(ThresholdFileError, match="expected a JSON object"):
        load_threshold(_write(tmp_path, "[1, 2]"))
    with pytest.raises(FileNotFoundError):
        load_threshold(tmp_path / "nope.json")


def test_plot_of_fallback_result(tmp_path):
    c, y = np.linspace(0.1, 0.9, 50), np.ones(50, bool)
    with pytest.warns(CalibrationWarning):
        r = fit_bmm_threshold(c, y)
    path = plot_calibration(r, c, y, tmp_path / "fallback.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
