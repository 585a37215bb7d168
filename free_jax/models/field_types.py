"""Type checks of a config dataclass's scalar fields, so that a bad value names its field.

It lives in `models/` because the model configs use it too, and `models` imports nothing else of
free_jax; the training, evaluation and LoRA configs import it from here.

gin bindings and JSON reach the configs unchecked: `--gin.TRAIN_STEPS="abc"` once surfaced as a
`TypeError` deep in the trainer (comparing a str with an int) that named no field, and
`TrainConfig.progress_bar="False"` would have been silently true. A config's `__post_init__` calls
`check_field_types(self)` first:

>>> import dataclasses
>>> @dataclasses.dataclass
... class Steps:
...     every: int = 1
...     rate: float | None = None
...     def __post_init__(self):
...         check_field_types(self)
>>> Steps(every="abc")
Traceback (most recent call last):
...
TypeError: Steps.every must be an int, got 'abc'
>>> Steps(every=True)
Traceback (most recent call last):
...
TypeError: Steps.every must be an int, got True
>>> Steps(every=2, rate=3).rate   # an int is a fine float
3
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing

# The scalar types checked, with the check each needs (bool is an int to Python but never a count
# or a rate here, and an int is never a flag) and how messages name them.
_CHECKS = {
    bool: (lambda v: isinstance(v, bool), "a bool"),
    int: (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an int"),
    float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a float"),
}


@functools.cache
def _scalar_fields(cls: type) -> tuple[tuple[str, tuple[type, ...], bool], ...]:
    """(name, scalar types, None allowed) of each field annotated with bool, int and float only
    (optionally `| None`); other fields (strings, tuples, nested configs) are left to the class."""
    hints = typing.get_type_hints(cls)
    fields = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        members = typing.get_args(hint) if union else (hint,)
        kinds = tuple(m for m in members if m is not types.NoneType)
        if kinds and all(k in _CHECKS for k in kinds):
            fields.append((field.name, kinds, types.NoneType in members))
    return tuple(fields)


def check_field_types(config) -> None:
    """Raises TypeError naming `Class.field` and the value when a bool, int or float field holds
    something else (None only where the annotation allows it)."""
    for name, kinds, optional in _scalar_fields(type(config)):
        value = getattr(config, name)
        if (optional and value is None) or any(_CHECKS[k][0](value) for k in kinds):
            continue
        expected = " or ".join([_CHECKS[k][1] for k in kinds] + ["None"] * optional)
        raise TypeError(f"{type(config).__name__}.{name} must be {expected}, got {value!r}")
