"""Issue 19: every entry point runs alone, as the README writes it, in a fresh process.

`python -m free_jax.calibrate --gin_file=gin_configs/runs/calibrate.gin ...` once failed with
"No configurable matching reference '@EvalSettings()'": EvalSettings was registered with gin only
when `free_jax.evaluate` had been imported too, which an in-process test always had. So each entry
point runs here in its own `python -m` process from the repository root, with the README's flags
(plus the overrides that keep it small: a session TFDS dir, a few examples, short decodes), on one
tiny trained run, and is checked for exit 0 and the one output it exists to make.

`python -m free_jax.train` runs here once, as the shared fixture; its own behaviour in subprocesses
(resume, SIGKILL, metrics) is tested in tests/training/.
"""

import json
import re

import jax
import pytest

from free_jax.checkpoints import save_params
from free_jax.models import init_params
from free_jax.models.lm_config import lm_preset

TASK = "system_translations"
# Small versions of the README's runs: 8 examples, 8 decoded tokens; "moments" fits in
# milliseconds where the default SVI compiles for seconds.
SMALL_EVAL = ["--gin.NUM_EXAMPLES=8", "--gin.EvalSettings.max_decode_len=8"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, smoke_args, run_python, run_module):
    """`python -m free_jax.train` (2 steps of the tiny model), then `python -m free_jax.export`
    of it, as the README's Training section writes them: the export's directory."""
    run = tmp_path_factory.mktemp("run")
    run_python(None, *smoke_args(run, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_EVERY=2"))
    out = run / "export"
    done = run_module("free_jax.export", f"--model_dir={run}", f"--out={out}", "--dtype=bfloat16")
    assert f"exported step 2 of {run}" in done.stdout
    assert (out / "params").is_dir() and (out / "config.json").exists()
    return out


def test_generate(export_dir, run_module):
    done = run_module(
        "free_jax.generate", f"--checkpoint={export_dir}", "--decoder=free", "--show_confidence",
        "Could not open file",
    )  # fmt: skip
    # stderr's summary line counts the tokens; stdout shows each with its exit and confidence.
    assert "[free: " in done.stderr and " tokens, " in done.stderr
    assert re.search(r"\[[SD]\d+ \d\.\d\d\]", done.stdout), done.stdout


def test_calibrate(export_dir, run_module, tfds_dir):
    run_module(
        "free_jax.calibrate", "--gin_file=gin_configs/runs/calibrate.gin",
        f'--gin.CHECKPOINT="{export_dir}"', f'--gin.TASK="{TASK}"',
        f'--gin.DATA_DIR="{tfds_dir}"', '--gin.ESTIMATOR="moments"', *SMALL_EVAL,
    )  # fmt: skip
    fitted = json.loads((export_dir / "threshold.json").read_text())
    assert fitted["estimator"] == "moments" and (export_dir / "calibration.png").exists()


@pytest.mark.slow  # every decoder of the suite compiles (~12 s here)
def test_evaluate(export_dir, run_module, tfds_dir):
    run_module(
        "free_jax.evaluate", "--gin_file=gin_configs/runs/evaluate.gin",
        f'--gin.CHECKPOINT="{export_dir}"', f'--gin.TASK="{TASK}"',
        f'--gin.DATA_DIR="{tfds_dir}"', "--gin.SuiteSpec.sweep_thresholds=()",
        "--gin.SuiteSpec.batch_sizes=(8,)", '--gin.EvalSettings.adaptive_estimator="moments"',
        *SMALL_EVAL,
    )  # fmt: skip
    records = json.loads((export_dir / "eval" / "results.json").read_text())
    assert {"full", "free (adaptive)"} <= {r["decoder"] for r in records}


def test_recursify(tmp_path, run_module):
    """From a random tiny Llama export (the README starts from a trained MODEL_DIR; recursify
    reads either, as tests/training/test_recursive_training.py checks in-process)."""
    config = lm_preset("tiny-llama")
    source = save_params(tmp_path / "vanilla", config, init_params(config, jax.random.key(0)))
    done = run_module(
        "free_jax.recursify", f"--model_dir={source}", f"--out={tmp_path / 'init'}",
        "--sharing=cycle", "--num_loops=2", "--init=stepwise", "--lora_rank=0",
    )  # fmt: skip
    assert "parameters: " in done.stdout
    assert '"sharing": "cycle"' in (tmp_path / "init" / "config.json").read_text()
