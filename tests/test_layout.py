"""The package layout is the architecture: imports flow one way, from the CLI down to pure math.

A lower layer that imports a higher one (``geo`` importing ``sources``, ``model`` importing
``run``) fails here, even when the import hides inside a function to stay lazy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "amber_hunter"

#: Rank of each top-level part of the package; a module may import only its own rank or lower.
LAYERS = {
    "__version__": 0, "errors": 0, "atomic": 0, "images": 0,
    "geo": 1,
    "sources": 2,
    "model": 3,
    "learn": 4,
    "run": 5,
    "export": 6,
    "explore": 7,
    "feedback": 7,
    "cli": 9,
}


def module_parts(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_layers(path: Path) -> list[tuple[int, str]]:
    """(line, top-level part of amber_hunter) for every import of the package in ``path``."""
    parts = module_parts(path)
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            else:
                target = (node.module or "").split(".")
            if target[:1] != ["amber_hunter"]:
                continue
            if len(target) > 1:
                found.append((node.lineno, target[1]))
            else:  # from amber_hunter import x, y: each name is a part
                found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name.split(".")
                if target[0] == "amber_hunter" and len(target) > 1:
                    found.append((node.lineno, target[1]))
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_downward(path):
    own = module_parts(path)[1]
    assert own in LAYERS, f"{own} has no layer: add it to LAYERS in this test and to the README's layout"
    bad = [f"line {line}: {own} (layer {LAYERS[own]}) imports {part} (layer {LAYERS.get(part)})"
           for line, part in imported_layers(path) if LAYERS.get(part, 99) > LAYERS[own]]
    assert not bad, "\n".join(bad)


def test_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a geo module importing the run store is reported."""
    fake = tmp_path / "amber_hunter"
    (fake / "geo").mkdir(parents=True)
    bad = fake / "geo" / "bad.py"
    bad.write_text("def f():\n    from ..run.store import RunStore\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert imported_layers(bad) == [(2, "run")]


def test_no_flat_modules_left():
    """Only the base modules sit at the top; every stage lives in its sub-package."""
    flat = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert flat <= {"errors", "atomic", "images"}, sorted(flat)
