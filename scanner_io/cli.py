"""Commands owned by the scanner_io package, attached to the root CLI by `register`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root `thzedge` app."""
