"""The one range rule shared by config keys, command-line flags and wire fields.

A config key declares ``choices`` / ``ge`` / ``gt`` / ``le`` / ``lt`` in its field metadata
(`hfs.config`); a flag that sets the same thing is checked by the same :class:`Range`, so
``--port 70000`` and ``paramserver.port: 70000`` are refused by the same rule, each error
naming what the user typed. :mod:`hfs.utils.typed` applies it to every annotated field:
config keys, wire fields, JSON specs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

#: the rule names a field's metadata may carry
RULE_KEYS = ("choices", "ge", "gt", "le", "lt")
_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


@dataclass(frozen=True)
class Range:
    """One value's rules: ``choices`` and bounds; built once per field, checked per value."""

    choices: tuple | None = None
    bounds: tuple[tuple[str, Any, Any], ...] = ()  # (text, test, bound)

    @classmethod
    def of(cls, choices: Iterable[Any] | None = None, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> "Range":
        given = {"ge": ge, "gt": gt, "le": le, "lt": lt}
        return cls(tuple(choices) if choices is not None else None,
                   tuple((text, test, given[rule]) for rule, text, test in _BOUNDS if given[rule] is not None))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Range":
        """The rules in a dataclass field's metadata (missing keys: no rule)."""
        return cls.of(**{key: meta.get(key) for key in RULE_KEYS})

    def __bool__(self) -> bool:
        return self.choices is not None or bool(self.bounds)

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` ("must be <= 65535; got 70000"), or None when it is fine."""
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}; got {value!r}"
        for text, test, bound in self.bounds:
            if not test(value, bound):
                return f"must be {text} {bound}; got {value!r}"
        return None

