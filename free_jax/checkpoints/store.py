"""free_jax's own inference checkpoints: orbax-saved parameters plus `config.json`.

    save_params("runs/demo/export", config, params)
    config, params = load_params("runs/demo/export")

Training checkpoints (optimizer state, step, data position) are the trainer's business; this is
the small, self-describing artefact that evaluation, the demo and users load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from free_jax.checkpoints.naming import check_against_config, flatten
from free_jax.models.configs import config_from_json

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_params(directory: str | os.PathLike, config, params, dtype=None) -> Path:
    """Writes `config.json` and the parameters (optionally cast, e.g. to bfloat16) atomically."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), params)
    with ocp.StandardCheckpointer() as ckptr:
        # orbax writes to a temporary name and renames, so a crash never leaves half a checkpoint.
        ckptr.save(directory / PARAMS_DIR, params, force=True)
    (directory / CONFIG_FILE).write_text(config.to_json())
    return directory


def load_config(directory: str | os.PathLike):
    """The saved model config: a `T5Config` or, for a decoder-only export, an `LMConfig`."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: missing {CONFIG_FILE} (not a free_jax checkpoint?)")
    return config_from_json(path.read_text(), source=str(path))


def load_params(directory: str | os.PathLike, **config_overrides):
    """Reads a directory written by `save_params` -> (config, params in the config's dtype)."""
    directory = Path(directory).absolute()
    config = load_config(directory)
    if config_overrides:
        config = config.replace(**config_overrides)
    if not (directory / PARAMS_DIR).exists():
        raise FileNotFoundError(f"{directory}: missing the {PARAMS_DIR}/ folder of parameters")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / PARAMS_DIR)
    check_against_config(flatten(params), config, source=str(directory))
    dtype = config.weights_dtype
    params = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, dtype=dtype), params)
    return config, params


def describe(directory: str | os.PathLike) -> dict:
    """Config and size summary of a saved checkpoint, for model cards."""
    config = load_config(directory)
    files = [p for p in Path(directory).rglob("*") if p.is_file()]
    return {
        "config": json.loads(config.to_json()),
        "bytes": int(sum(p.stat().st_size for p in files)),
    }
