"""`python_docstrings`: code -> summary pairs mined with `ast` from the installed Python sources.

For every function or method with a docstring in the standard library of the running interpreter
(tests, site-packages and caches excluded), one example:

    code:      the function's source with its docstring removed, dedented
    docstring: the first sentence of the docstring ("Return the sum of a and b.")
    name:      the qualified name ("json.decoder.JSONDecoder.decode"), which fixes the split
    source:    the file, relative to the source root ("json/decoder.py")

The stdlib differs between Python versions, so the default config is named after the running
one ("stdlib_py311") and the metadata records `sys.version`, the source root and every file read.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import platform
import sys
import sysconfig
import textwrap
import tokenize
from collections.abc import Iterator

import tensorflow_datasets as tfds

from free_jax.data.builders import split_by_hash

# Directory names never mined: tests (docstrings there describe tests, not APIs), third-party
# packages, bytecode caches.
_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
)

_DESCRIPTION = """\
Code -> summary pairs mined with `ast` from the standard library of the Python interpreter that
prepared the data: each function or method with a docstring gives its source without the
docstring (input) and the docstring's first sentence (target). Splits are fixed by a hash of the
qualified name. The metadata records the Python version, the source root and the files read.
"""


def first_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line.

    >>> first_sentence("Return the sum.\\n\\n    More text.")
    'Return the sum.'
    >>> first_sentence("Split on whitespace. Trailing text\\n is dropped.")
    'Split on whitespace.'
    """
    paragraph = docstring.strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    for i, char in enumerate(text):
        # A period followed by a space ends a sentence, unless it is "e.g. " / "i.e. ".
        if char == "." and i + 1 < len(text) and text[i + 1] == " ":
            if text[max(0, i - 3) : i + 1].lower() not in ("e.g.", "i.e."):
                return text[: i + 1]
    return text


def _qualified_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef]]:
    """(dotted path inside the module, node) for functions and methods, outermost first."""

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
                yield from visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, prefix + child.name + ".")
            elif not isinstance(child, (ast.Lambda, ast.expr)):
                # Functions defined under if/try at module or class level.
                yield from visit(child, prefix)

    yield from visit(tree, "")


def mine_file(
    path: str, module: str, *, max_code_chars: int, max_summary_chars: int
) -> Iterator[dict]:
    """{"code", "docstring", "name"} examples of one source file; raises SyntaxError if unparsable."""
    with tokenize.open(path) as f:  # honours PEP 263 encoding cookies
        source = f.read()
    tree = ast.parse(source, filename=path)
    lines = source.splitlines()
    for qualname, node in _qualified_functions(tree):
        docstring = ast.get_docstring(node, clean=True)
        if not docstring or len(node.body) < 2:
            continue  # no docstring, or nothing but a docstring: no code to summarize
        doc_node = node.body[0]
        if doc_node.lineno <= node.lineno:
            continue  # one-line "def f(): 'doc'" style; no clean way to cut the docstring
        start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        kept = lines[start - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        summary = first_sentence(docstring)
        if len(code) > max_code_chars or not summary or len(summary) > max_summary_chars:
            continue
        if summary.startswith(">>>") or not any(c.isalpha() for c in summary):
            continue
        yield {
            "code": code,
            "docstring": summary,
            "name": f"{module}.{qualname}",
        }


@dataclasses.dataclass
class PythonDocstringsConfig(tfds.core.BuilderConfig):
    """Which sources to mine and how much to keep.

    Attributes:
      source_dir: root of the Python sources; None means this interpreter's stdlib.
      files: restrict to these paths relative to `source_dir` ("json/decoder.py"), for tests.
      max_files: read only the first N files (sorted by relative path).
      max_examples: keep only the first N examples (in file order), before splitting.
      max_code_chars: skip functions whose code (docstring removed) is longer.
      max_summary_chars: skip functions whose first docstring sentence is longer.
      validation_percent, test_percent: split shares, by hash of the qualified name.
    """

    source_dir: str | None = None
    files: tuple[str, ...] = ()
    max_files: int | None = None
    max_examples: int | None = None
    max_code_chars: int = 4000
    max_summary_chars: int = 300
    validation_percent: float = 5.0
    test_percent: float = 5.0


_DEFAULT_CONFIG = f"stdlib_py{sys.version_info.major}{sys.version_info.minor}"


class PythonDocstrings(tfds.core.GeneratorBasedBuilder):
    """Code -> first docstring sentence from the installed Python stdlib (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        PythonDocstringsConfig(
            name=_DEFAULT_CONFIG, description=f"The stdlib of Python {platform.python_version()}."
        )
    ]

    def __init__(self, *, file_format=None, **kwargs):
        # array_record unless told otherwise: random access for grain, and no TensorFlow needed.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "code": tfds.features.Text(),
                    "docstring": tfds.features.Text(),
                    "name": tfds.features.Text(),
                    "source": tfds.features.Text(),
                }
            ),
            supervised_keys=("code", "docstring"),
            metadata=tfds.core.MetadataDict(),
        )

    def source_files(self) -> tuple[str, list[str]]:
        """(source root, sorted relative paths of the .py files to mine)."""
        cfg = self.builder_config
        root = cfg.source_dir or sysconfig.get_paths()["stdlib"]
        if cfg.files:
            relative = sorted(cfg.files)
        else:
            relative = []
            for directory, subdirs, names in os.walk(root):
                subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS)
                relative += [
                    os.path.relpath(os.path.join(directory, n), root)
                    for n in names
                    if n.endswith(".py")
                ]
            relative.sort()
        if cfg.max_files:
            relative = relative[: cfg.max_files]
        if not relative:
            raise FileNotFoundError(f"python_docstrings: no .py files under {root}")
        return root, relative

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        root, files = self.source_files()
        examples, read, unparsable, seen = [], [], [], {}
        for rel in files:
            if cfg.max_examples is not None and len(examples) >= cfg.max_examples:
                break
            read.append(rel.replace(os.sep, "/"))
            module = rel[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
            try:
                mined = list(
                    mine_file(
                        os.path.join(root, rel),
                        module,
                        max_code_chars=cfg.max_code_chars,
                        max_summary_chars=cfg.max_summary_chars,
                    )
                )
            except (SyntaxError, UnicodeDecodeError, ValueError):
                unparsable.append(rel)  # e.g. lib2to3 grammar fixtures, Python 2 files
                continue
            for example in mined:
                # A name defined twice (property setters, if/else definitions) gets "#2", "#3"
                # in its key; the split still follows the name, so both land together.
                seen[example["name"]] = seen.get(example["name"], 0) + 1
                example["key"] = f"{example['name']}#{seen[example['name']]}"
                example["source"] = read[-1]
                examples.append(example)
        examples = examples[: cfg.max_examples] if cfg.max_examples else examples
        if not examples:
            raise ValueError(f"python_docstrings: no documented functions in {len(files)} files")
        by_split = {"train": [], "validation": [], "test": []}
        for example in examples:
            split = split_by_hash(
                example["name"],
                validation_percent=cfg.validation_percent,
                test_percent=cfg.test_percent,
            )
            by_split[split].append(example)
        self.info.metadata.update(
            {
                "python_version": sys.version,
                "python_implementation": platform.python_implementation(),
                "source_root": root,
                "num_files": len(read),
                "files": read,
                "unparsable_files": unparsable,
                "num_examples": len(examples),
                "split_sizes": {k: len(v) for k, v in by_split.items()},
            }
        )
        # TFDS cannot write an empty split; a tiny config may leave validation or test empty.
        return {split: self._generate_examples(rows) for split, rows in by_split.items() if rows}

    def _generate_examples(self, rows) -> Iterator[tuple[str, dict]]:
        for example in rows:
            example = dict(example)
            yield example.pop("key"), example
