"""Typed dataclass configs that round-trip through JSON.

Every config in saeforge is a dataclass that inherits :class:`JsonConfig`. ``to_dict`` gives plain JSON
types; ``from_dict`` rebuilds the dataclass, recursing into nested config fields and refusing unknown keys
with a message that names them (a typo in a config file is an error, never silently ignored).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from saeforge.errors import SaeforgeError
from saeforge.io import write_json_atomic

T = TypeVar("T", bound="JsonConfig")


class ConfigError(SaeforgeError, ValueError):
    """A config value or key is wrong; the message names it and the fix."""


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, JsonConfig)


def _convert(tp: Any, value: Any) -> Any:
    """Rebuild nested configs and tuples from JSON values according to a field's annotation."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            if _is_config_type(arg) and isinstance(value, dict):
                return arg.from_dict(value)
        return value
    if _is_config_type(tp) and isinstance(value, dict):
        return tp.from_dict(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin is list and isinstance(value, list):
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(arg, v) for v in value]
    return value


@dataclasses.dataclass
class JsonConfig:
    """Mixin for dataclass configs: ``to_dict``/``from_dict``/``save``/``load`` with strict keys."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, JsonConfig):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, list):
                v = [x.to_dict() if isinstance(x, JsonConfig) else x for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any], *, strict: bool = True) -> T:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - names)
        if unknown and strict:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}"
            )
        kwargs = {k: _convert(hints.get(k, Any), v) for k, v in d.items() if k in names}
        return cls(**kwargs)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


def parse_size(text: str) -> int:
    """'5M' -> 5_000_000, '64k' -> 64_000, '1e6' -> 1_000_000."""
    t = str(text).strip().lower().replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise SaeforgeError(f"cannot read {text!r} as a count; write e.g. 5M, 250k or 100000") from None
