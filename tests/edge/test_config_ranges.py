"""Values that break the daemon are refused by `config validate` (issue 14, failure 7).

Every numeric setting has a finite range; NaN and infinity never pass; the CURVE key files the
daemon would load are loaded by `config validate` too. Checked with the real CLI (exit 78, one
line) and, for the values the probe found, with the daemon itself.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from edge.config import SECTIONS
from tests.edge.daemon_helpers import REPO

pytestmark = pytest.mark.timeout(120)


def thzedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], cwd=REPO, capture_output=True, text=True)


def _numeric(hint: typing.Any) -> bool:
    args = typing.get_args(hint) or (hint,)
    return any(a in (int, float) for a in args)


def test_every_numeric_setting_has_a_finite_range() -> None:
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _numeric(hints[f.name]):
                meta = f.metadata
                assert "file_modes" in meta or ("min" in meta and "max" in meta), f"[{name}] {f.name}"


BREAKING = [
    "[daemon]\nheartbeat_timeout_s = nan",
    "[daemon]\nstop_timeout_s = nan",
    "[daemon]\nstop_timeout_s = inf",
    "[daemon]\nmax_age_s = -inf",
    "[daemon]\nstalled_after_s = inf",
    "[daemon]\nqueue_size = 1000000000000000000",
    "[publisher]\nhwm = 1099511627776",
    "[model]\nmax_batch = 4294967296",
    "[verification]\nthreshold = nan",
    '[sources.s]\nuri = "sim"\n[sources.s.conditioning]\ndb_min = nan',
]


@pytest.mark.parametrize("text", BREAKING, ids=lambda t: t.split("\n")[-1])
def test_config_validate_refuses_values_that_break_the_daemon(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(text + "\n")
    out = thzedge("--config", str(cfg), "config", "validate")
    assert out.returncode == 78, (out.returncode, out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1 and "ok" not in out.stdout


def test_the_daemon_refuses_them_too_before_loading_anything(tmp_path: Path, tiny_bundle: Path) -> None:
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text("[metrics]\nenabled = false\n[daemon]\nheartbeat_timeout_s = nan\n")
    out = thzedge("--config", str(cfg), "run", "--source", "sim?frames=3", "--model", str(tiny_bundle))
    assert out.returncode == 78 and "finite" in out.stderr, out.stderr[-2000:]


def _curve_config(tmp_path: Path, secret: Path, clients: Path) -> Path:
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(
        '[publisher]\nendpoint = "tcp://127.0.0.1:5599"\n[publisher.curve]\nenabled = true\n'
        f'secret_key_file = "{secret}"\nallowed_clients_dir = "{clients}"\n'
    )
    return cfg


def test_config_validate_loads_the_curve_key_files(tmp_path: Path) -> None:
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    assert thzedge("keys", "generate", "--out", str(keys)).returncode == 0
    assert thzedge("keys", "generate", "--out", str(clients), "--name", "ui").returncode == 0
    (clients / "ui.key_secret").unlink()
    good = thzedge(
        "--config", str(_curve_config(tmp_path, keys / "server.key_secret", clients)), "config", "validate"
    )
    assert good.returncode == 0, good.stderr

    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text('public-key = "not a key"\nsecret-key = "nor this"\n')
    bare = tmp_path / "bare.key_secret"
    bare.write_text("~" * 40)  # 40 characters, none of them Z85
    cases = {
        "garbage": (garbage, clients),
        "bare garbage": (bare, clients),
        "public as secret": (keys / "server.key", clients),
        "missing clients dir": (keys / "server.key_secret", tmp_path / "nowhere"),
    }
    bad_client = tmp_path / "bad-clients"
    bad_client.mkdir()
    (bad_client / "x.key").write_text('curve\n  public-key = "short"\n')
    cases["garbage client key"] = (keys / "server.key_secret", bad_client)
    for what, (secret, cdir) in cases.items():
        out = thzedge("--config", str(_curve_config(tmp_path, secret, cdir)), "config", "validate")
        assert out.returncode == 78, (what, out.returncode, out.stdout, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, (what, out.stderr)
