"""What every package's commands share: the root's global options and a few terminal helpers.

The root command (`edge/cli.py`) parses `--log-level`, `--json` and `--config` once and stores a
`GlobalOptions` on the typer context; a command reads it with `global_options(ctx)` instead of
declaring its own copy. This module lives in the bottom layer so scanner_io, calibration, edge
and export commands can all import it.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from scanner_io.choices import Choice
from scanner_io.errors import ThzEdgeError

if TYPE_CHECKING:
    from scanner_io.sources import CurveClientKeys

C = TypeVar("C", bound=Choice)


class LogLevel(Choice):
    """Logging level on stderr."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@dataclass(frozen=True)
class NamedSource:
    """What `--source` stands for: the URI to open, its configured calibration profile and CURVE keys."""

    uri: str
    calibration: Path | None = None
    # A configured tcp source's CURVE client keys (the scanner is the CURVE server); else None.
    curve: CurveClientKeys | None = None


def source_as_given(name_or_uri: str) -> NamedSource:
    """Take `--source` literally (no configuration to resolve names with)."""
    return NamedSource(uri=name_or_uri)


@dataclass(frozen=True)
class GlobalOptions:
    """The root command's options (`thzedge [--log-level L] [--json] [--config FILE] COMMAND`)."""

    log_level: LogLevel = LogLevel.info
    # Print the command's result as JSON on stdout instead of text.
    json: bool = False
    # Daemon config file; None means $THZEDGE_CONFIG, else /etc/thzedge/thzedge.toml if present.
    config: Path | None = None
    # Resolves a configured source name (`scanner0`) through `config`; URIs pass unchanged. The
    # root CLI sets it: the config format is edge's, and the packages below may not import edge.
    resolve_source: Callable[[str], NamedSource] = source_as_given


def global_options(ctx: typer.Context) -> GlobalOptions:
    """Return the global options the root command parsed (the defaults when called outside it)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions()


def split_choices(kind: type[C], value: str, option: str) -> list[C]:
    """Parse a comma list of `kind` values (`--backend ort,trt`); one line naming the bad entry."""
    out = [
        kind.parse(item, f"{option} value") for item in (v.strip().lower() for v in value.split(",")) if item
    ]
    if not out:
        raise ThzEdgeError(f"{option} needs at least one of {', '.join(kind.values())}")
    return out


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Yield an Event set by SIGINT/SIGTERM, so loops end cleanly (handlers only set the event)."""
    stop = threading.Event()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def terminal_progress(label: str, total: int | None = None) -> Iterator[Callable[..., None] | None]:
    """Yield `update(completed, total=None)` driving a progress bar when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        # rich keeps the task's total when `total` is None.
        yield lambda completed, total=None: bar.update(task, completed=completed, total=total)
