"""Tokenizers with T5's conventions: pad=0, eos=1, unk=2, EOS added by the pipeline, not here.

Three ways to get one:
  * `load_tokenizer("spiece.model")`: T5's own SentencePiece model, for pretrained checkpoints.
  * `load_tokenizer("tokenizer.json")`: a Hugging Face fast tokenizer (needs the optional
    `tokenizers` package).
  * `get_or_train_sentencepiece(path, texts, vocab_size=...)`: train a vocabulary on a corpus for
    from-scratch runs, cached at `path` (see `vocabulary_path`: beside the dataset) so every
    process and every later run uses the same file.

All of them answer the same small interface:

    tok = load_tokenizer("spiece.model")
    ids = tok.encode("Hello world")          # no EOS
    tok.decode(ids + [tok.eos_id, 5, 6])     # 'Hello world': stops at EOS, skips pad
"""

from __future__ import annotations

import abc
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence

import sentencepiece as spm
from etils import epath
from sentencepiece import sentencepiece_model_pb2

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class Tokenizer(abc.ABC):
    """Text <-> token ids. `encode` adds no EOS; `decode` stops at the first EOS and skips pad."""

    pad_id: int = PAD_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model's embedding must cover (including extra ids)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ids that contain neither EOS nor pad."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` up to (not including) the first EOS, pad ids dropped.

        Accepts any int sequence, including a 1-D numpy array from a decoder's output.
        """
        kept = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id:
                kept.append(i)
        return self._decode(kept)


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, optionally followed by T5's `extra_ids` sentinels.

    As in T5, the sentinels sit at the end of the vocabulary and count down:
    `<extra_id_0>` is `vocab_size - 1`. They never come out of `encode`; `decode` renders them
    as text so that span-corruption outputs stay readable.
    """

    def __init__(self, model_proto: bytes, *, extra_ids: int = 0, source: str = "<bytes>"):
        """`source` names where the proto came from (its file) in error messages."""
        self._model_proto = model_proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # sentencepiece's "INTERNAL: ... ParseFromArray" names no file
            raise ValueError(
                f"{source}: not a SentencePiece model (truncated or another format?): {e}"
            ) from e
        # A file cut between two pieces still parses, as a model with fewer pieces; a whole one
        # ends with its normalizer spec, which is serialised after them.
        if not sentencepiece_model_pb2.ModelProto.FromString(model_proto).HasField(
            "normalizer_spec"
        ):
            raise ValueError(
                f"{source}: not a whole SentencePiece model: it ends before its normalizer spec "
                "(truncated?)"
            )
        self.extra_ids = extra_ids
        self.pad_id = self._sp.pad_id()
        self.eos_id = self._sp.eos_id()
        self.unk_id = self._sp.unk_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{source}: this SentencePiece model has no pad or eos piece; T5 models need both "
                f"(pad_id={self.pad_id}, eos_id={self.eos_id}). Train it with "
                "get_or_train_sentencepiece or use T5's spiece.model."
            )

    @property
    def base_vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + self.extra_ids

    @property
    def model_proto(self) -> bytes:
        return self._model_proto

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def _decode(self, ids: list[int]) -> str:
        # Decode runs of ordinary ids with SentencePiece; render sentinels between them.
        parts, run = [], []
        for i in ids:
            if i < self.base_vocab_size:
                run.append(i)
                continue
            if run:
                parts.append(self._sp.decode(run))
                run = []
            parts.append(f"<extra_id_{self.vocab_size - 1 - i}>")
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    # SentencePieceProcessor does not pickle; the proto does (grain worker processes need this).
    def __getstate__(self):
        return {"model_proto": self._model_proto, "extra_ids": self.extra_ids}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], extra_ids=state["extra_ids"])


def train_sentencepiece(
    texts: Iterable[str],
    *,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9999,
    max_sentences: int = 1_000_000,
    max_sentence_length: int = 4192,
    extra_ids: int = 0,
    num_threads: int = 1,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model in memory with T5's special ids (pad=0, eos=1, unk=2, no bos).

    Deterministic: the first `max_sentences` texts are used in order (no sampling) and training
    runs on one thread by default (the unigram EM sums in thread order). The same texts give
    byte-identical models.

    Args:
      texts: the corpus, one string per sentence/document (newlines inside are fine).
      vocab_size: size of the SentencePiece vocabulary, excluding `extra_ids`.
      model_type: "unigram" (T5's) or "bpe".
      character_coverage: share of characters that must be covered; the rest map to unk.
      max_sentences: texts beyond this many are ignored.
      max_sentence_length: longer texts are cut (bytes) before training.
      extra_ids: T5 sentinel ids appended after the vocabulary.
      num_threads: trainer threads; more is faster but no longer bit-reproducible.
    """

    def sentences():
        for n, text in enumerate(texts):
            if n >= max_sentences:
                return
            text = " ".join(text.split())  # SentencePiece reads one line per sentence
            if text:
                yield text.encode("utf-8")[:max_sentence_length].decode("utf-8", "ignore")

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads,
        minloglevel=2,
    )
    return SentencePieceTokenizer(model.getvalue(), extra_ids=extra_ids)


def vocabulary_path(data_dir: str | os.PathLike, dataset: str, vocab_size: int) -> epath.Path:
    """Where a vocabulary trained on `dataset` is cached: `<data_dir>/<dataset>/spm_<V>.model`.

    `dataset` may name a config ("system_translations/de"); each config gets its own vocabulary.
    """
    return epath.Path(data_dir) / dataset / f"spm_{vocab_size}.model"


def get_or_train_sentencepiece(
    path: str | os.PathLike,
    texts: Callable[[], Iterable[str]],
    *,
    vocab_size: int,
    extra_ids: int = 0,
    **train_kwargs,
) -> SentencePieceTokenizer:
    """Loads the model at `path`, or trains one on `texts()` and writes it there first.

    `texts` is a callable so that the corpus is only read when no cached model exists. The file
    is written to a temporary name and renamed, so concurrent processes never read half a file.
    """
    path = epath.Path(path)
    if path.exists():
        return SentencePieceTokenizer(path.read_bytes(), extra_ids=extra_ids, source=str(path))
    tokenizer = train_sentencepiece(
        texts(), vocab_size=vocab_size, extra_ids=extra_ids, **train_kwargs
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    tmp.write_bytes(tokenizer.model_proto)
    tmp.rename(path)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (optional `tokenizers` package)
# ---------------------------------------------------------------------------------------------


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer read from `tokenizer.json` (e.g. a t5-small checkpoint's)."""

    def __init__(self, tokenizer, *, pad_token: str = "<pad>", eos_token: str = "</s>"):
        self._tok = tokenizer
        pad_id, eos_id = tokenizer.token_to_id(pad_token), tokenizer.token_to_id(eos_token)
        if pad_id is None or eos_id is None:
            raise ValueError(
                f"tokenizer.json lacks {pad_token!r} or {eos_token!r}; pass the names of its "
                "pad and end-of-sequence tokens."
            )
        self.pad_id, self.eos_id = pad_id, eos_id
        unk_id = tokenizer.token_to_id("<unk>")
        self.unk_id = UNK_ID if unk_id is None else unk_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: T5's post-processor would append </s>; the pipeline does that.
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _read_json(path: epath.Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def _special_tokens(directory: epath.Path, tok) -> dict[str, str]:
    """pad_token / eos_token of a decoder-only checkpoint's tokenizer.json ("<|endoftext|>",
    "<|end_of_text|>", ...): named by the `tokenizer_config.json` beside it, else given by id in the
    model's `config.json` (GPT-2's tokenizer_config names none). A missing pad token is the EOS, as
    Hugging Face's `generate` pads. Empty when neither file says (T5's "<pad>" and "</s>" apply).
    """
    eos = pad = None
    path = directory / "tokenizer_config.json"
    if path.exists():
        config = _read_json(path)
        name = lambda v: v.get("content") if isinstance(v, dict) else v
        eos, pad = name(config.get("eos_token")), name(config.get("pad_token"))
    path = directory / "config.json"
    if not eos and path.exists():
        config = _read_json(path)
        first = lambda v: v[0] if isinstance(v, list) and v else v
        eos_id, pad_id = first(config.get("eos_token_id")), first(config.get("pad_token_id"))
        eos = tok.id_to_token(eos_id) if isinstance(eos_id, int) else None
        pad = tok.id_to_token(pad_id) if isinstance(pad_id, int) else None
    if not eos:
        return {}
    return {"eos_token": eos, "pad_token": pad or eos}


def load_hf_tokenizer(path: str | os.PathLike, **kwargs) -> HFTokenizer:
    """A `tokenizer.json`; its pad and EOS tokens come from `kwargs`, else from the checkpoint
    files beside it (`_special_tokens`), else T5's "<pad>" and "</s>"."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "Reading tokenizer.json needs the `tokenizers` package: pip install tokenizers"
        ) from e
    path = epath.Path(path)
    try:
        tok = tokenizers.Tokenizer.from_str(path.read_text())
    except Exception as e:  # tokenizers raises a bare Exception that names no file
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json (truncated?): {e}") from e
    return HFTokenizer(tok, **{**_special_tokens(path.parent, tok), **kwargs})


# ---------------------------------------------------------------------------------------------
# Does a tokenizer fit a model?
# ---------------------------------------------------------------------------------------------

# T5 appends up to 100 sentinel ids after its SentencePiece pieces and pads the embedding table to
# a multiple of 128 (32000 pieces -> 32128 ids); decoder-only checkpoints pad far less (Pythia:
# 50277 -> 50304) or not at all.
T5_EXTRA_IDS = 100
VOCAB_MULTIPLE = 128


def check_vocabulary_fits(
    tokenizer_size: int,
    vocab_size: int,
    *,
    tokenizer: str,
    advice: str = "use the tokenizer the model was trained with",
) -> None:
    """Raises ValueError unless a model with `vocab_size` ids was made for a tokenizer of
    `tokenizer_size` ids (`tokenizer` names its file in the message, `advice` ends it).

    The rule: tokenizer_size <= vocab_size <= round_up(tokenizer_size + 100, 128), i.e. the model
    has at most the ids T5's convention adds (100 sentinels, then padding to a multiple of 128).
    A larger tokenizer would give ids the model has no embedding for; a much smaller one is a
    different vocabulary (the model's ids would decode to the wrong pieces).

    >>> check_vocabulary_fits(32000, 32128, tokenizer="spiece.model")  # T5
    >>> check_vocabulary_fits(128, 4000, tokenizer="spm_128.model")
    Traceback (most recent call last):
    ...
    ValueError: tokenizer spm_128.model has 128 ids, too few for the model's vocabulary of 4000 ids (a model made for a 128-id tokenizer has at most 256); use the tokenizer the model was trained with
    """
    most = -(-(tokenizer_size + T5_EXTRA_IDS) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if tokenizer_size > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer} has {tokenizer_size} ids but the model's vocabulary has only "
            f"{vocab_size}; {advice}"
        )
    if vocab_size > most:
        raise ValueError(
            f"tokenizer {tokenizer} has {tokenizer_size} ids, too few for the model's vocabulary "
            f"of {vocab_size} ids (a model made for a {tokenizer_size}-id tokenizer has at most "
            f"{most}); {advice}"
        )


def load_tokenizer(path: str | os.PathLike, *, extra_ids: int = 0) -> Tokenizer:
    """Loads a SentencePiece `.model` file or a Hugging Face `tokenizer.json`.

    A directory is searched for `tokenizer.json`, then `spiece.model` (a Hugging Face T5
    checkpoint directory has both). `extra_ids` applies to SentencePiece only (T5 checkpoints use
    100); a tokenizer.json already lists its sentinels.
    """
    path = epath.Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "spiece.model"):
            if (path / name).exists():
                return load_tokenizer(path / name, extra_ids=extra_ids)
        raise FileNotFoundError(f"No tokenizer.json or spiece.model in {path}")
    if not path.exists():
        raise FileNotFoundError(f"Tokenizer file not found: {path}")
    if path.suffix == ".json":
        return load_hf_tokenizer(path)
    return SentencePieceTokenizer(path.read_bytes(), extra_ids=extra_ids, source=str(path))
