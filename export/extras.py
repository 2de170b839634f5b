"""Whether the `export` extra (torch, onnx) is installed, checked before a command needs it."""

from __future__ import annotations

from scanner_io.extras import require_extra


def require_export_extra(modules: tuple[str, ...] = ("torch", "onnx")) -> None:
    """Fail with what to install (exit 69) when `modules` of the export extra are missing."""
    require_extra("export", modules)
