"""The user's own data: one JSON object per line, with configurable input and target fields.

    {"document": "The cat sat on the mat.", "summary": "A cat sat."}
    {"document": "...", "summary": "..."}

`read_jsonl(path, input_field="document", target_field="summary")` returns a `JsonlSource`, a
random-access sequence of the records (so grain can shuffle and checkpoint it like a TFDS
`data_source`). Field names may be paths into nested objects and lists, separated by "/":
"answers/text/0" reads `record["answers"]["text"][0]`.

Errors name the file and the 1-based line number. With `skip_malformed=True` malformed lines and
lines missing a field are skipped instead, and counted on the returned source so the caller can log
how much of the file was unusable. Blank lines are ignored and not counted as malformed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

_MISSING = object()


class JsonlError(ValueError):
    """A line of a JSONL file that cannot be used; the message names file, line and field."""


def get_field(record: Any, path: str, default: Any = _MISSING) -> Any:
    """Reads a "/"-separated path from nested dicts and lists.

    >>> get_field({"answers": {"text": ["Paris", "paris"]}}, "answers/text/0")
    'Paris'

    Raises KeyError (naming the full path) when a step is absent, unless `default` is given. A
    value of None counts as absent: a null field is as useless as a missing one.
    """
    value = record
    for step in path.split("/"):
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, (list, tuple, np.ndarray)) and step.lstrip("-").isdigit():
            index = int(step)
            if not -len(value) <= index < len(value):
                value = None
                break
            value = value[index]
        else:
            value = None
            break
        if value is None:
            break
    if value is None:
        if default is not _MISSING:
            return default
        raise KeyError(path)
    return value


@dataclasses.dataclass
class JsonlSource(Sequence):
    """The usable records of one JSONL file, in file order, with counts of what was dropped.

    Attributes:
      path: the file read.
      records: the parsed JSON objects that have every required field.
      line_numbers: the 1-based line each record came from (for error messages further down).
      num_malformed: lines skipped because they were not a JSON object.
      num_missing_field: lines skipped because a required field was absent or null.
    """

    path: str
    records: list[dict]
    line_numbers: list[int]
    num_malformed: int = 0
    num_missing_field: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    @property
    def num_skipped(self) -> int:
        return self.num_malformed + self.num_missing_field


def read_jsonl(
    path: str | epath.PathLike,
    *,
    input_field: str | Sequence[str] = "input",
    target_field: str = "target",
    skip_malformed: bool = False,
) -> JsonlSource:
    """Reads a JSONL file, checking that every kept record has the required fields.

    Args:
      path: local path or any path `etils.epath` opens (gs://... on TPU pods).
      input_field: field (or several, e.g. for "question: {question} context: {context}"
        templates) every record must have.
      target_field: field every record must have.
      skip_malformed: skip and count bad lines instead of raising.

    Raises:
      FileNotFoundError: the file does not exist.
      JsonlError: a malformed line or a missing field, unless `skip_malformed`.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    required = [input_field] if isinstance(input_field, str) else list(input_field)
    required.append(target_field)

    source = JsonlSource(path=str(path), records=[], line_numbers=[])
    with path.open("r", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if skip_malformed:
                    source.num_malformed += 1
                    continue
                raise JsonlError(f"{path}:{line_number}: malformed JSON line ({e})") from e
            missing = [name for name in required if get_field(record, name, None) is None]
            if missing:
                if skip_malformed:
                    source.num_missing_field += 1
                    continue
                raise JsonlError(
                    f"{path}:{line_number}: missing field {missing[0]!r} "
                    f"(the line has fields {sorted(record)})"
                )
            source.records.append(record)
            source.line_numbers.append(line_number)
    return source
