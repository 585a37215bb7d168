"""Hugging Face decoder-only checkpoints (Llama, GPT-NeoX, GPT-2) <-> free_jax `DecoderLM` params.

    config, params = load_hf_lm("path/to/pythia-70m")            # a local directory
    config, params = load_hf_lm("EleutherAI/pythia-70m")         # the hub, when a network exists
    save_hf_lm("out/", config, params)   # AutoModelForCausalLM.from_pretrained("out/") loads it

Each checkpoint tensor is a `Link` to one or more free_jax parameters:
* "copy": same array (embeddings, norm scales and biases, linear biases);
* "linear": torch `Linear` weight [out, in] -> kernel [in, out];
* "conv1d": GPT-2's `Conv1D` weight, already [in, out];
* "neox_qkv": NeoX's fused `query_key_value`, interleaved per head: rows [3*H*K] viewed as
  [H, 3, K] (head h's query, key and value in turn) -> query, key and value kernels [D, H*K];
* "gpt2_qkv": GPT-2's `c_attn`, [D, 3D] = [query | key | value] along the output axis.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np

from free_jax.checkpoints.hf import resolve_hf_path
from free_jax.checkpoints.naming import flatten, to_params
from free_jax.checkpoints.safetensors_io import read_config_json, read_hf_tensors
from free_jax.models.lm import lm_param_shapes
from free_jax.models.lm_config import LMConfig

# Non-parameter buffers some checkpoints store (causal masks, rotary tables).
_BUFFERS = re.compile(r"\.(attn|attention)\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class Link:
    """One checkpoint tensor and the free_jax parameter(s) it holds (see the module docstring)."""

    hf: str
    free: tuple[str, ...]
    kind: str


# ================================================================== name tables


def hf_links(config: LMConfig) -> list[Link]:
    """Every tensor a checkpoint of `config` holds, in order.

    >>> from free_jax.models.lm_config import lm_preset
    >>> links = {link.hf: link for link in hf_links(lm_preset("tiny-neox"))}
    >>> links["gpt_neox.layers.0.attention.query_key_value.weight"]
    Link(hf='gpt_neox.layers.0.attention.query_key_value.weight', free=('decoder/layers_0/attention/query/kernel', 'decoder/layers_0/attention/key/kernel', 'decoder/layers_0/attention/value/kernel'), kind='neox_qkv')
    """
    c = config
    links: list[Link] = []
    add = lambda hf, free, kind="copy": links.append(
        Link(hf, (free,) if isinstance(free, str) else tuple(free), kind)
    )

    def norm(hf: str, free: str) -> None:
        add(f"{hf}.weight", f"{free}/scale")
        if c.norm == "layer":
            add(f"{hf}.bias", f"{free}/bias")

    def dense(hf: str, free: str, bias: bool, kind: str = "linear") -> None:
        add(f"{hf}.weight", f"{free}/kernel", kind)
        if bias:
            add(f"{hf}.bias", f"{free}/bias")

    def qkv(hf: str, kind: str) -> None:
        names = [f"{{}}/attention/{n}/{{}}" for n in ("query", "key", "value")]
        add(f"{hf}.weight", [n.format(layer, "kernel") for n in names], kind)
        if c.attention_bias:
            add(f"{hf}.bias", [n.format(layer, "bias") for n in names], kind)

    head = dict(llama="lm_head", gpt_neox="embed_out", gpt2="lm_head")[c.family]
    embed = dict(llama="model.embed_tokens", gpt_neox="gpt_neox.embed_in", gpt2="transformer.wte")[
        c.family
    ]
    add(f"{embed}.weight", "token_embedder/embedding")
    if c.positions == "learned":
        add("transformer.wpe.weight", "position_embedder/embedding")
    final = dict(llama="model.norm", gpt_neox="gpt_neox.final_layer_norm", gpt2="transformer.ln_f")
    norm(final[c.family], "decoder/final_norm")
    if not c.tie_word_embeddings:
        add(f"{head}.weight", "decoder/logits_dense/kernel", "linear")
    mlp = ("wi_0", "wi_1", "wo") if c.gated_mlp else ("wi", "wo")
    for i in range(c.num_layers):
        layer = f"decoder/layers_{i}"
        if c.family == "llama":
            p = f"model.layers.{i}"
            norm(f"{p}.input_layernorm", f"{layer}/pre_attention_norm")
            norm(f"{p}.post_attention_layernorm", f"{layer}/pre_mlp_norm")
            for hf, free in zip("qkvo", ("query", "key", "value", "out")):
                dense(f"{p}.self_attn.{hf}_proj", f"{layer}/attention/{free}", c.attention_bias)
            hf_mlp = (
                ("gate_proj", "up_proj", "down_proj") if c.gated_mlp else ("up_proj", "down_proj")
            )
            for hf, free in zip(hf_mlp, mlp):
                dense(f"{p}.mlp.{hf}", f"{layer}/mlp/{free}", c.mlp_bias)
        elif c.family == "gpt_neox":
            p = f"gpt_neox.layers.{i}"
            norm(f"{p}.input_layernorm", f"{layer}/pre_attention_norm")
            norm(f"{p}.post_attention_layernorm", f"{layer}/pre_mlp_norm")
            qkv(f"{p}.attention.query_key_value", "neox_qkv")
            dense(f"{p}.attention.dense", f"{layer}/attention/out", c.attention_bias)
            dense(f"{p}.mlp.dense_h_to_4h", f"{layer}/mlp/{mlp[0]}", c.mlp_bias)
            dense(f"{p}.mlp.dense_4h_to_h", f"{layer}/mlp/wo", c.mlp_bias)
        else:
            p = f"transformer.h.{i}"
            norm(f"{p}.ln_1", f"{layer}/pre_attention_norm")
            norm(f"{p}.ln_2", f"{layer}/pre_mlp_norm")
            qkv(f"{p}.attn.c_attn", "gpt2_qkv")
            dense(f"{p}.attn.c_proj", f"{layer}/attention/out", c.attention_bias, "conv1d")
            dense(f"{p}.mlp.c_fc", f"{layer}/mlp/{mlp[0]}", c.mlp_bias, "conv1d")
            dense(f"{p}.mlp.c_proj", f"{layer}/mlp/wo", c.mlp_bias, "conv1d")
    return links


def _hf_shape(link: Link, free_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The checkpoint shape a link must have, given its free_jax parameters' shapes."""
    first = free_shapes[0]
    if link.kind == "linear":
        return first[::-1]
    if link.kind in ("neox_qkv", "gpt2_qkv"):
        total = sum(s[-1] for s in free_shapes)
        if len(first) == 1:
            return (total,)
        return (total, first[0]) if link.kind == "neox_qkv" else (first[0], total)
    return first


def _to_free(link: Link, tensor: np.ndarray, c: LMConfig) -> list[np.ndarray]:
    if link.kind == "linear":
        return [tensor.T]
    if link.kind == "gpt2_qkv":
        return np.split(tensor, 3, axis=-1)
    if link.kind == "neox_qkv":
        h, k = c.num_heads, c.head_dim
        per_head = tensor.reshape(h, 3, k, *tensor.shape[1:])
        parts = [per_head[:, j].reshape(h * k, *tensor.shape[1:]) for j in range(3)]
        return [part.T for part in parts]  # weights [H*K, D] -> [D, H*K]; biases unchanged
    return [tensor]  # copy, conv1d


def _to_hf(link: Link, arrays: list[np.ndarray], c: LMConfig) -> np.ndarray:
    if link.kind == "linear":
        return arrays[0].T
    if link.kind == "gpt2_qkv":
        return np.concatenate(arrays, axis=-1)
    if link.kind == "neox_qkv":
        h, k = c.num_heads, c.head_dim
        rows = [a.T.reshape(h, k, *a.shape[:-1]) for a in arrays]  # [H, K(, D)] each
        return np.stack(rows, axis=1).reshape(3 * h * k, *arrays[0].shape[:-1])
    return arrays[0]


def _canonical_name(name: str, family: str) -> str:
    """Alternative spellings of the same tensor."""
    if family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return f"transformer.{name}"  # GPT2Model checkpoints have no prefix
    if family == "gpt_neox" and name == "lm_head.weight":
        return "embed_out.weight"  # transformers >= 5 names the module lm_head in memory
    return name


# ================================================================== conversion


def hf_to_flat(
    tensors: dict[str, np.ndarray], config: LMConfig, sources: dict[str, str] | None = None,
    default_source: str = "checkpoint",
) -> dict[str, np.ndarray]:  # fmt: skip
    """Checkpoint tensors -> flat free_jax params ('decoder/layers_0/...'), checking every shape.

    Errors name the checkpoint file, the tensor and the parameter(s); a wrong shape names both.
    """
    sources = sources or {}
    where = lambda name: sources.get(name, default_source)
    by_name = {_canonical_name(n, config.family): (n, v) for n, v in tensors.items()}
    expected = {k: tuple(v.shape) for k, v in flatten(lm_param_shapes(config)).items()}
    flat, used = {}, set()
    for link in hf_links(config):
        if link.hf not in by_name:
            raise ValueError(
                f"{default_source}: checkpoint is missing tensor {link.hf!r} "
                f"(free_jax parameter(s) {list(link.free)})"
            )
        original, tensor = by_name[link.hf]
        used.add(link.hf)
        want = _hf_shape(link, [expected[f] for f in link.free])
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"{where(original)}: tensor {original!r} (free_jax parameter(s) "
                f"{list(link.free)}) has shape {tuple(tensor.shape)}, but the config expects {want}"
            )
        flat.update(zip(link.free, _to_free(link, np.asarray(tensor), config)))
    head = "lm_head.weight" if config.family != "gpt_neox" else "embed_out.weight"
    unused = sorted(
        by_name[n][0]
        for n in set(by_name) - used
        if not _BUFFERS.search(n) and not (config.tie_word_embeddings and n == head)
    )
    if unused:
        raise ValueError(
            f"{default_source}: checkpoint has {len(unused)} tensor(s) a {config.family} model with "
            f"this config does not use, e.g. {unused[:5]}"
        )
    check_lm_params(flat, config, default_source)
    return flat


def check_lm_params(flat: dict[str, np.ndarray], config: LMConfig, source: str) -> None:
    """Every parameter `DecoderLM(config)` needs, with its exact shape, and nothing else."""
    expected = {k: tuple(v.shape) for k, v in flatten(lm_param_shapes(config)).items()}
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} parameter(s), e.g. {missing[:5]}")
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        raise ValueError(
            f"{source}: {len(unexpected)} unexpected parameter(s), e.g. {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if tuple(np.shape(flat[name])) != shape:
            raise ValueError(
                f"{source}: parameter {name!r} has shape {tuple(np.shape(flat[name]))}, but the "
                f"config expects {shape}"
            )


def flat_to_hf(params, config: LMConfig) -> dict[str, np.ndarray]:
    """free_jax params -> checkpoint tensors (float32, contiguous, no aliases)."""
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(params).items()}
    check_lm_params(flat, config, "params")
    return {
        link.hf: np.ascontiguousarray(_to_hf(link, [flat[f] for f in link.free], config))
        for link in hf_links(config)
    }


def load_hf_lm_config(directory: Path) -> LMConfig:
    raw, path = read_config_json(directory)
    return LMConfig.from_hf_dict(raw, source=str(path))


def load_hf_lm(path_or_name: str | os.PathLike, **config_overrides) -> tuple[LMConfig, dict]:
    """Loads a Hugging Face llama / gpt_neox / gpt2 directory (or hub name) -> (LMConfig, params).

    `config_overrides` replace config fields, e.g. `shallow_exit_layer=4, dtype="bfloat16"`.
    """
    directory = resolve_hf_path(str(path_or_name))
    config = load_hf_lm_config(directory)
    if config_overrides:
        config = config.replace(**config_overrides)
    tensors, sources, main = read_hf_tensors(directory)
    flat = hf_to_flat(tensors, config, sources, default_source=main)
    return config, to_params(flat, config)


def save_hf_lm(directory: str | os.PathLike, config: LMConfig, params) -> Path:
    """Writes `config.json` + `model.safetensors` that transformers' AutoModelForCausalLM loads.

    A tied head is not written (transformers re-ties it from the embedding), so no two entries
    share a buffer, which safetensors refuses.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    hf_config = config.to_hf_dict()  # raises before writing when transformers cannot express it
    tensors = flat_to_hf(params, config)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
