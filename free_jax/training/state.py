"""Training state, its orbax checkpoints, and what evaluation needs from a MODEL_DIR.

MODEL_DIR layout written by the trainer:

    config.json         the model config's `to_json()`, enough to rebuild the model: a T5Config, or
                        an LMConfig (decoder-only), told apart by the LMConfig's "family" key
                        ("llama", "gpt_neox", "gpt2"), which a T5 config.json never has
    run.json            tokenizer path, loss, LoRA scale (when fine-tuned with LoRA), exit-head
                        layers (when training exit heads), task, model family ("t5" or the
                        LMConfig's), data format and BOS
    exit_heads.msgpack  the trained exit heads of a `TrainConfig.exit_heads` run, rewritten at
                        every checkpoint (`models.exit_heads.load_exit_heads`)
    spm.model           a copy of the SentencePiece vocabulary, when training used one
    checkpoints/<step>/ orbax: `state` (step, params, optimiser state, RNG; sharded arrays are
                        written shard by shard by the processes that hold them) and `data` (the
                        data iterator's position, JSON: `metadata`, or one
                        `process_<i>-of-<n>.json` per process in a multi-process run)
    metrics.jsonl       one JSON object per logged step / evaluation
    tb/                 TensorBoard event files (when tensorboardX is installed)

    config, params, tokenizer_path = load_trained("runs/demo")
    config, heads = load_trained_exit_heads("runs/heads")      # an exit-heads run
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import struct

from free_jax import partitioning
from free_jax.checkpoints.store import reading_arrays
from free_jax.models import T5Config
from free_jax.models.configs import config_from_json
from free_jax.models.exit_heads import load_exit_heads
from free_jax.models.field_types import check_field_types
from free_jax.models.lm_config import LMConfig

CHECKPOINT_SUBDIR = "checkpoints"
EXIT_HEADS_FILE = "exit_heads.msgpack"


@struct.dataclass
class TrainState:
    """Everything a step changes, plus the run's RNG.

    Attributes:
      step: int32 [] batches trained so far.
      params: the trained tree: all model parameters, or only the LoRA adapters, or only the
        exit heads.
      opt_state: the optax state of `params`.
      rng: uint32 [2] the run's base key; step t's dropout uses fold_in(rng, t), so resuming needs
        no RNG bookkeeping beyond the step.
      frozen: the base model parameters under LoRA or exit-head training (never updated), else
        None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None

    def to_dict(self) -> dict[str, Any]:
        out = {"step": self.step, "params": self.params, "opt_state": self.opt_state}
        out["rng"] = self.rng
        if self.frozen is not None:
            out["frozen"] = self.frozen
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(d["step"], d["params"], d["opt_state"], d["rng"], d.get("frozen"))


def state_shardings(state: TrainState, mesh, rules) -> TrainState:
    """A TrainState of NamedShardings: parameters (and LoRA's frozen base) by the rule table,
    optimiser leaves that mirror a parameter like that parameter, step and RNG replicated."""
    params = partitioning.param_shardings(state.params, mesh, rules)
    return TrainState(
        step=partitioning.replicated(mesh),
        params=params,
        opt_state=partitioning.mirrored_shardings(state.opt_state, state.params, params, mesh),
        rng=partitioning.replicated(mesh),
        frozen=(
            None
            if state.frozen is None
            else partitioning.param_shardings(state.frozen, mesh, rules)
        ),
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint manager
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How often and how many checkpoints to keep.

    Attributes:
      every: save every N steps (and always at the end of training).
      keep: keep the latest K checkpoints ...
      keep_best: ... and the best one by `best_metric` among evaluated checkpoints (0: none).
      best_metric: a validation metric name in metrics.jsonl, e.g. "bleu" or "ce_layer8".
      best_mode: "max" or "min".
      async_save: write in a background thread while training goes on.
    """

    every: int = 1000
    keep: int = 3
    keep_best: int = 1
    best_metric: str = "loss"
    best_mode: str = "min"
    async_save: bool = True

    def __post_init__(self):
        check_field_types(self)


def _data_handler() -> ocp.JsonCheckpointHandler:
    """JSON of the data iterator's position, written by every process into its own file.

    Each process reads its own slice of the data, so each has its own position; one process
    writes the single file `metadata` as orbax's JsonSave would.
    """
    n = jax.process_count()
    return ocp.JsonCheckpointHandler(
        filename=None if n == 1 else f"process_{jax.process_index()}-of-{n}.json",
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None),
    )


def make_manager(model_dir, config: CheckpointConfig, read_only: bool = False):
    """An orbax CheckpointManager over MODEL_DIR/checkpoints with items `state` and `data`.

    Every process of a multi-process run makes one and calls save/restore together.
    """
    cm = ocp.checkpoint_managers
    policies = [cm.LatestN(max(1, config.keep))]
    if config.keep_best:
        metric = config.best_metric
        policies.append(
            cm.BestN(
                get_metric_fn=lambda m: m[metric],
                # BestN keeps the tail of the sorted list; reverse puts the smallest last.
                reverse=config.best_mode == "min",
                n=config.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=config.async_save,
        read_only=read_only,
        create=not read_only,
    )
    directory = epath.Path(model_dir)
    if "://" not in str(model_dir):
        # orbax refuses relative paths, and its async save reports that only at the next save
        # (after the run has gone on without a checkpoint): resolve local paths up front.
        directory = epath.Path(os.path.abspath(str(model_dir)))
    directory = directory / CHECKPOINT_SUBDIR
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": _data_handler()}
    return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


def save_checkpoint(manager, state: TrainState, data_state: dict, metrics: dict | None = None):
    step = int(jax.device_get(state.step))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state.to_dict()), data=ocp.args.JsonSave(data_state)
        ),
        metrics=metrics,
        force=True,
    )


def restore_checkpoint(manager, template: TrainState, step: int | None = None):
    """(state shaped like `template`, data iterator state) at `step` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        template.to_dict(),
    )
    with reading_arrays(f"{manager.directory} step {step}"):
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
    return TrainState.from_dict(restored.state), restored.data


# ---------------------------------------------------------------------------------------------
# MODEL_DIR metadata for evaluation
# ---------------------------------------------------------------------------------------------


class RunConfigMismatchError(ValueError):
    """A MODEL_DIR already holds a run of another model config; nothing of it was touched."""


def check_run_config(model_dir, model_config: T5Config | LMConfig) -> None:
    """Raises `RunConfigMismatchError` when MODEL_DIR/config.json describes another model.

    Called before a (re)started run writes anything into MODEL_DIR: the run's files and
    checkpoints belong to the config in config.json, and a restart under another config would
    overwrite config.json with one that no longer matches the saved parameters. The message names
    every differing field ("d_ff: run has 64, this config 96").
    """
    config_file = epath.Path(model_dir) / "config.json"
    if not config_file.exists():
        return
    saved = config_from_json(config_file.read_text(), source=str(config_file))
    # Through JSON, as config.json was written, so that tuples and lists compare equal.
    new = config_from_json(model_config.to_json())
    if type(saved) is not type(new):
        differences = [
            f"model type: run has {type(saved).__name__}, this config {type(new).__name__}"
        ]
    else:
        differences = [
            f"{f.name}: run has {getattr(saved, f.name)!r}, this config {getattr(new, f.name)!r}"
            for f in dataclasses.fields(saved)
            if getattr(saved, f.name) != getattr(new, f.name)
        ]
    if differences:
        raise RunConfigMismatchError(
            f"{model_dir} holds a run of another model ({config_file}): "
            + "; ".join(differences)
            + ". Resume with the run's config, or train in a new MODEL_DIR; nothing was written."
        )


def write_run_files(model_dir, model_config: T5Config | LMConfig, run_info: dict) -> None:
    """Writes config.json (the model) and run.json (`run_info`: tokenizer_path, ...) into MODEL_DIR."""
    model_dir = epath.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    # Whole files or none: the other processes of a run read config.json (`check_run_config`)
    # while this one writes it.
    for name, text in [
        ("config.json", model_config.to_json()),
        ("run.json", json.dumps(run_info, indent=2, sort_keys=True)),
    ]:
        tmp = model_dir / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(model_dir / name)


def read_run_files(model_dir) -> tuple[T5Config | LMConfig, dict]:
    model_dir = epath.Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {model_dir} a training MODEL_DIR?")
    config = config_from_json(config_file.read_text(), source=str(config_file))
    run_file = model_dir / "run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    return config, run


def read_saved_state(model_dir, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, the saved train state as a dict: "step", "params", "opt_state", "rng" and, under
    LoRA or exit-head training, "frozen" (the base weights; "params" are then the adapters or the
    heads)), every array whole on this
    process's first device, whatever mesh saved it.

    Args:
      model_dir: a directory written by `free_jax.train`.
      step: a checkpoint step; None picks the latest.
    """
    manager = make_manager(model_dir, CheckpointConfig(keep_best=0), read_only=True)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint under {epath.Path(model_dir) / CHECKPOINT_SUBDIR}"
            )
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {model_dir}; saved steps: {steps}")
        # Plain dicts, no TrainState: the saving run's mesh and sharding do not matter here.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = manager.item_metadata(step)["state"].tree
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved
        )
        with reading_arrays(f"{manager.directory} step {step}"):
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
    finally:
        manager.close()
    return step, restored.state


def load_trained(model_dir, step: int | None = None) -> tuple[T5Config | LMConfig, Any, str | None]:
    """(config, params, tokenizer_path) of a trained MODEL_DIR, LoRA adapters already merged (an
    exit-heads run gives its frozen backbone; `load_trained_exit_heads` gives the heads).

    Args:
      model_dir: a directory written by `free_jax.train`.
      step: a checkpoint step; None picks the latest.
    """
    from free_jax.training.lora import merge_lora

    config, run = read_run_files(model_dir)
    _, state = read_saved_state(model_dir, step)
    params = state["params"]
    if "exit_heads" in run:
        params = state["frozen"]
    elif "frozen" in state:
        params = merge_lora(state["frozen"], params, run["lora_scale"])
    params = jax.tree.map(jnp.asarray, params)
    return config, params, run.get("tokenizer_path")


def load_trained_exit_heads(model_dir) -> tuple[T5Config | LMConfig, dict]:
    """(config, heads) of an exit-heads run: MODEL_DIR/exit_heads.msgpack, checked against the
    run's config.json. The heads load beside any copy of the backbone (`load_trained`, or the
    checkpoint the run started from)."""
    config, run = read_run_files(model_dir)
    if "exit_heads" not in run:
        raise ValueError(f"{model_dir} is not an exit-heads run (run.json has no 'exit_heads')")
    name = run.get("exit_heads_file", EXIT_HEADS_FILE)
    return config, load_exit_heads(epath.Path(model_dir) / name, config)
