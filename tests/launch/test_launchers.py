"""Launch scripts: XManager dry run and the Slurm script's argument assembly."""

import importlib.util
import json
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _xm():
    spec = importlib.util.spec_from_file_location("xm_launch", ROOT / "launch" / "xm_launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_xm_dry_run_passes_gin_through(capsys):
    xm = _xm()
    argv = [
        "--gin_file=gin_configs/runs/finetune.gin",
        '--gin.MODEL_DIR="gs://b/run"',
        "--gin.TRAIN_STEPS=100",
        "--platform=gpu",
        "--accelerator=h100",
        "--num_hosts=2",
        "--dry_run",
    ]
    assert xm.main(argv) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["command"] == [
        "python", "-m", "free_jax.train", "--gin_file=gin_configs/runs/finetune.gin",
        '--gin.MODEL_DIR="gs://b/run"', "--gin.TRAIN_STEPS=100",
    ]  # fmt: skip
    assert spec["resources"] == {"gpu": "h100", "count": 8, "hosts": 2}
    assert spec["env"] == {"FREE_JAX_NUM_PROCESSES": "2"}
    assert shlex.split(spec["command_line"]) == spec["command"]


def test_xm_tpu_jobs_join_the_pod(capsys):
    xm = _xm()
    argv = ["--gin_file=gin_configs/runs/finetune.gin", "--platform=tpu", "--accelerator=v4"]
    assert xm.main([*argv, "--topology=2x2x2", "--dry_run"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["resources"] == {"tpu": "v4", "topology": "2x2x2"}
    # free_jax.partitioning.maybe_initialize_distributed calls jax.distributed.initialize on this
    assert spec["env"] == {"FREE_JAX_DISTRIBUTED": "auto"}


def test_xm_rejects_bad_flags():
    xm = _xm()
    with pytest.raises(SystemExit):
        xm.main(["--gin_file=a.gin", "--bogus", "--dry_run"])
    with pytest.raises(SystemExit):
        xm.main(["--gin.X=1", "--dry_run"])  # no gin file
    with pytest.raises(SystemExit):
        xm.main(["--gin_file=a.gin", "--platform=tpu", "--accelerator=h100", "--dry_run"])


def _bash(script: str) -> str:
    lib = ROOT / "launch" / "slurm" / "lib.sh"
    out = subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(lib))}; {script}"],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    return out.stdout.strip()


def test_slurm_argument_assembly():
    assert _bash("coordinator_address 'gpu[003-004],gpu010' 12345") == "gpu003:12345"
    assert _bash("coordinator_address 'node7' 999") == "node7:999"
    cmd = _bash(
        "train_command /env/bin/python --gin_file=gin_configs/runs/finetune.gin "
        "'--gin.MODEL_DIR=\"/shared/run a\"'"
    )
    # The quoted command, split by a shell, gives back exactly the arguments passed in.
    assert shlex.split(cmd) == [
        "/env/bin/python", "-m", "free_jax.train", "--gin_file=gin_configs/runs/finetune.gin",
        '--gin.MODEL_DIR="/shared/run a"',
    ]  # fmt: skip
    text = (ROOT / "launch" / "slurm" / "train.sbatch").read_text()
    assert "srun" in text and "FREE_JAX_COORDINATOR" in text and "#SBATCH --nodes" in text
    subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm" / "train.sbatch")], check=True)
