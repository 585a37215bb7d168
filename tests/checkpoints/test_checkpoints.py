"""Checkpoint import/export: T5X layout, sharded safetensors, orbax store, and their error messages."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import serialization

from free_jax.checkpoints import load_hf, load_params, load_t5x, save_hf, save_params, save_t5x
from free_jax.checkpoints.naming import flatten
from free_jax.models import T5, init_params, preset

CONFIG = preset("tiny")


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(3))


def _logits(config, params):
    enc = jnp.array([[5, 6, 7, 1, 0]])
    dec = jnp.array([[0, 9, 4]])
    return T5(config).apply({"params": params}, enc, dec).logits


def _write_t5x_by_hand(directory, params, legacy, bf16_name):
    """T5X's on-disk layout, written independently of free_jax's writer.

    Most parameters go to zarr arrays named `target.<dotted.path>` with relative tensorstore specs in
    the msgpack; the relative-position tables stay inline (T5X inlines small arrays); one kernel is
    stored as bfloat16, as T5X's published checkpoints are.
    """
    import tensorstore as ts

    directory.mkdir(parents=True)
    tree: dict = {}
    for name, value in flatten(params).items():
        value = np.asarray(value)
        if name == bf16_name:
            value = value.astype(ml_dtypes.bfloat16)
        if "relpos_bias" in name:
            leaf = value
        else:
            rel = "target." + name.replace("/", ".")
            meta = {"shape": list(value.shape), "chunks": list(value.shape)}
            meta["dtype"] = "bfloat16" if value.dtype == ml_dtypes.bfloat16 else value.dtype.str
            leaf = {"driver": "zarr", "kvstore": {"driver": "file", "path": rel}, "metadata": meta}
            spec = {**leaf, "kvstore": {"driver": "file", "path": str(directory / rel)}}
            ts.open(spec, create=True).result().write(value).result()
        node = tree
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    state = {"target": tree, "state": {"step": np.int32(7)}}
    if legacy:
        state = {"optimizer": {"target": tree, "state": {"step": np.int32(7)}}}
    (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(state))


@pytest.mark.parametrize("legacy", [False, True])
def test_t5x_import_of_hand_written_layout(tmp_path, params, legacy):
    bf16_name = "decoder/layers_1/mlp/wo/kernel"
    _write_t5x_by_hand(tmp_path / "checkpoint_7", params, legacy, bf16_name)
    config, loaded = load_t5x(tmp_path / "checkpoint_7", shallow_exit_layer=1)
    # max distance and dropout are not stored in T5X checkpoints: they come from the defaults.
    inferred = config.replace(shallow_exit_layer=None, relative_attention_max_distance=20)
    assert inferred.replace(dropout_rate=0.0) == CONFIG
    flat_in, flat_out = flatten(params), flatten(loaded)
    for name, value in flat_in.items():
        want = np.asarray(value)
        if name == bf16_name:
            want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(flat_out[name]), want)


def test_t5x_roundtrip_and_missing_array(tmp_path, params):
    save_t5x(tmp_path / "ckpt", params, step=3)
    config, loaded = load_t5x(tmp_path / "ckpt", config=CONFIG)
    np.testing.assert_array_equal(_logits(config, loaded), _logits(CONFIG, params))
    victim = tmp_path / "ckpt" / "target.decoder.layers_0.mlp.wo.kernel"
    for f in victim.iterdir():
        f.unlink()
    victim.rmdir()
    with pytest.raises(FileNotFoundError, match=r"decoder/layers_0/mlp/wo/kernel.*missing"):
        load_t5x(tmp_path / "ckpt", config=CONFIG)
    with pytest.raises(FileNotFoundError, match="no T5X 'checkpoint' file"):
        load_t5x(tmp_path / "nowhere")


def test_hf_roundtrip_sharded_and_errors(tmp_path, params):
    from safetensors.numpy import load_file, save_file

    save_hf(tmp_path / "hf", CONFIG, params)
    config, loaded = load_hf(str(tmp_path / "hf"))
    np.testing.assert_allclose(_logits(config, loaded), _logits(CONFIG, params), atol=1e-6)

    # Sharded: split the tensors over two files with an index, as large hub checkpoints are.
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    names = sorted(tensors)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(shard_dir / shard))
        weight_map.update({k: shard for k in keys})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, loaded_sharded = load_hf(str(shard_dir))
    np.testing.assert_allclose(_logits(CONFIG, loaded_sharded), _logits(CONFIG, params), atol=1e-6)

    os.remove(shard_dir / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf(str(shard_dir))

    # A shape mismatch names the parameter and both shapes.
    bad = dict(tensors)
    bad["decoder.block.1.layer.2.DenseReluDense.wo.weight"] = np.zeros((5, 5), np.float32)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(bad, str(bad_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"decoder/layers_1/mlp/wo/kernel.*\(5, 5\).*\(64, 32\)"):
        load_hf(str(bad_dir))

    # A partial checkpoint names what is missing.
    partial = {k: v for k, v in tensors.items() if "block.2" not in k}
    save_file(partial, str(bad_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="missing .* parameter"):
        load_hf(str(bad_dir))
    os.remove(bad_dir / "config.json")
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_hf(str(bad_dir))


def test_hub_name_offline_fails_clearly(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not fetch 'google/flan-t5-small'.*no network"):
        load_hf("google/flan-t5-small")


def test_orbax_store_roundtrip_bf16(tmp_path, params):
    save_params(tmp_path / "export", CONFIG, params)
    config, loaded = load_params(tmp_path / "export")
    assert config == CONFIG
    np.testing.assert_array_equal(_logits(config, loaded), _logits(CONFIG, params))
    # Stored in bfloat16 (half the bytes), loaded back in the config's dtype.
    save_params(tmp_path / "export16", CONFIG, params, dtype=ml_dtypes.bfloat16)
    _, loaded16 = load_params(tmp_path / "export16")
    leaf = loaded16["decoder"]["layers_0"]["mlp"]["wo"]["kernel"]
    assert leaf.dtype == jnp.float32
    want = np.asarray(params["decoder"]["layers_0"]["mlp"]["wo"]["kernel"])
    np.testing.assert_array_equal(
        np.asarray(leaf), want.astype(ml_dtypes.bfloat16).astype(np.float32)
    )
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_params(tmp_path)
