"""The CLI as a user meets it: --help says what to type, --version, usage errors as one line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer.main

from edge import __version__
from edge.cli import build_app, main

# What typer would print after an option or argument: its Python type, not what to type.
TYPE_TAG = re.compile(r"<(bool|str|int|float|path|list\[[^\]]*\])>|\{[A-Za-z_]+\}")


def _command_paths() -> list[list[str]]:
    paths: list[list[str]] = [[]]

    def walk(cmd: object, path: list[str]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            if not sub.hidden:
                paths.append([*path, name])
                walk(sub, [*path, name])

    walk(typer.main.get_command(build_app()), [])
    return paths


def test_every_help_page_shows_no_type_tags_and_describes_every_option(capsys):
    pages = 0
    for path in _command_paths():
        assert main([*path, "--help"]) == 0, path
        out = capsys.readouterr().out
        pages += 1
        assert out.startswith("\n Usage: thzedge") or "Usage: thzedge" in out
        tags = TYPE_TAG.findall(out)
        assert not tags, (path, tags, out)
    assert pages > 30  # every command and group was looked at
    # Every visible option, argument and command carries a description of more than one word.
    root = typer.main.get_command(build_app())

    def check(cmd: object, path: str) -> None:
        for p in cmd.params:  # type: ignore[attr-defined]
            if not getattr(p, "hidden", False):
                assert len((p.help or "").split()) >= 2, f"{path} {p.name}: {p.help!r}"
        for name, sub in getattr(cmd, "commands", {}).items():
            assert len((sub.help or "").split()) >= 3, f"{path} {name}"
            check(sub, f"{path} {name}")

    check(root, "thzedge")


def test_help_shows_what_to_type():
    out = subprocess.run(
        [sys.executable, "-m", "edge", "run", "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    line = {
        next(w for w in ln.split() if w.startswith("--")): ln
        for ln in out.splitlines()
        if ln.startswith("│") and " --" in ln
    }
    assert re.search(r"--source\s+SOURCE\s", line["--source"])
    assert re.search(r"--backend\s+<auto\|ort\|trt>", line["--backend"])  # choices stay listed
    assert re.search(r"--no-reconstruction\s+Skip the decoders", line["--no-reconstruction"])  # a flag
    assert re.search(r"--help\s+Show this message", line["--help"])


def test_version_option_and_command():
    for args in (["--version"], ["version"]):
        out = subprocess.run(
            [sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and out.stdout.strip() == __version__, out.stderr


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["run", "--bogus"], "thzedge: error: No such option: --bogus"),
        (["run"], "thzedge: error: Missing option '--source'"),
        (["run", "--source", "sim", "--max-frames", "x"], "thzedge: error: Invalid value for '--max-frames'"),
        (["no-such-command"], "thzedge: error: No such command 'no-such-command'"),
        (["--log-level", "loud", "version"], "thzedge: error: Invalid value for '--log-level'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, start):
    out = subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), out.stderr
    assert "--help`" in lines[0]  # says where to look
    assert "╭" not in out.stderr and out.stdout == ""


def test_config_sections_named_in_help_are_printed(capsys, monkeypatch):
    """Help renders as Rich markup, where `[publisher]` would be a style tag and vanish."""
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a name
    section = re.compile(r"\[[a-z_.]+\]")
    named: dict[tuple[str, ...], set[str]] = {}

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        texts = [getattr(cmd, "help", None) or ""] + [p.help or "" for p in cmd.params]  # type: ignore[attr-defined]
        found = {m for t in texts for m in section.findall(t)}
        if found:
            named[path] = found
        for name, sub in getattr(cmd, "commands", {}).items():
            if not sub.hidden:
                walk(sub, (*path, name))

    walk(typer.main.get_command(build_app()), ())
    assert len(named) >= 3  # tail, view, export sign, … say which config key they read
    for path, sections in named.items():
        assert main([*path, "--help"]) == 0, path
        out = capsys.readouterr().out
        assert all(s in out for s in sections), (path, sections, out)
