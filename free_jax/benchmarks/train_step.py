"""Training throughput: tokens/s of the jitted train step (FREE loss) for a few model sizes.

    python -m free_jax.benchmarks.train_step [--models tiny,t5-small,demo] [--batch_size 16]
        [--set d_model=192 num_heads=6]      # a candidate shape

Synthetic full-length batches (every position a real token) so the number is tokens the step
actually processes, encoder plus decoder. Reports the median over timed steps after warm-up
(the first call compiles), with the device it ran on. "demo" is gin_configs/models/demo_small.gin's
model, the one `make demo-train` trains.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.benchmarks.flags import add_set_flag
from free_jax.models import count_params, init_params, preset
from free_jax.training.losses import LossConfig
from free_jax.training.optim import OptimizerConfig, make_optimizer
from free_jax.training.state import TrainState
from free_jax.training.trainer import make_train_step


def model_for(name: str, **overrides):
    """A T5 preset; "demo" is the demo model (`demo-small`, with its training dropout)."""
    if name == "demo":
        return preset("demo-small", dropout_rate=0.1, **overrides)
    return preset(name, **overrides)


def benchmark(
    name: str, batch_size: int, length: int, steps: int, warmup: int, loss: str, **overrides
):
    config = model_for(name, **overrides)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    opt = OptimizerConfig(name="adafactor", learning_rate=1e-3, schedule="constant")
    tx, schedule = make_optimizer(opt, 1000)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(1),
    )
    step_fn = make_train_step(config, LossConfig(kind=loss), tx, schedule, opt, None)
    rng = np.random.default_rng(0)
    tokens = lambda: jnp.asarray(
        rng.integers(2, config.vocab_size, (batch_size, length)), jnp.int32
    )
    batch = {
        "encoder_input_tokens": tokens(),
        "decoder_input_tokens": tokens(),
        "decoder_target_tokens": tokens(),
        "decoder_loss_weights": jnp.ones((batch_size, length), jnp.float32),
    }
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "model": name,
        "params_M": count_params(params) / 1e6,
        "step_s": seconds,
        "tokens_per_s": 2 * batch_size * length / seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,demo,t5-small")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64, help="encoder and decoder length")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss", default="free", choices=["free", "calm", "ce"])
    add_set_flag(parser)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} (x{jax.device_count()})")
    print(f"batch {args.batch_size} x {args.length}+{args.length} tokens, loss {args.loss}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    print(f"{'model':<10} {'params':>8} {'step':>9} {'tokens/s':>10}")
    for name in args.models.split(","):
        r = benchmark(
            name, args.batch_size, args.length, args.steps, args.warmup, args.loss, **dict(args.set)
        )  # fmt: skip
        print(f"{r['model']:<10} {r['params_M']:>7.1f}M {r['step_s']:>8.3f}s "
              f"{r['tokens_per_s']:>10,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
