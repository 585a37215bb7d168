"""Loading a model and its tokenizer from whatever a user points at (entry points use this).

Accepted: a free_jax export (`config.json` + `params/`, written by `checkpoints.save_params`), a
training MODEL_DIR (orbax train-state checkpoints), a Hugging Face directory or hub name, or a T5X
checkpoint directory. The tokenizer is the `*.model` / `tokenizer.json` beside the weights unless
one is named. A learned confidence head (`decoding.ConfidenceHead`, measure "learned") is one
msgpack file (`save_confidence_head` / `load_confidence_head`).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import serialization

from free_jax.checkpoints import load_hf, load_params, load_t5x
from free_jax.checkpoints.store import check_weights_beside_config
from free_jax.data import load_tokenizer
from free_jax.data.tokenizer import check_vocabulary_fits
from free_jax.models import T5Config
from free_jax.models.configs import describe_config  # noqa: F401  (re-exported)


def _find_tokenizer(directory: Path) -> Path | None:
    for pattern in ("spiece.model", "*.model", "tokenizer.json"):
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
    return None


def load_model(checkpoint: str, tokenizer: str | None = None, **config_overrides):
    """-> (model config (T5 or decoder-only), params, Tokenizer or None), with config fields
    overridden as given."""
    path = Path(checkpoint)
    tok_path = Path(tokenizer) if tokenizer else None
    if (path / "params").is_dir() and (path / "config.json").exists():
        config, params = load_params(path, **config_overrides)
    elif (path / "checkpoint").exists() and not (path / "config.json").exists():
        config, params = load_t5x(path, **config_overrides)
    elif (path / "config.json").exists() and any(path.glob("*.safetensors*")):
        config, params = load_hf(str(path), **config_overrides)
    elif path.is_dir():
        check_weights_beside_config(path)
        from free_jax.training.state import load_trained  # a training MODEL_DIR

        config, params, saved_tok = load_trained(path)
        if config_overrides:
            config = config.replace(**config_overrides)
        if tok_path is None and saved_tok:
            tok_path = Path(saved_tok)
    elif "/" in checkpoint and not path.exists():
        config, params = load_hf(checkpoint, **config_overrides)  # a hub name
    else:
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r}: not a free_jax export, training MODEL_DIR, Hugging Face "
            "directory or T5X checkpoint"
        )
    if tok_path is None and path.is_dir():
        tok_path = _find_tokenizer(path)
    tok = load_tokenizer(str(tok_path)) if tok_path is not None else None
    if tok is not None:
        check_vocabulary_fits(tok.vocab_size, config.vocab_size, tokenizer=str(tok_path))
    return config, params, tok


def load_model_and_tokenizer(checkpoint: str, tokenizer: str | None, *, flag: str):
    """`load_model` for entry points that must turn text into ids: no tokenizer is an error
    naming the flag (`flag`, e.g. "evaluate.tokenizer") that supplies one."""
    config, params, tok = load_model(checkpoint, tokenizer)
    if tok is None:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer found; pass {flag}")
    return config, params, tok


def with_exit_heads(config, params, path: str | os.PathLike):
    """The model with the self-supervised exit heads of `path` (an exit-heads run's
    MODEL_DIR/exit_heads.msgpack, checked against this backbone): (HeadedConfig, params tree
    {"backbone", "exit_heads"}), which every decoder reads through the model protocol."""
    from free_jax.models import HeadedConfig
    from free_jax.models.exit_heads import exit_head_layers, load_exit_heads

    path = Path(path)
    if path.is_dir():
        path = path / "exit_heads.msgpack"
    heads = load_exit_heads(path, config)
    layers = tuple(exit_head_layers(heads))
    return HeadedConfig(base=config, head_layers=layers), {"backbone": params, "exit_heads": heads}


def save_confidence_head(path: str | os.PathLike, head_params) -> Path:
    """Writes a `ConfidenceHead`'s parameters (`training.confidence_head`) to one msgpack file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = jax.tree_util.tree_map(np.asarray, jax.device_get(head_params))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(tree))
    tmp.replace(path)  # never leave half a file under the real name
    return path


def load_confidence_head(path: str | os.PathLike, config: T5Config | None = None):
    """A `ConfidenceHead`'s parameters saved by `save_confidence_head`; with `config`, checks that
    the head reads hidden states of the model's width."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"confidence head {path}: no such file")
    try:
        head = serialization.msgpack_restore(path.read_bytes())
        width = np.asarray(head["hidden"]["kernel"]).shape[0]
        np.asarray(head["out"]["kernel"])
    except Exception as e:  # msgpack, or a tree that is not a ConfidenceHead's
        raise ValueError(f"{path}: not a ConfidenceHead's parameters ({e})") from e
    if config is not None and width != config.d_model:
        raise ValueError(f"{path}: a head for d_model={width}, but the model's is {config.d_model}")
    return head
