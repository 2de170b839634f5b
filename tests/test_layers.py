"""Imports point down only (DESIGN.md, layers): scanner_io ← calibration ← edge; export on top.

The one upward edge is the root CLI mounting the export package's commands: edge/cli.py imports
export.cli, and nothing else in edge imports export.

Every module of a lower package is parsed with `ast` and every import in it is checked — module
level, inside functions, under TYPE_CHECKING, and `importlib.import_module("…")` /
`__import__("…")` with a literal name — so a lazy import cannot slip an upward edge past this.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> packages it must never import
FORBIDDEN = {
    "scanner_io": ("calibration", "edge", "export"),
    "calibration": ("edge", "export"),
    "edge": ("export",),
}
# (file, imported module) pairs exempt from FORBIDDEN, each with its reason.
ALLOWED = {
    ("edge/cli.py", "export.cli"): "the root `thzedge` app mounts every package's commands",
}


def imported_modules(source: str, package: str, module: str) -> list[tuple[int, str]]:
    """Return (line, absolute module name) for every import in `source` (a module of `package`)."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative: resolve against the importing module's package.
                parts = [package, *module.split(".")[:-1]]
                base = parts[: len(parts) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def upward_imports(package: str) -> list[tuple[str, int, str]]:
    """Return (file, line, module) for every import in `package` of a package it must not import."""
    out = []
    root = REPO / package
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for line, name in imported_modules(path.read_text(encoding="utf-8"), package, module):
            if name.split(".")[0] in FORBIDDEN[package]:
                out.append((path.relative_to(REPO).as_posix(), line, name))
    return out


def violations(package: str) -> list[str]:
    """Return 'file:line imports X' for every forbidden import in `package` not in ALLOWED."""
    return [
        f"{f}:{line} imports {name}" for f, line, name in upward_imports(package) if (f, name) not in ALLOWED
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(package):
    assert (REPO / package / "__init__.py").is_file()
    assert violations(package) == [], f"{package} must not import {', '.join(FORBIDDEN[package])}"


def test_the_allowed_upward_imports_exist():
    """An exemption whose import is gone must be removed, not left to excuse a new one."""
    found = {(f, name) for package in FORBIDDEN for f, _, name in upward_imports(package)}
    assert set(ALLOWED) <= found


def test_the_checker_sees_every_kind_of_import():
    src = (
        "import calibration.profile\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from edge.bundle import Bundle\n"
        "def f():\n"
        "    from export import model\n"
        "    import importlib\n"
        "    importlib.import_module('calibration.conditioning')\n"
        "    return __import__('edge')\n"
        "from . import frame\n"
        "from .codec import decode_frame\n"
    )
    names = [name for _, name in imported_modules(src, "scanner_io", "sub.mod")]
    assert names[:1] == ["calibration.profile"]
    assert {"edge.bundle", "export", "calibration.conditioning", "edge"} <= set(names)
    assert {"scanner_io.sub", "scanner_io.sub.codec"} <= set(names)
