"""free_jax's own inference checkpoints: orbax-saved parameters plus `config.json`.

    save_params("runs/demo/export", config, params)
    config, params = load_params("runs/demo/export")

Training checkpoints (optimizer state, step, data position) are the trainer's business; this is
the small, self-describing artefact that evaluation, the demo and users load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from free_jax.checkpoints.naming import check_against_config, flatten
from free_jax.models.configs import config_from_json

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointReadError(ValueError):
    """Saved arrays could not be read (a damaged or incomplete checkpoint); the message names the
    checkpoint and the error tensorstore gave."""


@contextlib.contextmanager
def reading_arrays(what: str):
    """Turns a failed orbax restore into one `CheckpointReadError` naming `what` (the directory and
    step) and the innermost error of the chain: the one that says which array and file failed.

    orbax raises that as the cause of an error whose message is a page of TensorStore spec, and
    gin (around the trainer) drops the causes, so the useful line was buried or lost. The reads
    the failure abandons are kept quiet (`_quiet_abandoned_reads`).
    """
    _quiet_abandoned_reads()  # before the restore: the abandoned reads can report before we can
    try:
        yield
    except Exception as e:
        chain = [e]
        while (nxt := chain[-1].__cause__ or chain[-1].__context__) and nxt not in chain:
            chain.append(nxt)
        root = chain[-1]
        detail = (str(root).strip().splitlines() or [""])[0][:500]
        raise CheckpointReadError(
            f"{what}: cannot restore the saved arrays ({type(root).__name__}: {detail}); is the "
            "checkpoint damaged or incomplete?"
        ) from e


def _quiet_abandoned_reads() -> None:
    """Drops, from now on, what the reads of a failed restore report after it.

    When a restore fails, orbax closes its event loop while tensorstore still finishes the reads
    it abandoned. Each then reports its own failure from other threads, racing the real error:
    "RuntimeError: Event loop is closed" (a finished read calling back into the closed loop) and
    "Exception ignored in: <coroutine ... _read_array_index_and_device_put>" through
    `sys.unraisablehook`, "_GatheringFuture exception was never retrieved" through the asyncio
    logger; up to ~145 tracebacks, each with a page of TensorStore spec. Only the closed-loop error
    and errors raised in orbax's read functions are dropped; anything else still reaches the
    previous hook or the log.
    """
    previous = sys.unraisablehook
    if not getattr(previous, "quiets_abandoned_reads", False):

        def hook(unraisable):
            if not _abandoned_read(unraisable.exc_value):
                previous(unraisable)

        hook.quiets_abandoned_reads = True
        sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    if _keep_log_record not in asyncio_log.filters:
        asyncio_log.addFilter(_keep_log_record)


def _keep_log_record(record: logging.LogRecord) -> bool:
    return not (record.exc_info and _abandoned_read(record.exc_info[1]))


def _abandoned_read(error: BaseException | None) -> bool:
    """Whether `error` is the closed-loop error, or was raised (or raised from an error raised) in
    one of orbax's read functions."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        frame = error.__traceback__
        while frame is not None:
            code = frame.tb_frame.f_code
            if f"{os.sep}orbax{os.sep}" in code.co_filename and "read" in code.co_name:
                return True
            frame = frame.tb_next
        error = error.__cause__ or error.__context__
    return False


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


def check_weights_beside_config(directory: str | os.PathLike) -> None:
    """Raises FileNotFoundError when `directory` has a config.json but no weights in any of the
    places they live: an export whose params/ was deleted once reported a missing training
    checkpoint (it was taken for a MODEL_DIR) or a missing model.safetensors (for a Hugging Face
    directory) instead."""
    directory = Path(directory)
    places = (
        (directory / PARAMS_DIR).is_dir(),
        (directory / "checkpoints").is_dir(),  # a training MODEL_DIR's orbax checkpoints
        any(directory.glob("*.safetensors*")),
    )
    if (directory / CONFIG_FILE).exists() and not any(places):
        raise FileNotFoundError(
            f"{directory} has {CONFIG_FILE} but no weights: a free_jax export keeps them in "
            f"{PARAMS_DIR}/, a training MODEL_DIR in checkpoints/, a Hugging Face directory in "
            "*.safetensors (convert a pytorch_model.bin with transformers' save_pretrained); none "
            "is there"
        )


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
    with ocp.StandardCheckpointer() as ckptr, reading_arrays(str(directory / PARAMS_DIR)):
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
