"""The root `thzedge` command: global options, one sub-app per package, one-line errors.

Each package owns its commands in its own `cli` module and attaches them with `register(app)`.
Those modules import nothing heavy at import time (torch, tensorrt load inside commands), so
`thzedge --help` works on a device without the export extras.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from scanner_io.errors import EXIT_SOFTWARE, ThzEdgeError

log = logging.getLogger("thzedge")

app = typer.Typer(
    name="thzedge",
    help="Edge deployment toolkit for terahertz face scanners.",
    no_args_is_help=True,
    add_completion=False,
    # Locals may hold keys or embeddings: never print them (R-SEC-6).
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    log_level: Annotated[
        str, typer.Option("--log-level", help="Logging level on stderr (debug, info, warning, error).")
    ] = "info",
) -> None:
    """Edge deployment toolkit for terahertz face scanners."""
    configure_logging(log_level)


@app.command()
def version() -> None:
    """Print the thzedge version."""
    from edge import __version__

    typer.echo(__version__)


class _CurrentStderrHandler(logging.StreamHandler):
    """A stderr handler that writes to whatever `sys.stderr` is when a record is emitted.

    The handler outlives one `main()` call (tests run many in one process and swap stderr);
    binding the stream at creation would log into a closed file.
    """

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: str) -> None:
    """Log one line per event to stderr, in a form journald keeps readable."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ThzEdgeError(f"unknown log level {level!r}; use debug, info, warning or error")
    root = logging.getLogger()
    if not any(getattr(h, "_thzedge", False) for h in root.handlers):
        from edge.sdnotify import JournaldHandler, stderr_is_journal

        # Under systemd, structured journal fields (MESSAGE_ID, PRIORITY) instead of plain lines.
        handler: logging.Handler = JournaldHandler() if stderr_is_journal() else _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._thzedge = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(numeric)


def _register_subapps() -> None:
    from calibration.cli import register as register_calibration
    from edge.commands import register as register_edge
    from export.cli import register as register_export
    from scanner_io.cli import register as register_scanner_io

    register_edge(app)
    register_export(app)
    register_scanner_io(app)
    register_calibration(app)


_register_subapps()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; thzedge errors become one line on stderr."""
    try:
        # Standalone mode: typer prints usage errors itself and exits 2 through SystemExit.
        app(args=argv, prog_name="thzedge")
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    except ThzEdgeError as exc:
        typer.echo(f"thzedge: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("thzedge: interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: one line, and the traceback only at debug level
        log.debug("unhandled error", exc_info=True)
        hint = "rerun as `thzedge --log-level debug ...` for the traceback"
        typer.echo(f"thzedge: internal error: {type(exc).__name__}: {exc} ({hint})", err=True)
        return EXIT_SOFTWARE
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
