"""The user's own data: one JSON object per line, with configurable input and target fields.

    {"document": "The cat sat on the mat.", "summary": "A cat sat."}
    {"document": "...", "summary": "..."}

`read_jsonl(path, input_field="document", target_field="summary")` returns a `JsonlSource`, a
random-access sequence of the records (so grain can shuffle and checkpoint it like a TFDS
`data_source`). Field names may be paths into nested objects and lists, separated by "/":
"answers/text/0" reads `record["answers"]["text"][0]`.

Every required field must hold text: a JSON string (the target may also be a non-empty list of
strings, the acceptable answers). A number, a boolean or an object is not silently turned into text
("True", "{'a': 1}"); its line is malformed, as is a line that is not UTF-8 or not a JSON object.

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
      num_malformed: lines skipped because they were not UTF-8, not a JSON object, or had a
        required field that is not text.
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
    # Bytes, decoded line by line: a line that is not UTF-8 is then one malformed line (text mode
    # would raise UnicodeDecodeError from the file iterator, with no line number, past any skip).
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
                if skip_malformed:
                    source.num_malformed += 1
                    continue
                what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "malformed JSON line"
                raise JsonlError(f"{path}:{line_number}: {what} ({e})") from e
            missing = [name for name in required if get_field(record, name, None) is None]
            if missing:
                if skip_malformed:
                    source.num_missing_field += 1
                    continue
                raise JsonlError(
                    f"{path}:{line_number}: missing field {missing[0]!r} "
                    f"(the line has fields {sorted(record)})"
                )
            problem = _not_text(record, required[:-1], target_field)
            if problem:
                if skip_malformed:
                    source.num_malformed += 1
                    continue
                raise JsonlError(f"{path}:{line_number}: {problem}")
            source.records.append(record)
            source.line_numbers.append(line_number)
    return source


def _not_text(record: dict, input_fields: Sequence[str], target_field: str) -> str | None:
    """Why a required field of `record` is not text (None when all are).

    >>> _not_text({"document": {"a": 1}, "summary": "s"}, ["document"], "summary")
    "field 'document' is a JSON object, not a string"
    >>> _not_text({"q": "x", "answers": ["a", 2]}, ["q"], "answers")
    "field 'answers' is a list holding a JSON number, not a list of strings"
    >>> _not_text({"q": "x", "answers": ["a", "b"]}, ["q"], "answers") is None
    True
    """
    for name in [*input_fields, target_field]:
        value = get_field(record, name)
        if isinstance(value, str):
            continue
        if name == target_field and isinstance(value, list):
            if value and all(isinstance(v, str) for v in value):
                continue
            if not value:
                return f"field {name!r} is an empty list, not a string or a list of strings"
            bad = next(v for v in value if not isinstance(v, str))
            return f"field {name!r} is a list holding {_json_kind(bad)}, not a list of strings"
        return f"field {name!r} is {_json_kind(value)}, not a string"
    return None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, (int, float)):
        return "a JSON number"
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON list"
    return f"a {type(value).__name__}"
