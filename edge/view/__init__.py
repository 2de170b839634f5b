"""`thzedge view`: a live page of a daemon's results in the browser (edge/view/app.py).

This package's `__init__` imports nothing heavy, so `thzedge view` on an install without the
`view` extra says what to install instead of failing on an import.
"""

from __future__ import annotations

from scanner_io.extras import require_extra


def extra_missing() -> None:
    """Raise MissingDependencyError (exit 69) when the `view` extra (aiohttp) is not installed."""
    require_extra("view")
