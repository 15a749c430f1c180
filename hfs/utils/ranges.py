"""The one range rule shared by config keys and command-line flags.

A config key declares ``choices`` / ``ge`` / ``gt`` / ``le`` in its field metadata
(`hfs.config`); a flag that sets the same thing is checked by the same function, so
``--port 70000`` and ``paramserver.port: 70000`` are refused by the same rule, each error
naming what the user typed.
"""

from __future__ import annotations

from typing import Any, Iterable

_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b), ("le", "<=", lambda v, b: v <= b))


def range_problem(value: Any, *, choices: Iterable[Any] | None = None, ge: float | None = None,
                  gt: float | None = None, le: float | None = None) -> str | None:
    """What is wrong with ``value`` ("must be <= 65535; got 70000"), or None when it is fine."""
    if choices is not None and value not in tuple(choices):
        return f"must be one of {', '.join(map(str, choices))}; got {value!r}"
    for rule, text, ok in _BOUNDS:
        bound = {"ge": ge, "gt": gt, "le": le}[rule]
        if bound is not None and not ok(value, bound):
            return f"must be {text} {bound}; got {value!r}"
    return None
