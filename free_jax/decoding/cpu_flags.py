"""XLA:CPU compiler flags that make FREE's deep passes cheaper on a CPU (opt-in, per process).

A FREE pass multiplies a few positions (C = 2..8 at batch 1) by every deep weight matrix. With
XLA:CPU's defaults such a skinny matrix product costs up to about three times a one-position
product, where reading the weights once should cost about the same. These flags (YNNPACK's dot
fusions off, Eigen single-threaded) make those products cheaper but other skinny products much
dearer. Measured here (2-core x86-64, jax 0.10, two runs of the decode benchmark back to back on a
t5-large-shaped model): the 18 deep layers over 8 positions took 130 ms without and 98 ms with the
flags (48 and 55 ms for one position), but the exit head (1024 x 32128) over 2-4 positions went
from ~10 ms to ~150 ms, so FREE with agreement records fell from 1.29x to 1.14x of greedy and FREE
without records moved from 1.34x to 1.36x; on a t5-small shape FREE with records fell from 1.1x to
0.8x. Multi-threaded Eigen and YNNPACK also win on large products (training, wide batches). So the
flags are never set implicitly: a process that only decodes on a CPU opts in, after measuring its
own model (`python -m free_jax.benchmarks.decode --cpu_decode_flags`).

XLA reads `XLA_FLAGS` once, when its CPU backend starts, and aborts the process on a flag it does
not know, so `apply()` must run before the first JAX computation; tests check the flags are
still accepted by the installed jaxlib.
"""

from __future__ import annotations

import os

DECODE_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_multi_thread_eigen=false")


def backend_started() -> bool:
    """Whether JAX has already started a backend (after which XLA_FLAGS is no longer read)."""
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def apply(flags: tuple[str, ...] = DECODE_FLAGS) -> str:
    """Appends `flags` to XLA_FLAGS for this process and returns the new value.

    Raises:
      RuntimeError: a JAX backend already started, so the flags could no longer take effect.
    """
    if backend_started():
        raise RuntimeError(
            "cpu_flags.apply() must run before the first JAX computation: XLA reads XLA_FLAGS "
            "once, when its backend starts"
        )
    present = os.environ.get("XLA_FLAGS", "").split()
    names = {flag.split("=")[0] for flag in flags}
    kept = [flag for flag in present if flag.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join([*kept, *flags])
    return os.environ["XLA_FLAGS"]
