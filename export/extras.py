"""Whether the `export` extra (torch, onnx) is installed, checked before a command needs it."""

from __future__ import annotations

import importlib.util

from scanner_io.errors import MissingDependencyError


def require_export_extra() -> None:
    """Fail with what to install when torch/onnx (the `export` extra) are missing."""
    missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"{' and '.join(missing)} not installed; install the export extra: pip install 'thzedge[export]'"
        )
