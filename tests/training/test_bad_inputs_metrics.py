"""Issue 19, metrics.jsonl after a restart: steps logged after the restored checkpoint (all of them
when the run died before its first checkpoint) are dropped before training goes on, atomically, so
every step appears once."""

import json

import pytest

from free_jax.training import MetricsWriter, read_metrics

DIE_AT_STEP_4 = """
import sys
from free_jax import train as entry

def die(step, metrics):
    if step == 4:
        raise SystemExit(3)

entry.main(sys.argv[1:], step_callback=die)
"""


def _steps(model_dir, split="train"):
    return [r["step"] for r in read_metrics(model_dir, split)]


def test_truncate_after_keeps_steps_up_to_the_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        writer.write(step, "train", {"loss": 1.0 / step})
    writer.write(4, "validation", {"loss": 0.5})
    writer.truncate_after(2)
    assert _steps(tmp_path) == [1, 2] and _steps(tmp_path, "validation") == []
    writer.truncate_after(0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "split": "train", "loss": 2.0}) + '\n{"step": 2, "spl')
    MetricsWriter(tmp_path, tensorboard=False).truncate_after(5)
    assert _steps(tmp_path) == [1]


@pytest.mark.slow  # two training subprocesses; truncate_after is tested above
def test_restart_of_a_run_that_died_before_its_first_checkpoint(tmp_path, smoke_args, run_python):
    model_dir = tmp_path / "died"
    args = smoke_args(model_dir, "--gin.TRAIN_STEPS=5", "--gin.CHECKPOINT_EVERY=100")
    died = run_python(DIE_AT_STEP_4, *args, check=False)
    assert died.returncode == 3, died.stderr[-2000:]
    assert _steps(model_dir) == [1, 2, 3, 4]
    assert not list((model_dir / "checkpoints").glob("[0-9]*"))

    run_python(None, *args)
    assert _steps(model_dir) == [1, 2, 3, 4, 5]  # each step once
