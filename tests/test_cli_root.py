"""The root CLI: help works without extras, errors are one line with the right exit code."""

from __future__ import annotations

import subprocess
import sys

import typer.main

from edge.cli import build_app, main
from scanner_io.errors import EXIT_CONFIG, ConfigError

# The whole command surface: a command added or removed must show up here (and in README.md).
COMMANDS = {
    "version": None,
    "infer": None,
    "eval": None,
    "run": None,
    "enroll": None,
    "bench": None,
    "train": None,
    "record": None,
    "config": {"show", "validate"},
    "keys": {"generate", "show"},
    "gallery": {"info", "remove"},
    "export": {"onnx", "quantize", "check", "engine", "threshold"},
    "scanner": {"serve"},
    "recording": {"info"},
    "sim": {"dataset", "preview", "profile"},
}


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "thzedge" in out
    root = typer.main.get_command(build_app())
    tree = {
        name: set(cmd.commands) if hasattr(cmd, "commands") else None
        for name, cmd in root.commands.items()  # type: ignore[attr-defined]
    }
    assert tree == COMMANDS
    listed = {line.split()[1] for line in out.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert set(COMMANDS) <= listed
    for group, subcommands in COMMANDS.items():
        if subcommands:
            assert main([group, "--help"]) == 0
            sub_out = capsys.readouterr().out
            assert all(f" {name} " in sub_out for name in subcommands), group


def test_usage_error_exits_2(capsys):
    assert main(["no-such-command"]) == 2


def test_console_script_runs_version():
    out = subprocess.run(
        [sys.executable, "-m", "edge", "version"], capture_output=True, text=True, check=True
    )
    from edge import __version__

    assert out.stdout.strip() == __version__


def test_thzedge_error_is_one_line_without_traceback(capsys):
    import typer

    app = build_app()

    @app.command("_boom", hidden=True)
    def _boom() -> None:
        raise ConfigError("bad key 'x'; did you mean 'y'?")

    assert main(["_boom"], app=app) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.strip() == "thzedge: error: bad key 'x'; did you mean 'y'?"
    assert "Traceback" not in err
    assert typer  # imported to make sure typer is present


def test_log_handler_follows_the_current_stderr(capsys, monkeypatch):
    """A handler made under one stderr logs to the stderr current at emit time."""
    import io
    import logging

    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_thzedge", False)]:
        root.removeHandler(h)
    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    assert main(["version"]) == 0  # the handler is created while stderr is `first`
    monkeypatch.undo()
    first.close()
    logging.getLogger("thzedge.test").warning("second call")
    err = capsys.readouterr().err
    assert "WARNING thzedge.test: second call" in err
    assert "Logging error" not in err
