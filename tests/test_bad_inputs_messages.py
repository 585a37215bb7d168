"""Issue 19, item 8: errors that lost their culprit now name it.

* a mistyped config field (`--gin.TRAIN_STEPS="abc"`): `Class.field` and the value;
* a truncated config.json or spm.model: the file;
* an export without params/: what an export is missing (it was taken for a MODEL_DIR without
  checkpoints);
* an empty JSONL file: the file, at the first read (it surfaced as an empty data shard);
* unreadable checkpoint arrays: one error naming the checkpoint, step and tensorstore's own line,
  without the "Event loop is closed" tracebacks that buried it.
"""

import gc
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

from free_jax import train as train_entry
from free_jax.checkpoints import load_params, save_params
from free_jax.checkpoints.store import CheckpointReadError, reading_arrays
from free_jax.data import jsonl_task, load_source, load_tokenizer
from free_jax.data.jsonl import JsonlError
from free_jax.evaluation import EvalSettings, SuiteSpec
from free_jax.loading import load_model
from free_jax.models import T5Config, init_params, preset
from free_jax.models.lm_config import LMConfig
from free_jax.models.recursive import RecursiveConfig
from free_jax.partitioning import PartitionConfig
from free_jax.training import (
    CheckpointConfig,
    DataConfig,
    LoraConfig,
    LossConfig,
    OptimizerConfig,
    TrainConfig,
)
from free_jax.training.trainer import load_initial_checkpoint

REPO = Path(__file__).resolve().parent.parent
DEMO_SPM = REPO / "demo" / "model" / "spm.model"

# ============================================================ config fields of the wrong type


@pytest.mark.parametrize(
    "cls, fields, message",
    [
        (TrainConfig, dict(model_dir="x", train_steps="abc"), "TrainConfig.train_steps must be an int, got 'abc'"),
        (TrainConfig, dict(model_dir="x", train_steps=2.0), "TrainConfig.train_steps must be an int, got 2.0"),
        (TrainConfig, dict(model_dir="x", train_steps=True), "TrainConfig.train_steps must be an int, got True"),
        (TrainConfig, dict(model_dir="x", train_steps=2, progress_bar="False"), "TrainConfig.progress_bar must be a bool, got 'False'"),
        (TrainConfig, dict(model_dir="x", train_steps=2, max_decode_length="8"), "TrainConfig.max_decode_length must be an int or None, got '8'"),
        (OptimizerConfig, dict(learning_rate="fast"), "OptimizerConfig.learning_rate must be a float, got 'fast'"),
        (OptimizerConfig, dict(clip_grad_norm="1.0"), "OptimizerConfig.clip_grad_norm must be a float or None, got '1.0'"),
        (OptimizerConfig, dict(warmup_steps=None), "OptimizerConfig.warmup_steps must be an int, got None"),
        (LossConfig, dict(kd_alpha="0.5"), "LossConfig.kd_alpha must be a float, got '0.5'"),
        (CheckpointConfig, dict(every="100"), "CheckpointConfig.every must be an int, got '100'"),
        (CheckpointConfig, dict(async_save=1), "CheckpointConfig.async_save must be a bool, got 1"),
        (DataConfig, dict(vocab_size=8000.0), "DataConfig.vocab_size must be an int, got 8000.0"),
        (LoraConfig, dict(alpha="128"), "LoraConfig.alpha must be a float, got '128'"),
        (EvalSettings, dict(max_decode_len="64"), "EvalSettings.max_decode_len must be an int, got '64'"),
        (SuiteSpec, dict(include_lossless="yes"), "SuiteSpec.include_lossless must be a bool, got 'yes'"),
        (PartitionConfig, dict(model="2"), "PartitionConfig.model must be an int, got '2'"),
        (T5Config, dict(d_ff="abc"), "T5Config.d_ff must be an int, got 'abc'"),
        (T5Config, dict(dropout_rate="0.1"), "T5Config.dropout_rate must be a float, got '0.1'"),
        (LMConfig, dict(norm_eps="x"), "LMConfig.norm_eps must be a float, got 'x'"),
        (LMConfig, dict(tie_word_embeddings="False"), "LMConfig.tie_word_embeddings must be a bool, got 'False'"),
        (RecursiveConfig, dict(num_layers=6, num_loops="3"), "RecursiveConfig.num_loops must be an int, got '3'"),
    ],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_named(cls, fields, message):
    with pytest.raises(TypeError, match=f"^{message}$"):
        cls(**fields)


def test_ints_are_floats_and_none_only_where_allowed():
    assert OptimizerConfig(learning_rate=1, clip_grad_norm=None).learning_rate == 1
    assert TrainConfig(model_dir="x", train_steps=2, max_decode_length=None).train_steps == 2


@pytest.mark.parametrize(
    "binding, message",
    [
        ('--gin.TRAIN_STEPS="abc"', "TrainConfig.train_steps must be an int, got 'abc'"),
        ('--gin.OptimizerConfig.learning_rate="fast"', "OptimizerConfig.learning_rate must be a float"),
        ("--gin.CHECKPOINT_EVERY=1e3", "CheckpointConfig.every must be an int, got 1000.0"),
    ],
)  # fmt: skip
def test_a_gin_binding_of_the_wrong_type_is_named(binding, message, monkeypatch, clean_gin):
    monkeypatch.setattr(train_entry.trainer, "train", lambda *a, **k: pytest.fail("trained"))
    args = ["--gin_file=gin_configs/runs/smoke_cpu.gin", "--gin.MODEL_DIR='/tmp/x'", binding]
    with pytest.raises(TypeError, match=message):
        train_entry.main(args)


# ============================================================ truncated files


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A random tiny T5 saved as a free_jax export (config.json and params/)."""
    config = preset("tiny")
    params = init_params(config, jax.random.key(0))
    return save_params(tmp_path_factory.mktemp("export"), config, params)


def _copy(export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export, tmp_path / "copy"))


@pytest.mark.parametrize("cls", [T5Config, LMConfig])
def test_a_truncated_config_json_is_named(cls):
    text = cls().to_json()[:40]
    with pytest.raises(ValueError, match="^runs/x/config.json: invalid JSON"):
        cls.from_json(text, source="runs/x/config.json")
    with pytest.raises(ValueError, match="^runs/x/config.json: expected a JSON object"):
        cls.from_json("[1, 2]", source="runs/x/config.json")


@pytest.mark.parametrize("load", [load_params, lambda d: load_model(str(d))])
def test_an_export_with_a_truncated_config_json_names_it(export, tmp_path, load):
    copy = _copy(export, tmp_path)
    (copy / "config.json").write_text((export / "config.json").read_text()[:40])
    with pytest.raises(ValueError, match=f"{re.escape(str(copy / 'config.json'))}: invalid JSON"):
        load(copy)


@pytest.mark.parametrize("keep", [0, 99, 100, 10_000, 307_000])  # 100 ends between two pieces
def test_a_truncated_spm_model_is_named(tmp_path, keep):
    spm = tmp_path / "spm.model"
    spm.write_bytes(DEMO_SPM.read_bytes()[:keep])
    with pytest.raises(ValueError, match=f"{re.escape(str(spm))}: .*SentencePiece model"):
        load_tokenizer(spm)


def test_a_truncated_tokenizer_json_is_named(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {')
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: not a Hugging Face tokenizer"):
        load_tokenizer(path)


# ============================================================ an export without params/


@pytest.mark.parametrize("load", [load_model, load_initial_checkpoint])
def test_an_export_without_params_says_what_is_missing(export, tmp_path, load):
    """For evaluate, calibrate and generate (`load_model`) and for training's initial checkpoint."""
    copy = _copy(export, tmp_path)
    shutil.rmtree(copy / "params")
    message = f"{re.escape(str(copy))} has config.json but no weights: a free_jax export keeps"
    with pytest.raises(FileNotFoundError, match=message):
        load(str(copy))


# ============================================================ JSONL files with nothing to read


@pytest.mark.parametrize(
    "text, skip, message",
    [
        ("", False, "no usable records for split 'train' of task 'mine'$"),
        ("\n  \n", False, "no usable records for split 'train' of task 'mine'$"),
        (
            '{"input": "a"}\n"text"\n',
            True,
            r"no usable .* \(1 malformed and 1 missing a field skipped\)",
        ),
    ],
)
def test_a_jsonl_file_without_records_is_named_at_the_first_read(tmp_path, text, skip, message):
    path = tmp_path / "train.jsonl"
    path.write_text(text)
    task = jsonl_task("mine", train_file=str(path), skip_malformed=skip)
    with pytest.raises(JsonlError, match=f"^{re.escape(str(path))}: {message}"):
        load_source(task, "train")


# ============================================================ unreadable checkpoint arrays


def test_a_damaged_export_names_the_checkpoint_and_the_array(export, tmp_path, monkeypatch, caplog):
    reached = []  # what reaches the unraisable hook that was there before the failure
    monkeypatch.setattr(sys, "unraisablehook", reached.append)
    copy = _copy(export, tmp_path)
    arrays = [p for p in (copy / "params").rglob("d/*") if p.is_file()]
    max(arrays, key=lambda p: p.stat().st_size).unlink()
    message = rf"^{re.escape(str(copy / 'params'))}: cannot restore the saved arrays \(ValueError: "
    with pytest.raises(CheckpointReadError, match=message + ".*Error reading"):
        load_params(copy)
    # Some of the reads orbax abandoned (how many varies from run to run, often none) finish in
    # tensorstore's threads within a second, then report their own failures as they are
    # collected: through free_jax's hook, which drops them all.
    for _ in range(5):
        time.sleep(0.2)
        gc.collect()
    assert reached == []
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_the_innermost_error_is_reported_and_only_the_read_noise_dropped(monkeypatch, caplog):
    """orbax's restore, stood in for: the reported error is the innermost of the chain; then the
    closed-loop errors of the reads it abandoned are dropped, and nothing else."""
    reached = []
    monkeypatch.setattr(sys, "unraisablehook", reached.append)
    with pytest.raises(
        CheckpointReadError, match=r"^run/checkpoints step 3: .*\(OSError: disk gone\)"
    ):
        with reading_arrays("run/checkpoints step 3"):
            try:
                raise OSError("disk gone")
            except OSError as e:
                raise RuntimeError("a page of TensorStore spec") from e
    noise = SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(noise)
    sys.unraisablehook(other)
    assert reached == [other]
    log = logging.getLogger("asyncio")
    for error in (noise.exc_value, other.exc_value):
        log.error("Future exception was never retrieved", exc_info=error)
    assert [r.exc_info[1] for r in caplog.records if r.name == "asyncio"] == [other.exc_value]


@pytest.mark.slow  # trains, then restarts, in subprocesses (~25 s)
def test_resuming_from_a_damaged_checkpoint_reports_it_once(tmp_path, smoke_args, run_python):
    run = tmp_path / "run"
    run_python(None, *smoke_args(run, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_EVERY=2"))
    arrays = [p for p in (run / "checkpoints" / "2" / "state").rglob("d/*") if p.is_file()]
    max(arrays, key=lambda p: p.stat().st_size).unlink()
    restarted = run_python(
        None, *smoke_args(run, "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_EVERY=2"), check=False
    )
    assert restarted.returncode != 0
    assert f"CheckpointReadError: {run / 'checkpoints'} step 2: cannot restore" in restarted.stderr
    assert "Event loop is closed" not in restarted.stderr
