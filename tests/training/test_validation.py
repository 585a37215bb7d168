"""Validation during training uses the library's decoder and evaluation's metrics: its predictions
are `decoding.decode`'s greedy tokens (batched and padded as it likes, equal to each input alone),
its scores `evaluation.metrics.score`'s; exit losses add batches up exactly."""

import jax
import numpy as np
import pytest

from free_jax.decoding import GreedySpec, decode
from free_jax.evaluation import metrics
from free_jax.models import init_params, preset
from free_jax.models.lm_config import lm_preset
from free_jax.training.losses import exit_losses
from free_jax.training.validation import decode_and_score, validation_losses


def _detokenize(eos):
    def text(ids):
        ids = list(np.asarray(ids))
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return " ".join(str(i) for i in ids if i)

    return text


@pytest.fixture(scope="module")
def t5():
    config = preset("tiny")
    return config, jax.jit(init_params, static_argnums=0)(config, jax.random.key(4))


@pytest.fixture(scope="module")
def lm():
    config = lm_preset("tiny-llama")
    return config, jax.jit(init_params, static_argnums=0)(config, jax.random.key(5))


def test_t5_predictions_are_greedy_decodes_and_scores_are_evaluations(t5):
    config, params = t5
    rng = np.random.default_rng(0)
    inputs = [rng.integers(2, 128, n).astype(np.int32) for n in (3, 6, 2, 5, 4)]
    references = [["1 2 3"], ["4 5"], ["6"], ["7 8"], ["9"]]
    text = _detokenize(config.eos_token_id)
    scores, predictions = decode_and_score(
        config, params, inputs, references, text, "bleu", batch_size=2, max_decode_len=5,
        input_length=6,
    )  # fmt: skip
    for tokens, got in zip(inputs, predictions):  # batched and padded == each input alone
        alone = np.zeros((1, 6), np.int32)  # one shape: one compile (0 is T5's padding)
        alone[0, : len(tokens)] = tokens
        assert got == text(decode(config, params, alone, GreedySpec(), max_decode_len=5).tokens[0])
    want = metrics.score("bleu", predictions, [r[0] for r in references])
    assert scores == {**want, "loop_rate": metrics.loop_rate(predictions)}


def test_lm_predictions_continue_each_prompt(lm):
    config, params = lm
    rng = np.random.default_rng(1)
    lengths = [4, 1, 3]
    prompts = [rng.integers(3, config.vocab_size, n).astype(np.int32) for n in lengths]
    references = [["a b", "c"], ["d"], ["e f"]]
    text = _detokenize(config.eos_token_id)
    scores, predictions = decode_and_score(
        config, params, prompts, references, text, "squad", prompt_lengths=lengths,
        batch_size=2, max_decode_len=4, input_length=5,
    )  # fmt: skip
    for prompt, got in zip(prompts, predictions):
        alone = np.full((1, 5), 7, np.int32)  # one shape; padding past the length is never read
        alone[0, : len(prompt)] = prompt
        out = decode(
            config, params, alone, GreedySpec(), max_decode_len=4,
            prompt_lengths=np.array([len(prompt)]),
        )  # fmt: skip
        assert got == text(out.tokens[0])
    assert set(scores) == {"em", "f1", "score", "loop_rate"}  # evaluation's names
    assert scores["f1"] == metrics.squad(predictions, references)["f1"]


def test_validation_losses_add_batches_up_exactly(lm):
    config, params = lm
    rng = np.random.default_rng(2)

    def batch(weights):
        tokens = rng.integers(3, config.vocab_size, (2, 6)).astype(np.int32)
        return {
            "decoder_input_tokens": tokens,
            "decoder_target_tokens": np.roll(tokens, -1, axis=1),
            "decoder_loss_weights": np.asarray(weights, np.float32),
            "prompt_tokens": tokens[:, :2],  # validation batches carry prompts: ignored here
        }

    batches = [batch([[0, 1, 1, 1, 1, 0]] * 2), batch([[1, 1, 0, 0, 0, 0], [0] * 6])]
    got = validation_losses(config, params, batches)
    sums = [
        exit_losses(config, params, {k: v for k, v in b.items() if k != "prompt_tokens"})
        for b in batches
    ]
    weight = sum(float(s["weight"]) for s in sums)
    assert weight == 10.0
    for layer in range(1, config.num_decoder_layers + 1):
        for kind in ("ce", "acc"):
            key = f"{kind}_layer{layer}"
            want = sum(float(s[key]) for s in sums) / weight
            assert got[key] == pytest.approx(want, rel=1e-5), key
