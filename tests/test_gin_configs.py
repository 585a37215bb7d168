"""Every gin file parses and binds; model files build their configs (jax.eval_shape, no memory);
bad bindings fail while parsing, before any training starts."""

import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gin
import jax
import pytest

from free_jax import train as entry
from free_jax.data import Task
from free_jax.models import T5Config, param_shapes
from free_jax.models.lm_config import LMConfig
from free_jax.training import DataConfig, LoraConfig, TrainConfig

REPO = Path(__file__).resolve().parent.parent
GIN_DIR = REPO / "gin_configs"
# Every entry point registers its own configurables; run files of all of them live in gin_configs.
for _module in sorted((REPO / "free_jax").glob("*.py")):
    if "import gin" in _module.read_text():
        importlib.import_module(f"free_jax.{_module.stem}")
ALL_FILES = sorted(p.relative_to(GIN_DIR).as_posix() for p in GIN_DIR.rglob("*.gin"))
DUMMIES = {
    "MODEL_DIR": "'/tmp/free_jax_gin_test'",
    "TASK": "'xsum'",
    "MODEL": "@model_config()",
    "INITIAL_CHECKPOINT": "'/tmp/no_checkpoint'",
}


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def captured(monkeypatch):
    """Makes `train()` return the configured objects instead of training."""
    monkeypatch.setattr(
        entry.trainer,
        "train",
        lambda config, model, data, step_callback=None: (config, model, data),
    )


def _required(path: str) -> list[str]:
    text = (GIN_DIR / path).read_text()
    return re.findall(r"^(\w+) = %gin.REQUIRED", text, flags=re.M)


def _bindings(path: str) -> list[str]:
    bindings = [f"{name} = {DUMMIES.get(name, repr('dummy'))}" for name in _required(path)]
    if "MODEL" in _required(path):
        bindings.append("model_config.preset = 'tiny'")
    return bindings


def test_gin_tree_has_the_expected_files():
    for name in ("runs/train_scratch.gin", "runs/finetune.gin", "runs/demo_cpu.gin",
                 "runs/smoke_cpu.gin", "models/demo_small.gin", "models/tiny.gin",
                 "models/t5_small.gin", "models/flan_t5_large.gin", "tasks/xsum.gin",
                 "tasks/system_translations.gin", "tasks/python_docstrings.gin"):  # fmt: skip
        assert name in ALL_FILES, name


@pytest.mark.parametrize("path", ALL_FILES)
def test_every_file_parses(path):
    entry.parse_gin([str(GIN_DIR / path)], _bindings(path))


# The entry point that reads each run file. Each entry point must register, in a process that
# imports nothing else, every configurable its files reference (@EvalSettings(), @FreeSpec(), ...).
RUN_ENTRY = {
    "runs/calibrate.gin": "calibrate", "runs/demo_calibrate.gin": "calibrate",
    "runs/evaluate.gin": "evaluate", "runs/demo_eval.gin": "evaluate",
    "runs/train_scratch.gin": "train", "runs/finetune.gin": "train", "runs/demo_cpu.gin": "train",
    "runs/smoke_cpu.gin": "train", "runs/sharded_smoke_cpu.gin": "train",
    "runs/lm_scratch_cpu.gin": "train", "runs/finetune_lm_lora.gin": "train",
    "runs/exit_heads.gin": "train", "runs/recursive_uptrain.gin": "train",
    "runs/recursive_exits.gin": "train", "runs/mor_scratch_cpu.gin": "train",
}  # fmt: skip


def test_every_run_file_has_an_entry_point():
    assert set(RUN_ENTRY) == {p for p in ALL_FILES if p.startswith("runs/")}


@pytest.mark.parametrize("entry", sorted(set(RUN_ENTRY.values())))
def test_entry_point_parses_its_run_files_in_a_fresh_process(entry):
    files = [(str(GIN_DIR / p), _bindings(p)) for p, e in RUN_ENTRY.items() if e == entry]
    code = textwrap.dedent(f"""
        import gin
        from free_jax import {entry} as entry
        for path, bindings in {files!r}:
            gin.clear_config()
            entry.parse_gin([path], bindings)
        print("parsed", len({files!r}))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["parsed", str(len(files))]


def test_every_run_file_starts_with_a_header():
    for path in ALL_FILES:
        first = (GIN_DIR / path).read_text().splitlines()[0]
        assert first.startswith("# "), path
    for path in [p for p in ALL_FILES if p.startswith("runs/")]:
        head = (GIN_DIR / path).read_text().split("\n\n")[0]
        assert "Required" in head and "overrides" in head.lower(), path


TRAIN_RUNS = sorted(
    {p for p in ALL_FILES if "train.config" in (GIN_DIR / p).read_text()}
    | {p for p, e in RUN_ENTRY.items() if e == "train"}  # run files that include another
)


def test_training_run_files_are_recognised():
    assert {"runs/train_scratch.gin", "runs/finetune.gin", "runs/demo_cpu.gin",
            "runs/smoke_cpu.gin"} <= set(TRAIN_RUNS)  # fmt: skip


@pytest.mark.parametrize("path", TRAIN_RUNS)
def test_training_run_files_bind_every_argument(path, captured):
    task_file = [] if "include 'tasks/" in (GIN_DIR / path).read_text() else ["tasks/xsum.gin"]
    files = [str(GIN_DIR / path)] + [str(GIN_DIR / f) for f in task_file]
    entry.parse_gin(files, _bindings(path))
    config, model, data = entry.train()
    assert isinstance(config, TrainConfig) and isinstance(data, DataConfig)
    for macro in ("TRAIN_STEPS", "BATCH_SIZE", "EVAL_EVERY", "CHECKPOINT_EVERY", "SEED"):
        gin.query_parameter(f"%{macro}")
    assert config.train_steps == gin.query_parameter("%TRAIN_STEPS")
    assert config.checkpoint.every == gin.query_parameter("%CHECKPOINT_EVERY")
    if "MODEL_DIR" in _required(path):
        assert config.model_dir == "/tmp/free_jax_gin_test"
    if "INITIAL_CHECKPOINT" in _required(path):
        assert model is None and config.initial_checkpoint == "/tmp/no_checkpoint"
    else:
        assert isinstance(model, T5Config | LMConfig)
    # Decoder-only models train on a decoder-only format, T5s on 'seq2seq'; exit heads train on
    # text (decoder-only by default); recursive models are decoder-only.
    decoder_only_run = "_lm_" in path or path == "runs/exit_heads.gin" or "recursive_" in path
    assert data.decoder_only == (isinstance(model, LMConfig) or decoder_only_run)


def test_lm_lora_finetune_is_the_papers_llm_setting(captured):
    files = [str(GIN_DIR / "runs/finetune_lm_lora.gin"), str(GIN_DIR / "tasks/samsum.gin")]
    entry.parse_gin(files, ["MODEL_DIR = '/tmp/x'", "INITIAL_CHECKPOINT = '/tmp/smollm'"])
    config, model, data = entry.train()
    assert model is None and config.initial_checkpoint == "/tmp/smollm"
    assert config.lora == LoraConfig(rank=64, alpha=128.0) and config.lora.scale == 2.0
    assert config.loss.kind == "free" and config.optimizer.name == "adamw"
    assert data.format == "prompt_target" and data.extra_ids == 0
    assert data.tokenizer_path == "/tmp/smollm"  # the checkpoint's own tokenizer


def test_lm_scratch_recipe_is_a_small_decoder_only_model(captured):
    entry.parse_gin([str(GIN_DIR / "runs/lm_scratch_cpu.gin")], [])
    config, model, data = entry.train()
    assert isinstance(model, LMConfig) and model.family == "llama"
    assert model.num_decoder_layers == 4 and model.shallow_layer == 1 and model.d_model <= 256
    # The trained SentencePiece vocabulary's ids: pad 0, EOS 1, no BOS.
    assert (model.pad_token_id, model.eos_token_id, model.bos_token_id) == (0, 1, None)
    assert data.vocab_size <= model.vocab_size and data.format == "prompt_target"
    assert data.task == "system_translations" and config.loss.kind == "free"


def test_jsonl_task_from_gin(captured, tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text('{"document": "a b", "summary": "a"}\n')
    files = [str(GIN_DIR / "runs/lm_scratch_cpu.gin"), str(GIN_DIR / "tasks/jsonl.gin")]
    entry.parse_gin(files, [
        f"JSONL_TRAIN = '{train_file}'", "jsonl_task.input_field = 'document'",
        "jsonl_task.target_field = 'summary'",
    ])  # fmt: skip
    _, _, data = entry.train()
    assert isinstance(data.task, Task) and data.task.dataset == "jsonl"
    assert data.task.jsonl_files == {"train": str(train_file)}
    assert data.task.input_field == "document" and data.task.target_field == "summary"


def test_demo_recipe_is_the_documented_model(captured):
    entry.parse_gin([str(GIN_DIR / "runs/demo_cpu.gin")], [])
    config, model, data = entry.train()
    assert model.num_decoder_layers == 8 and model.shallow_layer == 2
    assert 256 <= model.d_model <= 384 and 4 <= model.num_encoder_layers <= 6
    assert 4000 <= model.vocab_size <= 8000 and data.vocab_size <= model.vocab_size
    assert data.task == "system_translations" and config.loss.kind == "free"


@pytest.mark.parametrize("path", [p for p in ALL_FILES if p.startswith("models/")])
def test_model_files_build_their_config(path):
    entry.parse_gin([str(GIN_DIR / path)], [])
    config = entry.model_config()
    shapes = param_shapes(config)  # jax.eval_shape: no parameter memory
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert n > 0 and 1 <= config.shallow_layer < config.num_decoder_layers


@pytest.mark.parametrize(
    "binding, needle",
    [
        ("TrainConfig.batch_sizee = 3", "batch_sizee"),
        ("NoSuchThing.value = 1", "NoSuchThing"),
        ("TrainConfig.batch_size = ]", "Unable to parse value"),
    ],
)
def test_bad_bindings_fail_before_training(binding, needle, monkeypatch):
    monkeypatch.setattr(entry.trainer, "train", lambda *a, **k: pytest.fail("training started"))
    key, value = binding.split(" = ")
    with pytest.raises(Exception, match=re.escape(needle)):
        entry.main(
            [f"--gin_file={GIN_DIR / 'runs/smoke_cpu.gin'}", "--gin.MODEL_DIR='/tmp/x'",
             f"--gin.{key}={value}"]
        )  # fmt: skip


def test_malformed_file_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(entry.trainer, "train", lambda *a, **k: pytest.fail("training started"))
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'runs/smoke_cpu.gin'\nTrainConfig.batch_size = = 3\n")
    with pytest.raises(Exception, match="bad.gin"):
        entry.main([f"--gin_file={bad}", "--gin.MODEL_DIR='/tmp/x'"])


def test_missing_required_value_is_reported(monkeypatch):
    monkeypatch.setattr(entry.trainer, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(Exception, match="MODEL_DIR|model_dir"):
        entry.main([f"--gin_file={GIN_DIR / 'runs/smoke_cpu.gin'}"])


def test_flag_parsing():
    args = entry.parse_flags(
        ["--gin_file=a.gin", "--gin_file", "b.gin", "--gin.X=1", '--gin.Y.z="s"']
    )
    assert args.gin_file == ["a.gin", "b.gin"]
    assert args.gin_bindings == ["X = 1", 'Y.z = "s"']
    with pytest.raises(SystemExit):
        entry.parse_flags(["--gin_file=a.gin", "--bogus"])


def test_benchmark_demo_model_is_the_gin_demo_model():
    from free_jax.benchmarks.train_step import model_for
    from free_jax.models import preset

    entry.parse_gin([str(GIN_DIR / "models/demo_small.gin")], [])
    assert entry.model_config() == model_for("demo")
    assert entry.model_config().replace(dropout_rate=0.0) == preset("demo-small", dropout_rate=0.0)
    assert model_for("demo", d_model=192).d_model == 192
