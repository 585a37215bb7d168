"""Issue 19, a restart under another model config: it fails before writing anything into the run
(config.json, run.json, the tokenizer stay the run's), and export checks config.json against the
saved parameters' shapes."""

import json

import pytest

from free_jax import export as export_entry
from free_jax.models import preset
from free_jax.training.state import RunConfigMismatchError, check_run_config

RUN_FILES = ("config.json", "run.json", "spm.model")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smoke_args, run_python):
    """A 2-step smoke run of the tiny model (d_ff 64), checkpointed at step 2."""
    model_dir = tmp_path_factory.mktemp("run")
    run_python(None, *smoke_args(model_dir, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_EVERY=2"))
    return model_dir


@pytest.mark.slow  # trains twice in subprocesses; check_run_config is tested below
def test_restart_with_another_config_fails_and_writes_nothing(run_dir, smoke_args, run_python):
    before = {name: (run_dir / name).read_bytes() for name in RUN_FILES}
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    restarted = run_python(
        None,
        *smoke_args(run_dir, "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_EVERY=2",
                    "--gin.model_config.d_ff=96"),
        check=False,
    )  # fmt: skip
    assert restarted.returncode != 0
    assert "d_ff: run has 64, this config 96" in restarted.stderr
    assert {name: (run_dir / name).read_bytes() for name in RUN_FILES} == before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("[0-9]*")) == ["2"]


def test_check_run_config_names_every_differing_field(tmp_path):
    config = preset("tiny")
    (tmp_path / "config.json").write_text(config.to_json())
    check_run_config(tmp_path, config)  # the same config: fine
    check_run_config(tmp_path / "new", config)  # no run yet: fine
    other = config.replace(d_ff=96, num_heads=config.num_heads * 2)
    with pytest.raises(
        RunConfigMismatchError, match=r"d_ff: run has 64, this config 96.*num_heads"
    ):
        check_run_config(tmp_path, other)


def test_export_rejects_a_config_that_does_not_match_the_params(run_dir, tmp_path):
    model_dir = tmp_path / "corrupt"
    model_dir.mkdir()
    for item in run_dir.iterdir():  # a copy whose config.json says d_ff=96 (the old bug's result)
        (model_dir / item.name).symlink_to(item)
    (model_dir / "config.json").unlink()
    config = json.loads((run_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "d_ff": 96}))
    with pytest.raises(
        ValueError, match=r"parameter '.*wi.*kernel' has shape \(\d+, 64\).*\(\d+, 96\)"
    ):
        export_entry.main([f"--model_dir={model_dir}", f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
    export_entry.main([f"--model_dir={run_dir}", f"--out={tmp_path / 'good'}"])
