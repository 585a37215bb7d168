"""`system_translations`: English -> German message pairs from the machine's gettext catalogs.

Every Linux package with a user interface ships its translations as compiled gettext catalogs,
`/usr/share/locale/<lang>/LC_MESSAGES/<package>.mo`: the English message (msgid) and its
translation (msgstr). Read together they are a real, human-translated parallel corpus of short
technical sentences that exists offline — the data of the demo model (a small T5 trained from
scratch, English -> German).

Cleaning, so that a pair is a sentence and its translation rather than UI plumbing:
  * the header entry and untranslated entries are dropped;
  * plural entries keep the singular and its first (singular) translation;
  * a message context ("Stock label\\x04_About") is removed from the msgid;
  * a GTK/Qt keyboard mnemonic ("_Open"/"&Open") is removed when both sides have exactly one;
  * whitespace runs (help-text columns, trailing newlines) collapse to one space;
  * pairs with no letters outside printf directives ("%s: %s"), pairs identical in both languages
    (names, units), and pairs longer than `max_chars` are dropped; exact duplicate pairs are kept
    once.
The split of a pair is fixed by a hash of its English text, so one msgid translated differently
by two packages never lands in two splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from free_jax.data.builders import split_by_hash

_MO_MAGIC = 0x950412DE
_PRINTF = re.compile(r"%(\d+\$)?[-+ #0']*(\d+|\*)?(\.(\d+|\*))?(hh|h|ll|l|L|q|j|z|t)?[a-zA-Z%]")
_LETTER = re.compile(r"[^\W\d_]")
_MNEMONIC = re.compile(r"[_&](?=\w)")

_DESCRIPTION = """\
English -> German message pairs read from the gettext catalogs (*.mo) installed on this machine
(/usr/share/locale/de/LC_MESSAGES by default). Plural and context entries are reduced to their
singular message; mnemonics, whitespace runs, format-only, identical and overlong pairs are
removed. Splits are fixed by a hash of the English message. The metadata lists every catalog read
with its entry and kept-pair counts.
"""


def read_mo_file(path: str | epath.PathLike) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a compiled gettext catalog, header included, in file order.

    Plural entries come back as their raw forms joined by NUL ("file\\x00files"), context
    entries as "context\\x04msgid", exactly as stored; `clean_pair` interprets them. Text is
    decoded with the charset the header declares (UTF-8 if none).

    Layout of a .mo file (GNU gettext manual, "The Format of MO Files"): a magic number that also
    gives the byte order, a revision, N, and the offsets of two tables of N (length, offset) pairs
    pointing at the original and translated strings.
    """
    data = epath.Path(path).read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path}: too short to be a .mo file")
    for order in ("<", ">"):
        if struct.unpack(order + "I", data[:4])[0] == _MO_MAGIC:
            break
    else:
        raise ValueError(f"{path}: not a gettext .mo file (bad magic number)")
    _, count, originals_at, translations_at = struct.unpack(order + "4I", data[4:20])

    def string(table_at: int, i: int) -> bytes:
        length, offset = struct.unpack(order + "2I", data[table_at + 8 * i : table_at + 8 * i + 8])
        return data[offset : offset + length]

    raw = [(string(originals_at, i), string(translations_at, i)) for i in range(count)]
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            match = re.search(rb"charset=([\w.-]+)", msgstr, re.IGNORECASE)
            if match and match.group(1).lower() != b"charset":
                charset = match.group(1).decode("ascii")
    return [(m.decode(charset, "replace"), t.decode(charset, "replace")) for m, t in raw]


def _normalize(text: str) -> str:
    return " ".join(text.split())


def clean_pair(msgid: str, msgstr: str, *, max_chars: int) -> tuple[str, str] | None:
    """The (English, translation) pair a catalog entry contributes, or None to drop it.

    >>> clean_pair("Se_lection", "Au_swahl", max_chars=100)
    ('Selection', 'Auswahl')
    >>> clean_pair("file\\x00files", "Datei\\x00Dateien", max_chars=100)
    ('file', 'Datei')
    >>> clean_pair("%s: %s", "%s: %s", max_chars=100) is None
    True
    """
    if not msgid or not msgstr:
        return None
    msgid = msgid.split("\x04", 1)[-1]  # drop "context\x04"
    msgid = msgid.split("\x00", 1)[0]  # plural: keep the singular...
    msgstr = msgstr.split("\x00", 1)[0]  # ...and its singular translation
    if len(_MNEMONIC.findall(msgid)) == 1 and len(_MNEMONIC.findall(msgstr)) == 1:
        msgid, msgstr = _MNEMONIC.sub("", msgid), _MNEMONIC.sub("", msgstr)
    msgid, msgstr = _normalize(msgid), _normalize(msgstr)
    if not msgid or not msgstr or msgid == msgstr:
        return None
    if not _LETTER.search(_PRINTF.sub("", msgid)):
        return None
    if len(msgid) > max_chars or len(msgstr) > max_chars:
        return None
    return msgid, msgstr


@dataclasses.dataclass
class SystemTranslationsConfig(tfds.core.BuilderConfig):
    """Where to read catalogs and how much to keep.

    Attributes:
      locale_dir: root holding `<language>/LC_MESSAGES/*.mo`.
      language: the target language's locale directory name ("de").
      max_catalogs: read only the first N catalogs (sorted by file name).
      max_examples: keep only the first N cleaned pairs (in catalog order), before splitting.
      max_chars: drop pairs with a side longer than this (after whitespace normalization).
      validation_percent, test_percent: split shares, by hash of the English text.
    """

    locale_dir: str = "/usr/share/locale"
    language: str = "de"
    max_catalogs: int | None = None
    max_examples: int | None = None
    max_chars: int = 256
    validation_percent: float = 5.0
    test_percent: float = 5.0


class SystemTranslations(tfds.core.GeneratorBasedBuilder):
    """English -> German pairs from the machine's gettext catalogs (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SystemTranslationsConfig(name="de", description="All German catalogs in /usr/share/locale.")
    ]

    def __init__(self, *, file_format=None, **kwargs):
        # array_record unless told otherwise: random access for grain, and no TensorFlow needed.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        language = self.builder_config.language
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "en": tfds.features.Text(),
                    language: tfds.features.Text(),
                    "catalog": tfds.features.Text(),
                }
            ),
            supervised_keys=("en", language),
            metadata=tfds.core.MetadataDict(),
        )

    def catalog_paths(self) -> list[epath.Path]:
        cfg = self.builder_config
        directory = epath.Path(cfg.locale_dir) / cfg.language / "LC_MESSAGES"
        paths = sorted(directory.glob("*.mo")) if directory.exists() else []
        if not paths:
            raise FileNotFoundError(
                f"system_translations: no gettext catalogs in {directory} (no *.mo files). The "
                "corpus is read from the translations installed packages ship; install some "
                "(e.g. Debian/Ubuntu: packages with translations, without a dpkg "
                "path-exclude for /usr/share/locale) or point "
                "SystemTranslationsConfig(locale_dir=..., language=...) at a directory holding "
                "<language>/LC_MESSAGES/*.mo."
            )
        return paths[: cfg.max_catalogs] if cfg.max_catalogs else paths

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        pairs: list[tuple[str, str, str]] = []
        seen: set[tuple[str, str]] = set()
        catalogs = {}
        for path in self.catalog_paths():
            if cfg.max_examples is not None and len(pairs) >= cfg.max_examples:
                break
            entries = read_mo_file(path)
            kept = 0
            for msgid, msgstr in entries:
                if cfg.max_examples is not None and len(pairs) >= cfg.max_examples:
                    break
                pair = clean_pair(msgid, msgstr, max_chars=cfg.max_chars)
                if pair is None or pair in seen:
                    continue
                seen.add(pair)
                pairs.append((*pair, path.stem))
                kept += 1
            catalogs[path.name] = {"entries": len(entries), "kept": kept}
        if not pairs:
            raise ValueError(
                f"system_translations: the {len(catalogs)} catalogs read gave no usable pairs "
                f"({catalogs})."
            )
        by_split = {"train": [], "validation": [], "test": []}
        for en, translation, catalog in pairs:
            split = split_by_hash(
                en, validation_percent=cfg.validation_percent, test_percent=cfg.test_percent
            )
            by_split[split].append((en, translation, catalog))
        self.info.metadata.update(
            {
                "locale_dir": str(cfg.locale_dir),
                "language": cfg.language,
                "num_catalogs": len(catalogs),
                "num_entries": sum(c["entries"] for c in catalogs.values()),
                "num_pairs": len(pairs),
                "split_sizes": {k: len(v) for k, v in by_split.items()},
                "catalogs": catalogs,
            }
        )
        # TFDS cannot write an empty split; a tiny config may leave validation or test empty.
        return {split: self._generate_examples(rows) for split, rows in by_split.items() if rows}

    def _generate_examples(self, rows) -> Iterator[tuple[str, dict]]:
        language = self.builder_config.language
        for en, translation, catalog in rows:
            key = hashlib.sha256(f"{en}\x00{translation}".encode()).hexdigest()[:20]
            yield key, {"en": en, language: translation, "catalog": catalog}
