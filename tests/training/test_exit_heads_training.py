"""Self-supervised exit heads: the KL loss by hand, training only the heads (the backbone stays
bit-identical), heads that learn on a small model trained here from scratch, and the gin run
(runs/exit_heads.gin) end to end from a free_jax export, its heads file loading back."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import traverse_util

from free_jax.models import init_params, lm_preset, preset
from free_jax.models.exit_heads import init_exit_heads, load_exit_heads
from free_jax.training import (
    LoraConfig,
    LossConfig,
    TrainConfig,
    compute_loss,
    exit_head_validation,
    exit_heads_loss,
    load_trained,
    load_trained_exit_heads,
    read_metrics,
    token_kl,
)
from free_jax.training.optim import OptimizerConfig, make_optimizer
from free_jax.training.state import TrainState, read_saved_state
from free_jax.training.trainer import make_train_step

GIN = REPO / "gin_configs"
HEADS_LOSS = LossConfig(kind="exit_heads")


def _kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


# ============================================================ the loss by hand


def test_token_kl_by_hand():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    teacher, student = jnp.log(p)[None, None], jnp.log(q)[None, None]
    got = token_kl(teacher, student)
    assert got.shape == (1, 1) and got.dtype == jnp.float32
    np.testing.assert_allclose(got[0, 0], _kl(p, q), rtol=1e-5)
    np.testing.assert_allclose(token_kl(teacher, teacher)[0, 0], 0.0, atol=1e-7)
    # Temperature 2: both softened (p ** 1/2, renormalised), the KL scaled by 2 ** 2.
    soft = lambda x: np.sqrt(x) / np.sqrt(x).sum()
    np.testing.assert_allclose(
        token_kl(teacher, student, temperature=2.0)[0, 0], 4 * _kl(soft(p), soft(q)), rtol=1e-5
    )
    # Top-2 teacher renormalised: [0.625, 0.375, 0]; the student stays over all three tokens.
    np.testing.assert_allclose(
        token_kl(teacher, student, top_k=2)[0, 0], _kl([0.625, 0.375, 0.0], q), rtol=1e-5
    )
    # top_k = V is the whole vocabulary.
    np.testing.assert_allclose(token_kl(teacher, student, top_k=3), token_kl(teacher, student))


def test_exit_heads_loss_weights_positions_and_averages_heads():
    rng = np.random.default_rng(0)
    final = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    heads = {1: jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32), 2: final + 0.0}
    weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    total, metrics = exit_heads_loss(final, heads, weights)
    kl_BT = np.asarray(token_kl(final, heads[1]))
    want_1 = (kl_BT[0, 0] + kl_BT[0, 1] + kl_BT[1, 0]) / 3  # padding positions never count
    np.testing.assert_allclose(metrics["kl_head1"], want_1, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_head2"], 0.0, atol=1e-6)
    np.testing.assert_allclose(total, want_1 / 2, rtol=1e-5)  # the mean over heads
    assert float(metrics["agree_head2"]) == 1.0 and float(metrics["loss"]) == float(total)
    argmax_agree = np.argmax(heads[1], -1) == np.argmax(final, -1)
    want_agree = (argmax_agree[0, 0] + argmax_agree[0, 1] + argmax_agree[1, 0]) / 3
    np.testing.assert_allclose(metrics["agree_head1"], want_agree)


def test_config_checks():
    with pytest.raises(ValueError, match="go together"):
        TrainConfig(model_dir="x", train_steps=1, exit_heads=2)
    with pytest.raises(ValueError, match="go together"):
        TrainConfig(model_dir="x", train_steps=1, loss=HEADS_LOSS)
    with pytest.raises(ValueError, match="frozen backbone"):
        TrainConfig(model_dir="x", train_steps=1, loss=HEADS_LOSS, exit_heads=2, lora=LoraConfig())
    assert TrainConfig(model_dir="x", train_steps=1, loss=HEADS_LOSS, exit_heads=[3, 1]).exit_heads == (3, 1)  # fmt: skip
    with pytest.raises(ValueError, match="temperature"):
        LossConfig(kind="exit_heads", exit_heads_temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        LossConfig(kind="exit_heads", exit_heads_top_k=0)
    with pytest.raises(ValueError, match="needs the heads"):
        compute_loss(lm_preset("tiny-llama"), HEADS_LOSS, {}, {"decoder_target_tokens": None})


# ============================================================ only the heads train


def _lm_batch(config, rng, b=4, t=8):
    tokens = rng.integers(2, config.vocab_size, (b, t + 1)).astype(np.int32)
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": np.ones((b, t), np.float32),
    }


def _t5_batch(config, rng, b=4, s=7, t=6):
    batch = _lm_batch(config, rng, b, t)
    batch["encoder_input_tokens"] = rng.integers(2, config.vocab_size, (b, s)).astype(np.int32)
    return batch


def _train(config, loss, params, frozen, batches, lr):
    """Runs the trainer's own step over `batches`; returns (state, last metrics)."""
    opt = OptimizerConfig(name="adamw", learning_rate=lr, schedule="constant", clip_grad_norm=1.0)
    tx, schedule = make_optimizer(opt, len(batches))
    params = jax.tree.map(jnp.copy, params)  # the step donates its input state
    frozen = None if frozen is None else jax.tree.map(jnp.copy, frozen)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.key(0), frozen=frozen,
    )  # fmt: skip
    step = make_train_step(config, loss, tx, schedule, opt, None)
    metrics = {}
    for batch in batches:
        state, metrics = step(state, batch)
    return state, jax.device_get(metrics)


# the T5 run is the slower twin of the GPT-2 one: `make test-slow`
@pytest.mark.parametrize("family", [pytest.param("t5", marks=pytest.mark.slow), "gpt2"])
def test_a_few_steps_change_the_heads_and_leave_the_backbone_bit_identical(family):
    rng = np.random.default_rng(0)
    if family == "t5":
        config, make_batch = preset("tiny").replace(dropout_rate=0.1), _t5_batch
    else:  # tied head and layer norms
        config, make_batch = lm_preset("tiny-gpt2", dropout_rate=0.1), _lm_batch
    backbone = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    backbone = jax.tree.map(np.asarray, backbone)
    heads = init_exit_heads(config, backbone, (1, 3))
    batches = [make_batch(config, rng) for _ in range(3)]

    # The loss's gradient reaches the heads only.
    grads = jax.grad(lambda p, h: compute_loss(config, HEADS_LOSS, p, batches[0], exit_heads=h)[0], (0, 1))  # fmt: skip
    backbone_grad, heads_grad = grads(backbone, heads)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(backbone_grad))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(heads_grad))

    state, metrics = _train(config, HEADS_LOSS, heads, backbone, batches, lr=1e-2)
    assert int(state.step) == 3
    assert {"loss", "kl_head1", "kl_head3", "agree_head1", "agree_head3"} <= set(metrics)
    assert all(math.isfinite(float(v)) for v in metrics.values())
    flat = traverse_util.flatten_dict(backbone)
    frozen = traverse_util.flatten_dict(state.frozen)
    assert frozen.keys() == flat.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(frozen[key]), value, str(key))
    before, after = traverse_util.flatten_dict(heads), traverse_util.flatten_dict(state.params)
    assert before.keys() == after.keys()
    for key in before:  # every kernel and norm moved
        assert not np.array_equal(np.asarray(before[key]), np.asarray(after[key])), key


# ============================================================ heads learn


def _markov_batches(vocab, seeds, b=16, t=24):
    """Rows of a first-order Markov chain: each token has 3 successors (probabilities .6 .3 .1)."""
    successors = np.random.default_rng(0).integers(2, vocab, (vocab, 3))
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        tokens = np.zeros((b, t + 1), np.int32)
        tokens[:, 0] = rng.integers(2, vocab, b)
        for i in range(t):
            tokens[:, i + 1] = successors[tokens[:, i], rng.choice(3, b, p=[0.6, 0.3, 0.1])]
        out.append({
            "decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": np.ones((b, t), np.float32),
        })  # fmt: skip
    return out


def test_trained_heads_beat_their_initialisation_on_a_model_trained_here():
    """A 4-layer Llama-style model learns a Markov chain from scratch (60 CE steps), then heads on
    layers 1, 2, 3 train for 40 steps on other rows of the chain and are scored on held-out rows."""
    config = lm_preset("tiny-llama", vocab_size=64, dropout_rate=0.0)  # L=4, D=48
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    state, metrics = _train(config, LossConfig(kind="ce"), params, None,
                            _markov_batches(64, range(60)), lr=3e-3)  # fmt: skip
    assert metrics["ce_deep"] < 1.5  # log 64 = 4.16 untrained; the chain's entropy is 0.90
    backbone = jax.tree.map(np.asarray, state.params)
    heads = init_exit_heads(config, backbone, (1, 2, 3))
    trained, _ = _train(config, HEADS_LOSS, heads, backbone,
                        _markov_batches(64, range(1000, 1040)), lr=1e-2)  # fmt: skip
    held_out = _markov_batches(64, range(10_000, 10_004))
    before = exit_head_validation(config, HEADS_LOSS, backbone, heads, held_out)
    after = exit_head_validation(config, HEADS_LOSS, backbone, trained.params, held_out)
    for layer in (1, 2, 3):  # each head's KL to the final layer at least halves (seen: / 6 to / 8)
        assert after[f"kl_head{layer}"] < 0.5 * before[f"kl_head{layer}"], (before, after)
        assert after[f"agree_head{layer}"] >= before[f"agree_head{layer}"], (before, after)
    assert after["loss"] < 0.5 * before["loss"]
    # Deeper heads are closer to the final layer.
    assert after["agree_head1"] <= after["agree_head2"] <= after["agree_head3"], after
    assert after["agree_head1"] < after["agree_head3"], after
    assert after["kl_head1"] > after["kl_head2"] > after["kl_head3"], after
    for a, b in zip(jax.tree.leaves(backbone), jax.tree.leaves(trained.frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))


# ============================================================ the gin run


def test_the_run_file_is_the_exit_heads_recipe(monkeypatch):
    from free_jax import train as entry

    monkeypatch.setattr(entry.trainer, "train", lambda c, m, d, step_callback=None: (c, m, d))
    import gin

    gin.clear_config()
    try:
        entry.parse_gin(
            [str(GIN / "runs/exit_heads.gin")],
            ["MODEL_DIR = '/tmp/heads'", "INITIAL_CHECKPOINT = '/tmp/smollm'"],
        )
        config, model, data = entry.train()
    finally:
        gin.clear_config()
    assert model is None and config.initial_checkpoint == "/tmp/smollm" and config.lora is None
    assert config.exit_heads == 3 and config.loss.kind == "exit_heads"
    assert config.loss.exit_heads_temperature == 1.0 and config.loss.exit_heads_top_k is None
    assert data.format == "text" and data.extra_ids == 0 and data.tokenizer_path == "/tmp/smollm"
    assert config.optimizer.name == "adamw"


def _write_jsonl(path, n, seed):
    words = sorted({w.strip(".,:;()'\"").lower() for w in json.__doc__.split() if w.isalpha()})
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        text = list(rng.choice(words, size=int(rng.integers(3, 8))))
        lines.append(json.dumps({"input": " ".join(text[:2]), "target": " ".join(text[2:])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gin_run_from_a_free_jax_export_saves_heads_that_load_back(tmp_path, run_python):
    from free_jax.checkpoints import save_params

    # A tiny Llama whose special ids are a trained SentencePiece vocabulary's (pad 0, EOS 1).
    config = lm_preset(
        "tiny-llama", vocab_size=128, pad_token_id=0, eos_token_id=1, bos_token_id=None
    )
    backbone = jax.tree.map(
        np.asarray, jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    )
    export = save_params(tmp_path / "export", config, backbone)
    model_dir = tmp_path / "heads"
    run_python(
        None, f"--gin_file={GIN / 'runs/exit_heads.gin'}", f"--gin_file={GIN / 'tasks/jsonl.gin'}",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.INITIAL_CHECKPOINT='{export}'",
        f"--gin.JSONL_TRAIN='{_write_jsonl(tmp_path / 'train.jsonl', 200, 0)}'",
        f"--gin.JSONL_VALIDATION='{_write_jsonl(tmp_path / 'dev.jsonl', 8, 1)}'",
        "--gin.TOKENIZER=None", "--gin.DataConfig.vocab_size=64", "--gin.EXIT_HEADS=2",
        "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_EVERY=3", "--gin.EVAL_EVERY=0",
        "--gin.BATCH_SIZE=4", "--gin.OptimizerConfig.warmup_steps=0",
        "--gin.OptimizerConfig.learning_rate=0.01", "--gin.DataConfig.max_input_length=16",
        "--gin.DataConfig.max_target_length=16", "--gin.DataConfig.num_threads=1",
        "--gin.DataConfig.eval_examples=8", "--gin.TrainConfig.eval_batch_size=8",
        "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.tensorboard=False",
        "--gin.TrainConfig.log_every=1",
    )  # fmt: skip
    run = json.loads((model_dir / "run.json").read_text())
    assert run["exit_heads"] == [1, 3] and run["loss"] == "exit_heads" and run["format"] == "text"
    records = read_metrics(model_dir, "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "kl_head1", "kl_head3"))
    (validation,) = read_metrics(model_dir, "validation")
    assert {"loss", "kl_head1", "kl_head3", "agree_head1", "agree_head3"} <= set(validation)

    # The heads file loads back, beside the export (the backbone) it was trained on.
    saved_config, heads = load_trained_exit_heads(model_dir)
    assert saved_config == config and sorted(heads) == ["head_1", "head_3"]
    same = load_exit_heads(model_dir / "exit_heads.msgpack", config)
    _, state = read_saved_state(model_dir)
    for a, b, c in zip(jax.tree.leaves(heads), jax.tree.leaves(same), jax.tree.leaves(state["params"])):  # fmt: skip
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, np.asarray(c))
    fresh = init_exit_heads(config, backbone, (1, 3))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(heads)))  # fmt: skip
    # The backbone is the export, bit for bit, in the checkpoint and through load_trained.
    loaded_config, params, _ = load_trained(model_dir)
    assert loaded_config == config
    for a, b, c in zip(jax.tree.leaves(backbone), jax.tree.leaves(state["frozen"]), jax.tree.leaves(params)):  # fmt: skip
        np.testing.assert_array_equal(a, np.asarray(b))
        np.testing.assert_array_equal(a, np.asarray(c))
