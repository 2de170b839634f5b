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
    "tail": None,
    "view": None,
    "doctor": None,
    "train": None,
    "record": None,
    "rescore": None,
    "replay": None,
    "config": {"show", "validate"},
    "keys": {"generate", "show"},
    "gallery": {"info", "remove"},
    "export": {"onnx", "quantize", "check", "engine", "threshold", "sign"},
    "scanner": {"serve"},
    "recording": {"info", "sweep", "redact", "export"},
    "sim": {"dataset", "preview", "profile"},
    "calibrate": {"capture", "build", "check", "report", "activate", "list"},
}


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "thzedge" in out
    root = typer.main.get_command(build_app())
    tree = {
        name: set(cmd.commands) if hasattr(cmd, "commands") else None for name, cmd in root.commands.items()
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


def _probe_app():
    """The root app plus a hidden `_probe` command that prints the global options it was given."""
    import typer

    from scanner_io.cli_common import global_options

    app = build_app()

    @app.command("_probe", hidden=True)
    def _probe(ctx: typer.Context, name: str = typer.Option("x", "--name")) -> None:
        opts = global_options(ctx)
        typer.echo(f"{opts.log_level} {opts.json} {opts.config} {name}")

    return app


def test_global_options_reach_the_command(capsys, tmp_path):
    app = _probe_app()
    assert main(["_probe"], app=app) == 0
    assert capsys.readouterr().out.strip() == "info False None x"
    cfg = tmp_path / "t.toml"
    assert main(["--log-level", "warning", "--json", "--config", str(cfg), "_probe"], app=app) == 0
    assert capsys.readouterr().out.strip() == f"warning True {cfg} x"


def test_config_after_the_command_is_taken_as_the_root_option(capsys, tmp_path):
    app = _probe_app()
    cfg = tmp_path / "t.toml"
    assert main(["_probe", "--config", str(cfg), "--name", "y"], app=app) == 0
    assert capsys.readouterr().out.strip() == f"info False {cfg} y"
    assert main(["--json", "_probe", f"--config={cfg}"], app=app) == 0
    assert capsys.readouterr().out.strip() == f"info True {cfg} x"
    assert main(["--config", str(cfg), "_probe", "--config", str(cfg)], app=app) == 2
    assert "--config given twice" in capsys.readouterr().err


def test_json_after_the_command_says_where_it_goes(capsys):
    assert main(["_probe", "--json"], app=_probe_app()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thzedge: error: --json is an option of thzedge itself: put it before the command")
    assert len(err.splitlines()) == 1


def test_unknown_log_level_is_a_usage_error(capsys):
    assert main(["--log-level", "loud", "version"]) == 2


def test_internal_errors_exit_70_with_one_line(capsys):
    from scanner_io.errors import EXIT_SOFTWARE, InternalError

    app = build_app()

    @app.command("_bug", hidden=True)
    def _bug() -> None:
        raise InternalError("backend is closed")

    @app.command("_crash", hidden=True)
    def _crash() -> None:
        raise KeyError("k")

    assert main(["_bug"], app=app) == EXIT_SOFTWARE
    err = capsys.readouterr().err.strip()
    assert err.startswith("thzedge: error: backend is closed (a bug:") and len(err.splitlines()) == 1
    assert main(["_crash"], app=app) == EXIT_SOFTWARE
    err = capsys.readouterr().err.strip()
    assert err.startswith("thzedge: error: internal error: KeyError") and "Traceback" not in err


def test_help_works_without_the_export_extra(tmp_path):
    """With torch, onnx and tensorrt unimportable, --help works and export says what to install."""
    code = (
        "import sys\n"
        "for m in ('torch', 'onnx', 'tensorrt', 'onnxruntime.quantization'):\n"
        "    sys.modules[m] = None  # import fails, find_spec says absent\n"
        "from edge.cli import main\n"
        "assert main(['--help']) == 0\n"
        "assert main(['export', '--help']) == 0\n"
        f"sys.exit(main(['export', 'onnx', '--checkpoint', 'x.pth', '--out', {str(tmp_path / 'b')!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 69, out.stderr
    assert "Usage: thzedge" in out.stdout and " onnx " in out.stdout
    assert out.stderr.strip().splitlines() == [
        "thzedge: error: torch and onnx not installed; "
        "install the export extra: pip install 'thzedge[export]'"
    ]
