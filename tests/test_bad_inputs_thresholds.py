"""Issue 19, item 4: a NaN or non-numeric threshold is an error where it enters, never a decode
that silently never exits (`generate --threshold=nan` and `decode(..., threshold=nan)` used to run
forever saying nothing).

The rule (`decode`'s docstring): any real number is a threshold and a token exits when its
confidence > threshold, so -1 always exits and 2 never does (tests and benchmarks rely on both);
NaN, strings and bools are rejected before anything is traced. Values are checked in
`decoding.api.check_threshold`, called by `decode` / `Decoder`, the `--threshold` flags of generate
and the decode benchmark, and the evaluation configs that gin builds (`SuiteSpec`,
`EvalSettings`). calibrate takes no threshold (it decodes at the never-exit threshold and fits one).
"""

import math

import jax
import numpy as np
import pytest

from free_jax import generate
from free_jax.benchmarks import decode as decode_benchmark
from free_jax.decoding import decode, make_decoder
from free_jax.decoding.api import check_threshold
from free_jax.evaluation import EvalSettings, SuiteSpec
from free_jax.models import preset

CONFIG = preset("tiny")
NAN = float("nan")


@pytest.mark.parametrize("method", ["free", "calm"])
@pytest.mark.parametrize(
    "threshold, message",
    [
        (NAN, "threshold is NaN"),
        (np.float32(NAN), "threshold is NaN"),
        ([0.5, NAN], "threshold is NaN"),
        ("0.9", "threshold must be a real number, got '0.9'"),
        ("abc", "threshold must be a real number, got 'abc'"),
        (True, "threshold must be a real number, got True"),
        (1 + 2j, r"threshold must be a real number, got \(1\+2j\)"),
        (None, "needs a threshold"),
    ],
)
def test_decode_rejects_a_threshold_that_is_not_a_real_number(method, threshold, message):
    # Rejected before the parameters are ever read: None stands in for them.
    inputs = np.ones((1, 3), np.int32)
    with pytest.raises(ValueError, match=message):
        decode(CONFIG, None, inputs, method=method, max_decode_len=2, threshold=threshold)


@pytest.mark.parametrize("threshold", [-1, 2.0, 0.0, math.inf, -math.inf, np.float32(0.5)])
def test_any_real_number_is_a_threshold(threshold):
    assert check_threshold(threshold).shape == ()
    decoder = make_decoder(CONFIG, method="free", max_decode_len=2)
    assert float(decoder.options(1, threshold).threshold) == np.float32(threshold)


def test_a_traced_threshold_is_not_checked():
    """Inside the caller's jit the value is unknown; checking it would fail to trace."""
    decoder = make_decoder(CONFIG, method="free", max_decode_len=2)
    shape = jax.eval_shape(lambda t: decoder.options(1, t).threshold, 0.5)
    assert shape.shape == () and shape.dtype == np.float32


@pytest.mark.parametrize(
    "flag, message",
    [
        ("nan", "argument --threshold: 'nan' is NaN"),
        ("-NaN", "argument --threshold: '-NaN' is NaN"),
        ("abc", "argument --threshold: 'abc' is not a number"),
        ("0.9x", "argument --threshold: '0.9x' is not a number"),
        ("", "argument --threshold: '' is not a number"),
    ],
)
def test_generate_and_the_decode_benchmark_reject_the_flag(flag, message, capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--checkpoint=x", f"--threshold={flag}", "text"])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decode_benchmark.parse_args([f"--threshold={flag}"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("-1", -1.0), ("2", 2.0), ("0.9", 0.9), ("inf", math.inf)])
def test_generate_takes_any_real_number(flag, value):
    args = generate.parse_args(["--checkpoint=x", f"--threshold={flag}", "text"])
    assert args.threshold == value


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SuiteSpec(free_threshold=NAN), "SuiteSpec.free_threshold is NaN"),
        (lambda: SuiteSpec(calm_threshold=NAN), "SuiteSpec.calm_threshold is NaN"),
        (lambda: SuiteSpec(calibrated_threshold=NAN), "SuiteSpec.calibrated_threshold is NaN"),
        (lambda: SuiteSpec(sweep_thresholds=(0.5, NAN)), "SuiteSpec.sweep_thresholds is NaN"),
        (lambda: SuiteSpec(sweep_thresholds=("0.5",)), "SuiteSpec.sweep_thresholds must be a"),
        (
            lambda: SuiteSpec(exits=(1, 2), exit_thresholds=(0.5, NAN)),
            "SuiteSpec.exit_thresholds is NaN",
        ),
        (
            lambda: EvalSettings(adaptive_initial_threshold=NAN),
            "EvalSettings.adaptive_initial_threshold is NaN",
        ),
    ],
)
def test_evaluation_configs_reject_nan_thresholds(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_evaluation_configs_take_the_always_and_never_exit_thresholds():
    suite = SuiteSpec(free_threshold=-1, calm_threshold=2.0, sweep_thresholds=(-1.0, 2.0))
    assert (suite.free_threshold, suite.calm_threshold) == (-1, 2.0)
