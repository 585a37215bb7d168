"""End-to-end training: smoke runs, kill-and-resume equivalence, data iterator resume, NaN stop,
TFDS mock data, LoRA through the trainer, and `load_trained`."""

import json
import math

import jax
import numpy as np
import pytest

from free_jax.models import param_shapes
from free_jax.training import load_trained, read_metrics

STEPS, EVERY = 6, 2  # the smoke runs below: 6 steps, a checkpoint every 2


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smoke_args, run_python):
    """An uninterrupted smoke run: the reference trajectory."""
    model_dir = tmp_path_factory.mktemp("smoke")
    run_python(None, *smoke_args(model_dir, f"--gin.TRAIN_STEPS={STEPS}",
                                 f"--gin.CHECKPOINT_EVERY={EVERY}"))  # fmt: skip
    return model_dir


def _losses(model_dir):
    return {r["step"]: r["loss"] for r in read_metrics(model_dir, "train")}


def test_smoke_run_on_the_builtin_corpus(smoke_run):
    records = read_metrics(smoke_run, "train")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        for key in ("loss", "ce_shallow", "ce_deep", "kd", "acc_shallow", "acc_deep"):
            assert math.isfinite(r[key]), key
        assert r["tokens_per_s"] > 0 and r["num_truncated_inputs"] >= 0
    # Learning happens: the last loss is below the first.
    assert records[-1]["loss"] < records[0]["loss"]
    (validation,) = read_metrics(smoke_run, "validation")
    assert validation["step"] == STEPS and validation["num_examples"] == 16
    assert {f"ce_layer{i}" for i in range(1, 5)} <= set(validation) and "bleu" in validation
    assert list((smoke_run / "tb").glob("events.out.tfevents.*"))


def test_load_trained_rebuilds_from_model_dir_alone(smoke_run):
    config, params, tokenizer_path = load_trained(smoke_run)
    assert config.num_decoder_layers == 4 and config.vocab_size == 128
    want = jax.tree.map(lambda x: x.shape, param_shapes(config))
    assert jax.tree.map(lambda x: x.shape, params) == want
    from free_jax.data import load_tokenizer

    assert load_tokenizer(tokenizer_path).vocab_size == 128
    run = json.loads((smoke_run / "run.json").read_text())
    assert run["task"] == "system_translations" and run["loss"] == "free"
    _, older, _ = load_trained(smoke_run, step=STEPS - EVERY)
    assert not np.array_equal(older["decoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                              params["decoder"]["layers_0"]["mlp"]["wo"]["kernel"])  # fmt: skip
    with pytest.raises(ValueError, match="no checkpoint for step"):
        load_trained(smoke_run, step=1)


KILLER = """
import os, signal, sys, time
from pathlib import Path
from free_jax import train as entry

model_dir = Path(sys.argv[1])

def kill_after_a_checkpoint(step, metrics):
    if step == 5:
        # A real kill can land anywhere; waiting for step 2's checkpoint to be final only makes
        # sure that the restart has something to resume from.
        while not (model_dir / "checkpoints" / "2").exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)

entry.main(sys.argv[2:], step_callback=kill_after_a_checkpoint)
"""


def test_sigkill_then_restart_gives_the_same_losses(smoke_run, tmp_path, smoke_args, run_python):
    model_dir = tmp_path / "killed"
    args = smoke_args(model_dir, f"--gin.TRAIN_STEPS={STEPS}",
                      f"--gin.CHECKPOINT_EVERY={EVERY}")  # fmt: skip
    killed = run_python(KILLER, str(model_dir), *args, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = _losses(model_dir)
    assert max(before) == 5  # it got as far as step 5, past the checkpoints at 2 and 4

    resumed = run_python(None, *args)
    assert "Resumed from step" in resumed.stdout + resumed.stderr
    after = read_metrics(model_dir, "train")
    assert [r["step"] for r in after] == list(range(1, STEPS + 1))  # no duplicated steps
    reference = read_metrics(smoke_run, "train")
    for got, want in zip(after, reference):
        for key in ("loss", "ce_shallow", "ce_deep", "kd", "grad_norm", "num_examples"):
            assert got[key] == want[key], (got["step"], key)  # bit-identical on CPU
    assert (
        read_metrics(model_dir, "validation")[-1]["loss"]
        == read_metrics(smoke_run, "validation")[-1]["loss"]
    )


def test_data_iterator_position_is_in_the_checkpoint(smoke_run, tfds_dir):
    """Restoring the saved iterator state gives exactly the batch a fresh iterator gives next."""
    from free_jax import data
    from free_jax.training import state as state_lib

    manager = state_lib.make_manager(smoke_run, state_lib.CheckpointConfig(keep_best=0))
    step = manager.latest_step() - EVERY
    import orbax.checkpoint as ocp

    saved = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    manager.close()
    task = data.get_task("system_translations")
    tokenizer = data.load_tokenizer(smoke_run / "spm.model")

    def batches():
        source = data.load_source(task, "train[:512]", data_dir=str(tfds_dir))
        return data.train_batches(source, task, tokenizer, batch_size=8, max_input_length=32,
                                  max_target_length=32, seed=0, shard_index=0, shard_count=1,
                                  num_threads=1)  # fmt: skip

    fresh = batches()
    for _ in range(step):
        next(fresh)
    restored = batches()
    restored.set_state(saved)
    a, b = next(fresh), next(restored)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert saved["counters"]["num_batches"] == step


NAN_AT_STEP_4 = """
import sys
from free_jax.training import trainer

real = trainer.make_train_step

def with_nan_at_step_4(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def step(state, batch):
        new_state, metrics = step_fn(state, batch)
        if int(new_state.step) >= 4:
            metrics = dict(metrics, loss=float("nan"))
        return new_state, metrics

    return step

trainer.make_train_step = with_nan_at_step_4
from free_jax import train as entry
entry.main(sys.argv[1:])
"""


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, smoke_args, run_python):
    model_dir = tmp_path / "nan"
    args = smoke_args(model_dir, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_EVERY=1")
    proc = run_python(NAN_AT_STEP_4, *args, check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError" in proc.stderr and "stopped at step 4" in proc.stderr
    assert "last good checkpoint is step 3" in proc.stderr
    steps = sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 3
    _, params, _ = load_trained(model_dir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert max(_losses(model_dir)) == 3  # the NaN step was not logged as a good step


MOCK = """
import sys
import tensorflow_datasets as tfds
from free_jax import train as entry

with tfds.testing.mock_data(num_examples=24):
    entry.main(sys.argv[1:])
"""


def test_one_step_on_tfds_mock_data(smoke_run, tmp_path, smoke_args, run_python):
    model_dir = tmp_path / "mock"
    args = smoke_args(
        model_dir, "--gin.TRAIN_STEPS=1", "--gin.TASK='samsum'",
        "--gin.DataConfig.train_split='train'", "--gin.DataConfig.eval_split='validation'",
        f"--gin.DataConfig.tokenizer_path='{smoke_run / 'spm.model'}'",
    )  # fmt: skip
    run_python(MOCK, *args)
    (record,) = read_metrics(model_dir, "train")
    assert record["step"] == 1 and math.isfinite(record["loss"])
    assert "rougeLsum" in read_metrics(model_dir, "validation")[0]


@pytest.fixture(scope="module")
def hf_checkpoint(smoke_run, tmp_path_factory):
    """The smoke run's final weights written as a Hugging Face checkpoint."""
    from free_jax.checkpoints import save_hf

    config, trained, _ = load_trained(smoke_run)
    return save_hf(tmp_path_factory.mktemp("hf"), config, trained), trained


@pytest.mark.slow
def test_finetune_starts_from_the_initial_checkpoint(smoke_run, hf_checkpoint, tmp_path,
                                                     smoke_args, run_python):  # fmt: skip
    hf_dir, _ = hf_checkpoint
    model_dir = tmp_path / "finetune"
    args = smoke_args(model_dir, "--gin.TRAIN_STEPS=1", "--gin.CHECKPOINT_EVERY=1",
                      f"--gin.TrainConfig.initial_checkpoint='{hf_dir}'")  # fmt: skip
    run_python(None, *args)
    # Same first batch, trained weights instead of a random init: a lower loss.
    assert _losses(model_dir)[1] < _losses(smoke_run)[1] - 0.1


@pytest.mark.slow
def test_lora_finetune_keeps_the_base_frozen(hf_checkpoint, tmp_path, smoke_args, run_python):
    """INITIAL_CHECKPOINT + LoRA: the base stays exactly the loaded weights."""
    import orbax.checkpoint as ocp

    from free_jax.training import state as state_lib

    hf_dir, trained = hf_checkpoint
    model_dir = tmp_path / "lora"
    args = smoke_args(
        model_dir, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_EVERY=2",
        f"--gin.TrainConfig.initial_checkpoint='{hf_dir}'",
        "--gin.TrainConfig.lora=@LoraConfig()", "--gin.LoraConfig.rank=2",
        "--gin.LoraConfig.alpha=4.0",
    )  # fmt: skip
    run_python(None, *args)
    assert json.loads((model_dir / "run.json").read_text())["lora_scale"] == 2.0
    manager = state_lib.make_manager(model_dir, state_lib.CheckpointConfig(keep_best=0))
    state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    for a, b in zip(jax.tree.leaves(state["frozen"]), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(a, b)
    assert "encoder" in state["params"] and "token_embedder" not in state["params"]
    _, merged, _ = load_trained(model_dir)
    assert jax.tree.structure(merged) == jax.tree.structure(trained)
    assert not np.array_equal(  # the trained adapters are merged in
        merged["decoder"]["layers_0"]["mlp"]["wo"]["kernel"],
        trained["decoder"]["layers_0"]["mlp"]["wo"]["kernel"],
    )
