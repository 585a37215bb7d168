import collections
import os
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds

import free_jax.data  # noqa: F401  (registers the builders)
from free_jax.data.builders import (
    PythonDocstrings,
    PythonDocstringsConfig,
    SystemTranslations,
    SystemTranslationsConfig,
    python_docstrings,
    read_mo_file,
    split_by_hash,
    system_translations,
)

REAL_CATALOGS = "/usr/share/locale/de/LC_MESSAGES"


def _rows(source):
    return sorted(tuple(sorted(source[i].items())) for i in range(len(source)))


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def test_split_by_hash_is_a_fixed_function_of_the_key():
    keys = [f"module.function_{i}" for i in range(20_000)]
    splits = [split_by_hash(k, validation_percent=5, test_percent=5) for k in keys]
    assert splits == [split_by_hash(k, validation_percent=5, test_percent=5) for k in keys]
    counts = collections.Counter(splits)
    # 5% of 20,000 = 1,000 with a binomial s.d. of ~31: 850..1150 is ~5 s.d.
    assert 850 < counts["validation"] < 1150 and 850 < counts["test"] < 1150
    assert split_by_hash("json.dumps", validation_percent=5, test_percent=5) == "train"
    assert split_by_hash("x", validation_percent=0, test_percent=100) == "test"


# ---------------------------------------------------------------------------------------------
# system_translations
# ---------------------------------------------------------------------------------------------


def test_read_mo_file_both_byte_orders(tmp_path, mo_writer):
    entries = {"Hello": "Hallo", "%d file\x00%d files": "%d Datei\x00%d Dateien"}
    for order in "<>":
        path = mo_writer(tmp_path / f"x{order == '<'}.mo", entries, byte_order=order)
        pairs = dict(read_mo_file(path))
        assert pairs["Hello"] == "Hallo"
        assert pairs["%d file\x00%d files"] == "%d Datei\x00%d Dateien"
        assert "charset=UTF-8" in pairs[""]
    latin = mo_writer(tmp_path / "latin.mo", {"Size": "Größe"}, charset="ISO-8859-1")
    assert dict(read_mo_file(latin))["Size"] == "Größe"
    (tmp_path / "bad.mo").write_bytes(b"\0" * 40)
    with pytest.raises(ValueError, match="not a gettext .mo file"):
        read_mo_file(tmp_path / "bad.mo")


@pytest.mark.parametrize(
    "msgid, msgstr, expected",
    [
        ("_Save", "_Speichern", ("Save", "Speichern")),
        ("Se_lection", "Au_swahl", ("Selection", "Auswahl")),
        ("a_b and c_d", "a_b und c_d", ("a_b and c_d", "a_b und c_d")),  # not one mnemonic
        ("Stock label\x04_About", "_Info", ("About", "Info")),
        ("%d file\x00%d files", "%d Datei\x00%d Dateien", ("%d file", "%d Datei")),
        (
            "Usage:  %s\n  [OPTION]\n",
            "Aufruf:  %s\n  [OPTION]\n",
            ("Usage: %s [OPTION]", "Aufruf: %s [OPTION]"),
        ),
        ("%s: %s", "%s: %s", None),
        ("%s: %5.2f%%", "%s: %5.2f %%", None),
        ("PostScript", "PostScript", None),
        ("Untranslated", "", None),
        ("", "Project-Id-Version: x", None),
        ("long " * 60, "lang " * 60, None),
    ],
)
def test_clean_pair(msgid, msgstr, expected):
    assert system_translations.clean_pair(msgid, msgstr, max_chars=200) == expected


def _prepare_translations(data_dir, locale_dir, name="tiny", **config):
    config = SystemTranslationsConfig(name=name, locale_dir=str(locale_dir), **config)
    builder = SystemTranslations(data_dir=str(data_dir), config=config)
    builder.download_and_prepare()
    return builder


def test_system_translations_from_written_catalogs(tmp_path, locale_dir):
    builder = _prepare_translations(tmp_path / "tfds", locale_dir)
    assert builder.info.file_format.value == "array_record"
    # Catalog a: Open file, Save, Selection, file (plural), About (context), invalid argument,
    # Usage = 7 kept of 11 + header; catalog b: 5 entries, "Open file" already seen = 4 kept.
    metadata = builder.info.metadata
    assert metadata["catalogs"] == {
        "a.mo": {"entries": 12, "kept": 7},
        "b.mo": {"entries": 6, "kept": 4},
    }
    assert metadata["num_pairs"] == 11 and metadata["num_catalogs"] == 2

    # Readable by name after `import free_jax.data`, like any TFDS dataset.
    source = tfds.data_source("system_translations/tiny", data_dir=str(tmp_path / "tfds"))
    pairs = {}
    for split, split_source in source.items():
        assert len(split_source) == metadata["split_sizes"][split]
        for i in range(len(split_source)):
            row = split_source[i]
            en = row["en"].decode()
            pairs[en] = row["de"].decode()
            assert split == split_by_hash(en, validation_percent=5, test_percent=5)
    assert pairs["Save"] == "Speichern"
    assert pairs["%d file"] == "%d Datei"
    assert pairs["invalid argument: %s"] == "ungültiges Argument: %s"
    assert pairs["Close window"] == "Fenster schließen"
    assert len(pairs) == 11


def test_system_translations_are_deterministic(tmp_path, locale_dir):
    _prepare_translations(tmp_path / "one", locale_dir)
    _prepare_translations(tmp_path / "two", locale_dir)
    first = tfds.data_source("system_translations/tiny", data_dir=str(tmp_path / "one"))
    second = tfds.data_source("system_translations/tiny", data_dir=str(tmp_path / "two"))
    assert first.keys() == second.keys()
    for split in first:
        assert [first[split][i] for i in range(len(first[split]))] == [
            second[split][i] for i in range(len(second[split]))
        ]


def test_system_translations_limits(tmp_path, locale_dir):
    builder = _prepare_translations(
        tmp_path / "tfds", locale_dir, name="one", max_catalogs=1, max_examples=3
    )
    assert list(builder.info.metadata["catalogs"]) == ["a.mo"]
    assert sum(s.num_examples for s in builder.info.splits.values()) == 3


def test_system_translations_without_catalogs_says_where_it_looked(tmp_path):
    empty = tmp_path / "empty_locale"
    (empty / "de" / "LC_MESSAGES").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no gettext catalogs in .*empty_locale"):
        _prepare_translations(tmp_path / "tfds", empty, name="none")


@pytest.mark.skipif(not os.path.isdir(REAL_CATALOGS), reason="no German catalogs installed")
def test_system_translations_real_catalogs_smoke(tmp_path):
    builder = _prepare_translations(
        tmp_path / "tfds", "/usr/share/locale", name="real_small", max_catalogs=4
    )
    sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert sizes["train"] > 50, sizes
    assert builder.info.metadata["num_catalogs"] == 4
    row = builder.as_data_source(split="train")[0]
    assert row["en"] and row["de"] and row["en"] != row["de"]


# ---------------------------------------------------------------------------------------------
# python_docstrings
# ---------------------------------------------------------------------------------------------

_MODULE = '''
import functools


def add(a, b):
    """Return the sum of a and b.

    More detail that is not part of the summary.
    """
    return a + b


def only_doc():
    """Nothing but a docstring."""


def undocumented():
    return 1


class Box:
    """A box."""

    @functools.cache
    def weigh(
        self, scale,
    ):
        """Weigh the box, e.g. on a scale. Then report it."""
        # a comment stays
        return scale * 2

    if True:
        def conditional(self):
            """Defined under an if."""
            return None
'''


def test_mine_file_extracts_code_without_docstring(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(_MODULE)
    examples = {
        e["name"]: e
        for e in python_docstrings.mine_file(
            str(path), "pkg.mod", max_code_chars=1000, max_summary_chars=200
        )
    }
    assert sorted(examples) == ["pkg.mod.Box.conditional", "pkg.mod.Box.weigh", "pkg.mod.add"]
    assert examples["pkg.mod.add"]["code"] == "def add(a, b):\n    return a + b"
    assert examples["pkg.mod.add"]["docstring"] == "Return the sum of a and b."
    weigh = examples["pkg.mod.Box.weigh"]
    assert weigh["code"] == textwrap.dedent(
        """\
        @functools.cache
        def weigh(
            self, scale,
        ):
            # a comment stays
            return scale * 2"""
    )
    assert weigh["docstring"] == "Weigh the box, e.g. on a scale."


def test_python_docstrings_from_a_few_stdlib_files(tmp_path):
    files = ("json/decoder.py", "textwrap.py", "shlex.py")
    config = PythonDocstringsConfig(name="few", files=files)
    builder = PythonDocstrings(data_dir=str(tmp_path), config=config)
    builder.download_and_prepare()
    metadata = builder.info.metadata
    assert metadata["files"] == sorted(files)
    assert metadata["python_version"] == sys.version
    sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert sum(sizes.values()) == metadata["num_examples"] > 20

    source = tfds.data_source("python_docstrings/few", data_dir=str(tmp_path))
    names = set()
    for split, split_source in source.items():
        for i in range(len(split_source)):
            row = {k: v.decode() for k, v in split_source[i].items()}
            assert split == split_by_hash(row["name"], validation_percent=5, test_percent=5)
            assert row["source"] in files
            assert '"""' not in row["code"].split("\n", 2)[1]  # docstring line removed
            names.add(row["name"])
    assert "textwrap.dedent" in names and "shlex.split" in names


def test_python_docstrings_max_files_and_default_config_name(tmp_path):
    config = PythonDocstringsConfig(name="ten", max_files=10, max_examples=5)
    builder = PythonDocstrings(data_dir=str(tmp_path), config=config)
    builder.download_and_prepare()
    assert builder.info.metadata["num_files"] <= 10
    assert 0 < sum(s.num_examples for s in builder.info.splits.values()) <= 5
    major, minor = sys.version_info[:2]
    assert PythonDocstrings.BUILDER_CONFIGS[0].name == f"stdlib_py{major}{minor}"
