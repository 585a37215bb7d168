"""Offline corpora as TFDS builders: real text found on any machine, no download.

Importing this package registers the builders with TFDS, after which

    tfds.data_source("system_translations", data_dir=...)
    tfds.data_source("python_docstrings", data_dir=...)

prepare the data on first use (array_record files, so TensorFlow is not needed) and read it back
from the cache afterwards. Each builder takes a config for tests and small runs, e.g.
`SystemTranslations(config=SystemTranslationsConfig(name="small", max_examples=500))`.
"""

import hashlib
import importlib.util
import sys

# TFDS 4.9.x imports the `importlib_resources` backport whenever it locates the code of a builder
# defined in a package (to prepare it), but declares it a dependency only for Python < 3.9. The
# backport and the stdlib module offer the same `abc.Traversable` TFDS checks against, so where the
# backport is absent the stdlib module stands in for it.
if importlib.util.find_spec("importlib_resources") is None:
    import importlib.resources
    import importlib.resources.abc

    sys.modules["importlib_resources"] = importlib.resources

# Builders file an example under a split by a hash of a stable key (a msgid, a qualified name), so
# that the split of an example never depends on what else was read or on the order of reading.
_HASH_BUCKETS = 10_000


def split_by_hash(key: str, *, validation_percent: float, test_percent: float) -> str:
    """ "train", "validation" or "test" for `key`, fixed by a hash of it.

    >>> split_by_hash("json.dumps", validation_percent=5, test_percent=5)
    'train'
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    percent = int.from_bytes(digest[:8], "big") % _HASH_BUCKETS * 100 / _HASH_BUCKETS
    if percent < test_percent:
        return "test"
    if percent < test_percent + validation_percent:
        return "validation"
    return "train"


# Imported after split_by_hash, which the builders use.
from free_jax.data.builders.python_docstrings import (  # noqa: E402
    PythonDocstrings,
    PythonDocstringsConfig,
)
from free_jax.data.builders.system_translations import (  # noqa: E402
    SystemTranslations,
    SystemTranslationsConfig,
    read_mo_file,
)

__all__ = [
    "PythonDocstrings",
    "PythonDocstringsConfig",
    "SystemTranslations",
    "SystemTranslationsConfig",
    "read_mo_file",
    "split_by_hash",
]
