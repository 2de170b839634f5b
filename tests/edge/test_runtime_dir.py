"""The daemon never binds its results socket in a directory someone else controls (issue 14,
failure 9): without RuntimeDirectory/XDG_RUNTIME_DIR it falls back to $TMPDIR/thzedge-<uid>,
which another user may have created first to swap the socket. Real daemon processes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from daemon_helpers import finish, thzedge, write_config

pytestmark = pytest.mark.timeout(180)

OTHER_UID = 54321  # a user that is not us


def _run_default_endpoint(tmp_path: Path, bundle: Path) -> tuple[int, str]:
    cfg = write_config(tmp_path / "thzedge.toml")
    env = {"TMPDIR": str(tmp_path), "XDG_RUNTIME_DIR": "", "RUNTIME_DIRECTORY": ""}
    proc = thzedge("--config", str(cfg), "run", "--source", "sim?frames=3", "--model", str(bundle), env=env)
    rc, _, err = finish(proc, timeout=120)
    return rc, err


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory owned by another user needs root")
def test_a_runtime_dir_squatted_by_another_user_is_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    squat = tmp_path / f"thzedge-{os.getuid()}"
    squat.mkdir(mode=0o700)
    os.chown(squat, OTHER_UID, OTHER_UID)
    rc, err = _run_default_endpoint(tmp_path, tiny_bundle)
    assert rc == 78, (rc, err[-2000:])
    assert "belongs to uid 54321" in err and not list(squat.iterdir())


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_runtime_dir_others_may_write_to_is_refused(tmp_path: Path, tiny_bundle: Path, mode: int) -> None:
    loose = tmp_path / f"thzedge-{os.getuid()}"
    loose.mkdir()
    os.chmod(loose, mode)
    rc, err = _run_default_endpoint(tmp_path, tiny_bundle)
    assert rc == 78, (rc, err[-2000:])
    assert "writable by group or others" in err and not list(loose.iterdir())


def test_missing_parents_are_created_private(tmp_path: Path, tiny_bundle: Path) -> None:
    deep = tmp_path / "a" / "b" / "run"
    cfg = write_config(tmp_path / "thzedge.toml")
    proc = thzedge(
        "--config", str(cfg), "run", "--source", "sim?frames=3", "--model", str(tiny_bundle),
        "--publish", f"ipc://{deep}/results.sock",
    )  # fmt: skip
    rc, _, err = finish(proc, timeout=120)
    assert rc == 0, err[-2000:]
    for d in (tmp_path / "a", tmp_path / "a" / "b", deep):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
