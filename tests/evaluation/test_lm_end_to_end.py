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


@pytest.mark.slow  # the per-exit fit, exit records and suite rows are tested apart
def test_exit_heads_calibrated_per_exit_with_a_guarantee_then_evaluated(trained, tmp_path):
    """Heads file -> calibrate (per-exit Learn-then-Test) -> evaluate's multi-exit rows, each
    guaranteed row with its measured risk; and FREE's own Learn-then-Test row."""
    from free_jax.calibration.per_exit import load_exit_thresholds
    from free_jax.loading import load_model
    from free_jax.models.exit_heads import init_exit_heads, save_exit_heads

    model_dir, data_dir = trained
    config, params, _ = load_model(str(model_dir))
    heads_file = save_exit_heads(
        tmp_path / "exit_heads.msgpack", config, init_exit_heads(config, params, (1, 2))
    )
    settings = EvalSettings(max_decode_len=6, adaptive_max_examples=4, adaptive_estimator="moments")
    common = dict(
        checkpoint=str(model_dir), task=TASK, data_dir=str(data_dir), num_examples=6,
        max_input_length=16, settings=settings, progress=False,
    )  # fmt: skip
    # epsilon = delta = 0.5: a handful of records certifies the strict end of the grid
    levels = dict(estimator="ltt", epsilon=0.5, delta=0.5)
    multi = calibrate_entry.calibrate(
        batch_size=4, exit_heads=str(heads_file), out=str(tmp_path / "exit_thresholds.json"),
        **levels, **common,
    )  # fmt: skip
    assert multi.exits == (1, 2) and [r.epsilon for r in multi.per_exit] == [0.25, 0.25]
    assert load_exit_thresholds(tmp_path / "exit_thresholds.json") == multi
    single = calibrate_entry.calibrate(
        batch_size=4, out=str(tmp_path / "threshold.json"), **levels, **common
    )
    assert not single.never_exit

    suite = SuiteSpec(batch_sizes=(4,), include_adaptive=False, include_lossless=False)
    out = tmp_path / "eval_heads"
    evaluate_entry.evaluate(
        threshold_file=str(tmp_path / "exit_thresholds.json"), exit_heads=str(heads_file),
        suite=suite, out_dir=str(out), **common,
    )  # fmt: skip
    by_name = {r["decoder"]: r for r in json.loads((out / "results.json").read_text())}
    heads = [name for name in by_name if name.startswith("heads 1,2")]
    assert len(heads) == 3, heads
    lossless = by_name["heads 1,2 free lossless"]
    assert lossless["same_outputs_as_full"] == 1.0
    for name in heads:
        if "lossless" not in name:
            g = by_name[name]["guarantee"]
            assert (g["epsilon"], g["delta"]) == (0.5, 0.5) and 0.0 <= g["measured_risk"] <= 1.0
            assert g["num_tokens"] == by_name[name]["num_tokens"]
    assert "measured risk" in (out / "results.md").read_text()

    evaluate_entry.evaluate(
        threshold_file=str(tmp_path / "threshold.json"), suite=suite, out_dir=str(tmp_path / "e"),
        **common,
    )  # fmt: skip
    rows = json.loads((tmp_path / "e" / "results.json").read_text())
    (ltt,) = [r for r in rows if r["decoder"].startswith("free (ltt")]
    assert ltt["guarantee"]["epsilon"] == 0.5 and ltt["threshold"] == single.threshold
