"""The package runs on JetPack 6's Python 3.10: 3.10 grammar everywhere, no 3.11+ stdlib without a fallback.

CI runs a newer Python, so three things guard the Jetson's one: ruff's target and mypy's
python_version are 3.10 (checked below), every module parses under 3.10's grammar
(`ast.parse(feature_version=(3, 10))`, which rejects `except*`, type parameter lists and
`type` statements), f-strings do not reuse their own quote or hold a backslash in a replacement
field (3.12 syntax `feature_version` does not catch), and no name that appeared in the standard
library after 3.10 is imported or used unless the code guards it (`if sys.version_info >=
(3, 11)` or `try`/`except ImportError`), as edge/config.py does for `tomllib` → `tomli`.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("scanner_io", "calibration", "edge", "export", "benchmarks")

# Standard-library modules and names added after 3.10 (the "What's New" pages of 3.11-3.13).
NEW_MODULES = {"tomllib": "3.11", "wsgiref.types": "3.11"}
NEW_NAMES = {
    ("typing", "Self"): "3.11",
    ("typing", "LiteralString"): "3.11",
    ("typing", "Never"): "3.11",
    ("typing", "assert_never"): "3.11",
    ("typing", "assert_type"): "3.11",
    ("typing", "reveal_type"): "3.11",
    ("typing", "Required"): "3.11",
    ("typing", "NotRequired"): "3.11",
    ("typing", "TypeVarTuple"): "3.11",
    ("typing", "Unpack"): "3.11",
    ("typing", "dataclass_transform"): "3.11",
    ("typing", "override"): "3.12",
    ("typing", "TypeAliasType"): "3.12",
    ("typing", "ReadOnly"): "3.13",
    ("typing", "TypeIs"): "3.13",
    ("enum", "StrEnum"): "3.11",
    ("enum", "ReprEnum"): "3.11",
    ("enum", "verify"): "3.11",
    ("enum", "EnumCheck"): "3.11",
    ("enum", "member"): "3.11",
    ("enum", "nonmember"): "3.11",
    ("datetime", "UTC"): "3.11",
    ("hashlib", "file_digest"): "3.11",
    ("contextlib", "chdir"): "3.11",
    ("asyncio", "TaskGroup"): "3.11",
    ("asyncio", "timeout"): "3.11",
    ("asyncio", "Runner"): "3.11",
    ("operator", "call"): "3.11",
    ("itertools", "batched"): "3.12",
    ("math", "sumprod"): "3.12",
    ("copy", "replace"): "3.13",
    ("warnings", "deprecated"): "3.13",
}
NEW_BUILTINS = {"ExceptionGroup": "3.11", "BaseExceptionGroup": "3.11", "aiter": "3.10", "anext": "3.10"}
NEW_BUILTINS = {k: v for k, v in NEW_BUILTINS.items() if v > "3.10"}


def python_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside `if sys.version_info >= ...` / `else` of `< ...`, or a try with an ImportError handler."""
    child, p = node, parents.get(node)
    while p is not None:
        if isinstance(p, ast.If) and "version_info" in ast.unparse(p.test):
            return True
        if isinstance(p, ast.Try) and child in p.body:
            names = {ast.unparse(h.type) for h in p.handlers if h.type is not None}
            if names & {
                "ImportError",
                "ModuleNotFoundError",
                "(ImportError, AttributeError)",
                "AttributeError",
            }:
                return True
        child, p = p, parents.get(p)
    return False


def newer_stdlib_uses(source: str) -> list[str]:
    """'line: name (3.x)' for every unguarded use of a standard-library name newer than 3.10."""
    tree = ast.parse(source)
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    # local name -> module, for `import datetime as dt; dt.UTC`
    aliases = {
        a.asname or a.name: a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    found = []
    for node in ast.walk(tree):
        hits: list[str] = []
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in NEW_MODULES:
                    hits.append(f"{a.name} ({NEW_MODULES[a.name]})")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module in NEW_MODULES:
                hits.append(f"{node.module} ({NEW_MODULES[node.module]})")
            hits += [f"{node.module}.{a.name} ({NEW_NAMES[node.module, a.name]})" for a in node.names
                     if (node.module, a.name) in NEW_NAMES]  # fmt: skip
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = aliases.get(node.value.id)
            if module is not None and (module, node.attr) in NEW_NAMES:
                hits.append(f"{module}.{node.attr} ({NEW_NAMES[module, node.attr]})")
        elif isinstance(node, ast.Name) and node.id in NEW_BUILTINS:
            hits.append(f"{node.id} ({NEW_BUILTINS[node.id]})")
        if hits and not _guarded(node, parents):
            found += [f"{getattr(node, 'lineno', '?')}: {h}" for h in hits]
    return found


def newer_fstrings(source: str) -> list[str]:
    """'line: why' for f-strings using 3.12 syntax: their own quote, or a backslash, inside a field."""
    if sys.version_info < (3, 12):
        return []  # older tokenizers reject these already, and ast.parse above fails on them
    out = []
    quotes: list[str] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.FSTRING_START:
            q = tok.string.lstrip("rRfFbBuU")
            if quotes and any(q[0] == outer[0] for outer in quotes):
                out.append(f"{tok.start[0]}: nested f-string reuses its enclosing quote")
            quotes.append(q)
        elif tok.type == tokenize.FSTRING_END:
            quotes.pop()
        elif quotes and tok.type == tokenize.STRING:
            q = tok.string.lstrip("rRbBuU")
            if any(q[0] == outer[0] for outer in quotes):
                out.append(f"{tok.start[0]}: string in an f-string field reuses the f-string's quote")
            if "\\" in tok.string:
                out.append(f"{tok.start[0]}: backslash in an f-string field")
    return out


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_is_python310(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    try:
        ast.parse(source, filename=str(path), feature_version=(3, 10))
    except SyntaxError as exc:
        pytest.fail(f"{path.relative_to(REPO)}:{exc.lineno}: not Python 3.10 syntax: {exc.msg}")
    problems = newer_stdlib_uses(source) + newer_fstrings(source)
    assert problems == [], f"{path.relative_to(REPO)} needs Python > 3.10: {problems}"


def test_tools_check_against_310() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert cfg["project"]["requires-python"] == ">=3.10"
    assert cfg["tool"]["ruff"]["target-version"] == "py310"
    assert cfg["tool"]["mypy"]["python_version"] == "3.10"
    # The one 3.11 module the package uses has its backport for 3.10 as a dependency.
    assert "tomli>=2.0; python_version < '3.11'" in cfg["project"]["dependencies"]


def test_the_checkers_catch_what_they_claim() -> None:
    """The negative controls: each construct is flagged, each guarded form is not."""
    bad = (
        "import tomllib\nfrom typing import Self\nimport datetime as dt\nx = dt.UTC\n"
        "from itertools import batched\ntry:\n    pass\nexcept ExceptionGroup:\n    pass\n"
    )
    assert sorted(newer_stdlib_uses(bad)) == [
        "1: tomllib (3.11)", "2: typing.Self (3.11)", "4: datetime.UTC (3.11)", "5: itertools.batched (3.12)",
        "8: ExceptionGroup (3.11)",
    ]  # fmt: skip
    good = (
        "import sys\nif sys.version_info >= (3, 11):\n    import tomllib\n"
        "else:\n    import tomli as tomllib\n"
        "try:\n    from typing import Self\nexcept ImportError:\n    from typing_extensions import Self\n"
    )
    assert newer_stdlib_uses(good) == []
    for src in ("try:\n    pass\nexcept* ValueError:\n    pass\n", "def f[T](x: T) -> T:\n    return x\n",
                "type Alias = int\n"):  # fmt: skip
        with pytest.raises(SyntaxError):
            ast.parse(src, feature_version=(3, 10))
    if sys.version_info >= (3, 12):
        assert newer_fstrings('d = {"a": 1}\ns = f"{d["a"]}"\n') != []
        assert newer_fstrings("s = f\"{'\\n'.join(x)}\"\n") != []
        assert newer_fstrings("s = f\"{d['a']}\"\n") == []
