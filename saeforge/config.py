"""Typed dataclass configs that round-trip through JSON.

Every config in saeforge is a dataclass that inherits :class:`JsonConfig`. ``to_dict`` gives plain JSON
types; ``from_dict`` rebuilds the dataclass, recursing into nested config fields and refusing unknown keys
with a message that names them (a typo in a config file is an error, never silently ignored).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_value(tp: Any, value: Any) -> tuple[bool, Any, str]:
    """(ok, value, expected) for a field annotation; integral floats become ints, ints floats, lists tuples."""
    import numbers

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, value, ""
        wants = []
        for arg in args:
            if arg is type(None):
                continue
            ok, v, want = _check_value(arg, value)
            if ok:
                return True, v, ""
            wants.append(want)
        return False, value, " or ".join(wants) + (" or null" if type(None) in args else "")
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        if isinstance(value, bool):
            return False, value, "an integer"
        if isinstance(value, numbers.Integral):
            return True, int(value), ""
        if isinstance(value, float) and value.is_integer():
            return True, int(value), ""
        return False, value, "an integer"
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return True, float(value), ""
        return False, value, "a number"
    if tp is str:
        return isinstance(value, str), value, "a string"
    if origin is list or tp is list:
        if isinstance(value, tuple):
            value = list(value)
        return isinstance(value, list), value, "a list"
    if origin is tuple or tp is tuple:
        if isinstance(value, list):
            value = tuple(value)
        return isinstance(value, tuple), value, "a list"
    if origin is dict or tp is dict:
        return isinstance(value, dict), value, "an object"
    return True, value, ""


@dataclasses.dataclass
class JsonConfig:
    """Mixin for dataclass configs: ``to_dict``/``from_dict``/``save``/``load`` with strict keys.

    Construction checks every field's type against its annotation (``__post_init__``), so a wrong-typed value
    from the CLI (``--set k=abc``), a JSON file or the Python API is refused before any work starts. Subclasses
    add range checks in their own ``__post_init__`` (calling this one first), with :meth:`require`.
    """

    FLAGS: typing.ClassVar[dict[str, str]] = {}  # field -> CLI flag, where the flag is not --<field-name>

    def __post_init__(self) -> None:
        self.check_types()

    @classmethod
    def _flag(cls, name: str) -> str:
        return cls.FLAGS.get(name, _flag(name))

    def check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            tp = hints.get(f.name, Any)
            value = getattr(self, f.name)
            ok, fixed, want = _check_value(tp, value)
            if not ok:
                raise ConfigError(
                    f"{type(self).__name__}.{f.name} must be {want}, got {value!r}; pass a valid {self._flag(f.name)}"
                )
            if fixed is not value:
                object.__setattr__(self, f.name, fixed)

    def require(self, ok: bool, name: str, rule: str) -> None:
        """Raise a one-line ConfigError unless ``ok``: ``<Config>.<name> must be <rule>, got <value>``."""
        if not ok:
            raise ConfigError(
                f"{type(self).__name__}.{name} must be {rule}, got {getattr(self, name)!r}; "
                f"pass a valid {self._flag(name)}"
            )

    def require_ints(self, minimum: int, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            self.require(v is None or v >= minimum, n, f">= {minimum}")

    def require_finite(self, *names: str, positive: bool = False, minimum: float | None = None,
                       maximum: float | None = None) -> None:
        import math

        for n in names:
            v = getattr(self, n)
            if v is None:
                continue
            rule = "a finite number" + (" > 0" if positive else "")
            if minimum is not None:
                rule += f" >= {minimum}"
            if maximum is not None:
                rule += f" <= {maximum}"
            ok = math.isfinite(v) and (not positive or v > 0)
            ok = ok and (minimum is None or v >= minimum) and (maximum is None or v <= maximum)
            self.require(ok, n, rule)

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
        for k, v in kwargs.items():  # before construction: a recipe's own __post_init__ may compare values
            ok, fixed, want = _check_value(hints.get(k, Any), v)
            if not ok:
                flag = cls._flag(k)
                also = "" if flag.startswith("--set") else f" (or --set {k}=VALUE)"
                raise ConfigError(f"{cls.__name__}.{k} must be {want}, got {v!r}; pass a valid {flag}{also}")
            kwargs[k] = fixed
        try:
            return cls(**kwargs)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{cls.__name__}: {e}; add the missing key(s)") from None

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); fix or recreate it") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} holds a JSON {type(d).__name__}, not an object of {cls.__name__} fields")
        return cls.from_dict(d)


class ArgError(ConfigError, argparse.ArgumentTypeError):
    """A flag value that cannot be read; argparse prints it as its one-line usage error."""


def parse_size(text: str) -> int:
    """'5M' -> 5_000_000, '64k' -> 64_000, '1e6' -> 1_000_000 (a positive whole count)."""
    t = str(text).strip().lower().replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ArgError(f"cannot read {text!r} as a count; write e.g. 5M, 250k or 100000") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise ArgError(f"{text!r} is not a positive whole count; write e.g. 5M, 250k or 100000")
    return int(value)


def finite_float(text: str) -> float:
    """A finite number (argparse ``type``): 'nan', 'inf' and words are refused."""
    try:
        value = float(text)
    except ValueError:
        raise ArgError(f"cannot read {text!r} as a number; write e.g. 2e-4 or 0.5") from None
    if not math.isfinite(value):
        raise ArgError(f"{text!r} is not a finite number; write e.g. 2e-4 or 0.5")
    return value


# ---- CLI flags generated from config fields ------------------------------------------------------------------
def _field(cls: type[JsonConfig], name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def field_default(cls: type[JsonConfig], name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (its factory called), or None when it has none."""
    f = _field(cls, name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def flag_of(cls: type[JsonConfig], name: str) -> str:
    """The CLI flag of config field ``name``: ``cls.FLAGS[name]`` or ``--<field-name>``."""
    return cls.FLAGS.get(name, _flag(name))


def _dest(cls: type[JsonConfig], name: str) -> str:
    return flag_of(cls, name)[2:].replace("-", "_")


def _flag_type(cls: type[JsonConfig], name: str) -> Any:
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
    return {int: int, float: finite_float, str: str}.get(tp)


def config_flag(parser: Any, cls: type[JsonConfig], name: str, help: str, **kw: Any) -> argparse.Action:
    """Add the flag of config field ``cls.name`` to ``parser`` (a parser or argument group): its name from
    ``cls.FLAGS`` (else ``--<field-name>``), its default the field's (so no default is typed twice), its type from
    the annotation (int, a finite float, str; a bool defaulting to False is a ``store_true`` switch) unless
    ``type=`` is given. Further argparse keywords (``choices``, ``metavar``, ``nargs`` ...) pass through."""
    default = field_default(cls, name)
    if typing.get_type_hints(cls)[name] is bool and default is False and "type" not in kw:
        return parser.add_argument(flag_of(cls, name), action="store_true", help=help, **kw)
    kw.setdefault("type", _flag_type(cls, name))
    if kw["type"] is None:
        raise TypeError(f"{cls.__name__}.{name}: give the flag's type=")
    return parser.add_argument(flag_of(cls, name), default=default, help=help, **kw)


def config_flags(parser: Any, cls: type[JsonConfig], helps: dict[str, str], **kw: dict[str, Any]) -> None:
    """:func:`config_flag` for each ``field: help`` of ``helps`` (in order); ``kw[field]`` holds that flag's
    extra argparse keywords."""
    for name, text in helps.items():
        config_flag(parser, cls, name, text, **kw.get(name, {}))


def config_values(cls: type[JsonConfig], args: argparse.Namespace, names: typing.Iterable[str]) -> dict[str, Any]:
    """``{field: value}`` of the parsed flags that :func:`config_flag` made for ``names``."""
    return {n: getattr(args, _dest(cls, n)) for n in names}
