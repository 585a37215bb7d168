"""Flattening and checking parameter trees against the model's expected shapes."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util

from free_jax.models import param_shapes


def flatten(tree: Mapping, sep: str = "/") -> dict[str, object]:
    return {sep.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, object], sep: str = "/") -> dict:
    return traverse_util.unflatten_dict({tuple(k.split(sep)): v for k, v in flat.items()})


def check_against_config(flat: Mapping[str, np.ndarray], config, source: str) -> None:
    """Every expected parameter present with its exact shape, and nothing unexpected.

    Errors name the parameter and both shapes, and the checkpoint they came from.
    """
    expected = {k: tuple(v.shape) for k, v in flatten(param_shapes(config)).items()}
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(
            f"{source}: checkpoint is missing {len(missing)} parameter(s) the config needs, "
            f"e.g. {missing[:5]}"
        )
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        raise ValueError(
            f"{source}: checkpoint has {len(unexpected)} parameter(s) the config does not use, "
            f"e.g. {unexpected[:5]}"
        )
    for name, shape in expected.items():
        got = tuple(np.shape(flat[name]))
        if got != shape:
            raise ValueError(
                f"{source}: parameter {name!r} has shape {got}, but the config expects {shape}"
            )


def to_params(flat: Mapping[str, np.ndarray], config) -> dict:
    """Casts to the config's parameter dtype and nests the tree as the model expects."""
    dtype = config.weights_dtype
    return unflatten({k: jax.numpy.asarray(np.asarray(v), dtype=dtype) for k, v in flat.items()})
