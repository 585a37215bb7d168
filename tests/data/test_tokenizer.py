import json
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from free_jax.data import tokenizer as tokenizer_lib

VOCAB = 300


@pytest.fixture(scope="module")
def corpus():
    """A few thousand lines of real text that every Python install has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for name in ("textwrap.py", "string.py", "json/decoder.py", "shlex.py"):
        lines += (stdlib / name).read_text(encoding="utf-8").splitlines()
    lines += ["Die Datei kann nicht gelesen werden.", "Grüße aus München, schön!"] * 20
    return [line for line in lines if line.strip()]


@pytest.fixture(scope="module")
def trained(corpus):
    return tokenizer_lib.train_sentencepiece(corpus, vocab_size=VOCAB)


def test_t5_special_ids(trained):
    assert (trained.pad_id, trained.eos_id, trained.unk_id) == (0, 1, 2)
    assert trained.vocab_size == VOCAB


def test_roundtrip_and_no_eos(trained):
    for text in ["def dedent(text):", "Die Datei kann nicht gelesen werden.", "Grüße"]:
        ids = trained.encode(text)
        assert ids and trained.eos_id not in ids and trained.pad_id not in ids
        assert trained.decode(ids) == text


def test_decode_stops_at_eos_and_skips_pad(trained):
    ids = trained.encode("return lines")
    padded = [0] + ids[:1] + [0] + ids[1:] + [trained.eos_id] + trained.encode("junk") + [0, 0]
    assert trained.decode(padded) == "return lines"
    assert trained.decode(np.asarray(ids + [1], np.int32)) == "return lines"


def test_training_is_deterministic(corpus, trained):
    again = tokenizer_lib.train_sentencepiece(corpus, vocab_size=VOCAB)
    assert again.model_proto == trained.model_proto


def test_extra_ids_sit_at_the_end_and_decode_as_sentinels(corpus, trained):
    tok = tokenizer_lib.SentencePieceTokenizer(trained.model_proto, extra_ids=3)
    assert tok.vocab_size == VOCAB + 3
    hello = tok.encode("hello")
    assert tok.decode(hello + [VOCAB + 2] + hello + [VOCAB]) == "hello<extra_id_0>hello<extra_id_2>"


def test_pickles_for_grain_workers(trained):
    tok = tokenizer_lib.SentencePieceTokenizer(trained.model_proto, extra_ids=5)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.vocab_size == tok.vocab_size
    assert clone.encode("import json") == tok.encode("import json")


def test_get_or_train_caches_beside_the_dataset(tmp_path, corpus):
    path = tokenizer_lib.vocabulary_path(tmp_path, "system_translations/de", VOCAB)
    assert str(path) == str(tmp_path / "system_translations" / "de" / f"spm_{VOCAB}.model")
    calls = []

    def texts():
        calls.append(1)
        return corpus

    first = tokenizer_lib.get_or_train_sentencepiece(path, texts, vocab_size=VOCAB)
    assert path.exists() and calls == [1]
    second = tokenizer_lib.get_or_train_sentencepiece(path, texts, vocab_size=VOCAB)
    assert calls == [1], "a cached vocabulary must not re-read the corpus"
    assert second.model_proto == first.model_proto
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    loaded = tokenizer_lib.load_tokenizer(path)
    assert loaded.encode("shlex.split") == first.encode("shlex.split")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizer_lib.load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="No tokenizer.json or spiece.model"):
        tokenizer_lib.load_tokenizer(tmp_path)


def test_hf_tokenizer_json_matches_sentencepiece(tmp_path, trained):
    """A tokenizer.json converted by transformers from our spiece.model gives the same ids."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    (tmp_path / "spiece.model").write_bytes(trained.model_proto)
    transformers.T5TokenizerFast.from_pretrained(str(tmp_path)).save_pretrained(tmp_path / "hf")
    hf = tokenizer_lib.load_tokenizer(tmp_path / "hf")  # a directory: finds tokenizer.json
    sp = tokenizer_lib.SentencePieceTokenizer(trained.model_proto, extra_ids=100)
    assert isinstance(hf, tokenizer_lib.HFTokenizer)
    assert (hf.pad_id, hf.eos_id, hf.vocab_size) == (0, 1, sp.vocab_size)
    for text in ["def dedent(text):", "  Die   Datei\nkann nicht.", "Grüße aus München"]:
        assert hf.encode(text) == sp.encode(text)
        ids = sp.encode(text)
        assert hf.decode(ids + [1, 5, 6]) == sp.decode(ids)


def test_decoder_only_tokenizer_json_takes_its_special_tokens_from_tokenizer_config(tmp_path):
    """GPT-2 / Pythia / SmolLM style: "<|endoftext|>" ends texts and, without a pad token, pads."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<|endoftext|>": 0, "<unk>": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="lacks '<pad>'"):  # no tokenizer_config.json: T5's names
        tokenizer_lib.load_tokenizer(tmp_path)
    config = {"eos_token": {"content": "<|endoftext|>"}, "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = tokenizer_lib.load_tokenizer(tmp_path)
    assert (hf.eos_id, hf.pad_id) == (0, 0)
    assert hf.encode("hello world") == [2, 3] and hf.decode([2, 3, 0, 2]) == "hello world"
    # GPT-2's tokenizer_config names no tokens; the model's config.json gives them by id.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 0}))
    hf = tokenizer_lib.load_tokenizer(tmp_path)
    assert (hf.eos_id, hf.pad_id) == (0, 0)
