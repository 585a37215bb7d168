"""Tiny end to end: train a few steps on the built-in corpus, then calibrate and evaluate every decoder."""

import json

import numpy as np
import pytest

from free_jax import calibrate as calibrate_entry
from free_jax import evaluate as evaluate_entry
from free_jax import train as train_entry
from free_jax.evaluation import EvalSettings, SuiteSpec

TASK = "system_translations"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    data_dir = tmp_path_factory.mktemp("tfds")
    train_entry.main([
        "--gin_file=gin_configs/runs/smoke_cpu.gin",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.DATA_DIR='{data_dir}'",
        "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_EVERY=3",
    ])  # fmt: skip
    return model_dir, data_dir


def test_calibrate_then_evaluate_every_decoder(trained):
    model_dir, data_dir = trained
    settings = EvalSettings(max_decode_len=8, adaptive_max_examples=4, adaptive_estimator="moments")
    result = calibrate_entry.calibrate(
        checkpoint=str(model_dir), task=TASK, data_dir=str(data_dir), num_examples=8,
        batch_size=4, max_input_length=24, estimator="moments", settings=settings, progress=False,
    )  # fmt: skip
    assert (model_dir / "threshold.json").exists() and (model_dir / "calibration.png").exists()
    assert 0.0 <= result.threshold <= 1.0

    # A threshold no confidence passes (margins lie in [0, 1]) never exits.
    suite = SuiteSpec(
        free_threshold=0.05, calm_threshold=0.05, sweep_thresholds=(1.0,), batch_sizes=(4,)
    )
    out = evaluate_entry.evaluate(
        checkpoint=str(model_dir), task=TASK, data_dir=str(data_dir), num_examples=8,
        max_input_length=24, threshold_file=str(model_dir / "threshold.json"),
        settings=settings, suite=suite, progress=False,
    )  # fmt: skip
    paths = out["paths"]
    for key in ("json", "md", "pareto", "predictions"):
        assert paths[key] and (model_dir / "eval").exists()
    records = json.loads((model_dir / "eval" / "results.json").read_text())
    names = {r["decoder"] for r in records if r["kind"] == "main"}
    assert names == {
        "full", "static (k=1)", "calm (thr=0.05)", "free (thr=0.05)", "free (adaptive)",
        f"free (calibrated {result.threshold:.3f})", "free lossless (thr=0.05)",
    }  # fmt: skip
    for r in records:
        for key in ("decoder", "metric", "score", "score_ratio_vs_full", "speedup_vs_full",
                    "tokens_per_s", "exit_rate", "layers_per_token", "device", "batch_size"):  # fmt: skip
            assert key in r, key
        assert r["metric"] == "bleu" and r["num_examples"] == 8
    by_name = {r["decoder"]: r for r in records}
    assert out["lossless_equals_full"] is True
    assert by_name["free lossless (thr=0.05)"]["same_outputs_as_full"] == 1.0
    never = by_name["sweep free 1"]
    assert never["exit_rate"] == 0.0
    assert never["same_outputs_as_full"] == 1.0
    assert never["score"] == by_name["full"]["score"]
    assert by_name["sweep calm 1"]["same_outputs_as_full"] == 1.0
    table = (model_dir / "eval" / "results.md").read_text()
    for name in names:
        assert f"| {name} |" in table
    assert np.isfinite([r["tokens_per_s"] for r in records]).all()


def test_entry_points_without_a_tokenizer_name_the_flag(tmp_path):
    import jax

    from free_jax.checkpoints import save_params
    from free_jax.models import init_params, preset

    config = preset("tiny")
    save_params(tmp_path / "export", config, init_params(config, jax.random.key(0)))
    for entry, fn in (
        ("evaluate", evaluate_entry.evaluate),
        ("calibrate", calibrate_entry.calibrate),
    ):
        with pytest.raises(
            FileNotFoundError, match=rf"no tokenizer found; pass {entry}\.tokenizer"
        ):
            fn(checkpoint=str(tmp_path / "export"), task=TASK, progress=False)
