"""Two processes on 127.0.0.1 joined by `jax.distributed` (gloo collectives on CPU).

Quick: the pieces the trainer uses (mesh over both processes, each process reading its slice of
the global batch, FSDP-sharded state, jitted step, orbax save) on a small linear model: the pair
ends with identical parameters, equal to one process training on the whole batches, and its
sharded checkpoint restores in this single process.

Slow: the same through `python -m free_jax.train`'s `main` with the smoke T5 and FSDP across the
processes: identical parameters, only process 0 writes logs and run files, per-process data
positions in the checkpoint, and `load_trained` in a single process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

from free_jax.training import load_trained, read_metrics
from free_jax.training import state as state_lib

REPO = Path(__file__).resolve().parent.parent
STEPS = 3


def _env(port: int | None, pid: int | None) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS="--xla_backend_optimization_level=0",  # compiling dominates tiny programs
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    for key in ("FREE_JAX_COORDINATOR", "FREE_JAX_NUM_PROCESSES", "FREE_JAX_PROCESS_ID"):
        env.pop(key, None)
    if port is not None:
        env.update(
            FREE_JAX_COORDINATOR=f"127.0.0.1:{port}",
            FREE_JAX_NUM_PROCESSES="2",
            FREE_JAX_PROCESS_ID=str(pid),
            FREE_JAX_CPU_COLLECTIVES="gloo",
            FREE_JAX_INIT_TIMEOUT="120",  # a process that never meets its peer gives up
        )
    return env


def _run(commands: list[tuple[list[str], dict]], timeout: int = 600) -> list[tuple[str, str]]:
    """Starts every command at once, waits (bounded) for all, and fails with their logs."""
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for cmd, env in commands
    ]
    logs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            logs.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:  # only after a timeout or an error above: never leave one running
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for code, stdout, stderr in logs:
        if code != 0:
            raise AssertionError(f"exit {code}\n{stdout[-3000:]}\n{stderr[-5000:]}")
    return [(stdout, stderr) for _, stdout, stderr in logs]


def _pair(code: str, *args: str) -> list[tuple[str, str]]:
    port = portpicker.pick_unused_port()
    return _run([([sys.executable, "-c", code, *args], _env(port, pid)) for pid in range(2)])


# ---------------------------------------------------------------------------------------------
# Quick: the trainer's pieces on a linear model
# ---------------------------------------------------------------------------------------------

# argv: OUT "pair" | "single". Trains y = x @ W for STEPS steps with Adam on global batches of 4
# rows, W FSDP-sharded over the processes, saves a checkpoint, and writes the final W and the last
# global batch, both gathered whole, to OUT/<mode>_<process>.npz.
PIECES = r"""
import sys
import numpy as np
from free_jax import partitioning as P

out, mode = sys.argv[1], sys.argv[2]
assert P.maybe_initialize_distributed() == (mode == "pair")
import jax, jax.numpy as jnp, optax
from jax.experimental import multihost_utils
from free_jax.training import state as S


mesh = P.PartitionConfig(strategy="fsdp").make_mesh()
assert dict(mesh.shape) == {"data": jax.process_count(), "model": 1}
rules = P.RULES["fsdp"]
bs = P.batch_sharding(mesh, rules)
index, count = P.process_batch_shard(bs, 4)
assert (index, count) == (jax.process_index(), jax.process_count())
rows = slice(index * 4 // count, (index + 1) * 4 // count)  # this process's rows of each batch

data = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
w_true = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
# Named like a T5 weight ("mlp", "embed"), so fsdp splits its embed (last) axis over 'data'.
params = {"mlp": {"wo": {"kernel": np.zeros((8, 4), np.float32)}}}
tx = optax.adam(0.1)
state = S.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))
shardings = S.state_shardings(state, mesh, rules)
state = P.put_global(state, shardings)

def loss_fn(p, x):
    return jnp.mean((x @ p["mlp"]["wo"]["kernel"] - x @ w_true) ** 2)

def step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch["x"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), loss

step = jax.jit(step, in_shardings=(shardings, bs), out_shardings=(shardings, P.replicated(mesh)),
               donate_argnums=(0,))
for s in range(3):
    batch = P.global_batch({"x": data[s, rows]}, bs, 4)
    state, loss = step(state, batch)

kernel = state.params["mlp"]["wo"]["kernel"]
assert kernel.sharding.spec == jax.sharding.PartitionSpec("model", "data"), kernel.sharding.spec
manager = S.make_manager(f"{out}/{mode}", S.CheckpointConfig(keep_best=0))
S.save_checkpoint(manager, state, {"rows": [rows.start, rows.stop]})
manager.wait_until_finished()
manager.close()
gather = lambda x: multihost_utils.process_allgather(x, tiled=True) if mode == "pair" else x
np.savez(f"{out}/{mode}_{jax.process_index()}.npz", kernel=np.asarray(gather(kernel)),
         batch=np.asarray(gather(batch["x"])), loss=np.asarray(loss))
"""


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    out = tmp_path_factory.mktemp("pieces")
    port = portpicker.pick_unused_port()
    single = ([sys.executable, "-c", PIECES, str(out), "single"], _env(None, None))
    pair = [([sys.executable, "-c", PIECES, str(out), "pair"], _env(port, p)) for p in range(2)]
    _run([single, *pair], timeout=300)
    return out


def test_two_processes_train_like_one(pieces):
    a, b, one = (np.load(pieces / f) for f in ("pair_0.npz", "pair_1.npz", "single_0.npz"))
    np.testing.assert_array_equal(a["kernel"], b["kernel"])  # identical on both processes
    # The global batch is the whole batch, rows in order, assembled from the two halves.
    data = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    np.testing.assert_array_equal(a["batch"], data[-1])
    np.testing.assert_array_equal(one["batch"], data[-1])
    # Against one process on the same batches: only the order of float32 sums differs (gradient
    # partial sums per process, then an all-reduce), a few units in the last place of W ~ 0.3.
    np.testing.assert_allclose(a["kernel"], one["kernel"], rtol=0, atol=1e-6)
    assert abs(float(a["loss"]) - float(one["loss"])) <= 1e-5 * abs(float(one["loss"]))


def test_sharded_checkpoint_of_two_processes_restores_in_one(pieces):
    step_dir = pieces / "pair" / "checkpoints" / str(STEPS)
    assert {p.name for p in (step_dir / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }
    # Each process saved its own data position.
    for i, rows in enumerate(([0, 2], [2, 4])):
        saved = json.loads((step_dir / "data" / f"process_{i}-of-2.json").read_text())
        assert saved == {"rows": rows}
    manager = state_lib.make_manager(pieces / "pair", state_lib.CheckpointConfig(keep_best=0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = manager.item_metadata(STEPS)["state"].tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    state = manager.restore(
        STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    ).state
    manager.close()
    assert int(state["step"]) == STEPS
    kernel = np.load(pieces / "pair_0.npz")["kernel"]
    np.testing.assert_array_equal(np.asarray(state["params"]["mlp"]["wo"]["kernel"]), kernel)


# ---------------------------------------------------------------------------------------------
# Slow: the trainer end to end
# ---------------------------------------------------------------------------------------------

# Runs `free_jax.train.main` and then writes the final parameters, gathered whole from both
# processes, to OUT/params_<process>.npz. The step function is wrapped only to keep the last state.
RUNNER = r"""
import sys
import numpy as np
from free_jax.training import trainer

real, last = trainer.make_train_step, {}

def keep_last_state(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def step(state, batch):
        state, metrics = step_fn(state, batch)
        last["state"] = state
        return state, metrics

    return step

trainer.make_train_step = keep_last_state
from free_jax import train as entry

entry.main(sys.argv[2:])
import jax
from jax.experimental import multihost_utils

assert jax.process_count() == 2
params = multihost_utils.process_allgather(last["state"].params, tiled=True)
flat = jax.tree_util.tree_flatten_with_path(params)[0]
np.savez(f"{sys.argv[1]}/params_{jax.process_index()}.npz",
         **{jax.tree_util.keystr(path): np.asarray(x) for path, x in flat})
"""


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """~50 s of CPU: each process compiles the smoke model's step, validation and decoder."""
    root = tmp_path_factory.mktemp("multihost")
    model_dir, out = root / "model", root / "out"
    out.mkdir()
    args = [
        f"--gin_file={REPO / 'gin_configs/runs/sharded_smoke_cpu.gin'}",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.DATA_DIR='{root / 'tfds'}'",  # process 0 prepares it, process 1 waits
        f"--gin.TRAIN_STEPS={STEPS}",
        "--gin.CHECKPOINT_EVERY=2",
        "--gin.PARTITION='fsdp'",  # every weight split over the two processes' devices
        "--gin.DataConfig.eval_examples=4",
    ]
    logs = _pair(RUNNER, str(out), *args)
    return model_dir, out, logs


@pytest.mark.slow
def test_trainer_processes_end_with_identical_parameters(two_process_run):
    _, out, _ = two_process_run
    a, b = np.load(out / "params_0.npz"), np.load(out / "params_1.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 50
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_trainer_checkpoint_restores_in_one_process(two_process_run):
    model_dir, out, _ = two_process_run
    config, params, tokenizer_path = load_trained(model_dir)
    assert config.vocab_size == 128 and Path(tokenizer_path).exists()
    saved = np.load(out / "params_0.npz")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(flat) == len(saved.files)
    for path, x in flat:
        np.testing.assert_array_equal(np.asarray(x), saved[jax.tree_util.keystr(path)])
    step_dir = model_dir / "checkpoints" / str(STEPS)
    assert len(list((step_dir / "state").glob("ocdbt.process_*"))) == 2
    positions = [
        json.loads((step_dir / "data" / f"process_{i}-of-2.json").read_text()) for i in range(2)
    ]
    assert all(p["counters"]["num_batches"] == STEPS for p in positions)
    assert positions[0] != positions[1]  # each read its own slice of the data


@pytest.mark.slow
def test_trainer_only_process_zero_writes_logs_and_run_files(two_process_run):
    model_dir, _, logs = two_process_run
    records = read_metrics(model_dir, "train")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # once each, not twice
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    (validation,) = read_metrics(model_dir, "validation")
    assert validation["num_examples"] == 4
    assert list((model_dir / "tb").glob("events.out.tfevents.*"))
    assert (model_dir / "config.json").exists() and (model_dir / "run.json").exists()
    (out0, _), (out1, _) = logs
    assert "done: step 3" in out0 and "done" not in out1
