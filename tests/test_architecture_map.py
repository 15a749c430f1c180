"""The map (docs/architecture.md) cannot drift silently: every call it names in backticks,
``Class.method(args)`` or ``function(args)``, exists in hfs/ with exactly those parameters."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import hfs

MAP = Path(hfs.__file__).resolve().parents[1] / "docs" / "architecture.md"
CALL = re.compile(r"`([A-Za-z_][\w.]*)\(([^`()]*)\)`")


def named_calls(text: str) -> list[tuple[str, list[str]]]:
    """(dotted name, parameter names) of every backticked call; ``*`` and defaults are dropped."""
    calls = []
    for name, args in CALL.findall(text):
        params = [a.strip().lstrip("*").split("=")[0].split(":")[0].strip() for a in args.split(",")]
        calls.append((name, [p for p in params if p]))
    return calls


def hfs_definitions() -> dict[str, list[object]]:
    """Every class and function defined in an hfs module, by its name."""
    found: dict[str, list[object]] = {}
    for info in pkgutil.walk_packages(hfs.__path__, "hfs."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as exc:  # an optional extra this environment lacks
            if (exc.name or "").startswith("hfs"):
                raise
            continue
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == info.name:
                found.setdefault(name, []).append(obj)
    return found


@pytest.fixture(scope="module")
def definitions() -> dict[str, list[object]]:
    return hfs_definitions()


def resolve(name: str, definitions: dict[str, list[object]]) -> object:
    """``Class.method`` or ``function``: the one object hfs defines under that name."""
    owner, _, member = name.rpartition(".")
    candidates = definitions.get(owner or member, [])
    assert len(candidates) == 1, f"`{owner or member}` names {len(candidates)} definitions in hfs/, not one"
    target = candidates[0]
    if owner:
        assert hasattr(target, member), f"`{owner}` has no `{member}`"
        target = getattr(target, member)
    return target


def parameter_names(target: object) -> list[str]:
    names = [p.name for p in inspect.signature(target).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def test_the_map_names_calls_at_all():
    calls = named_calls(MAP.read_text())
    names = {name for name, _ in calls}
    assert len(calls) >= 20
    for seam in ("WeightStore", "ClassSampler", "ActiveClassSelector", "MarginHead", "ClassifierLayer", "Hook"):
        assert any(name.startswith(seam + ".") for name in names), f"the map shows no signature of {seam}"


def test_the_map_stays_a_map():
    assert len(MAP.read_text().splitlines()) <= 125


def test_every_call_in_the_map_exists_with_its_parameters(definitions):
    wrong = []
    for name, params in named_calls(MAP.read_text()):
        try:
            real = parameter_names(resolve(name, definitions))
        except AssertionError as exc:
            wrong.append(str(exc).splitlines()[0])
            continue
        if params != real:
            wrong.append(f"`{name}({', '.join(params)})` but the code has ({', '.join(real)})")
    assert not wrong, "docs/architecture.md drifted from the code:\n" + "\n".join(wrong)


def test_a_drifted_signature_is_caught(definitions):
    """The check itself: a renamed parameter or a wrong owner is reported."""
    (name, params), = named_calls("`ClassSampler.rebuild(weights)`")
    assert params != parameter_names(resolve(name, definitions))
    assert named_calls("`f(a, *, b=1, c: int)`") == [("f", ["a", "b", "c"])]
    with pytest.raises(AssertionError, match="has no `logits`"):
        resolve("MarginHead.logits", definitions)
