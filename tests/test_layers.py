"""Layers only point down: every ``import hfs.X`` in hfs/ (also inside functions) goes to a lower layer.

The order (docs/architecture.md, "Packages"): utils -> config, registry -> dist, checkpoint,
default_config -> data, models, samplers -> paramserver -> fc -> train, eval -> bench ->
cli, demo -> __main__. Packages on the same layer do not import each other either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hfs

ROOT = Path(hfs.__file__).resolve().parent
LAYERS: list[set[str]] = [
    {"utils"},
    {"config", "registry"},
    {"dist", "checkpoint", "default_config"},
    {"data", "models", "samplers"},
    {"paramserver"},
    {"fc"},
    {"train", "eval"},
    {"bench"},
    {"cli", "demo"},
    {"__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _part(module: str) -> str | None:
    """The top-level part of hfs a dotted module name belongs to (None: hfs itself or outside)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "hfs" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every hfs import in ``path``, at any depth; ``from hfs import x`` counts as hfs.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "hfs":
                found += [(node.lineno, f"hfs.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if m == "hfs" or m.startswith("hfs.")]


def _sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _violations() -> list[str]:
    bad = []
    for path in _sources():
        rel = path.relative_to(ROOT)
        here = rel.parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for line, module in _imports(path):
            there = _part(module)
            if there is None or there == here:
                continue
            if RANK[there] >= RANK[here]:
                bad.append(f"hfs/{rel}:{line} ({here}, layer {RANK[here]}) imports {module} (layer {RANK[there]})")
    return bad


def test_every_part_of_hfs_has_a_layer():
    parts = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _sources()} - {"__init__"}
    assert parts <= RANK.keys(), f"give these a layer in tests/test_layers.py: {sorted(parts - RANK.keys())}"


def test_no_import_points_up_or_sideways():
    assert _violations() == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from hfs.cli import main\n    from hfs import dist\n")
    assert _imports(probe) == [(2, "hfs.cli"), (3, "hfs.dist")]


@pytest.mark.parametrize("module", ["hfs.cli", "hfs.fc.sharded", "hfs.eval.evaluate"])
def test_parts_resolve(module):
    assert _part(module) in RANK
