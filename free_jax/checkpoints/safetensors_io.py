"""Reading Hugging Face checkpoint files: safetensors (single or sharded, bfloat16 included) and
config.json. Shared by the T5 (`hf.py`) and decoder-only (`hf_lm.py`) loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_config_json(directory: Path) -> tuple[dict, Path]:
    """(config.json as a dict, its path); errors name the file."""
    config_path = Path(directory) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory}: missing config.json")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    return raw, config_path


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def _read_file(path: Path) -> dict[str, np.ndarray]:
    """One safetensors file, memory-mapped; bfloat16 comes back as ml_dtypes' bfloat16.

    (safetensors.numpy cannot represent bfloat16, the hub's dtype for Llama-3 and SmolLM2.)
    """
    import ml_dtypes

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = info["dtype"]
        dtype = ml_dtypes.bfloat16 if kind == "BF16" else _DTYPES.get(kind)
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {kind}")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    return out


def read_hf_tensors(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(tensors, file of each tensor, the checkpoint's main file) of a single or sharded checkpoint."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {missing}")
        tensors, sources = {}, {}
        for shard in shards:
            part = _read_file(directory / shard)
            tensors.update(part)
            sources.update(dict.fromkeys(part, str(directory / shard)))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{index}: tensors listed but not found in the shards: {absent[:5]}")
        return tensors, sources, str(index)
    if single.exists():
        tensors = _read_file(single)
        return tensors, dict.fromkeys(tensors, str(single)), str(single)
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or model.safetensors.index.json (free_jax reads "
        "safetensors; convert a pytorch_model.bin with transformers' save_pretrained)"
    )
