"""Shared fixtures. Tests run on CPU; keep shapes tiny.

Runs of the entry points go through `python -m free_jax.<entry>` in subprocesses (what a user runs,
and what SIGKILL needs). They share one persistent XLA compilation cache, so only the first run of
the session compiles the tiny model's programs, and compile without LLVM optimisation.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The tests' programs are tiny and compiling dominates their time: without LLVM's optimisation
# passes the suite runs in about half the time (the subprocess runs below use the same flag).
# Set before any test module imports jax; results do not depend on it (no test times anything).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "gin_configs" / "runs" / "smoke_cpu.gin")


@pytest.fixture
def clean_gin():
    """A test that parses gin starts and ends with an empty gin config."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A TFDS data_dir for the session; system_translations prepares itself there once."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def run_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        # The tiny model's programs run for milliseconds; LLVM's optimisation passes would take
        # most of each run's time. Every run here uses the same flags, so they stay comparable.
        XLA_FLAGS=env["XLA_FLAGS"],  # without LLVM optimisation, as set at the top
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


@pytest.fixture(scope="session")
def run_module(run_env):
    """run_module("free_jax.export", *args) -> CompletedProcess of `python -m` that module, from
    the repository root; a non-zero exit fails the test with the output's tail (check=False: not)."""

    def run(module, *args, check=True, timeout=300):
        return _run([sys.executable, "-m", module, *args], run_env, check, timeout)

    return run


@pytest.fixture(scope="session")
def run_python(run_env):
    """run_python(code_or_None, *args) -> CompletedProcess; None runs `-m free_jax.train`."""

    def run(code, *args, check=True, timeout=300):
        head = ["-m", "free_jax.train"] if code is None else ["-c", code]
        return _run([sys.executable, *head, *args], run_env, check, timeout)

    return run


def _run(command, env, check, timeout):
    proc = subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def smoke_args(tfds_dir):
    """smoke_args(model_dir, *extra_flags): flags of a smoke_cpu.gin run."""

    def args(model_dir, *extra):
        return [
            f"--gin_file={SMOKE}",
            f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.DATA_DIR='{tfds_dir}'",
            *extra,
        ]

    return args
