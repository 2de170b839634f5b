"""The optional extras of pyproject.toml, and the one check a command makes before it needs one.

A command whose extra is missing says which extra to install and exits 69
(`MissingDependencyError`) instead of dying on an ImportError deep inside.
`thzedge doctor` lists the same table.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from scanner_io.errors import MissingDependencyError


@dataclass(frozen=True)
class Extra:
    """One optional extra: its name, the modules it brings and what it enables."""

    name: str
    modules: tuple[str, ...]
    enables: str


EXTRAS: dict[str, Extra] = {
    e.name: e
    for e in (
        Extra(
            "export", ("torch", "onnx", "onnxscript", "onnxconverter_common", "matplotlib"), "export, train"
        ),
        Extra("calibrate", ("astropy", "scipy", "matplotlib"), "calibrate build, calibrate report"),
        Extra("tensorrt", ("tensorrt",), "the trt backend, export engine"),
        Extra("view", ("aiohttp",), "thzedge view"),
    )
}


def is_installed(module: str) -> bool:
    """Whether `module` can be imported here (an already imported one counts, `None` in sys.modules not)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module without a spec
        return False


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The modules of `modules` that cannot be imported here."""
    return [m for m in modules if not is_installed(m)]


def require_extra(extra: str, modules: Iterable[str] | None = None) -> None:
    """Raise MissingDependencyError (exit 69) naming `extra` when its modules (or `modules`) are missing."""
    missing = missing_modules(EXTRAS[extra].modules if modules is None else modules)
    if missing:
        raise MissingDependencyError(
            f"{' and '.join(missing)} not installed; install the {extra} extra: "
            f"pip install 'thzedge[{extra}]'"
        )
