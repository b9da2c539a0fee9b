"""Checking the values of a model config (read from a config.json) against its dataclass's field types.

A wrong-typed value ("max_layers": "4", "block_out_channels": 320) otherwise fails far away, inside a
comparison or a Flax module, without naming the field.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):  # JSON has lists
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # other annotations are left to the dataclass


def _describe(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_field_types(cls: type, values: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first of `values` whose type does not fit `cls`'s field of that name."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _matches(value, hints[name]):
            raise ValueError(f"{name} must be {_describe(hints[name])}, got {value!r}")
