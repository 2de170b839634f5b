"""Commands for watching and checking a device: `tail`, `view` and `doctor`.

`register(app)` attaches them to the root app (called from edge/commands.py). Each command
parses, calls a library function (edge/tail.py, edge/view/, edge/doctor.py) and renders.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from scanner_io.cli_common import global_options, stop_on_signals

_ENDPOINT_HELP = (
    "Results endpoint (ipc://PATH or tcp://HOST:PORT); default: the one in the config "
    "(`[publisher] endpoint`), as `thzedge run` binds it."
)
_SOURCE_HELP = "A config source name: subscribe to the daemon that runs it (thzedge@NAME)."


def register(app: typer.Typer) -> None:
    """Attach `tail`, `view` and `doctor` to the root `thzedge` app."""
    app.command("tail")(tail_command)
    app.command("view")(view_command)
    app.command("doctor")(doctor_command)


def tail_command(
    ctx: typer.Context,
    endpoint: Annotated[str | None, typer.Argument(help=_ENDPOINT_HELP, show_default=False)] = None,
    source: Annotated[str | None, typer.Option("--source", help=_SOURCE_HELP)] = None,
    filter_: Annotated[
        str | None,
        typer.Option(
            "--filter",
            help="Show only matching results: status=ok|partial, decision=accept, visit=accept|pending, "
            "posture=Left, scanner=S (comma-separated; events always show).",
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option("--count", min=1, help="Exit after this many results (default: until Ctrl-C)."),
    ] = None,
    no_events: Annotated[bool, typer.Option("--no-events", help="Results only, no event lines.")] = False,
) -> None:
    """Print a running daemon's results and events, one line each (JSON lines with --json)."""
    from edge.subscriber import resolve_target
    from edge.tail import ResultFilter, tail

    opts = global_options(ctx)
    only = ResultFilter.parse(filter_)
    target = resolve_target(endpoint, opts.config, source)

    def emit(line: str) -> None:
        typer.echo(line)
        sys.stdout.flush()

    with stop_on_signals() as stop:
        # Printed once SIGTERM/SIGINT stop it cleanly (a script may wait for this line).
        typer.echo(f"subscribed to {target.endpoint}{' (CURVE)' if target.curve else ''}", err=True)
        tail(target, emit, stop, as_json=opts.json, only=only, max_results=count, events=not no_events)


def view_command(
    ctx: typer.Context,
    endpoint: Annotated[str | None, typer.Argument(help=_ENDPOINT_HELP, show_default=False)] = None,
    source: Annotated[str | None, typer.Option("--source", help=_SOURCE_HELP)] = None,
    bind: Annotated[
        str,
        typer.Option(
            "--bind", help="HOST:PORT the page is served on; beyond loopback needs [view] allow_remote."
        ),
    ] = "127.0.0.1:8642",
    show_reconstruction: Annotated[
        bool,
        typer.Option(
            "--show-reconstruction",
            help="Show the reconstructed face when the daemon publishes it (biometric; a banner says so).",
        ),
    ] = False,
    max_fps: Annotated[
        float, typer.Option("--max-fps", min=0.5, max=60.0, help="Most updates per second sent to a page.")
    ] = 10.0,
) -> None:
    """Serve a live page of the daemon's results in a browser: input, posture, decision, rates, state."""
    from edge.view import extra_missing

    extra_missing()
    from edge.view.app import ViewOptions, serve_view

    opts = global_options(ctx)
    serve_view(
        ViewOptions(
            endpoint=endpoint,
            source=source,
            config=opts.config,
            bind=bind,
            show_reconstruction=show_reconstruction,
            max_fps=max_fps,
        ),
        announce=lambda line: typer.echo(line, err=True),
    )


def doctor_command(ctx: typer.Context) -> None:
    """Check this device: packages, extras, runtimes, GPU, config, model, calibration, ports, keys."""
    from edge.doctor import render_checks, run_doctor

    opts = global_options(ctx)
    report = run_doctor(opts.config)
    if opts.json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(render_checks(report.checks))
        typer.echo(f"\n{'ready' if report.ready else 'NOT ready'}: {report.summary()}")
    if not report.ready:
        raise typer.Exit(1)
