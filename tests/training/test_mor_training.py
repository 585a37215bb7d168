"""Training a Mixture-of-Recursions model with the existing trainer: CE plus the router losses
(logged), unpacked rows, validation by step-by-step greedy decoding; and the issue's claim that
after training the causal router (sigmoid >= 0.5) agrees with the training-time top-k.

The model is trained here from scratch on the built-in system_translations corpus (width 48,
5 effective layers = 1 + 3 recursions of 1 layer + 1, 150 steps, ~20 s)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.models.mor import MoRConfig, mor_forward
from free_jax.training import (
    CheckpointConfig,
    DataConfig,
    LossConfig,
    OptimizerConfig,
    TrainConfig,
    compute_loss,
    inputs,
    load_trained,
    read_metrics,
)
from free_jax.training.trainer import train

DATA = DataConfig(
    task="system_translations", format="text", vocab_size=128, vocab_max_sentences=2000,
    max_input_length=16, max_target_length=16, pack=False, train_split="train[:4000]",
    eval_split="validation[:64]", eval_examples=64, num_threads=1,
)  # fmt: skip
# router_aux 0.1, not the paper's 1e-3: with 1e-3 these 150 steps reach 77% agreement (measured
# here), with 0.1 91%; the coefficient trades LM loss against teaching the causal decision.
MOR = MoRConfig(
    vocab_size=128, d_model=48, num_layers=5, num_loops=3, num_heads=4, num_kv_heads=2, d_ff=96,
    max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    router_aux=0.1,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
    data = dataclasses.replace(DATA, data_dir=str(tfds_dir))
    model_dir = tmp_path_factory.mktemp("mor")
    optimizer = OptimizerConfig(
        name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=20, clip_grad_norm=1.0
    )
    config = TrainConfig(
        model_dir=str(model_dir), train_steps=150, batch_size=16, loss=LossConfig(kind="ce"),
        optimizer=optimizer,
        checkpoint=CheckpointConfig(every=10_000, keep=1, keep_best=0, async_save=False),
        progress_bar=False, tensorboard=False, log_every=10, eval_batch_size=64,
        max_decode_length=4,
    )  # fmt: skip
    result = train(config, MOR, data)
    return model_dir, data, result


def test_training_logs_the_router_losses_and_learns(trained):
    model_dir, _, result = trained
    rows = [r for r in read_metrics(model_dir) if r["split"] == "train"]
    for key in ("aux_router_bce", "aux_router_z", "aux_total", "ce_deep"):
        assert all(np.isfinite(r[key]) for r in rows), key
    # The total is CE plus the weighted router losses.
    last = rows[-1]
    assert last["loss"] == pytest.approx(last["ce_deep"] + last["aux_total"], rel=1e-5)
    assert rows[-1]["aux_router_bce"] < rows[0]["aux_router_bce"]
    # Validation: the last layer's loss (no inner exits) and greedy decoding through the routers.
    metrics = result.validation_metrics
    assert set(k for k in metrics if k.startswith("ce_layer")) == {"ce_layer5"}
    assert metrics["loss"] < 3.0  # log 128 = 4.85 untrained
    config, _, _ = load_trained(model_dir)
    assert config == MOR


def test_causal_router_agrees_with_training_top_k(trained):
    """Per recursion r >= 2, among the tokens top-k kept at r - 1: the decode-time decision
    (logit_r >= 0) equals the top-k decision on >= 90% of them (a router that always keeps, or
    never keeps, scores the top-k's keep rate or its complement: 57% / 43% here)."""
    model_dir, data, _ = trained
    config, params, tokenizer_path = load_trained(model_dir)
    task = inputs.resolve_task(data.task)
    tokenizer = inputs.make_tokenizer(
        dataclasses.replace(data, tokenizer_path=tokenizer_path), task
    )
    eval_set = inputs.validation_set(data, task, tokenizer, 64, None)
    agree = total = keep = 0
    for batch in eval_set.batches:
        real_BT = np.asarray(batch["decoder_loss_weights"]) > 0
        out = mor_forward(config, params, jnp.asarray(batch["decoder_input_tokens"]))
        for r in range(1, config.num_loops):
            candidate_BT = np.asarray(out.kept[r - 1]) & real_BT
            decision_BT = np.asarray(out.router_logits[r]) >= 0
            kept_BT = np.asarray(out.kept[r])
            agree += np.sum((decision_BT == kept_BT) & candidate_BT)
            keep += np.sum(kept_BT & candidate_BT)
            total += np.sum(candidate_BT)
    assert total > 1000
    assert agree / total >= 0.9, (agree / total, keep / total)


def test_recursion_wise_cache_of_decoding_stores_about_n_plus_1_over_2n(trained):
    """What decoding stores: the causal routing of the trained model (step-by-step decoding
    routes exactly so, tests/models/test_mor_cached.py) keeps each real token's keys/values at the
    recursions it runs. Expert-choice top-k would store (N_r + 1) / (2 N_r) = 2/3 of a full
    recursive model's middle-block keys/values; the causal routers stay within 0.1 of it."""
    model_dir, data, _ = trained
    config, params, tokenizer_path = load_trained(model_dir)
    task = inputs.resolve_task(data.task)
    tokenizer = inputs.make_tokenizer(
        dataclasses.replace(data, tokenizer_path=tokenizer_path), task
    )
    stored = real = 0
    for batch in inputs.validation_set(data, task, tokenizer, 64, None).batches:
        real_BT = np.asarray(batch["decoder_loss_weights"]) > 0
        out = mor_forward(config, params, jnp.asarray(batch["decoder_input_tokens"]),
                          routing="causal")  # fmt: skip
        stored += sum(np.sum(np.asarray(k) & real_BT) for k in out.kv_stored)
        real += config.num_loops * np.sum(real_BT)
    n = config.num_loops
    assert abs(stored / real - (n + 1) / (2 * n)) <= 0.1, stored / real


def test_losses_that_need_inner_exits_are_refused_with_the_fix():
    batch = {
        "decoder_input_tokens": jnp.ones((2, 6), jnp.int32),
        "decoder_target_tokens": jnp.ones((2, 6), jnp.int32),
        "decoder_loss_weights": jnp.ones((2, 6), jnp.float32),
    }
    import jax

    from free_jax.models import init_params

    params = init_params(MOR, jax.random.key(0))
    with pytest.raises(ValueError, match="LossConfig.kind='ce'"):
        compute_loss(MOR, LossConfig(kind="free"), params, batch)
    packed = {**batch, "decoder_segment_ids": jnp.ones((2, 6), jnp.int32)}
    with pytest.raises(ValueError, match="DataConfig.pack=False"):
        compute_loss(MOR, LossConfig(kind="ce"), params, packed)
