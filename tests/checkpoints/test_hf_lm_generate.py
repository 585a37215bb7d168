"""Greedy decoding of decoder-only HF checkpoints: free_jax's tokens equal transformers'
`generate(do_sample=False)` for each family, on a batch of ragged prompts decoded together."""

import numpy as np
import pytest
from hf_lm_testlib import load_hf_model, make_hf_checkpoint, right_padded_batch

from free_jax.checkpoints import load_hf
from free_jax.decoding import FreeSpec, GreedySpec, decode

N = 10


def hf_generate(model, prompt: np.ndarray, eos: int) -> list[int]:
    """HF greedy on one unpadded prompt; tokens after it, padded with 0 after EOS to N."""
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(prompt[None], dtype=torch.long),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=N, do_sample=False, num_beams=1, pad_token_id=eos,
            eos_token_id=eos,
        )  # fmt: skip
    new = out[0, len(prompt) :].tolist()
    if eos in new:
        new = new[: new.index(eos) + 1]
    return new + [0] * (N - len(new))


@pytest.mark.parametrize(
    "family, kw",
    [("llama", {}),
     pytest.param("llama", dict(tie_word_embeddings=True, num_key_value_heads=3),
                  marks=pytest.mark.slow),  # tied heads: logits parity stays fast in test_lm
     ("gpt_neox", {}), ("gpt2", {})],
    ids=["llama-gqa", "llama-tied", "gpt_neox", "gpt2"],
)  # fmt: skip
def test_greedy_tokens_equal_hf_generate(tmp_path, family, kw):
    path = make_hf_checkpoint(family, tmp_path / family, **kw)
    config, params = load_hf(str(path))
    hf = load_hf_model(path)
    tokens, lengths = right_padded_batch(config.vocab_size)
    # make EOS a token this random model often picks (not a special id), so sequences end at
    # different steps
    first = decode(config, params, tokens, GreedySpec(), max_decode_len=N, prompt_lengths=lengths)
    counts = np.bincount(np.asarray(first.tokens).ravel(), minlength=config.vocab_size)
    eos = 3 + int(np.argmax(counts[3:]))
    config = config.replace(eos_token_id=eos)
    ours = decode(config, params, tokens, GreedySpec(), max_decode_len=N, prompt_lengths=lengths)
    want = [hf_generate(hf, tokens[row, : lengths[row]], eos) for row in range(len(lengths))]
    assert np.asarray(ours.tokens).tolist() == want
    assert any(eos in row for row in want)  # at least one sequence stopped early
    # FREE lossless on the loaded checkpoint reproduces them too
    lossless = decode(config, params, tokens, FreeSpec(window=4, lossless=True), threshold=0.2,
                      max_decode_len=N, prompt_lengths=lengths)  # fmt: skip
    assert np.asarray(lossless.tokens).tolist() == want
