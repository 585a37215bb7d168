"""`evaluation.exit_records`: one teacher-forced pass gives every exit's prediction at every
position, for T5 and decoder-only models."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "decoding"))
from lm_testlib import N, config, prompts  # noqa: E402
from test_headed_decoding import NAME, headed  # noqa: E402

from free_jax.decoding import GreedySpec, decode  # noqa: E402
from free_jax.decoding.confidence import softmax_margin  # noqa: E402
from free_jax.evaluation.exit_records import early_disagreement, exit_records, padded  # noqa: E402
from free_jax.models import DecoderLM, init_params, preset  # noqa: E402
from free_jax.models.exit_heads import head_logits  # noqa: E402


def test_records_equal_the_full_forward_pass_on_greedy_outputs():
    c, p = headed()
    tokens, lengths = prompts(NAME)
    out = np.asarray(
        decode(c, p, tokens, GreedySpec(), max_decode_len=N, prompt_lengths=lengths).tokens
    )
    recs = exit_records(c, p, tokens, out, exits=(1, 2), prompt_lengths_B=lengths)
    base = config(NAME)
    for row in range(3):
        seq = np.concatenate([tokens[row, : lengths[row]], out[row]])[None]
        res = DecoderLM(base).apply({"params": p["backbone"]}, jnp.asarray(seq), return_hidden=True)
        at = slice(lengths[row] - 1, lengths[row] - 1 + N)  # predictions of the N outputs
        np.testing.assert_array_equal(recs.deep_BN[row], np.argmax(res.logits[0, at], -1))
        for j, layer in enumerate((1, 2)):
            logits = head_logits(base, p["exit_heads"], layer, res.hidden[layer - 1])[0, at]
            np.testing.assert_array_equal(recs.token_EBN[j, row], np.argmax(logits, -1))
            np.testing.assert_allclose(
                recs.confidence_EBN[j, row], softmax_margin(logits), atol=1e-5
            )
    # greedy outputs are the final layer's argmax wherever they are real tokens
    valid = np.cumsum(np.r_["1", np.zeros((3, 1)), out[:, :-1] == base.eos_token_id], 1) == 0
    np.testing.assert_array_equal(np.asarray(recs.deep_BN)[valid], out[valid])


@pytest.mark.slow  # the decoder-only twin above stays fast
def test_t5_records_and_the_measured_risk():
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    enc = np.random.default_rng(0).integers(2, cfg.vocab_size, size=(2, 7)).astype(np.int32)
    out = np.asarray(decode(cfg, params, enc, GreedySpec(), max_decode_len=6).tokens)
    recs = exit_records(cfg, params, enc, out, exits=(1,))
    assert recs.confidence_EBN.shape == (1, 2, 6)
    np.testing.assert_array_equal(recs.deep_BN[:, 0], out[:, 0])
    only_deep = exit_records(cfg, params, enc, out)
    assert only_deep.token_EBN.shape == (0, 2, 6)
    np.testing.assert_array_equal(only_deep.deep_BN, recs.deep_BN)
    # an output that exits everywhere with the deep tokens has no risk; a changed token counts
    layers = np.ones_like(out)
    deep = np.asarray(recs.deep_BN)
    valid = np.ones(out.shape, bool)
    assert early_disagreement(deep, layers, deep, valid, cfg.num_decoder_layers) == (0, 12)
    changed = deep.copy()
    changed[0, 2] += 1
    assert early_disagreement(changed, layers, deep, valid, cfg.num_decoder_layers) == (1, 12)
    full = np.full_like(out, cfg.num_decoder_layers)  # differing tokens from the deep layers
    assert early_disagreement(changed, full, deep, valid, cfg.num_decoder_layers) == (0, 12)


def test_padded_and_bad_measure():
    out, valid = padded([np.array([5, 6, 1]), np.array([7])], 3, 4)
    assert out.tolist() == [[5, 6, 1, 0], [7, 0, 0, 0], [0, 0, 0, 0]]
    assert valid.sum(1).tolist() == [3, 1, 0]
    c, p = headed()
    with pytest.raises(ValueError, match="hidden_cosine"):
        exit_records(c, p, prompts(NAME)[0], np.zeros((3, 2), np.int32), measure="hidden_cosine")
