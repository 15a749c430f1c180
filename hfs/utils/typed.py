"""The one check for values that come from outside: a config file, a ``--set``, a wire message, a JSON spec.

A value is checked against a type annotation (a dataclass field's, read with
``typing.get_type_hints``) and against the rules in the field's metadata (``choices``,
``ge``/``gt``/``le``/``lt``: :class:`hfs.utils.ranges.Range`). The type rules live here and
nowhere else:

- an int counts as a float (and becomes one); a bool is neither an int nor a float nor a str;
- an int must fit in 64 bits (numpy and the wire carry int64);
- ``finite``: a float must be finite (what arrives over the wire);
- ``loose`` (what a person typed: YAML, ``--set``): a number is accepted where a string is
  expected, ``5e-4`` (a string to YAML 1.1) where a float is, and a single item or comma
  separated text (``100,200``) where a list is.

Each caller names what it checks (``config key 'train.lr'``, ``header field 'rows'``) and the
exception it raises, so every error is one line that names the key or field. The checks of
a type are built once per annotation and field (the server runs them on every message).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from typing import Any, Callable, Iterable, Mapping, TypeVar

from hfs.utils.ranges import Range

_INT64 = 2**63
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NO = object()  # "the value is not of this type"

T = TypeVar("T")
Raise = type[Exception]
#: converts a value (``loose``, ``finite``) or returns _NO; raises _Problem for a usable type but a bad value
Converter = Callable[[Any, bool, bool], Any]


class _Problem(Exception):
    """What is wrong with a value, without its name (``suffix`` names an item inside it: ``[1]``)."""

    def __init__(self, text: str, suffix: str = "") -> None:
        super().__init__(text)
        self.text, self.suffix = text, suffix

    def raise_as(self, what: str, error: Raise) -> typing.NoReturn:
        raise error(f"{_inner(what, self.suffix)} {self.text}") from None


def rules(*, choices: Iterable[Any] | None = None, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, **extra: Any) -> dict[str, Any]:
    """A field's metadata: its range rules (None: no rule) plus ``extra`` entries (e.g. help text)."""
    return {"choices": tuple(choices) if choices is not None else None, "ge": ge, "gt": gt, "le": le, "lt": lt,
            **extra}


def hint_name(hint: Any) -> str:
    """``int``, ``float/None``, ``list``: how an annotation reads in an error message."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return "/".join(hint_name(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(what: str, value: Any, hint: Any, *, error: Raise = ValueError, loose: bool = False,
           finite: bool = False) -> Any:
    """``value`` as the annotation ``hint`` says (an int becomes a float where a float is expected),
    or ``error("<what> must be <type>, got <value>")``."""
    return _item_spec(hint).check(what, value, error, loose, finite)


def fits(value: Any, hint: Any, *, finite: bool = False) -> bool:
    """Whether :func:`coerce` accepts ``value`` as ``hint`` (e.g. a request id that must be an int)."""
    try:
        return _converter(hint)(value, False, finite) is not _NO
    except _Problem:
        return False


def check_rules(what: str, value: Any, meta: Mapping[str, Any], *, error: Raise = ValueError) -> None:
    """``value`` obeys the ``choices``/bounds in ``meta`` (each item of a list does); None has no rules."""
    FieldSpec.of(Any, meta).check(what, value, error)


def checked(what: str, value: Any, hint: Any, meta: Mapping[str, Any] | None = None, *, error: Raise = ValueError,
            loose: bool = False, finite: bool = False) -> Any:
    """:func:`coerce` then :func:`check_rules`: the value a field may hold, or one error naming ``what``."""
    return FieldSpec.of(hint, meta or {}).check(what, value, error, loose, finite)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One dataclass field as the checks see it: its annotation, metadata and built checks."""

    hint: Any
    meta: Mapping[str, Any]
    required: bool = False
    convert: Converter = dataclasses.field(default=None, repr=False, compare=False)
    range: Range | None = dataclasses.field(default=None, repr=False, compare=False)  # None: no rules

    @classmethod
    def of(cls, hint: Any, meta: Mapping[str, Any], required: bool = False) -> "FieldSpec":
        return cls(hint, meta, required, _converter(hint), Range.from_meta(meta) or None)

    def check(self, what: str, value: Any, error: Raise, loose: bool = False, finite: bool = False) -> Any:
        """The value this field may hold, or ``error`` naming ``what``."""
        try:
            return self.value(value, loose, finite)
        except _Problem as problem:
            problem.raise_as(what, error)

    def value(self, value: Any, loose: bool, finite: bool) -> Any:
        """The value this field may hold, or a _Problem without the field's name."""
        got = self.convert(value, loose, finite)
        if got is _NO:
            raise _Problem(f"must be {hint_name(self.hint)}, got {value!r}")
        if self.range is not None and got is not None:
            _obey(self.range, got)
        return got


@functools.lru_cache(maxsize=None)
def field_specs(cls: type) -> dict[str, FieldSpec]:
    """Name -> :class:`FieldSpec` of a dataclass's fields, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: FieldSpec.of(hints[f.name], f.metadata,
                                 f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)}


def field_values(cls: type, data: Any, what: str, *, error: Raise = ValueError, strict: bool = True,
                 finite: bool = False) -> dict[str, Any]:
    """The fields of a ``cls`` from a mapping (a JSON object), each one checked.

    Refuses a non-mapping, a missing required field and (``strict``) an unknown one;
    ``strict=False`` drops unknown keys. Errors name ``<what> field '<key>'``.
    """
    if not isinstance(data, (dict, Mapping)):
        raise error(f"{what} must be an object of its fields, got {type(data).__name__}")
    specs = field_specs(cls)
    out = {}
    key = None
    try:
        for key, value in data.items():
            spec = specs.get(key)
            if spec is not None:
                out[key] = spec.value(value, False, finite)
            elif strict:
                unknown = sorted(map(str, set(data) - set(specs)))
                raise error(f"{what} has unknown field(s) {', '.join(unknown)} (known: {', '.join(specs)})")
    except _Problem as problem:
        problem.raise_as(f"{what} field '{key}'", error)
    if len(out) < len(specs):
        for name in _required(cls):
            if name not in out:
                raise error(f"{what} field '{name}' is missing")
    return out


@functools.lru_cache(maxsize=None)
def _required(cls: type) -> tuple[str, ...]:
    return tuple(name for name, spec in field_specs(cls).items() if spec.required)


def check_fields(obj: T, what: str, *, error: Raise = ValueError, finite: bool = False) -> T:
    """``obj`` (a dataclass instance built in code, not parsed) with every field checked against its
    type and rules and converted (an int where a float is expected becomes a float)."""
    changed = {}
    for name, spec in field_specs(type(obj)).items():
        value = getattr(obj, name)
        got = spec.check(f"{what} field '{name}'", value, error, False, finite)
        if got is not value:
            changed[name] = got
    return dataclasses.replace(obj, **changed) if changed else obj


# --------------------------------------------------------------------------- the rules


def _obey(rule: Range, value: Any) -> None:
    """``value`` (each item of a list) obeys ``rule``, or a _Problem."""
    if not isinstance(value, list):
        text = rule.problem(value)
        if text:
            raise _Problem(text)
        return
    for i, item in enumerate(value):
        text = rule.problem(item)
        if text:
            raise _Problem(text, f"[{i}]")


def _inner(what: str, suffix: str) -> str:
    """The name of an item: ``config key 'optim.milestones'`` -> ``config key 'optim.milestones[1]'``."""
    if not suffix:
        return what
    return f"{what[:-1]}{suffix}'" if what.endswith("'") else f"{what}{suffix}"


@functools.lru_cache(maxsize=None)
def _converter(hint: Any) -> Converter:
    """The conversion of one annotation, built once."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return lambda value, loose, finite: value
    if origin in (typing.Union, types.UnionType):
        return functools.partial(_first_fit, tuple(_converter(option) for option in args))
    if hint is list or origin is list:
        return functools.partial(_as_list, args[0] if args else Any)
    if hint is dict or origin is dict:
        return functools.partial(_as_dict, args or (Any, Any))
    return _SCALARS.get(hint) or functools.partial(_exact, hint)


def _first_fit(options: tuple[Converter, ...], value: Any, loose: bool, finite: bool) -> Any:
    for convert in options:
        got = convert(value, loose, finite)
        if got is not _NO:
            return got
    return _NO


def _as_none(value: Any, loose: bool, finite: bool) -> Any:
    return None if value is None else _NO


def _as_bool(value: Any, loose: bool, finite: bool) -> Any:
    return value if isinstance(value, bool) else _NO


def _as_int(value: Any, loose: bool, finite: bool) -> Any:
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # a bool is not a number
            return _NO
        value = int(value)
    if not -_INT64 <= value < _INT64:
        raise _Problem(f"{value} is out of range (a 64-bit integer)")
    return value


def _as_float(value: Any, loose: bool, finite: bool) -> Any:
    if type(value) is float or isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    elif loose and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
    else:
        return _NO
    if finite and not math.isfinite(value):
        raise _Problem(f"must be a finite number, got {value!r}")
    return value


def _as_str(value: Any, loose: bool, finite: bool) -> Any:
    if isinstance(value, str):
        return value
    return str(value) if loose and isinstance(value, numbers.Real) and not isinstance(value, bool) else _NO


def _exact(hint: Any, value: Any, loose: bool, finite: bool) -> Any:
    return value if isinstance(hint, type) and isinstance(value, hint) else _NO


_SCALARS: dict[Any, Converter] = {int: _as_int, float: _as_float, str: _as_str, bool: _as_bool,
                                  type(None): _as_none}


def _as_list(item_hint: Any, value: Any, loose: bool, finite: bool) -> Any:
    if loose:
        value = _list_text(value)
    if not isinstance(value, (list, tuple)):
        return _NO
    item = _item_spec(item_hint)
    convert = item.convert
    out = []
    for i, each in enumerate(value):
        try:
            got = convert(each, loose, finite)
            out.append(got if got is not _NO else item.value(each, loose, finite))  # the latter raises
        except _Problem as problem:
            text = f"{problem.text} (a list: [100,200] or 100,200)" if loose else problem.text
            raise _Problem(text, f"[{i}]{problem.suffix}") from None
    return out


@functools.lru_cache(maxsize=None)
def _item_spec(hint: Any) -> FieldSpec:
    """The check of a list's or dict's items (their rules are the field's, checked with it)."""
    return FieldSpec.of(hint, {})


def _list_text(value: Any) -> Any:
    """What a person typed for a list: nothing, one item, or comma-separated items (each read as YAML)."""
    import yaml

    if value is None:
        return []
    if isinstance(value, str) and "," in value:
        return [yaml.safe_load(part) for part in value.split(",") if part.strip()]
    return value if isinstance(value, (list, tuple)) else [value]


def _as_dict(hints: tuple[Any, Any], value: Any, loose: bool, finite: bool) -> Any:
    if not isinstance(value, dict):
        return _NO
    keys, items = (_item_spec(hint) for hint in hints)
    out = {}
    for key, item in value.items():
        try:
            out[keys.value(key, loose, finite)] = items.value(item, loose, finite)
        except _Problem as problem:
            raise _Problem(problem.text, f".{key}{problem.suffix}") from None
    return out
