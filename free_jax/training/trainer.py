"""The training loop: data, state, jitted step, validation, checkpoints, logs and resume.

    result = train(TrainConfig(model_dir="runs/demo", train_steps=6000, batch_size=32),
                   preset("tiny"), DataConfig(task="system_translations"))
    result = train(TrainConfig(model_dir="runs/lm", train_steps=2000),
                   lm_preset("tiny-llama"), DataConfig(format="prompt_target"))   # decoder-only

The model is a T5 (`T5Config`, data format "seq2seq") or a decoder-only LM (`LMConfig`, formats
"prompt_target" and "text"), from a random init or an initial checkpoint (a Hugging Face directory
of either family, chosen by its config.json's model_type, a T5X checkpoint, a free_jax export or a
training MODEL_DIR).

What trains is the whole model, or a subtree beside a frozen one (`TrainState.frozen`): LoRA
adapters (`TrainConfig.lora`), or self-supervised exit heads (`TrainConfig.exit_heads` with
`LossConfig(kind="exit_heads")`; the heads also go to MODEL_DIR/exit_heads.msgpack at every
checkpoint, and validation reports each head's KL and agreement with the final layer).

Library code takes these plain dataclasses; `python -m free_jax.train` builds them from gin.

Guarantees:
* A restarted run resumes from the latest checkpoint in MODEL_DIR (parameters, optimiser state,
  step, RNG and the data iterator's position), and metrics.jsonl is cut back to that step, so a
  run killed at any point and restarted logs the same losses as one that never stopped (bit for
  bit on CPU: dropout keys are fold_in(rng, step) and the data order is a function of the seed).
* A non-finite loss, gradient norm or parameter norm stops training with `NonFiniteLossError`
  before anything of that step is saved; the checkpoints already written stay as they were.

Scale-out (`TrainConfig.partition`, see free_jax/partitioning.py): the state lives on a device mesh
(parameters and the optimiser leaves that mirror them sharded by the rule table, the rest
replicated), the step is jitted with those shardings and donates its input state, and each
process reads its own slice of every global batch. Only process 0 writes metrics, TensorBoard
files and run files; every process takes part in saving the (sharded) orbax checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from free_jax import data as data_lib
from free_jax import partitioning
from free_jax.data.tokenizer import check_vocabulary_fits
from free_jax.models import init_params, param_shapes
from free_jax.models.exit_heads import choose_exit_head_layers, init_exit_heads, save_exit_heads
from free_jax.training import inputs, validation
from free_jax.training import state as state_lib
from free_jax.training.config import DataConfig, NonFiniteLossError, TrainConfig, TrainResult
from free_jax.training.forward import ModelConfig
from free_jax.training.lora import count_lora_params, init_lora, merge_lora
from free_jax.training.losses import LossConfig, compute_loss
from free_jax.training.metrics import MetricsWriter, Progress
from free_jax.training.optim import OptimizerConfig, make_optimizer, update_count
from free_jax.training.state import EXIT_HEADS_FILE, CheckpointConfig, TrainState, state_shardings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Set-up pieces
# ---------------------------------------------------------------------------------------------


def load_initial_checkpoint(path: str, fmt: str = "auto") -> tuple[ModelConfig, Any]:
    """(config, params) of a Hugging Face, T5X or free_jax checkpoint.

    A Hugging Face directory (or hub name) is read by `checkpoints.load_hf`, which picks the
    family from config.json's `model_type`: "t5" gives a `T5Config`, "llama" / "gpt_neox" /
    "gpt2" an `LMConfig` (`checkpoints.hf_lm.load_hf_lm`). "free_jax" is an export of
    `checkpoints.save_params` (config.json + params/) or a training MODEL_DIR (its latest
    checkpoint, LoRA merged). "auto" tells them apart by their files.
    """
    from free_jax import checkpoints

    local = epath.Path(path)
    if fmt == "auto":
        if local.is_dir():
            checkpoints.store.check_weights_beside_config(local)
        if (local / "params").is_dir() or (local / state_lib.CHECKPOINT_SUBDIR).is_dir():
            fmt = "free_jax"
        else:
            fmt = "hf" if (local / "config.json").exists() or not local.exists() else "t5x"
    if fmt == "free_jax":
        if (local / "params").is_dir():
            return checkpoints.load_params(path)
        config, params, _ = state_lib.load_trained(path)
        return config, params
    loader = checkpoints.load_hf if fmt == "hf" else checkpoints.load_t5x
    return loader(path)


def _initial_params(config: TrainConfig, model_config: ModelConfig | None, rng, mesh, rules):
    """(model config, parameters) from the initial checkpoint or a random init, on the mesh."""
    if config.initial_checkpoint:
        loaded_config, params = load_initial_checkpoint(
            config.initial_checkpoint, config.initial_checkpoint_format
        )
        if model_config is None:
            return loaded_config, _place_params(params, mesh, rules)
        if type(model_config) is not type(loaded_config):
            raise ValueError(
                f"The model config is a {type(model_config).__name__} but "
                f"{config.initial_checkpoint} holds a {type(loaded_config).__name__}; leave the "
                "model unset to use the checkpoint's own config."
            )
        want = jax.tree.map(lambda x: x.shape, param_shapes(model_config))
        got = jax.tree.map(lambda x: tuple(x.shape), params)
        if want != got:
            raise ValueError(
                f"The model config does not match the shapes of {config.initial_checkpoint}; "
                "leave the model unset to use the checkpoint's own config."
            )
        params = jax.tree.map(lambda x: np.asarray(x, model_config.weights_dtype), params)
        return model_config, _place_params(params, mesh, rules)
    if model_config is None:
        raise ValueError("pass a model config, or an initial_checkpoint to take one from")
    # One compiled program instead of one dispatch per initialiser (seconds on CPU), writing each
    # parameter straight into its shards.
    shardings = partitioning.param_shardings(param_shapes(model_config), mesh, rules)
    init = jax.jit(init_params, static_argnums=0, out_shardings=shardings)
    return model_config, init(model_config, rng)


def _place_params(params, mesh, rules):
    return partitioning.put_global(params, partitioning.param_shardings(params, mesh, rules))


def make_train_step(
    model_config: ModelConfig,
    loss_config: LossConfig,
    tx: optax.GradientTransformation,
    schedule: Callable,
    optimizer: OptimizerConfig,
    lora_scale: float | None,
    *,
    shardings: TrainState | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
):
    """The jitted step: (state, batch) -> (state, metrics). The input state is donated.

    With `shardings` (from `state_shardings`) and `batch_sharding` the step is compiled for the
    mesh: the state keeps its layout from step to step, every batch array is split on its leading
    axis, and the metrics come back replicated. Without them it runs where its inputs live.

    The trained tree `state.params` is the model's parameters, LoRA adapters on `state.frozen`
    (`lora_scale` set), or exit heads on `state.frozen` (loss kind "exit_heads").
    """
    heads_run = loss_config.kind == "exit_heads"

    def step(state: TrainState, batch):
        def loss_fn(trainable):
            if heads_run:  # the backbone runs deterministically: no dropout key
                return compute_loss(
                    model_config, loss_config, state.frozen, batch, exit_heads=trainable
                )
            params = (
                trainable if lora_scale is None else merge_lora(state.frozen, trainable, lora_scale)
            )
            rng = jax.random.fold_in(state.rng, state.step)
            return compute_loss(
                model_config, loss_config, params, batch, rng=rng, deterministic=False
            )

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["param_norm"] = optax.global_norm(params)
        metrics["learning_rate"] = schedule(update_count(optimizer, state.step))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    mesh = batch_sharding.mesh
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, partitioning.replicated(mesh)),
        donate_argnums=(0,),
    )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def evaluate(
    model_config: ModelConfig,
    params,
    eval_set: inputs.ValidationSet,
    tokenizer,
    config: TrainConfig,
    data,
) -> dict[str, float]:
    """Exit losses and the task metric of greedy decodes on the validation examples."""
    metrics = validation.validation_losses(model_config, params, eval_set.batches)
    metrics["loss"] = metrics[f"ce_layer{model_config.num_decoder_layers}"]
    if eval_set.inputs:
        scores, _ = validation.decode_and_score(
            model_config, params, eval_set.inputs, eval_set.references,
            tokenizer.decode, eval_set.metric, prompt_lengths=eval_set.prompt_lengths,
            batch_size=config.eval_batch_size,
            max_decode_len=config.max_decode_length or data.max_target_length,
            input_length=data.max_input_length,
        )  # fmt: skip
        metrics.update(scores)
    metrics["num_examples"] = len(eval_set.inputs)
    return metrics


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _all_finite(values: dict, keys=("loss", "grad_norm", "param_norm")) -> bool:
    return all(math.isfinite(float(values[k])) for k in keys if k in values)


def train(
    config: TrainConfig,
    model_config: ModelConfig | None,
    data: DataConfig,
    *,
    step_callback: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Trains (or resumes training) and returns the final metrics; see the module docstring.

    Args:
      config: the run.
      model_config: the model (`T5Config` or `LMConfig`); None takes it from
        `config.initial_checkpoint`.
      data: the task, its format (T5's "seq2seq" or a decoder-only one) and its tokenization.
      step_callback: called as f(step, metrics) after every step (and its logging/saving).
    """
    model_dir = epath.Path(config.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    primary = partitioning.is_primary()
    mesh, rules = config.partition.make_mesh(), config.partition.rules
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    # Which slice of every global batch this process reads (checks the batch size fits the mesh).
    shard_index, shard_count = partitioning.process_batch_shard(batch_sharding, config.batch_size)
    task = inputs.resolve_task(data.task)
    # Process 0 prepares the dataset and vocabulary first; the others then find them ready.
    tokenizer, train_source = _primary_first(
        "data_ready",
        lambda: (
            inputs.make_tokenizer(data, task),
            data_lib.load_source(
                task, data.train_split or task.train_split, data_dir=data.data_dir
            ),
        ),
    )

    rng = jax.random.PRNGKey(config.seed)
    init_rng, lora_rng, dropout_rng = jax.random.split(rng, 3)
    model_config, params = _initial_params(config, model_config, init_rng, mesh, rules)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{model_config.vocab_size}; set the model's vocab_size to at least the tokenizer's."
        )
    # The rule generate and evaluate will load this run with (they read the tokenizer file,
    # without T5's sentinels): fail now rather than after training.
    check_vocabulary_fits(
        getattr(tokenizer, "base_vocab_size", tokenizer.vocab_size),
        model_config.vocab_size,
        tokenizer=data.tokenizer_path or f"(trained for task {task.name})",
        advice="set the model's vocab_size to the tokenizer's, rounded up to a multiple of 128",
    )
    inputs.check_model_and_data(model_config, data, tokenizer)
    # A restart under another model config must fail before it writes anything (tokenizer,
    # config.json, run.json) into a MODEL_DIR whose checkpoints belong to the old config.
    state_lib.check_run_config(model_dir, model_config)
    bos_id = inputs.bos_id_for(model_config, data) if data.decoder_only else None
    tx, schedule = make_optimizer(config.optimizer, config.train_steps)
    lora_scale, head_layers = None, None
    if config.lora is not None:
        frozen, trainable = params, init_lora(params, config.lora, lora_rng)
        trainable = _place_params(trainable, mesh, rules)
        lora_scale = config.lora.scale
        log.info("LoRA: %d trainable parameters", count_lora_params(trainable))
    elif config.exit_heads is not None:
        head_layers = choose_exit_head_layers(model_config.num_decoder_layers, config.exit_heads)
        frozen = params
        trainable = _place_params(init_exit_heads(model_config, params, head_layers), mesh, rules)
        log.info(
            "Exit heads on layers %s: %d trainable parameters",
            head_layers,
            sum(x.size for x in jax.tree.leaves(trainable)),
        )
    else:
        frozen, trainable = None, params
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=trainable,
        opt_state=jax.eval_shape(tx.init, trainable),
        rng=dropout_rng,
        frozen=frozen,
    )
    shardings = state_shardings(abstract, mesh, rules)
    state = TrainState(
        step=partitioning.put_global(np.zeros((), np.int32), shardings.step),
        params=trainable,
        opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable),
        rng=partitioning.put_global(dropout_rng, shardings.rng),
        frozen=frozen,
    )
    run_info = {
        "task": task.name,
        "family": getattr(model_config, "family", "t5"),
        "format": data.format,
        "bos_id": bos_id,
        "loss": config.loss.kind,
        "train_steps": config.train_steps,
        "tokenizer_path": inputs.save_tokenizer(model_dir, tokenizer, data) if primary else None,
        "extra_ids": data.extra_ids,
    }
    if lora_scale is not None:
        run_info["lora_scale"] = lora_scale
    if head_layers is not None:
        run_info["exit_heads"] = list(head_layers)
        run_info["exit_heads_file"] = EXIT_HEADS_FILE
    if primary:
        state_lib.write_run_files(model_dir, model_config, run_info)

    train_iter = inputs.train_iterator(
        train_source,
        task,
        tokenizer,
        data,
        bos_id,
        batch_size=config.batch_size // shard_count,
        seed=config.seed,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    eval_set = inputs.validation_set(data, task, tokenizer, config.eval_batch_size, bos_id)
    eval_set.batches = [_place_eval_batch(b, batch_sharding) for b in eval_set.batches]

    manager = state_lib.make_manager(model_dir, config.checkpoint)
    writer = MetricsWriter(model_dir, tensorboard=config.tensorboard) if primary else _NoWriter()
    resumed_from = manager.latest_step()
    if resumed_from is not None:
        state, data_state = state_lib.restore_checkpoint(manager, state, resumed_from)
        train_iter.set_state(data_state)
        log.info("Resumed from step %d in %s", resumed_from, model_dir)
    # Steps logged after the checkpoint (all of them, when a run died before its first one) are
    # trained again now: drop them so that metrics.jsonl holds each step once.
    writer.truncate_after(resumed_from or 0)

    step_fn = make_train_step(
        model_config, config.loss, tx, schedule, config.optimizer, lora_scale,
        shardings=shardings, batch_sharding=batch_sharding,
    )  # fmt: skip
    eval_params = lambda s: (
        s.params if lora_scale is None else merge_lora(s.frozen, s.params, lora_scale)
    )

    start = int(jax.device_get(state.step))
    progress = Progress(config.train_steps, start, enabled=config.progress_bar and primary)
    say = progress.write if primary else lambda _: None
    if resumed_from is not None:
        say(f"Resumed from step {resumed_from} in {model_dir}")
    train_metrics: dict[str, float] = {}
    validation_metrics: dict[str, float] = {}
    tokens_since_log, time_of_log = 0, time.perf_counter()
    try:
        for step in range(start + 1, config.train_steps + 1):
            local = inputs.array_batch(next(train_iter))
            # Tokens of the global batch, estimated from this process's equal share of it.
            num_tokens = inputs.num_tokens(local) * shard_count
            batch = partitioning.global_batch(local, batch_sharding, config.batch_size)
            state, metrics = step_fn(state, batch)
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not _all_finite(values):
                manager.wait_until_finished()
                last = manager.latest_step()
                raise NonFiniteLossError(
                    f"Training stopped at step {step}: loss {values['loss']}, gradient norm "
                    f"{values.get('grad_norm')}, parameter norm {values.get('param_norm')}. "
                    "Nothing of this step was saved; the last good checkpoint is "
                    f"{'step ' + str(last) if last is not None else 'none'} in "
                    f"{model_dir / state_lib.CHECKPOINT_SUBDIR}. Lower the learning rate or "
                    "clip gradients, then restart to resume from it."
                )
            tokens_since_log += num_tokens
            progress.update(1, num_tokens, values["loss"])
            train_metrics = values
            if step % config.log_every == 0 or step == config.train_steps:
                now = time.perf_counter()
                values["tokens_per_s"] = tokens_since_log / max(now - time_of_log, 1e-9)
                tokens_since_log, time_of_log = 0, now
                values.update(train_iter.counters)
                writer.write(step, "train", values)

            evaluated = None
            due = (
                config.eval_every and step % config.eval_every == 0
            ) or step == config.train_steps
            if due and eval_set.batches:
                if head_layers is not None:  # the backbone does not change: validate the heads
                    evaluated = validation.exit_head_validation(
                        model_config, config.loss, state.frozen, state.params, eval_set.batches
                    )
                else:
                    evaluated = evaluate(
                        model_config, eval_params(state), eval_set, tokenizer, config, data
                    )
                validation_metrics = evaluated
                writer.write(step, "validation", evaluated)
                say(_eval_line(step, evaluated, train_iter.counters))
            if step % config.checkpoint.every == 0 or step == config.train_steps:
                best = config.checkpoint.best_metric
                ranked = {best: evaluated[best]} if evaluated and best in evaluated else None
                state_lib.save_checkpoint(manager, state, train_iter.get_state(), ranked)
                if head_layers is not None:
                    _save_heads(model_dir / EXIT_HEADS_FILE, model_config, state.params, primary)
            if step_callback is not None:
                step_callback(step, values)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        progress.close()
    return TrainResult(
        model_dir=str(model_dir),
        step=int(jax.device_get(state.step)),
        train_metrics=train_metrics,
        validation_metrics=validation_metrics,
        resumed_from=resumed_from,
    )


def _primary_first(name: str, fn: Callable[[], Any]) -> Any:
    """fn() on process 0, then on the others (shared files are created once, by one process)."""
    if partitioning.is_primary():
        result = fn()
        partitioning.sync(name)
        return result
    partitioning.sync(name)
    return fn()


def _save_heads(path, model_config: ModelConfig, heads, primary: bool) -> None:
    """Every process gathers the (possibly sharded) heads; process 0 writes them."""
    from jax.experimental import multihost_utils

    whole = multihost_utils.process_allgather(heads, tiled=True)
    if primary:
        save_exit_heads(path, model_config, whole)


def _place_eval_batch(batch: dict, batch_sharding) -> dict[str, jax.Array]:
    """Every process holds the whole validation batch; split it like training batches when the
    mesh divides it, else replicate it."""
    size = len(next(iter(batch.values())))
    fits = size % partitioning.batch_axis_size(batch_sharding) == 0
    sharding = batch_sharding if fits else partitioning.replicated(batch_sharding.mesh)
    return partitioning.put_global(batch, sharding)


class _NoWriter:
    """What processes other than 0 log to: nothing."""

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, step: int, split: str, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _eval_line(step: int, metrics: dict, counters: dict) -> str:
    shown = {k: v for k, v in metrics.items() if k in ("loss", "bleu", "rougeLsum", "f1")}
    shown.update({k: v for k, v in metrics.items() if k.startswith(("acc_layer", "agree_head"))})
    text = ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))
    cut = counters.get("num_truncated_inputs", 0), counters.get("num_truncated_targets", 0)
    return (
        f"step {step} validation: {text} | truncated so far: {cut[0]} inputs, {cut[1]} targets "
        f"of {counters.get('num_examples', 0)} examples"
    )


__all__ = [
    "EXIT_HEADS_FILE",
    "CheckpointConfig",
    "DataConfig",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "make_train_step",
    "train",
]
