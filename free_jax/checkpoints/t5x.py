"""T5X checkpoints: a msgpack `checkpoint` file plus tensorstore (zarr) arrays beside it.

On disk (`checkpoint_<step>/`):
    checkpoint                                       msgpack of the train state
    target.encoder.layers_0.attention.query.kernel/  zarr array (.zarray + chunks)
    ...
Inside the msgpack, each parameter is either an inline array or a tensorstore spec whose file path
is relative to the checkpoint directory. The parameters sit under `target` (newer T5X) or
`optimizer/target` (older). T5X's parameter names are free_jax's, so no renaming is needed; T5X
stores no model config, so it is inferred from the shapes unless given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import serialization

from free_jax.checkpoints.naming import check_against_config, flatten, to_params
from free_jax.models.config import T5Config


def _is_ts_spec(leaf: Any) -> bool:
    return isinstance(leaf, dict) and "driver" in leaf and "kvstore" in leaf


def _read_spec(spec: dict, ckpt_dir: Path, name: str) -> np.ndarray:
    import tensorstore as ts

    spec = dict(spec)
    kvstore = dict(spec["kvstore"])
    if kvstore.get("driver") == "file":
        path = kvstore.get("path", "")
        if not os.path.isabs(path):
            kvstore["path"] = str(ckpt_dir / path)
        if not Path(kvstore["path"]).exists():
            raise FileNotFoundError(
                f"{ckpt_dir}: parameter {name!r} is stored in {kvstore['path']}, which is missing"
            )
    spec["kvstore"] = kvstore
    return np.asarray(ts.open(spec, open=True, read=True).result().read().result())


def _params_subtree(state: dict, source: Path) -> dict:
    if "target" in state:
        return state["target"]
    if "optimizer" in state and "target" in state["optimizer"]:
        return state["optimizer"]["target"]
    raise ValueError(f"{source}: no 'target' (or 'optimizer/target') tree in the T5X checkpoint")


def read_t5x_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat {name: array} of a T5X checkpoint's parameters (`path` is the dir or its `checkpoint`)."""
    path = Path(path)
    ckpt_file = path / "checkpoint" if path.is_dir() else path
    if not ckpt_file.exists():
        raise FileNotFoundError(f"{path}: no T5X 'checkpoint' file found")
    ckpt_dir = ckpt_file.parent
    try:
        state = serialization.msgpack_restore(ckpt_file.read_bytes())
    except Exception as e:
        raise ValueError(f"{ckpt_file}: not a readable T5X msgpack checkpoint: {e}") from e
    target = _params_subtree(state, ckpt_file)
    flat = {}
    for name, leaf in _flatten_with_specs(target).items():
        flat[name] = _read_spec(leaf, ckpt_dir, name) if _is_ts_spec(leaf) else np.asarray(leaf)
    return flat


def _flatten_with_specs(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict) and not _is_ts_spec(value):
            out.update(_flatten_with_specs(value, name))
        else:
            out[name] = value
    return out


def infer_config(flat: dict[str, np.ndarray], **overrides) -> T5Config:
    """Reads the architecture off the parameter shapes (T5X keeps no config)."""

    def count(stack):
        return len({k.split("/")[1] for k in flat if k.startswith(f"{stack}/layers_")})

    vocab, d_model = flat["token_embedder/embedding"].shape
    heads, buckets = flat["encoder/relpos_bias/rel_embedding"].shape
    inner = flat["encoder/layers_0/attention/query/kernel"].shape[1]
    gated = "encoder/layers_0/mlp/wi_0/kernel" in flat
    d_ff = flat[f"encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel"].shape[1]
    fields = dict(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_heads=heads,
        num_encoder_layers=count("encoder"), num_decoder_layers=count("decoder"),
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings="decoder/logits_dense/kernel" not in flat,
    )  # fmt: skip
    fields.update(overrides)
    return T5Config(**fields)


def load_t5x(
    path: str | os.PathLike, config: T5Config | None = None, **config_overrides
) -> tuple[T5Config, dict]:
    """Loads a T5X checkpoint directory -> (T5Config, params).

    Without `config`, the architecture is inferred from shapes (T5 v1.1 / FLAN use gated-GELU; mT5's
    vocabulary and widths are read off too); `config_overrides` then replace fields, e.g.
    `shallow_exit_layer=2`.
    """
    flat = read_t5x_arrays(path)
    if config is None:
        config = infer_config(flat, **config_overrides)
    elif config_overrides:
        config = config.replace(**config_overrides)
    check_against_config(flat, config, source=str(path))
    return config, to_params(flat, config)


def save_t5x(path: str | os.PathLike, params, step: int = 0) -> Path:
    """Writes params in T5X's on-disk layout (msgpack + one zarr array per parameter).

    Used by tests and for handing free_jax-trained weights to T5X tooling.
    """
    import tensorstore as ts

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    target: dict = {}
    for name, value in flatten(params).items():
        value = np.asarray(value)
        rel = "target." + name.replace("/", ".")
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": rel},
            "metadata": {
                "compressor": {"id": "gzip"},
                "shape": list(value.shape),
                "chunks": list(value.shape),
                "dtype": "bfloat16" if value.dtype.name == "bfloat16" else value.dtype.str,
            },
        }
        absolute = {**spec, "kvstore": {"driver": "file", "path": str(directory / rel)}}
        ts.open(absolute, create=True, delete_existing=True).result().write(value).result()
        node = target
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = spec
    state = {"target": target, "state": {"step": np.asarray(step, np.int32), "param_states": {}}}
    (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
    return directory
