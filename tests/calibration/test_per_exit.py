"""Per-exit thresholds (`calibration.per_exit`): the cascade guarantee by simulation, levels,
files, and the calibrate entry point with many exits and the sequence-level estimator."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.special import betainc

from free_jax.calibration import (
    CalibrationWarning,
    ThresholdFileError,
    fit_ltt_sequence_threshold,
    fit_target_accuracy_threshold,
    load_threshold,
)
from free_jax.calibration.per_exit import (
    ExitThresholds,
    fit_exit_thresholds,
    load_exit_thresholds,
    save_exit_thresholds,
)

GIN_DIR = Path(__file__).resolve().parents[2] / "gin_configs"
# Exit j: c ~ Beta(A_j, B_j), agree ~ Bernoulli(c), the two exits independent.
SHAPES = ((2.0, 1.5), (4.0, 1.5))


def exits_above(lam, a, b):
    """P(c > lam)."""
    return 1.0 - betainc(a, b, np.minimum(lam, 1.0))


def risk(lam, a, b):
    """P(c > lam, not agree) = P(c > lam) - a / (a + b) P(c' > lam), c' ~ Beta(a + 1, b)."""
    return exits_above(lam, a, b) - a / (a + b) * exits_above(lam, a + 1, b)


def cascade_risk(t1, t2):
    """Share of tokens that leave early and disagree: at exit 1, or passing it and leaving at 2."""
    (a1, b1), (a2, b2) = SHAPES
    return risk(t1, a1, b1) + (1.0 - exits_above(t1, a1, b1)) * risk(t2, a2, b2)


def records(n, seed):
    rng = np.random.default_rng(seed)
    conf = np.stack([rng.beta(a, b, n) for a, b in SHAPES])
    return conf, rng.random(conf.shape) < conf


def test_cascade_guarantee_holds_over_1000_calibration_draws():
    eps, delta, n, draws = 0.08, 0.1, 2000, 1000
    risks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        for d in range(draws):
            conf, agree = records(n, seed=100 + d)
            t1, t2 = fit_exit_thresholds(
                conf, agree, "ltt", exits=(1, 2), epsilon=eps, delta=delta
            ).thresholds
            risks.append(cascade_risk(t1, t2))
    risks = np.array(risks)
    # delta plus three binomial standard errors of 1000 trials: 0.1 + 0.028; Bonferroni is
    # conservative, so observed violations are far fewer
    assert np.mean(risks > eps) <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert np.mean(risks) > 0.4 * eps, "not vacuous: the thresholds spend much of the budget"


def test_each_exit_is_fitted_on_its_own_records_at_its_share_of_the_levels():
    conf, agree = records(3000, seed=1)
    r = fit_exit_thresholds(conf, agree, "ltt", exits=(2, 4), epsilon=0.1, delta=0.2)
    assert [(x.epsilon, x.delta) for x in r.per_exit] == [(0.05, 0.1), (0.05, 0.1)]
    assert (r.epsilon, r.delta, r.exits, r.estimator) == (0.1, 0.2, (2, 4), "ltt")
    target = fit_exit_thresholds(conf, agree, "target_accuracy", exits=(2, 4), target=0.9)
    for j in range(2):
        assert target.per_exit[j] == fit_target_accuracy_threshold(conf[j], agree[j], target=0.9)
    assert target.epsilon is None
    with pytest.raises(ValueError, match="records for 2 exits"):
        fit_exit_thresholds(conf, agree, "ltt", exits=(1, 2, 3), epsilon=0.1, delta=0.1)
    with pytest.raises(ValueError, match="needs epsilon and delta"):
        fit_exit_thresholds(conf, agree, "ltt", exits=(1, 2), epsilon=0.1)


def test_an_exit_that_cannot_be_certified_gets_a_threshold_no_token_passes():
    conf, agree = records(3000, seed=2)
    agree[0] = False  # exit 1 never agrees
    with pytest.warns(CalibrationWarning):
        r = fit_exit_thresholds(conf, agree, "ltt", exits=(1, 2), epsilon=0.1, delta=0.1)
    assert r.per_exit[0].never_exit and r.thresholds[0] == 1.0
    assert 0.0 <= r.thresholds[1] < 1.0


def test_file_round_trip_and_malformed_files(tmp_path):
    conf, agree = records(3000, seed=3)
    r = fit_exit_thresholds(conf, agree, "ltt", exits=(1, 2), epsilon=0.1, delta=0.1)
    path = tmp_path / "x" / "exit_thresholds.json"
    save_exit_thresholds(path, r)
    assert load_exit_thresholds(path) == r
    d = json.loads(path.read_text())
    d["epsilon"] = 2
    path.write_text(json.dumps(d))
    with pytest.raises(ThresholdFileError, match=r"exit_thresholds.json: field 'epsilon'"):
        load_exit_thresholds(path)
    path.write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(ThresholdFileError, match="field 'format'"):
        load_exit_thresholds(path)
    with pytest.raises(ValueError, match="2 exits but 1 results"):
        ExitThresholds((1, 2), r.per_exit[:1], "ltt")


def _calibrate(monkeypatch, tmp_path, flags, conf_E, agree_E, valid):
    from free_jax import calibrate as entry
    from free_jax.models import preset

    monkeypatch.setattr(
        entry, "load_model_and_tokenizer", lambda *a, **k: (preset("tiny"), None, None)
    )
    monkeypatch.setattr(entry, "split_batches", lambda *a, **k: [])
    monkeypatch.setattr(entry, "teacher_forced_records", lambda *a, **k: (conf_E, agree_E, valid))
    return entry.main([
        f"--gin_file={GIN_DIR / 'runs/calibrate.gin'}", '--gin.CHECKPOINT="/nowhere"',
        '--gin.TASK="system_translations"', f'--gin.OUT="{tmp_path / "out.json"}"', *flags,
    ])  # fmt: skip


def test_calibrate_fits_one_threshold_per_exit(monkeypatch, tmp_path, clean_gin):
    conf, agree = records(3000, seed=4)
    valid = np.ones((60, 50), bool)
    valid[:, 45:] = False  # padding positions are not records
    conf_E, agree_E = conf.reshape(2, 60, 50), agree.reshape(2, 60, 50)
    got = _calibrate(monkeypatch, tmp_path, [
        "--gin.FreeSpec.exits=(1, 2)", '--gin.ESTIMATOR="ltt"', "--gin.EPSILON=0.1",
        "--gin.DELTA=0.1",
    ], conf_E, agree_E, valid)  # fmt: skip
    want = fit_exit_thresholds(
        [c[valid] for c in conf_E], [a[valid] for a in agree_E], "ltt", exits=(1, 2),
        epsilon=0.1, delta=0.1,
    )  # fmt: skip
    assert got == want == load_exit_thresholds(tmp_path / "out.json")
    assert (tmp_path / "calibration_exit1.png").exists()


def test_calibrate_sequence_level(monkeypatch, tmp_path, clean_gin):
    rng = np.random.default_rng(5)
    conf = rng.uniform(size=(1, 400, 12))
    agree = rng.uniform(size=conf.shape) < 0.8 + 0.2 * conf
    valid = np.ones((400, 12), bool)
    got = _calibrate(monkeypatch, tmp_path, [
        '--gin.ESTIMATOR="ltt_sequence"', "--gin.EPSILON=0.2", "--gin.DELTA=0.1"
    ], conf, agree, valid)  # fmt: skip
    assert got == fit_ltt_sequence_threshold(conf[0], agree[0], valid, epsilon=0.2, delta=0.1)
    assert load_threshold(tmp_path / "out.json") == got and got.estimator == "ltt-sequence"
