"""Cache writes: per-example offsets, chunks, and rows past the end."""

import jax.numpy as jnp
import numpy as np

from free_jax.models import write_chunk


def test_write_chunk_matches_per_example_slices():
    rng = np.random.default_rng(0)
    cache = rng.normal(size=(3, 2, 9, 4)).astype(np.float32)
    chunk = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
    offsets = np.array([0, 4, 6])
    out = np.asarray(write_chunk(jnp.asarray(cache), jnp.asarray(chunk), jnp.asarray(offsets)))
    want = cache.copy()
    for b, o in enumerate(offsets):
        want[b, :, o : o + 3] = chunk[b]
    np.testing.assert_array_equal(out, want)


def test_write_chunk_single_position_and_overflow_is_dropped():
    cache = jnp.zeros((2, 1, 4, 1))
    one = write_chunk(cache, jnp.full((2, 1, 1, 1), 5.0), jnp.array([3, 0]))
    np.testing.assert_array_equal(one[:, 0, :, 0], [[0, 0, 0, 5], [5, 0, 0, 0]])
    # a chunk running past the end keeps its in-range rows where they belong (no shifting)
    chunk = jnp.arange(1.0, 4.0).reshape(1, 1, 3, 1)
    over = write_chunk(jnp.zeros((1, 1, 4, 1)), chunk, jnp.array([2]))
    np.testing.assert_array_equal(over[0, 0, :, 0], [0, 0, 1, 2])
