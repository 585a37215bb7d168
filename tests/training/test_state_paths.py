"""Checkpoints under a relative MODEL_DIR (the demo recipe's default) save and restore.

Regression: orbax rejects relative paths, and with async saving the error surfaced only at the
next save, after the run had gone on for hundreds of steps without a checkpoint.
"""

import jax.numpy as jnp
import numpy as np

from free_jax.training.state import (
    CheckpointConfig,
    TrainState,
    make_manager,
    restore_checkpoint,
    save_checkpoint,
)


def test_relative_model_dir_saves_and_restores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = TrainState(
        step=jnp.asarray(3, jnp.int32),
        params={"w": jnp.arange(4.0)},
        opt_state={"m": jnp.ones(4)},
        rng=jnp.zeros(2, jnp.uint32),
    )
    config = CheckpointConfig(every=1, keep=1, keep_best=0, async_save=True)
    manager = make_manager("runs/rel", config)
    assert str(manager.directory).startswith(str(tmp_path))
    save_checkpoint(manager, state, {"position": 7})
    manager.wait_until_finished()
    manager.close()
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "3").is_dir()
    restored, data = restore_checkpoint(make_manager("runs/rel", config), state)
    np.testing.assert_array_equal(restored.params["w"], np.arange(4.0))
    assert data == {"position": 7}
