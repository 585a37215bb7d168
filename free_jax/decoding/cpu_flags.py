"""XLA:CPU compiler flags that make FREE's deep passes cheaper on a CPU (opt-in, per process).

A FREE pass multiplies a few positions (C = 2..8 at batch 1) by every deep weight matrix. With
XLA:CPU's defaults such a skinny matrix product costs about three times a one-position product,
where reading the weights once should cost about the same: measured here (2-core x86-64, jax
0.10) on a t5-large-shaped block, the 18 deep layers took 79 ms for one position, 147 ms for two
and 250 ms for four. With YNNPACK's dot fusions off and Eigen single-threaded the same pass took
65 / 106 / 111 ms, and one-position steps got no slower. They are not a general win: on a
t5-small shape the exit head over two or more positions (a 512 x 32128 product) became ~10x
slower and FREE with records fell from 1.1x to 0.8x of greedy. Multi-threaded Eigen and YNNPACK
also win on large products (training, wide batches). So the flags are never set implicitly: a
process that only decodes on a CPU opts in, after measuring its own model
(`python -m free_jax.benchmarks.decode --cpu_decode_flags`).

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
