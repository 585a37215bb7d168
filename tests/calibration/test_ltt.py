"""Learn-then-Test and target accuracy: the guarantee by simulation, monotonicity, edge cases,
threshold.json, the estimator table and the calibrate entry point with ESTIMATOR = 'ltt'."""

import doctest
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.special import betainc

from free_jax.calibration import (
    ESTIMATORS,
    NEVER_EXIT,
    CalibrationWarning,
    OnlineThreshold,
    ThresholdFileError,
    ThresholdResult,
    estimators,
    fit_ltt_sequence_threshold,
    fit_ltt_threshold,
    fit_moments_threshold,
    fit_target_accuracy_threshold,
    fit_threshold,
    load_threshold,
    ltt,
    max_disagree_confidence,
    plot_calibration,
    resolve_estimator,
    save_threshold,
    target,
)
from free_jax.calibration.ltt import default_grid, ltt_pvalues, min_records

GIN_DIR = Path(__file__).resolve().parents[2] / "gin_configs"

# Synthetic records with a known risk curve: c ~ Beta(A, B), agree ~ Bernoulli(c).
A, B = 4.0, 1.5


def true_risk(lam):
    """R(λ) = P(c > λ, not agree) = ∫_λ^1 (1 - c) Beta(c; A, B) dc
    = (1 - I_λ(A, B)) - A / (A + B) (1 - I_λ(A + 1, B)); 0 when nothing exits (λ >= 1)."""
    lam = np.minimum(np.asarray(lam, np.float64), 1.0)
    return (1 - betainc(A, B, lam)) - A / (A + B) * (1 - betainc(A + 1, B, lam))


def records(shape, seed):
    rng = np.random.default_rng(seed)
    conf = rng.beta(A, B, shape)
    return conf, rng.random(shape) < conf


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return fn(*args, **kwargs)


# -------------------------------------------------------------------- the guarantee
DRAWS = 1000


def allowance(delta, draws=DRAWS):
    """delta plus three binomial standard errors of a rate estimated from `draws` trials."""
    return delta + 3.0 * math.sqrt(delta * (1.0 - delta) / draws)


def test_analytic_risk_matches_a_huge_sample():
    conf, agree = records(2_000_000, seed=1)
    for lam in (0.0, 0.3, 0.6, 0.8, 0.9):
        assert np.mean((conf > lam) & ~agree) == pytest.approx(true_risk(lam), abs=1e-3)


def test_token_guarantee_holds_over_1000_calibration_draws():
    eps, delta, n = 0.05, 0.1, 2000
    conf_DN, agree_DN = records((DRAWS, n), seed=2)
    lam_D = np.array(
        [quietly(fit_ltt_threshold, c, y, epsilon=eps, delta=delta).threshold
         for c, y in zip(conf_DN, agree_DN)]
    )  # fmt: skip
    violations = np.mean(true_risk(lam_D) > eps)
    assert violations <= allowance(delta)  # 0.1 + 3 * 0.0095 = 0.128; observed about 0.09
    # Not vacuous: the certified thresholds use most of the budget ...
    assert np.mean(true_risk(lam_D)) > 0.6 * eps
    # ... and the same simulation catches an uncertified rule: the lowest grid threshold whose
    # EMPIRICAL risk is <= epsilon exceeds epsilon about half of the time.
    grid = default_grid()
    loss_sorted = np.sort(np.where(agree_DN, -np.inf, conf_DN), axis=1)
    emp_DG = np.stack([n - np.searchsorted(s, grid, side="right") for s in loss_sorted]) / n
    naive_D = grid[np.cumprod(emp_DG <= eps, axis=1).sum(axis=1) - 1]
    assert np.mean(true_risk(naive_D) > eps) > 0.3


def test_sequence_guarantee_holds_over_1000_calibration_draws():
    # T i.i.d. tokens per sequence: the output differs from greedy unless no token exits and
    # disagrees, so R_seq(λ) = 1 - (1 - R(λ))^T.
    eps, delta, num_seq, T = 0.1, 0.1, 400, 10
    conf_DBT, agree_DBT = records((DRAWS, num_seq, T), seed=3)
    lam_D = np.array(
        [quietly(fit_ltt_sequence_threshold, c, y, epsilon=eps, delta=delta).threshold
         for c, y in zip(conf_DBT, agree_DBT)]
    )  # fmt: skip
    seq_risk_D = 1.0 - (1.0 - true_risk(lam_D)) ** T
    assert np.mean(seq_risk_D > eps) <= allowance(delta)
    assert np.mean(seq_risk_D) > 0.5 * eps


# -------------------------------------------------------------------- direction of change
def test_threshold_falls_as_epsilon_grows():
    conf, agree = records(3000, seed=4)
    thresholds = [
        fit_ltt_threshold(conf, agree, epsilon=e, delta=0.1).threshold
        for e in (0.01, 0.02, 0.05, 0.1, 0.2)
    ]
    assert all(a >= b for a, b in zip(thresholds, thresholds[1:]))
    assert thresholds[0] > thresholds[-1]


def test_threshold_falls_as_n_grows():
    conf, agree = records(2000, seed=5)
    # The same empirical risk curve from ten times the records: smaller p-values, lower threshold.
    small = fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1).threshold
    large = fit_ltt_threshold(np.tile(conf, 10), np.tile(agree, 10), epsilon=0.05, delta=0.1)
    assert large.threshold < small
    # And on fresh draws, in the median.
    medians = []
    for n in (300, 3000):
        conf_DN, agree_DN = records((51, n), seed=6)
        medians.append(
            np.median(
                [
                    quietly(fit_ltt_threshold, c, y, epsilon=0.05, delta=0.1).threshold
                    for c, y in zip(conf_DN, agree_DN)
                ]
            )  # fmt: skip
        )
    assert medians[1] < medians[0]


def test_hoeffding_bentkus_is_more_conservative_than_binomial():
    k = np.arange(0, 40)
    assert np.all(ltt_pvalues(k, 500, 0.05, "hoeffding_bentkus") >= ltt_pvalues(k, 500, 0.05))
    conf, agree = records(3000, seed=7)
    binomial = fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1)
    hb = fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1, pvalue="hoeffding_bentkus")
    assert hb.threshold >= binomial.threshold and hb.pvalue == "hoeffding_bentkus"


# -------------------------------------------------------------------- what the result records
def test_result_records_the_tested_grid():
    conf, agree = records(3000, seed=8)
    r = fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1)
    assert (r.estimator, r.zeta, r.epsilon, r.delta, r.pvalue) == (
        "ltt",
        None,
        0.05,
        0.1,
        "binomial",
    )
    assert not r.fallback and not r.never_exit and r.interval is None
    thr, p, risk = map(np.asarray, (r.tested_thresholds, r.tested_pvalues, r.tested_risks))
    assert thr[0] == 1.0 and np.all(np.diff(thr) < 0)  # strictest first
    assert np.all(p[:-1] <= 0.1) and p[-1] > 0.1  # rejected up to the first non-rejection
    assert r.threshold == thr[-2]  # the lowest rejected
    loss = np.mean((conf[:, None] > thr) & ~agree[:, None], axis=0)
    np.testing.assert_allclose(risk, loss)
    assert (r.n, r.n_agree, r.n_disagree) == (3000, int(agree.sum()), int((~agree).sum()))


def test_user_grid_in_any_order_is_tested_strictest_first():
    conf, agree = records(3000, seed=9)
    grid = np.linspace(0.0, 1.0, 21)
    r = fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1, grid=grid[::-1].tolist() + [0.5])
    assert r.threshold in grid and r.tested_thresholds[0] == 1.0
    assert r == fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1, grid=grid)


def test_sequence_fit_is_token_ltt_on_the_per_sequence_scores():
    conf_BT, agree_BT = records((400, 12), seed=10)
    valid_BT = np.arange(12) < np.random.default_rng(0).integers(1, 13, (400, 1))
    seq = fit_ltt_sequence_threshold(conf_BT, agree_BT, valid_BT, epsilon=0.1, delta=0.1)
    s_B = max_disagree_confidence(conf_BT, agree_BT, valid_BT)
    tok = fit_ltt_threshold(np.maximum(s_B, 0.0), np.isneginf(s_B), epsilon=0.1, delta=0.1)
    assert seq.estimator == "ltt-sequence" and seq.threshold == tok.threshold
    assert seq.tested_pvalues == tok.tested_pvalues
    assert (seq.n, seq.n_agree) == (400, int(np.isneginf(s_B).sum()))
    # Padding is never read: garbage there changes nothing.
    garbage = np.where(valid_BT, conf_BT, np.nan)
    assert fit_ltt_sequence_threshold(garbage, agree_BT, valid_BT, epsilon=0.1, delta=0.1) == seq


def test_max_disagree_confidence_by_hand():
    conf = [[0.9, 0.3, 0.6], [0.8, 0.7, 0.1], [0.5, np.nan, 0.2]]
    agree = [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    valid = [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    out = max_disagree_confidence(conf, agree, valid)
    assert out[0] == 0.6 and np.isneginf(out[1]) and np.isnan(out[2])
    with pytest.warns(CalibrationWarning) as caught:  # and too few are left: never exit
        r = fit_ltt_sequence_threshold(conf, agree, valid, epsilon=0.1, delta=0.1)
    assert any("dropped 1 of 3 sequences" in str(w.message) for w in caught)
    assert r.n_dropped == 1 and r.n == 2
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        max_disagree_confidence([0.5, 0.6], [1, 0])
    with pytest.raises(ValueError, match="valid must have the shape"):
        max_disagree_confidence(conf, agree, [[1, 1]])
    with pytest.raises(ValueError, match="same shape"):
        max_disagree_confidence(conf, [[1, 1, 1]])


# -------------------------------------------------------------------- edge cases
def test_all_agree_certifies_the_lowest_grid_threshold_once_n_suffices():
    assert min_records(0.05, 0.1) == 45  # (0.95)^45 = 0.0994 <= 0.1 < (0.95)^44 = 0.1047
    conf = np.linspace(0.0, 1.0, 45)
    r = fit_ltt_threshold(conf, np.ones(45, bool), epsilon=0.05, delta=0.1)
    assert r.threshold == 0.0 and not r.fallback and len(r.tested_thresholds) == 1001
    assert r.tested_risks == (0.0,) * 1001


@pytest.mark.parametrize("fit", ["token", "sequence"])
def test_too_few_records_never_exit_with_warning(fit):
    if fit == "token":
        call = lambda: fit_ltt_threshold(
            np.linspace(0, 1, 44), np.ones(44), epsilon=0.05, delta=0.1
        )
    else:
        call = lambda: fit_ltt_sequence_threshold(
            np.full((44, 3), 0.9), np.ones((44, 3)), epsilon=0.05, delta=0.1
        )
    with pytest.warns(CalibrationWarning, match="never-exit threshold inf"):
        r = call()
    assert r.threshold == NEVER_EXIT and r.never_exit and r.fallback
    assert "than any certificate needs (at least 45" in r.fallback_reason
    assert r.tested_thresholds == (1.0,) and r.tested_pvalues[0] == pytest.approx(0.95**44)
    json.loads(r.to_json())  # strict JSON


def test_none_agree_never_exit_with_warning():
    with pytest.warns(CalibrationWarning, match="never-exit"):
        r = fit_ltt_threshold(np.linspace(0, 1, 500), np.zeros(500), epsilon=0.05, delta=0.1)
    assert r.never_exit and r.fallback and "no agreeing token" in r.fallback_reason


def test_empty_and_all_nan_never_exit():
    for c, y in ((np.zeros(0), np.zeros(0, bool)), (np.full(50, np.nan), np.ones(50))):
        with pytest.warns(CalibrationWarning):
            r = fit_ltt_threshold(c, y, epsilon=0.05, delta=0.1)
        assert r.never_exit and "no valid token" in r.fallback_reason


def test_high_risk_at_the_strictest_threshold_never_exit():
    # A tenth of the records disagree at confidence 1: R(λ) = 0.1 for every λ < 1.
    conf = np.r_[np.ones(100), np.full(900, 0.5)]
    agree = np.r_[np.zeros(100, bool), np.ones(900, bool)]
    with pytest.warns(CalibrationWarning, match="strictest grid threshold 0.99 has 100 loss"):
        r = fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1, grid=[0.99, 0.5])
    assert r.never_exit


def test_nan_pairs_are_dropped_with_warning():
    conf, agree = records(2000, seed=11)
    clean = fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1)
    c = np.r_[conf, np.nan, 0.5, np.nan]
    y = np.r_[agree.astype(float), 1.0, np.nan, np.nan]
    with pytest.warns(CalibrationWarning, match="dropped 3 of"):
        r = fit_ltt_threshold(c, y, epsilon=0.05, delta=0.1)
    assert r.n_dropped == 3 and r.n == clean.n and r.threshold == clean.threshold


def test_zero_and_one_confidences_are_not_clipped():
    # Exits are counted as the decoder does, on the raw value: a disagreeing token at exactly 1.0
    # is a loss at every threshold below 1 (clipped to 0.9999 it would not be at 0.9995).
    conf = np.r_[np.ones(9), np.zeros(2991)]
    agree = np.r_[np.zeros(9, bool), np.ones(2991, bool)]
    r = fit_ltt_threshold(conf, agree, epsilon=0.002, delta=0.1, grid=[1.0, 0.9995])
    assert r.tested_risks == (0.0, 0.003) and r.threshold == 1.0


def test_bad_arguments_raise_naming_them():
    conf, agree = records(100, seed=12)
    for kw, match in (
        ({"epsilon": 0.0, "delta": 0.1}, "epsilon must be"),
        ({"epsilon": 0.05, "delta": 1.0}, "delta must be"),
        ({"epsilon": 0.05, "delta": 0.1, "grid": [0.5, 1.5]}, "grid must be"),
        ({"epsilon": 0.05, "delta": 0.1, "grid": []}, "grid must be"),
        ({"epsilon": 0.05, "delta": 0.1, "pvalue": "wsr"}, "pvalue must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            fit_ltt_threshold(conf, agree, **kw)
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        fit_ltt_threshold(np.r_[conf, 1.5], np.r_[agree, True], epsilon=0.05, delta=0.1)


# -------------------------------------------------------------------- target accuracy
TA_CONF = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def test_target_accuracy_by_hand():
    # Sorted by confidence the labels are 0 1 1 0 0 1 1 1 1 1 (non-monotone on purpose).
    agree = [0, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    # exit accuracy at λ = 0, .1, .2, .3, .4, .5, ...: 7/10, 7/9, 6/8, 5/7, 5/6, 5/5, ...
    expected = {0.7: 0.0, 0.75: 0.1, 0.77: 0.1, 0.8: 0.4, 0.84: 0.5, 1.0: 0.5}
    for level, thr in expected.items():
        r = fit_target_accuracy_threshold(TA_CONF, agree, target=level)
        assert r.threshold == thr, level
        assert (r.estimator, r.target, r.zeta, r.fallback) == (
            "target_accuracy",
            level,
            None,
            False,
        )
    # Exits are conf > λ: at λ = 0.1 the token at 0.1 stays; 7 of the 9 above it agree.
    assert (
        "9 of 10 calibration tokens exit"
        in fit_target_accuracy_threshold(TA_CONF, agree, target=0.75).notes[0]
    )


def test_target_accuracy_unreachable_or_too_few_never_exit():
    # The most confident token disagrees: the best exit accuracy is 9/10, at λ = 0.
    with pytest.warns(
        CalibrationWarning, match=r"no threshold reaches target accuracy 0.95 \(best 0.9\)"
    ):
        r = fit_target_accuracy_threshold(TA_CONF, [1, 1, 1, 1, 1, 1, 1, 1, 1, 0], target=0.95)
    assert r.never_exit and r.fallback and r.target == 0.95
    with pytest.warns(CalibrationWarning, match="fewer than min_points"):
        assert fit_target_accuracy_threshold([0.9], [1], target=0.9).never_exit
    with pytest.raises(ValueError, match="target must be in"):
        fit_target_accuracy_threshold(TA_CONF, np.ones(10), target=0.0)


def test_target_accuracy_tracks_the_population_curve():
    conf, agree = records(200_000, seed=13)
    r = fit_target_accuracy_threshold(conf, agree, target=0.9)
    # Population: acc(λ) = E[c | c > λ] = A/(A+B) (1 - I_λ(A+1, B)) / (1 - I_λ(A, B)) = 0.9.
    lam = np.linspace(0.5, 0.95, 4501)
    acc = A / (A + B) * (1 - betainc(A + 1, B, lam)) / (1 - betainc(A, B, lam))
    assert r.threshold == pytest.approx(lam[np.argmax(acc >= 0.9)], abs=0.01)


# -------------------------------------------------------------------- threshold.json
def test_round_trip_with_the_new_fields(tmp_path):
    conf, agree = records(3000, seed=14)
    results = [
        fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1),
        fit_ltt_sequence_threshold(conf.reshape(300, 10), agree.reshape(300, 10),
                                   epsilon=0.2, delta=0.05),
        fit_target_accuracy_threshold(conf, agree, target=0.9),
        quietly(fit_ltt_threshold, conf[:20], agree[:20], epsilon=0.05, delta=0.1),  # never exit
    ]  # fmt: skip
    for i, r in enumerate(results):
        path = tmp_path / f"{i}" / "threshold.json"
        save_threshold(path, r)
        assert load_threshold(path) == r
    text = results[-1].to_json()
    assert json.loads(text)["threshold"] == "inf" and load_threshold(path).threshold == math.inf
    d = results[0].to_dict()
    assert d["guarantee"]["epsilon"] == 0.05 and d["zeta"] is None
    assert len(d["guarantee"]["tested"]["pvalue"]) == len(results[0].tested_thresholds)


def test_version_1_files_still_load(tmp_path):
    r = fit_moments_threshold(*records(500, seed=15))
    d = r.to_dict()
    d["format"] = "free_jax.threshold/v1"
    del d["target"], d["guarantee"]
    path = tmp_path / "threshold.json"
    path.write_text(json.dumps(d))
    assert load_threshold(path) == r


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.update(threshold="never"), "field 'threshold' must be a finite number or"),
        (lambda d: d.update(threshold=math.inf), "field 'threshold' must be a finite number"),
        (lambda d: d["guarantee"].update(epsilon=2.0), "field 'guarantee.epsilon' must be in"),
        (lambda d: d["guarantee"]["tested"]["pvalue"].pop(), "differ in length"),
        (lambda d: d["guarantee"].update(tested=[]), "field 'guarantee.tested.threshold'"),
        (lambda d: d["guarantee"].update(pvalue=1), "field 'guarantee.pvalue' must be a string"),
        (lambda d: d.update(guarantee=[1]), "field 'guarantee' must be an object"),
        (lambda d: d.update(target="high"), "field 'target' must be a finite number"),
    ],
)
def test_malformed_new_fields_name_file_and_field(tmp_path, mutate, field):
    d = fit_ltt_threshold(*records(3000, seed=16), epsilon=0.05, delta=0.1).to_dict()
    mutate(d)
    path = tmp_path / "threshold.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ThresholdFileError, match=f"threshold.json: .*{field}"):
        load_threshold(path)


def test_plots_of_the_new_results(tmp_path):
    conf, agree = records(2000, seed=17)
    for i, r in enumerate([
        fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1),
        fit_target_accuracy_threshold(conf, agree, target=0.9),
        quietly(fit_ltt_threshold, conf[:20], agree[:20], epsilon=0.05, delta=0.1),
    ]):  # fmt: skip
        with open(plot_calibration(r, conf, agree, tmp_path / f"{i}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------- the table and entry point
def test_one_table_resolves_every_name():
    assert set(ESTIMATORS) == {"moments", "svi", "nuts", "ltt", "target_accuracy"}
    conf, agree = records(2000, seed=18)
    levels = dict(zeta=0.4, epsilon=0.05, delta=0.1, target=0.9)
    assert fit_threshold(conf, agree, "ltt", **levels) == fit_ltt_threshold(
        conf, agree, epsilon=0.05, delta=0.1
    )
    assert fit_threshold(conf, agree, "target_accuracy", **levels).target == 0.9
    assert fit_threshold(conf, agree, "moments", **levels).zeta == 0.4
    with pytest.raises(ValueError, match="'ltt' needs delta"):
        resolve_estimator("ltt", epsilon=0.05)
    with pytest.raises(ValueError, match="estimator must be one of"):
        resolve_estimator("ltx")
    online = OnlineThreshold(
        "ltt", initial_threshold=0.9, fit_kwargs={"epsilon": 0.05, "delta": 0.1}
    )
    online.update(conf, agree)
    assert online.result.estimator == "ltt" and online.threshold == online.result.threshold


@pytest.mark.parametrize(
    "flags, estimator",
    [
        (['--gin.ESTIMATOR="ltt"', "--gin.EPSILON=0.05", "--gin.DELTA=0.1"], "ltt"),
        (['--gin.ESTIMATOR="target_accuracy"', "--gin.TARGET=0.9"], "target_accuracy"),
    ],
)
def test_calibrate_entry_point_with_ltt_from_gin(
    monkeypatch, tmp_path, clean_gin, flags, estimator
):
    from free_jax import calibrate as calibrate_entry
    from free_jax.models import preset

    conf, agree = records(3000, seed=19)
    monkeypatch.setattr(
        calibrate_entry, "load_model_and_tokenizer", lambda *a, **k: (preset("tiny"), None, None)
    )
    monkeypatch.setattr(calibrate_entry, "split_batches", lambda *a, **k: [])
    monkeypatch.setattr(calibrate_entry, "collect_records", lambda *a, **k: (conf, agree))
    out = tmp_path / "run" / "threshold.json"
    result = calibrate_entry.main([
        f"--gin_file={GIN_DIR / 'runs/calibrate.gin'}", '--gin.CHECKPOINT="/nowhere"',
        '--gin.TASK="system_translations"', f'--gin.OUT="{out}"', *flags,
    ])  # fmt: skip
    assert load_threshold(out) == result and result.estimator == estimator
    assert (out.parent / "calibration.png").exists()
    if estimator == "ltt":
        assert (result.epsilon, result.delta) == (0.05, 0.1)
        assert result == fit_ltt_threshold(conf, agree, epsilon=0.05, delta=0.1)
    else:
        assert result.target == 0.9


def test_unknown_estimator_fails_before_decoding(monkeypatch, clean_gin):
    from free_jax import calibrate as calibrate_entry

    def no_decoding(*a, **k):
        raise AssertionError("decoded before checking the estimator")

    monkeypatch.setattr(calibrate_entry, "load_model_and_tokenizer", no_decoding)
    with pytest.raises(ValueError, match="estimator must be one of"):
        calibrate_entry.calibrate(checkpoint="/nowhere", task="system_translations", estimator="x")


@pytest.mark.parametrize("module", [ltt, target, estimators], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_threshold_result_is_frozen_with_defaults():
    r = ThresholdResult(threshold=0.5, estimator="x", zeta=None, n=1, n_agree=1, n_disagree=0)
    assert (r.epsilon, r.delta, r.target, r.tested_pvalues) == (None, None, None, ())
