"""Training entry point (t5x style): gin files and bindings in, one call to the trainer.

    python -m free_jax.train --gin_file=gin_configs/runs/demo_cpu.gin \\
        --gin.MODEL_DIR=\\"runs/demo\\" [--gin.TRAIN_STEPS=2000 ...]

Flags:
  --gin_file=PATH      a gin file; repeatable, read in order. Relative includes inside gin files
                       ("models/t5_small.gin") resolve against the repository's gin_configs/.
  --gin.KEY=VALUE      one binding, e.g. --gin.BATCH_SIZE=16 or --gin.LossConfig.kd_alpha=1.0.
  --gin_bindings=TEXT  bindings in gin syntax; repeatable.
  --gin_search_path=D  another directory for includes; repeatable.

Multi-process runs (TPU pods, Slurm, XManager, two CPU processes in the tests) join through
`jax.distributed.initialize`, configured by the environment the launchers set (see
`free_jax.partitioning.maybe_initialize_distributed`); only process 0 logs and prints.

The model is a T5 or a decoder-only LM: `model_config.preset` names either family's preset
(gin_configs/models/), and `DataConfig.format` says how texts become rows ('seq2seq' for T5,
'prompt_target' or 'text' for decoder-only models). `TASK` is a registered task name or a task over
the user's JSONL files, `TASK = @jsonl_task()` (see gin_configs/tasks/jsonl.gin).

gin lives only here and in gin_configs/: the library takes plain dataclasses, which are registered
below as configurables. Bad bindings and unknown configurables fail while parsing, before any data
is read or any array computed, with gin's message naming the file and line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import gin
from etils import epath

from free_jax import partitioning
from free_jax.data import jsonl_task
from free_jax.models import PRESETS, T5Config
from free_jax.models import preset as model_preset
from free_jax.models.lm_config import FAMILIES, LM_PRESETS, LMConfig, lm_preset
from free_jax.models.mor import MoRConfig
from free_jax.partitioning import PartitionConfig
from free_jax.training import (
    CheckpointConfig,
    DataConfig,
    LoraConfig,
    LossConfig,
    OptimizerConfig,
    TrainConfig,
    trainer,
)

GIN_CONFIGS = epath.Path(__file__).resolve().parent.parent / "gin_configs"

for _cls in (
    LossConfig, OptimizerConfig, LoraConfig, CheckpointConfig, DataConfig, PartitionConfig,
    TrainConfig,
):  # fmt: skip
    gin.external_configurable(_cls, module="free_jax")
gin.external_configurable(T5Config, module="free_jax")
gin.external_configurable(LMConfig, module="free_jax")
gin.external_configurable(MoRConfig, module="free_jax")
gin.external_configurable(jsonl_task, module="free_jax")


@gin.configurable(module="free_jax")
def model_config(
    preset: str | None = None, family: str | None = None, **overrides
) -> T5Config | LMConfig:
    """A model config: a named preset of either family with overrides, or fields alone.

    Args:
      preset: a T5 preset ("t5-small", "tiny", ...) or a decoder-only one ("pythia-70m",
        "smollm-135m", "llama-3.2-1b", "gpt2", "tiny-llama", ...; hub names work too).
      family: without a preset, which config the fields build: None or "t5" a T5Config,
        "llama" / "gpt_neox" / "gpt2" an LMConfig.
    """
    if preset:
        if preset.removeprefix("google/") in PRESETS:
            return model_preset(preset, **overrides)
        if preset.split("/")[-1].lower() in LM_PRESETS:
            return lm_preset(preset, **overrides)
        known = sorted(PRESETS) + sorted(LM_PRESETS)
        raise ValueError(f"unknown model preset {preset!r}; known presets: {known}")
    if family in (None, "t5"):
        return T5Config(**overrides)
    if family in FAMILIES:
        return LMConfig(family=family, **overrides)
    raise ValueError(f"model_config.family={family!r}; expected 't5' or one of {FAMILIES}")


@gin.configurable(module="free_jax")
def train(
    config: TrainConfig = gin.REQUIRED,
    model: T5Config | LMConfig | None = None,
    data: DataConfig = gin.REQUIRED,
    step_callback: Callable | None = None,
) -> trainer.TrainResult:
    """The configured run: `train.config`, `train.model` (None: the initial checkpoint's) and
    `train.data` are bound in gin_configs/runs/*.gin."""
    return trainer.train(config, model, data, step_callback=step_callback)


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """Splits argv into gin files, bindings and search paths (`--gin.KEY=VALUE` included)."""
    parser = argparse.ArgumentParser(prog="python -m free_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--gin_search_path", action="append", default=[])
    args, rest = parser.parse_known_args(list(argv))
    for item in rest:
        if item.startswith("--gin.") and "=" in item:
            key, value = item[len("--gin.") :].split("=", 1)
            args.gin_bindings.append(f"{key} = {value}")
        else:
            parser.error(f"unrecognised argument {item!r} (bindings are --gin.KEY=VALUE)")
    if not args.gin_file:
        parser.error("at least one --gin_file is required, e.g. gin_configs/runs/demo_cpu.gin")
    return args


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths=()) -> None:
    """Parses files then bindings (later ones win) into a fresh config (an entry point's config is
    its flags, also when a process runs several entry points); errors carry gin's file and line."""
    gin.clear_config()  # also unlocks a config a previous entry point finalized
    for path in [GIN_CONFIGS, *search_paths]:
        if str(path) not in gin.config._LOCATION_PREFIXES:
            gin.add_config_file_search_path(str(path))
    # gin also tries each include as a file inside a Python package ("models/tiny.gin" -> package
    # `models`). That probe logs an error for every miss and crashes when a namespace package of
    # that name is importable (a tests/models folder on sys.path). Includes here are plain files,
    # so the probe is switched off while parsing.
    readers = list(gin.config._FILE_READERS)
    gin.config._FILE_READERS[:] = [r for r in readers if r[1] is not _package_probe()]
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=True)
    finally:
        gin.config._FILE_READERS[:] = readers


def _package_probe():
    try:
        from gin import resource_reader
    except ImportError:
        return None
    return resource_reader.system_path_file_exists


def main(argv: Sequence[str] | None = None, step_callback: Callable | None = None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_flags(argv)
    parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
    # After parsing (bad flags fail at once) and before anything starts a JAX backend.
    partitioning.maybe_initialize_distributed()
    primary = partitioning.is_primary()
    logging.basicConfig(
        level=logging.INFO if primary else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    result = train(step_callback=step_callback)
    if primary:
        print(
            f"done: step {result.step} in {result.model_dir}; validation "
            f"{result.validation_metrics}"
        )
    return result


if __name__ == "__main__":
    main()
