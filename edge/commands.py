"""Commands owned by the edge package (run, infer, eval, bench), attached by `register`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root `thzedge` app."""
