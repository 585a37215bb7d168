"""Issue 19, tokenizer and model: `check_vocabulary_fits` (what loading, generate, evaluate and the
trainer apply) accepts every real pairing and rejects a tokenizer larger than the vocabulary or
much smaller than it."""

import pytest

from free_jax.data.tokenizer import check_vocabulary_fits


@pytest.mark.parametrize(
    "tokenizer_size, vocab_size",
    [
        (32000, 32128),  # T5 / Flan-T5: spiece.model, 100 sentinels, padded to 128s
        (32100, 32128),  # the same with the sentinels counted (extra_ids=100)
        (128, 128),  # smoke_cpu.gin
        (4000, 4000),  # demo_cpu.gin
        (64, 128),  # the decoder-only tests' trained vocabulary in a 128-id model
        (8000, 8192),  # from scratch: 8000 pieces + 100 sentinels, padded
        (32000, 32000),  # Llama 2
        (128256, 128256),  # Llama 3
        (50277, 50304),  # Pythia (gpt_neox), padded
        (50257, 50257),  # GPT-2
    ],
)
def test_real_pairings_fit(tokenizer_size, vocab_size):
    check_vocabulary_fits(tokenizer_size, vocab_size, tokenizer="t.model")


def test_a_larger_tokenizer_is_an_error():
    with pytest.raises(ValueError, match=r"tokenizer t\.model has 4001 ids .* only 4000"):
        check_vocabulary_fits(4001, 4000, tokenizer="t.model")


@pytest.mark.parametrize("tokenizer_size, vocab_size", [(128, 4000), (32000, 32256), (64, 512)])
def test_a_much_smaller_tokenizer_is_an_error(tokenizer_size, vocab_size):
    with pytest.raises(ValueError, match=rf"has {tokenizer_size} ids, too few .* {vocab_size} ids"):
        check_vocabulary_fits(tokenizer_size, vocab_size, tokenizer="t.model")
