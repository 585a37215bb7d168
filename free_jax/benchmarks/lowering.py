"""Device readiness without a device: every decoder and the training step lowered for GPU and TPU.

`jax.export` with `platforms=("cuda",)` / `("tpu",)` traces and lowers a jitted function to
StableHLO for that platform on any machine, so a decoder that uses an op or a layout the
platform's lowering rejects fails here, on the CPU, rather than on the accelerator.

    python -m free_jax.benchmarks.lowering            # prints one line per (target, platform)
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from free_jax.decoding import make_decoder
from free_jax.decoding.specs import (
    BeamSpec,
    CalmSpec,
    FreeSpec,
    GreedySpec,
    SampleSpec,
    StaticSpec,
)
from free_jax.models import T5Config, param_shapes, preset
from free_jax.models.lm_config import lm_preset

PLATFORMS = ("cuda", "tpu")


def decoder_specs(num_layers: int) -> dict:
    """Every decoder, with the options that select different code (modes, exits, deferral)."""
    free = FreeSpec(window=4)
    return {
        "greedy": GreedySpec(),
        "sample": SampleSpec(top_k=5),
        "beam": BeamSpec(beam_size=2),
        "static": StaticSpec(exit_layer=1),
        "calm": CalmSpec(),
        "free": free,
        "free_rollback": dataclasses.replace(free, rollback=1.0),
        "free_lossless": dataclasses.replace(free, lossless=True),
        "free_deferred": dataclasses.replace(free, min_waiting=2, max_wait=4),
        "free_exits": dataclasses.replace(free, exits=(1, num_layers - 1)),
        "calm_exits": CalmSpec(exits=(1, num_layers - 1)),
    }


def lower_decoder(config, spec, platform: str, *, batch: int = 2, length: int = 6) -> int:
    """Lowers one decoder for `platform`; returns the StableHLO text size (characters)."""
    decoder = make_decoder(config, spec, max_decode_len=length)
    params = param_shapes(config)
    inputs = jax.ShapeDtypeStruct((batch, 5), jnp.int32)
    threshold = 0.5 if isinstance(spec, CalmSpec | FreeSpec) else None
    prompts = None if isinstance(config, T5Config) else np.full((batch,), 5, np.int32)
    options = decoder.options(batch, threshold, prompt_lengths=prompts)
    exported = export.export(decoder.jitted, platforms=(platform,))(params, inputs, options)
    return len(exported.mlir_module())


def lower_train_step(config, platform: str, *, batch: int = 2, length: int = 8) -> int:
    """Lowers the training step (FREE loss, AdamW) for `platform`; StableHLO size."""
    from free_jax.training.losses import LossConfig
    from free_jax.training.optim import OptimizerConfig, make_optimizer
    from free_jax.training.state import TrainState
    from free_jax.training.trainer import make_train_step

    opt = OptimizerConfig(name="adamw", learning_rate=1e-3, schedule="constant")
    tx, schedule = make_optimizer(opt, 100)
    params = param_shapes(config)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
        opt_state=jax.eval_shape(tx.init, params), rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
    )  # fmt: skip
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    batch_tree = {
        "encoder_input_tokens": tokens,
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": jax.ShapeDtypeStruct((batch, length), jnp.float32),
    }
    step = make_train_step(config, LossConfig(kind="free"), tx, schedule, opt, None)
    exported = export.export(step, platforms=(platform,))(state, batch_tree)
    return len(exported.mlir_module())


def lower_everything(platforms=PLATFORMS) -> dict[tuple[str, str], int]:
    """{(target, platform): StableHLO size} for every decoder on a tiny T5 and a tiny Llama, and
    the T5 training step. Raises on the first target that does not lower."""
    out = {}
    for family, config in (("t5", preset("tiny")), ("llama", lm_preset("tiny-llama"))):
        for name, spec in decoder_specs(config.num_decoder_layers).items():
            for platform in platforms:
                out[(f"{family}/{name}", platform)] = lower_decoder(config, spec, platform)
    for platform in platforms:
        out[("t5/train_step", platform)] = lower_train_step(preset("tiny"), platform)
    return out


def main(argv=None) -> int:
    del argv
    for (target, platform), size in lower_everything().items():
        print(f"{target:<24} {platform:<5} lowered ({size:,} characters of StableHLO)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
