"""The root `thzedge` command: global options, one sub-app per package, one-line errors.

`build_app()` makes the root app and asks each package to attach its commands with
`register(app)`. The root parses the global options `--log-level`, `--json` and `--config` and
stores them as a `scanner_io.cli_common.GlobalOptions` on the context, where every command reads
them with `global_options(ctx)`. The packages' `cli` modules import nothing heavy at import time
(torch, onnx, tensorrt load inside commands), so `thzedge --help` works on a device without the
export extras.

Importing `export.cli` is the one place edge points up at export: the root mounts every
package's commands, and tests/test_layers.py allows exactly this import.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, TextIO

import typer
import typer.main

from calibration.cli import register as register_calibration
from edge import __version__, early_stop
from edge.commands import register as register_edge
from edge.config import is_source_uri, load_config
from edge.fleet.cli import register as register_fleet
from edge.sdnotify import JournaldHandler, stderr_is_journal
from export.cli import register as register_export
from scanner_io.cli import register as register_scanner_io
from scanner_io.cli_common import GlobalOptions, LogLevel, NamedSource
from scanner_io.errors import EXIT_SOFTWARE, EXIT_USAGE, ThzEdgeError, UsageError
from scanner_io.sources import split_queue_mode

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[no-redef,assignment,unused-ignore]
    from click.exceptions import UsageError as ClickUsageError  # type: ignore[no-redef,assignment,unused-ignore]

log = logging.getLogger("thzedge")

_CONFIG_HELP = "Config file (default: $THZEDGE_CONFIG, else /etc/thzedge/thzedge.toml if present)."
_BUG_HINT = "rerun as `thzedge --log-level debug ...` for the traceback"


def _root(
    ctx: typer.Context,
    log_level: Annotated[
        LogLevel, typer.Option("--log-level", help="Logging level on stderr.", case_sensitive=False)
    ] = LogLevel.info,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the command's result as JSON on stdout instead of text.")
    ] = False,
    config: Annotated[Path | None, typer.Option("--config", help=_CONFIG_HELP)] = None,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the thzedge version and exit.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    """Edge deployment toolkit for terahertz face scanners."""
    configure_logging(log_level)
    ctx.obj = GlobalOptions(
        log_level=log_level, json=json_out, config=config, resolve_source=partial(named_source, config)
    )


def named_source(config: Path | None, name_or_uri: str) -> NamedSource:
    """Resolve `--source`: a URI as given, a name (`scanner0`) through the config's [sources].

    The config is read only for a name, so a URI works whatever state the config file is in.
    The daemon's own `mode=` parameter is taken off: it is no source parameter.
    """
    if is_source_uri(name_or_uri):
        return NamedSource(uri=name_or_uri)
    from edge.security import source_curve_keys  # zmq.auth: only when a name is resolved

    src = load_config(config).resolve_source(name_or_uri)  # unknown: ConfigError listing the known
    uri, _ = split_queue_mode(src.uri)
    return NamedSource(uri=uri, calibration=src.calibration, curve=source_curve_keys(src))


def version() -> None:
    """Print the thzedge version."""
    typer.echo(__version__)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


def build_app() -> typer.Typer:
    """Make the root `thzedge` app with every package's commands attached."""
    app = typer.Typer(
        name="thzedge",
        help="Edge deployment toolkit for terahertz face scanners.",
        no_args_is_help=True,
        add_completion=False,
        # Locals may hold keys or embeddings: never print them (R-SEC-6).
        pretty_exceptions_show_locals=False,
    )
    app.callback()(_root)
    app.command("version")(version)
    register_edge(app)
    register_fleet(app)
    register_export(app)
    register_scanner_io(app)
    register_calibration(app)
    return app


class _CurrentStderrHandler(logging.StreamHandler):
    """A stderr handler that writes to whatever `sys.stderr` is when a record is emitted.

    The handler outlives one `main()` call (tests run many in one process and swap stderr);
    binding the stream at creation would log into a closed file.
    """

    @property
    def stream(self) -> TextIO:
        """The current `sys.stderr`."""
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(level: LogLevel | str) -> None:
    """Log one line per event to stderr, in a form journald keeps readable."""
    numeric = logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int):
        raise ThzEdgeError(f"unknown log level {level!r}; use {', '.join(LogLevel.values())}")
    root = logging.getLogger()
    if not any(getattr(h, "_thzedge", False) for h in root.handlers):
        # Under systemd, structured journal fields (MESSAGE_ID, PRIORITY) instead of plain lines.
        handler: logging.Handler = JournaldHandler() if stderr_is_journal() else _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._thzedge = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(numeric)


def hoist_config(argv: Sequence[str]) -> list[str]:
    """Move a `--config FILE` given after the command name in front of it, where the root parses it.

    Unit files and scripts written when every daemon command had its own `--config` say
    `thzedge run --source S --config FILE`; they keep working. `--json` after the command is
    refused with where it goes instead, so it has one place.
    """
    args = list(argv)
    i = 0
    # Skip the root's own options to find the command name.
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("--log-level", "--config") else 1
    head, rest = args[:i], args[i:]
    moved: list[str] = []
    kept: list[str] = []
    j = 0
    while j < len(rest):
        arg = rest[j]
        if arg == "--":
            kept += rest[j:]
            break
        if arg == "--config" and j + 1 < len(rest):
            moved += rest[j : j + 2]
            j += 2
            continue
        if arg.startswith("--config="):
            moved.append(arg)
        elif arg == "--json":
            raise UsageError(
                "--json is an option of thzedge itself: put it before the command "
                "(thzedge [--json] [--config FILE] COMMAND ...)"
            )
        else:
            kept.append(arg)
        j += 1
    if moved and any(a == "--config" or a.startswith("--config=") for a in head):
        raise UsageError("--config given twice: once before the command and once after it")
    return [*head, *moved, *kept]


def cli_command(app: typer.Typer) -> Any:
    """Return the click command of `app` with plain help: option names, not type tags.

    typer labels every value with its Python type (`--source <str>`, `--json <bool>`,
    `INPUTS <list[Path]>`). Help shows instead what a user types: nothing after a flag, the
    choices of a choice, and the upper-case name of any other value (`--source SOURCE`, the
    argparse convention); an explicit `metavar=` is kept.
    """
    command = typer.main.get_command(app)
    _plain_metavars(command)
    _literal_brackets(command)
    return command


def _literal_brackets(command: Any) -> None:
    """Show `[section] key` in help as written: typer renders help as Rich markup, which takes
    `[publisher]` for a style tag and drops it."""
    from rich.markup import escape

    for item in (command, *command.params):
        if getattr(item, "help", None):
            item.help = escape(item.help)
    for sub in getattr(command, "commands", {}).values():
        _literal_brackets(sub)


def _plain_metavars(command: Any) -> None:
    # `--help` is made on first use; make it now (click caches it) so it gets the same treatment.
    help_option = command.get_help_option(SimpleNamespace(help_option_names=["--help"]))
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            name = param.metavar = param.name.upper()
            more = "..." if param.nargs != 1 else ""
            # typer prints an argument's type beside its name and braces around a required one.
            param.display_type_rich = lambda ctx: None
            param._usage_display_name = lambda name=name, more=more, req=param.required: (
                (name if req else f"[{name}]") + more
            )
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        elif not getattr(getattr(param, "type_descriptor", None), "is_choice", False):
            param.metavar = param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None, app: typer.Typer | None = None) -> int:
    """Run the CLI and return its exit code; every error, usage errors too, is one line on stderr."""
    try:
        args = hoist_config(sys.argv[1:] if argv is None else argv)
        # Not standalone: usage errors come here as exceptions and print like every other error.
        code = cli_command(app or build_app()).main(args=args, prog_name="thzedge", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    except NoArgsIsHelpError:
        return EXIT_USAGE  # a group without its command: click printed the group's help
    except ClickUsageError as exc:
        where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
        typer.echo(f"thzedge: error: {_one_line(exc.format_message()).rstrip('.')}{where}", err=True)
        return EXIT_USAGE
    except ClickException as exc:
        typer.echo(f"thzedge: error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("thzedge: aborted", err=True)
        return 1
    except ThzEdgeError as exc:
        if exc.exit_code == EXIT_SOFTWARE:
            log.debug("internal error", exc_info=True)
            typer.echo(f"thzedge: error: {exc} (a bug: {_BUG_HINT})", err=True)
        else:
            typer.echo(f"thzedge: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("thzedge: interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: one line, and the traceback only at debug level
        log.debug("unhandled error", exc_info=True)
        typer.echo(f"thzedge: error: internal error: {type(exc).__name__}: {exc} ({_BUG_HINT})", err=True)
        return EXIT_SOFTWARE
    return 0


def run() -> None:
    """Console-script entry point."""
    early_stop.install()  # `python -m edge` did it before its imports already; the script does it here
    sys.exit(main())
