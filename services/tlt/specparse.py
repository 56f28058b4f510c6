"""Build typed dataclasses from plain dicts (YAML, JSON, CRD specs) with errors that name the field.

:func:`from_dict` walks a dataclass's type hints: nested dataclasses, ``int``/``float``/``bool``/``str``,
``Literal[...]``, ``X | None``, ``list[X]``/``tuple[X, ...]`` and ``dict[str, X]``. Unknown keys are
refused with a "did you mean" hint, so a typo never silently falls back to a default. Range checks stay
in each dataclass's ``__post_init__``; a :class:`ConfigError` raised there gets the field's path prefixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from tlt.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Instantiate dataclass ``cls`` from ``data``; ``path`` prefixes field names in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping of fields, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        try:
            key = str(unknown[0])
        except ValueError:  # an int key over 4300 digits
            key = _show(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid fields: {', '.join(fields)}"
        raise ConfigError(f"{_join(path, key)}: unknown field{hint}")
    kwargs = {name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(_prefix(path, str(exc))) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """The inverse of :func:`from_dict`: plain dicts/lists, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _prefix(path: str, message: str) -> str:
    """Prefix a nested error (which names its own field first) with the parent path."""
    if not path or message.startswith(path):
        return message
    return f"{path}.{message}"


def _show(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message, shortened; never raises (ints over 4300 digits, deep nesting)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[:limit]}..."


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {_show(value)} is not any of {_describe(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:  # YAML 1.1 reads `off` as false
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, choices))}; got {_show(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a list, got {type(value).__name__} {_show(value)}")
        args = get_args(tp)
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {type(value).__name__}")
        item = get_args(tp)[1] if get_args(tp) else Any
        return {str(k): _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any or tp is typing.Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {_show(value)}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{path} must be a 64-bit integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} must be a number, got {_show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            raise ConfigError(f"{path} must be a number in the float range, got {_show(value)}") from None
        if not math.isfinite(number):  # no setting means anything at inf or NaN; they would poison training
            raise ConfigError(f"{path} must be a finite number, got {number}")
        return number
    if tp is str:
        if not isinstance(value, str):
            hint = " (YAML reads 4_2_8 as the number 428: quote it)" if isinstance(value, int | float) else ""
            raise ConfigError(f"{path} must be a string, got {_show(value)}{hint}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_describe(tp)}")
