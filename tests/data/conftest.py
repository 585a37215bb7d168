"""Shared fixtures for the data tests: a transparent tokenizer, a .mo writer, small corpora."""

import struct

import pytest
import tensorflow_datasets as tfds

from free_jax.data import tokenizer as tokenizer_lib

tfds.disable_progress_bar()


class IntTokenizer(tokenizer_lib.Tokenizer):
    """Whitespace-separated integers are their own ids: "7 8 9" -> [7, 8, 9].

    Makes batch contents predictable to the token, so pipeline tests can assert exact arrays.
    """

    @property
    def vocab_size(self) -> int:
        return 1000

    def encode(self, text):
        return [int(w) for w in text.split()]

    def _decode(self, ids):
        return " ".join(str(i) for i in ids)


@pytest.fixture
def int_tokenizer():
    return IntTokenizer()


def write_mo(path, entries, *, byte_order="<", charset="UTF-8"):
    """Writes a gettext .mo catalog of {msgid: msgstr} (plus its header entry) to `path`.

    The layout from the GNU gettext manual: magic, revision, N, offsets of the original and
    translated string tables (N (length, offset) pairs each), then the NUL-terminated strings.
    """
    header = f"Content-Type: text/plain; charset={charset}\n"
    items = sorted({"": header, **entries}.items())
    originals = [k.encode(charset) for k, _ in items]
    translations = [v.encode(charset) for _, v in items]
    n = len(items)
    originals_at, translations_at = 28, 28 + 8 * n
    data_at = 28 + 16 * n
    tables, blob = [b"", b""], b""
    for which, strings in enumerate((originals, translations)):
        for s in strings:
            tables[which] += struct.pack(byte_order + "2I", len(s), data_at + len(blob))
            blob += s + b"\0"
    head = struct.pack(
        byte_order + "7I", 0x950412DE, 0, n, originals_at, translations_at, 0, data_at
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + tables[0] + tables[1] + blob)
    return path


@pytest.fixture
def mo_writer():
    return write_mo


# Real English -> German UI messages in the shapes catalogs hold them: plain, mnemonic, plural,
# context, format directives, and the kinds the builder must drop.
CATALOG_A = {
    "Open file": "Datei öffnen",
    "_Save": "_Speichern",
    "Se_lection": "Au_swahl",
    "%d file\x00%d files": "%d Datei\x00%d Dateien",
    "Stock label\x04_About": "_Info",
    "invalid argument: %s\n": "ungültiges Argument: %s\n",
    "Usage:   %s  [OPTION]...\n": "Aufruf:   %s  [OPTION]...\n",
    "%s: %s": "%s: %s",  # format only: dropped
    "PostScript": "PostScript",  # identical: dropped
    "Untranslated": "",  # untranslated: dropped
    "word " * 80: "Wort " * 80,  # too long: dropped
}
CATALOG_B = {
    "Open file": "Datei öffnen",  # duplicate of a pair in catalog A: kept once
    "Close window": "Fenster schließen",
    "Print document": "Dokument drucken",
    "Cannot read the file": "Die Datei kann nicht gelesen werden",
    "Permission denied": "Keine Berechtigung",
}


@pytest.fixture
def locale_dir(tmp_path):
    """A locale tree with two German catalogs: <tmp>/locale/de/LC_MESSAGES/{a,b}.mo."""
    root = tmp_path / "locale"
    write_mo(root / "de" / "LC_MESSAGES" / "a.mo", CATALOG_A)
    write_mo(root / "de" / "LC_MESSAGES" / "b.mo", CATALOG_B, byte_order=">")
    return root
