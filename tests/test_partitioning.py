"""Partitioning: logical axes and rule tables (in process, on an abstract 2x4 mesh), and on 8
simulated CPU devices (a subprocess, since the device count is fixed when JAX starts) a sharded
training step and sharded FREE decoding that equal their single-device counterparts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from free_jax import partitioning as P
from free_jax.models import param_shapes, preset
from free_jax.training.lora import LoraConfig, init_lora
from free_jax.training.optim import OptimizerConfig, make_optimizer

REPO = Path(__file__).resolve().parent.parent
MESH = AbstractMesh((2, 4), ("data", "model"))


def _spec(shardings, path: str) -> PartitionSpec:
    node = shardings
    for key in path.split("/"):
        node = node[key]
    return node.spec


# ---------------------------------------------------------------------------------------------
# Logical axes and rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t5-small", "flan-t5-small"])
def test_every_weight_matrix_has_named_axes(name):
    """No kernel or embedding of a real T5 falls through to "unknown, replicated"."""
    shapes = param_shapes(preset(name))
    flat = jax.tree_util.tree_flatten_with_path(P.param_logical_axes(shapes), is_leaf=_is_axes)[0]
    assert flat
    for path, axes in flat:
        name_ = jax.tree_util.keystr(path)
        assert None not in axes, name_


def _is_axes(x):
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def test_rule_tables_on_a_2x4_mesh():
    shapes = param_shapes(preset("t5-small"))  # 8 heads x 64, d_ff 2048, vocabulary 32128
    dp = P.param_shardings(shapes, MESH, P.RULES["data_parallel"])
    mp = P.param_shardings(shapes, MESH, P.RULES["model_parallel"])
    fsdp = P.param_shardings(shapes, MESH, P.RULES["fsdp"])
    assert all(s.spec == PartitionSpec(None, None) or s.spec == PartitionSpec(None)
               for s in jax.tree.leaves(dp))  # fmt: skip
    q = "encoder/layers_0/attention/query/kernel"
    o = "decoder/layers_1/self_attention/out/kernel"
    wi, wo = "decoder/layers_0/mlp/wi/kernel", "encoder/layers_3/mlp/wo/kernel"
    emb, rel = "token_embedder/embedding", "encoder/relpos_bias/rel_embedding"
    assert _spec(mp, q) == PartitionSpec(None, "model")
    assert _spec(mp, o) == PartitionSpec("model", None)
    assert _spec(mp, wi) == PartitionSpec(None, "model")
    assert _spec(mp, wo) == PartitionSpec("model", None)
    assert _spec(mp, emb) == PartitionSpec("model", None)
    assert _spec(mp, rel) == PartitionSpec("model", None)
    assert _spec(mp, "encoder/encoder_norm/scale") == PartitionSpec(None)
    assert _spec(fsdp, q) == PartitionSpec("data", "model")
    assert _spec(fsdp, wo) == PartitionSpec("model", "data")
    assert _spec(fsdp, emb) == PartitionSpec("model", "data")
    assert _spec(fsdp, "encoder/encoder_norm/scale") == PartitionSpec("data")


def test_a_split_that_does_not_divide_stays_replicated():
    shapes = param_shapes(preset("tiny"))  # 3 heads: not a multiple of model=4
    mp = P.param_shardings(shapes, MESH, P.RULES["model_parallel"])
    assert _spec(mp, "decoder/relpos_bias/rel_embedding") == PartitionSpec(None, None)
    assert _spec(mp, "decoder/layers_0/mlp/wi_0/kernel") == PartitionSpec(None, "model")  # 64


def test_batch_axes_use_replica_and_data():
    mesh3 = AbstractMesh((2, 2, 2), ("replica", "data", "model"))
    assert P.batch_sharding(MESH, P.RULES["fsdp"]).spec == PartitionSpec("data", None)
    assert P.batch_sharding(mesh3, P.RULES["fsdp"]).spec == PartitionSpec(("replica", "data"), None)
    # FSDP's embed axis is 'data'; a mesh axis is used once per array, so the batch keeps it.
    spec = P.logical_to_spec(("batch", "embed"), P.RULES["fsdp"], MESH)
    assert spec == PartitionSpec("data", None)


def test_lora_factors_follow_their_kernel():
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(preset("tiny")))
    lora = init_lora(params, LoraConfig(rank=2), jax.random.PRNGKey(0))
    sh = P.param_shardings(lora, MESH, P.RULES["fsdp"])
    # query kernel is (embed, joined_kv): A [D, r] keeps embed, B [r, H*K] keeps joined_kv.
    a = _spec(sh, "decoder/layers_0/self_attention/query/lora_a")
    b = _spec(sh, "decoder/layers_0/self_attention/query/lora_b")
    assert a == PartitionSpec("data", None) and b == PartitionSpec(None, "model")


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_leaves_mirror_their_parameter(name):
    params = param_shapes(preset("tiny"))
    tx, _ = make_optimizer(OptimizerConfig(name=name, grad_accum_steps=2), 10)
    opt_state = jax.eval_shape(tx.init, params)
    p_sh = P.param_shardings(params, MESH, P.RULES["fsdp"])
    o_sh = P.mirrored_shardings(opt_state, params, p_sh, MESH)
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    sh_leaves = jax.tree.leaves(o_sh)
    wi = _spec(p_sh, "decoder/layers_0/mlp/wi_0/kernel")
    assert wi == PartitionSpec("data", "model")
    hits = 0
    for (path, leaf), sharding in zip(leaves, sh_leaves):
        name_ = jax.tree_util.keystr(path)
        if name_.endswith("['decoder']['layers_0']['mlp']['wi_0']['kernel']") and leaf.shape == (
            32,
            64,
        ):
            assert sharding.spec == wi, name_
            hits += 1
        elif leaf.ndim == 0 or "v_row" in name_ or "v_col" in name_:
            assert sharding.spec == PartitionSpec(), name_
    # AdamW: mu, nu and MultiSteps' accumulated gradient; Adafactor: its unfactored update state.
    assert hits >= (3 if name == "adamw" else 1)


def test_partition_config_validates():
    assert P.PartitionConfig().rules == P.RULES["data_parallel"]
    with pytest.raises(ValueError, match="strategy"):
        P.PartitionConfig(strategy="pipeline")
    with pytest.raises(ValueError, match="mesh sizes"):
        P.PartitionConfig(model=0)


def test_mesh_and_batch_errors_are_plain():
    with pytest.raises(ValueError, match="needs 8 devices"):
        P.make_mesh(data=2, model=4, devices=jax.devices()[:1])
    mesh = P.make_mesh(devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    assert P.process_batch_shard(P.batch_sharding(mesh, P.RULES["fsdp"]), 6) == (0, 1)
    fake = jax.sharding.NamedSharding(MESH, PartitionSpec("data"))
    with pytest.raises(ValueError, match="not a multiple of the 2 ways"):
        P.process_batch_shard(fake, 7)


def test_distributed_is_off_without_its_environment(monkeypatch):
    for key in ("FREE_JAX_COORDINATOR", "FREE_JAX_DISTRIBUTED", "FREE_JAX_NUM_PROCESSES"):
        monkeypatch.delenv(key, raising=False)
    assert P.maybe_initialize_distributed() is False
    monkeypatch.setenv("FREE_JAX_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("FREE_JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="FREE_JAX_PROCESS_ID"):
        P.maybe_initialize_distributed()


def test_distributed_auto_lets_jax_find_the_pod(monkeypatch):
    # What the XManager launcher sets on TPU pods: JAX reads the peers from the slice itself.
    for key in ("FREE_JAX_COORDINATOR", "FREE_JAX_NUM_PROCESSES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FREE_JAX_DISTRIBUTED", "auto")
    calls = []
    monkeypatch.setattr(P.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert P.maybe_initialize_distributed() is True
    assert calls == [((), {})]


# ---------------------------------------------------------------------------------------------
# 8 simulated devices: sharded == single-device
# ---------------------------------------------------------------------------------------------

EIGHT_DEVICES = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from free_jax import partitioning as P
from free_jax.decoding import decode
from free_jax.models import init_params, preset
from free_jax.training.losses import LossConfig
from free_jax.training.optim import OptimizerConfig, make_optimizer
from free_jax.training.state import TrainState, state_shardings
from free_jax.training.trainer import make_train_step

assert jax.device_count() == 8, jax.devices()
config = preset("tiny").replace(dropout_rate=0.1)  # dropout bits must not depend on the layout
params = jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
B, S, T = 8, 12, 10
dec = rng.integers(2, config.vocab_size, size=(B, T)).astype(np.int32)
lengths = rng.integers(4, T + 1, size=(B, 1))
batch = {
    "encoder_input_tokens": rng.integers(2, config.vocab_size, size=(B, S)).astype(np.int32),
    "decoder_input_tokens": np.concatenate([np.zeros((B, 1), np.int32), dec[:, :-1]], 1),
    "decoder_target_tokens": dec,
    "decoder_loss_weights": (np.arange(T)[None] < lengths).astype(np.float32),
}
# eps=1e-3: AdamW's first update lr*g/(|g|+eps) then moves at most lr/eps per unit of gradient
# error, so reduction-order noise in g stays at rounding level in the parameters. (With eps=1e-8
# a gradient that cancels to ~1e-8 could flip its update by 2*lr.)
opt = OptimizerConfig(name="adamw", learning_rate=1e-2, schedule="constant", eps=1e-3)
tx, schedule = make_optimizer(opt, 10)
loss = LossConfig(kind="free")

def fresh():
    p = jax.tree.map(jnp.copy, params)  # the step donates its input state
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      rng=jax.random.PRNGKey(1))

ref_state, ref_metrics = make_train_step(config, loss, tx, schedule, opt, None)(fresh(), batch)
ref_params = jax.device_get(ref_state.params)
out = {"train": {}}
for strategy in ("data_parallel", "model_parallel", "fsdp"):
    mesh = P.make_mesh(data=2, model=4)
    rules = P.RULES[strategy]
    state = fresh()
    shardings = state_shardings(state, mesh, rules)
    state = P.put_global(state, shardings)
    bs = P.batch_sharding(mesh, rules)
    step = make_train_step(config, loss, tx, schedule, opt, None, shardings=shardings,
                           batch_sharding=bs)
    before = state.params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    new, metrics = step(state, P.global_batch(batch, bs, B))
    wi = new.params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    mu = new.opt_state[1][0].mu["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    errors = [float(np.max(np.abs(np.asarray(a) - b)))
              for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref_params))]
    out["train"][strategy] = {
        "max_abs_error": max(errors),
        "loss": float(metrics["loss"]), "ref_loss": float(ref_metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]), "ref_grad_norm": float(ref_metrics["grad_norm"]),
        "donated": before.is_deleted(),
        "wi_spec": list(wi.sharding.spec), "mu_spec": list(mu.sharding.spec),
        "count_spec": list(new.opt_state[1][0].count.sharding.spec),
        "wi_shard_shape": list(wi.addressable_shards[0].data.shape),
    }

# FREE decoding with the trained parameters: first unsharded, at a threshold halfway between two
# neighbouring confidences near the median (so some tokens exit at the shallow layer, others run
# deep, and no confidence sits on the threshold), then with fsdp-sharded parameters and batch.
enc = batch["encoder_input_tokens"].copy()
enc[3, 7:] = 0
enc[5, 4:] = 0
probe = decode(config, ref_params, jnp.asarray(enc), method="free", max_decode_len=8,
               threshold=0.0)
conf = np.sort(np.asarray(probe.confidence).ravel())
mid = len(conf) // 2
gap = int(np.argmax(np.diff(conf[mid - 8 : mid + 8]))) + mid - 8
threshold = float((conf[gap] + conf[gap + 1]) / 2)
full = decode(config, ref_params, jnp.asarray(enc), method="free", max_decode_len=8,
              threshold=threshold)
mesh = P.make_mesh(data=2, model=4)
sharded_params = P.put_global(ref_params, P.param_shardings(ref_params, mesh, P.RULES["fsdp"]))
sharded_enc = jax.device_put(enc, P.batch_sharding(mesh, P.RULES["fsdp"]))
sharded = decode(config, sharded_params, sharded_enc, method="free", max_decode_len=8,
                 threshold=threshold)
out["decode"] = {
    "threshold": threshold,
    "margin": float(np.min(np.abs(np.asarray(full.confidence) - threshold))),
    "tokens": np.asarray(full.tokens).tolist(),
    "sharded_tokens": np.asarray(sharded.tokens).tolist(),
    "exit_layer": np.asarray(full.exit_layer).tolist(),
    "sharded_exit_layer": np.asarray(sharded.exit_layer).tolist(),
    "confidence": np.asarray(full.confidence).tolist(),
    "sharded_confidence": np.asarray(sharded.confidence).tolist(),
    "shallow": config.shallow_layer, "deep": config.num_decoder_layers,
    "param_devices": len(jax.tree.leaves(sharded_params)[0].sharding.device_set),
}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices():
    """The script's results (one subprocess for every test below: ~55 s of CPU, mostly compiling
    the single-device step, three sharded steps and two FREE decoders)."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        # Simulated devices; no LLVM optimisation (the tiny programs run for milliseconds and
        # compiling dominates). Both the sharded and the single-device programs use these flags.
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES], env=env, cwd=REPO, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("strategy", ["data_parallel", "model_parallel", "fsdp"])
def test_sharded_train_step_equals_single_device(eight_devices, strategy):
    """One step on a 2x4 mesh gives the single-device parameters to 1e-6 (absolute).

    Sharding changes only the order of float32 reductions (per-shard partial sums, then an
    all-reduce), which moves a sum by a few units in the last place; the parameters are O(1), where
    one unit is 1.2e-7, and the optimiser (AdamW with eps=1e-3, see the script) does not magnify
    it. Seen: 2.4e-7, i.e. two units in the last place.
    """
    r = eight_devices["train"][strategy]
    assert r["max_abs_error"] <= 1e-6
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-5)
    assert r["donated"]  # the input state was donated to the step
    assert r["count_spec"] == []  # replicated
    want = {
        "data_parallel": ([None, None], [32, 64]),
        "model_parallel": ([None, "model"], [32, 16]),
        "fsdp": (["data", "model"], [16, 16]),
    }[strategy]
    assert (r["wi_spec"], r["wi_shard_shape"]) == want
    assert r["mu_spec"] == r["wi_spec"]  # Adam's moments live where their parameter lives


def test_sharded_free_decoding_equals_unsharded(eight_devices):
    r = eight_devices["decode"]
    assert r["param_devices"] == 8
    assert r["margin"] > 1e-5  # no confidence sits on the threshold: equality is not luck
    exits = np.asarray(r["exit_layer"])
    assert (exits == r["shallow"]).any() and (exits == r["deep"]).any()
    assert r["sharded_tokens"] == r["tokens"]
    assert r["sharded_exit_layer"] == r["exit_layer"]
    np.testing.assert_allclose(r["sharded_confidence"], r["confidence"], rtol=1e-5, atol=1e-6)
