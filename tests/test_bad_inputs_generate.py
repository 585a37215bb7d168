"""Issue 19, generate: a tokenizer that does not fit the model is an error naming both sizes and
the file, and an input longer than `--max_input_length` is cut with a warning instead of reaching
XLA whole."""

from pathlib import Path

import numpy as np
import pytest

from free_jax import generate
from free_jax.data import load_tokenizer
from free_jax.data.tokenizer import train_sentencepiece
from free_jax.models import lm_preset, preset

DEMO = Path(__file__).resolve().parents[1] / "demo" / "model"
WORDS = "the cat sat on a mat while dogs ran past houses under grey skies and rain fell".split()


@pytest.fixture(scope="module")
def demo_tokenizer():
    return load_tokenizer(DEMO / "spm.model")


@pytest.fixture(scope="module")
def small_spm(tmp_path_factory):
    """A 128-piece SentencePiece model: not the demo model's 4000-id vocabulary."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=12)) + f" {i} x{i * 7}" for i in range(400)]
    tok = train_sentencepiece(texts, vocab_size=128, character_coverage=1.0)
    path = tmp_path_factory.mktemp("spm") / "spm_128.model"
    path.write_bytes(tok.model_proto)
    return path


def test_a_tokenizer_too_small_for_the_model_is_an_error(small_spm):
    with pytest.raises(ValueError, match=rf"{small_spm.name} has 128 ids.*vocabulary of 4000"):
        generate.main([f"--checkpoint={DEMO}", f"--tokenizer={small_spm}", "hello"])


def test_t5_input_is_cut_to_max_input_length_with_a_warning(demo_tokenizer, capsys):
    config = preset("tiny")
    text = " ".join(WORDS * 1200)  # 18,000 words
    ids = generate.input_ids(demo_tokenizer, config, text, 64, max_decode_len=8)
    assert len(ids) == 64 and ids[-1] == demo_tokenizer.eos_id
    assert ids[:63] == demo_tokenizer.encode(text)[:63]
    assert "cut to its first 64 (--max_input_length=64)" in capsys.readouterr().err


def test_a_short_input_is_left_alone(demo_tokenizer, capsys):
    ids = generate.input_ids(demo_tokenizer, preset("tiny"), "the cat", 64, max_decode_len=8)
    assert ids == demo_tokenizer.encode("the cat") + [demo_tokenizer.eos_id]
    assert capsys.readouterr().err == ""


def test_a_prompt_leaves_room_for_the_decode_within_the_positions(demo_tokenizer, capsys):
    config = lm_preset("tiny-gpt2", vocab_size=4000)  # 64 learned positions
    ids = generate.input_ids(demo_tokenizer, config, " ".join(WORDS * 10), 512, max_decode_len=16)
    assert len(ids) == 64 - 16
    assert "cut to its first 48" in capsys.readouterr().err
    rotary = lm_preset("tiny-llama", vocab_size=4000)
    assert len(generate.input_ids(demo_tokenizer, rotary, " ".join(WORDS * 10), 100, 16)) == 100


def test_an_18000_word_input_generates(capsys):
    text = " ".join(WORDS * 1200)
    generate.main([f"--checkpoint={DEMO}", "--decoder=full", "--max_decode_len=4", text])
    assert "cut to its first 64" in capsys.readouterr().err
