"""Optimisers and learning-rate schedules (optax), configured by a plain dataclass.

    tx, schedule = make_optimizer(OptimizerConfig(name="adafactor", learning_rate=1e-3),
                                  total_steps=10_000)

The chain is: clip the global gradient norm -> Adafactor or AdamW with the schedule, wrapped in
`optax.MultiSteps` when gradients are accumulated over several batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import optax

from free_jax.models.field_types import check_field_types

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser, schedule and gradient handling.

    Attributes:
      name: "adafactor" (T5's default; factored second moments, update scaled by the parameter
        norm) or "adamw".
      learning_rate: peak learning rate, reached at the end of warm-up.
      schedule: after warm-up, "rsqrt" (T5: peak * sqrt(warmup / step)), "cosine" or "linear" decay
        to `end_learning_rate_fraction * peak` at `decay_steps`, or "constant".
      warmup_steps: linear warm-up from 0, in optimiser updates.
      decay_steps: where cosine/linear decay ends; None means the run's total updates.
      end_learning_rate_fraction: final learning rate of cosine/linear decay, as a share of the peak.
      weight_decay: AdamW's decoupled weight decay (Adafactor's too, when non-zero).
      b1, b2, eps: AdamW moments.
      adafactor_decay_rate: Adafactor's second-moment decay exponent (T5: 0.8).
      clip_grad_norm: clip the global gradient norm to this; None disables clipping.
      grad_accum_steps: apply an update every k batches (optax.MultiSteps); effective batch is k
        times the batch size. Schedules count updates, not batches.
    """

    name: str = "adafactor"
    learning_rate: float = 1e-3
    schedule: str = "rsqrt"
    warmup_steps: int = 0
    decay_steps: int | None = None
    end_learning_rate_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    adafactor_decay_rate: float = 0.8
    clip_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        check_field_types(self)
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name={self.name!r}; expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}; expected {SCHEDULES}")
        if self.grad_accum_steps < 1 or self.warmup_steps < 0:
            raise ValueError("grad_accum_steps must be >= 1 and warmup_steps >= 0")


def make_schedule(
    config: OptimizerConfig, total_updates: int
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Learning rate as a function of the optimiser update count (0-based).

    >>> s = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=4), 100)
    >>> [round(float(s(i)), 3) for i in (0, 1, 3, 4, 15)]   # ramp, then peak * sqrt(4 / update)
    [0.25, 0.5, 1.0, 0.894, 0.5]
    """
    peak, warmup = config.learning_rate, config.warmup_steps
    decay_end = max(config.decay_steps or total_updates, warmup + 1)
    end = peak * config.end_learning_rate_fraction

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0  # the first update is update 1
        ramp = jnp.minimum(1.0, step / warmup) if warmup else jnp.ones_like(step)
        if config.schedule == "constant":
            decayed = jnp.full_like(step, peak)
        elif config.schedule == "rsqrt":
            decayed = peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
        else:
            frac = jnp.clip((step - warmup) / (decay_end - warmup), 0.0, 1.0)
            if config.schedule == "cosine":
                decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
            else:
                decayed = peak + (end - peak) * frac
        return ramp * decayed

    return schedule


def make_optimizer(
    config: OptimizerConfig, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
    """The gradient transformation and its schedule (a function of the update count).

    `total_steps` counts batches; with gradient accumulation the schedule spans
    total_steps // grad_accum_steps updates.
    """
    total_updates = max(1, total_steps // config.grad_accum_steps)
    schedule = make_schedule(config, total_updates)
    if config.name == "adafactor":
        opt = optax.adafactor(
            learning_rate=schedule,
            decay_rate=config.adafactor_decay_rate,
            multiply_by_parameter_scale=True,
            clipping_threshold=1.0,
            weight_decay_rate=config.weight_decay or None,
        )
    else:
        opt = optax.adamw(
            learning_rate=schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    parts = [optax.clip_by_global_norm(config.clip_grad_norm)] if config.clip_grad_norm else []
    tx = optax.chain(*parts, opt)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx, schedule


def update_count(config: OptimizerConfig, step):
    """Optimiser updates done after `step` batches (for logging the current learning rate)."""
    return jnp.asarray(step) // config.grad_accum_steps
