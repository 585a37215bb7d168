"""Hugging Face checkpoints: `config.json` + (sharded) `model.safetensors`, or a hub name.

T5 is mapped here; decoder-only families (Llama, GPT-NeoX, GPT-2) in `hf_lm.py`, chosen by
config.json's `model_type`.

Tensor names map to free_jax's t5x-style names; torch Linear weights [out, in] become kernels [in, out].

    config, params = load_hf("path/to/flan-t5-small")   # a local directory
    config, params = load_hf("google/flan-t5-small")    # the hub, when a network exists
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from free_jax.checkpoints.naming import check_against_config, flatten, to_params
from free_jax.checkpoints.safetensors_io import read_config_json, read_hf_tensors
from free_jax.models.config import T5Config

_ATTN = {"q": "query", "k": "key", "v": "value", "o": "out"}
# (stack, sub-layer index) -> free_jax name of that sub-layer's attention block and its norm.
_SUBLAYERS = {
    ("encoder", 0): ("attention", "pre_attention_layer_norm"),
    ("encoder", 1): ("mlp", "pre_mlp_layer_norm"),
    ("decoder", 0): ("self_attention", "pre_self_attention_layer_norm"),
    ("decoder", 1): ("encoder_decoder_attention", "pre_cross_attention_layer_norm"),
    ("decoder", 2): ("mlp", "pre_mlp_layer_norm"),
}
_BLOCK = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)$")


def hf_name_to_free(name: str) -> str | None:
    """Maps one Hugging Face tensor name to a free_jax parameter path (None: not a parameter we keep).

    >>> hf_name_to_free("decoder.block.3.layer.1.EncDecAttention.q.weight")
    'decoder/layers_3/encoder_decoder_attention/query/kernel'
    """
    if name == "shared.weight":
        return "token_embedder/embedding"
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        return None  # aliases of shared.weight
    if name == "lm_head.weight":
        return "decoder/logits_dense/kernel"
    if name in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
        stack = name.split(".")[0]
        return f"{stack}/{stack}_norm/scale"
    match = _BLOCK.match(name)
    if not match:
        raise ValueError(f"unrecognised T5 tensor {name!r}")
    stack, block, sub, rest = (
        match.group(1),
        int(match.group(2)),
        int(match.group(3)),
        match.group(4),
    )
    module, norm = _SUBLAYERS[(stack, sub)]
    prefix = f"{stack}/layers_{block}"
    if rest == "layer_norm.weight":
        return f"{prefix}/{norm}/scale"
    if rest.endswith("relative_attention_bias.weight"):
        return f"{stack}/relpos_bias/rel_embedding"
    parts = rest.split(".")  # e.g. SelfAttention.q.weight, DenseReluDense.wi_0.weight
    if parts[0] in ("SelfAttention", "EncDecAttention"):
        return f"{prefix}/{module}/{_ATTN[parts[1]]}/kernel"
    if parts[0] == "DenseReluDense":
        return f"{prefix}/mlp/{parts[1]}/kernel"
    raise ValueError(f"unrecognised T5 tensor {name!r}")


def hf_to_flat(tensors: dict[str, np.ndarray], config: T5Config) -> dict[str, np.ndarray]:
    flat = {}
    for name, value in tensors.items():
        target = hf_name_to_free(name)
        if target is None:
            continue
        value = np.asarray(value)
        if target.endswith("/kernel") or target.endswith("rel_embedding"):
            value = value.T  # torch [out, in] -> [in, out]; bias [buckets, H] -> [H, buckets]
        flat[target] = value
    if config.tie_word_embeddings:
        flat.pop("decoder/logits_dense/kernel", None)  # tied checkpoints may still store lm_head
    elif "decoder/logits_dense/kernel" not in flat and "token_embedder/embedding" in flat:
        # transformers >= 5 saves a tied, unscaled head (v1.1 style) without lm_head.weight.
        flat["decoder/logits_dense/kernel"] = flat["token_embedder/embedding"].T
    return flat


def free_to_hf(params, config: T5Config) -> dict[str, np.ndarray]:
    """The inverse mapping, for exporting free_jax parameters as Hugging Face safetensors."""
    inverse = {}
    for name in _all_hf_names(config):
        target = hf_name_to_free(name)
        if target is not None:
            inverse[target] = name
    out = {}
    for path, value in flatten(params).items():
        value = np.asarray(value, dtype=np.float32)
        if path.endswith("/kernel") or path.endswith("rel_embedding"):
            value = value.T
        out[inverse[path]] = np.ascontiguousarray(value)
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    out["decoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def _all_hf_names(config: T5Config) -> list[str]:
    names = ["shared.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    mlp = ["wi_0", "wi_1", "wo"] if config.is_gated else ["wi", "wo"]
    for stack, depth, subs in (
        ("encoder", config.num_encoder_layers, (0, 1)),
        ("decoder", config.num_decoder_layers, (0, 1, 2)),
    ):
        attn_names = {0: "SelfAttention", 1: "EncDecAttention"}
        for i in range(depth):
            for sub in subs:
                base = f"{stack}.block.{i}.layer.{sub}"
                names.append(f"{base}.layer_norm.weight")
                if _SUBLAYERS[(stack, sub)][0] == "mlp":
                    names += [f"{base}.DenseReluDense.{m}.weight" for m in mlp]
                else:
                    names += [f"{base}.{attn_names[sub]}.{p}.weight" for p in "qkvo"]
            if i == 0:
                names.append(
                    f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
                )
    return names


def resolve_hf_path(path_or_name: str) -> Path:
    """A local directory as is; otherwise a hub name downloaded with huggingface_hub."""
    local = Path(os.path.expanduser(path_or_name))
    if local.exists():
        return local
    if "/" not in path_or_name or path_or_name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint directory {path_or_name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(
            f"{path_or_name!r} is not a local directory and huggingface_hub is not installed "
            "(pip install 'free_jax[hub]')"
        ) from e
    try:
        return Path(
            snapshot_download(
                path_or_name,
                allow_patterns=["config.json", "*.safetensors", "*.json", "spiece.model"],
            )
        )
    except Exception as e:  # the hub client raises many types when offline
        raise OSError(
            f"could not fetch {path_or_name!r} from the Hugging Face hub (no network here?): "
            f"{type(e).__name__}: {e}. Download it elsewhere and pass the local directory."
        ) from e


def load_hf_config(directory: Path) -> T5Config:
    raw, config_path = read_config_json(directory)
    return T5Config.from_hf_dict(raw, source=str(config_path))


# config.json `model_type`s read by the decoder-only loader (`hf_lm.py`)
DECODER_ONLY_TYPES = ("llama", "gpt_neox", "gpt2")


def model_type(directory: Path) -> str:
    """config.json's `model_type` ("t5" when absent, as in old T5 exports)."""
    raw, config_path = read_config_json(directory)
    kind = raw.get("model_type", "t5")
    if kind not in ("t5", "mt5", *DECODER_ONLY_TYPES):
        raise ValueError(
            f"{config_path}: model_type {kind!r} is not supported; free_jax loads t5, "
            f"{', '.join(DECODER_ONLY_TYPES)}"
        )
    return kind


def load_hf(path_or_name: str, **config_overrides):
    """Loads a Hugging Face directory (or hub name) of any supported family -> (config, params).

    T5 gives a `T5Config`; Llama / GPT-NeoX / GPT-2 give an `LMConfig` (`hf_lm.load_hf_lm`).
    `config_overrides` replace config fields, e.g. `shallow_exit_layer=2, dtype="bfloat16"`.
    """
    directory = resolve_hf_path(path_or_name)
    if model_type(directory) in DECODER_ONLY_TYPES:
        from free_jax.checkpoints.hf_lm import load_hf_lm

        return load_hf_lm(str(directory), **config_overrides)
    config = load_hf_config(directory)
    if config_overrides:
        config = config.replace(**config_overrides)
    flat = hf_to_flat(read_hf_tensors(directory)[0], config)
    check_against_config(flat, config, source=str(directory))
    return config, to_params(flat, config)


def save_hf(directory: str | os.PathLike, config, params) -> Path:
    """Writes `config.json` + `model.safetensors` that transformers loads (T5 or decoder-only)."""
    from safetensors.numpy import save_file

    if not isinstance(config, T5Config):
        from free_jax.checkpoints.hf_lm import save_hf_lm

        return save_hf_lm(directory, config, params)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    tensors = free_to_hf(params, config)
    # safetensors refuses aliased buffers; store independent copies as transformers does on save.
    save_file({k: np.array(v) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory
