"""Decoder-only end to end: train a tiny Llama-style model a few steps on the built-in corpus, then
calibrate, evaluate every decoder, generate and export, each from the run directory."""

import json

import pytest

from free_jax import calibrate as calibrate_entry
from free_jax import evaluate as evaluate_entry
from free_jax import export as export_entry
from free_jax import generate as generate_entry
from free_jax import train as train_entry
from free_jax.checkpoints import load_params
from free_jax.evaluation import EvalSettings, SuiteSpec
from free_jax.models import LMConfig

TASK = "system_translations"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("lm")
    data_dir = tmp_path_factory.mktemp("tfds")
    train_entry.main([
        "--gin_file=gin_configs/runs/lm_scratch_cpu.gin",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.DataConfig.data_dir='{data_dir}'",
        "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_EVERY=3", "--gin.EVAL_EVERY=0",
        "--gin.BATCH_SIZE=4", "--gin.model_config.vocab_size=256", "--gin.model_config.d_model=32",
        "--gin.model_config.d_ff=64", "--gin.DataConfig.vocab_size=256",
        "--gin.DataConfig.vocab_max_sentences=2000", "--gin.DataConfig.train_split='train[:64]'",
        "--gin.DataConfig.eval_split='validation[:4]'", "--gin.DataConfig.eval_examples=4",
        "--gin.DataConfig.max_input_length=16", "--gin.DataConfig.max_target_length=16",
        "--gin.TrainConfig.eval_batch_size=4", "--gin.TrainConfig.max_decode_length=4",
        "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.tensorboard=False",
    ])  # fmt: skip
    return model_dir, data_dir


def test_calibrate_evaluate_generate_export_a_decoder_only_run(trained, tmp_path, capsys):
    model_dir, data_dir = trained
    settings = EvalSettings(max_decode_len=6, adaptive_max_examples=4, adaptive_estimator="moments")
    common = dict(
        checkpoint=str(model_dir), task=TASK, data_dir=str(data_dir), num_examples=6,
        max_input_length=16, settings=settings, progress=False,
    )  # fmt: skip
    result = calibrate_entry.calibrate(batch_size=4, estimator="moments", **common)
    assert 0.0 <= result.threshold <= 1.0 and (model_dir / "threshold.json").exists()

    suite = SuiteSpec(
        free_threshold=0.05, calm_threshold=0.05, sweep_thresholds=(1.0,), batch_sizes=(4,)
    )
    out = evaluate_entry.evaluate(
        threshold_file=str(model_dir / "threshold.json"), suite=suite, **common
    )
    records = json.loads((model_dir / "eval" / "results.json").read_text())
    by_name = {r["decoder"]: r for r in records}
    assert out["lossless_equals_full"] is True
    assert by_name["sweep free 1"]["same_outputs_as_full"] == 1.0  # never exits: greedy
    assert by_name["sweep calm 1"]["same_outputs_as_full"] == 1.0
    assert all(r["num_examples"] == 6 for r in records)
    assert by_name["full"]["tokens_per_s"] > 0

    text = generate_entry.main(
        ["compiler error", "--checkpoint", str(model_dir), "--decoder", "free",
         "--max_decode_len", "5", "--color", "never"]
    )  # fmt: skip
    assert isinstance(text, str)
    assert "[free:" in capsys.readouterr().err

    export_entry.main([f"--model_dir={model_dir}", f"--out={tmp_path / 'export'}"])
    config, params = load_params(tmp_path / "export")
    assert isinstance(config, LMConfig) and config.d_model == 32
