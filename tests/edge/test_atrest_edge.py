"""Galleries sealed at rest, signed bundles, the storage-key commands, record/sweep from the CLI."""

from __future__ import annotations

import json
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main
from edge.gallery import Gallery
from scanner_io.atrest import KEY_ENV, StorageKey, generate_storage_key, use_storage_key
from scanner_io.errors import ConfigError, IntegrityError
from scanner_io.recording import RecordingReader


@pytest.fixture(autouse=True)
def _no_default_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    use_storage_key(None)
    yield
    use_storage_key(None)


@pytest.fixture
def key(tmp_path: Path) -> StorageKey:
    return generate_storage_key(tmp_path / "storage.key")


def small_gallery() -> Gallery:
    g = Gallery("ab" * 32, 8, threshold=0.5)
    rng = np.random.default_rng(0)
    g.enroll("alice", rng.normal(size=(3, 8)).astype(np.float32), postures=[0, 1, 2])
    g.enroll("bob", rng.normal(size=(2, 8)).astype(np.float32), postures=[0, 0])
    return g


def test_a_gallery_is_sealed_under_the_storage_key_and_round_trips(tmp_path: Path, key: StorageKey) -> None:
    use_storage_key(key)
    g = small_gallery()
    path = g.save(tmp_path / "g.npz")
    raw = path.read_bytes()
    assert raw.startswith(b"THZSEAL1") and b"alice" not in raw and b"PK" not in raw[:64]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = Gallery.load(path, threshold=0.5)
    assert back.identities == g.identities and back.reference_count("alice") == 3
    probe = small_gallery()._view[1][0]
    assert back.match_1toN(probe).identity == "alice"
    # Without the key it cannot be read; under another key it is refused; a flipped byte is detected.
    use_storage_key(None)
    with pytest.raises(ConfigError, match="encrypted"):
        Gallery.load(path)
    use_storage_key(generate_storage_key(tmp_path / "other.key"))
    with pytest.raises(IntegrityError, match="encrypted under key"):
        Gallery.load(path)
    use_storage_key(key)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x04
    path.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError, match="failed authentication"):
        Gallery.load(path)


def test_without_a_key_a_gallery_stays_plaintext_and_says_so(tmp_path: Path, caplog) -> None:
    path = small_gallery().save(tmp_path / "g.npz")
    assert path.read_bytes().startswith(b"PK")  # a plain .npz (zip)
    assert "WITHOUT encryption" in caplog.text


def test_keys_generate_storage_writes_an_owner_only_key(tmp_path: Path, capsys) -> None:
    assert main(["keys", "generate", "--kind", "storage", "--out", str(tmp_path / "k")]) == 0
    key_file = tmp_path / "k" / "storage.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "LoadCredential=storage.key:" in capsys.readouterr().out
    assert main(["keys", "generate", "--kind", "storage", "--out", str(tmp_path / "k")]) == 1  # no overwrite


def test_record_encrypts_info_needs_the_key_and_sweep_deletes_the_expired(
    tmp_path: Path, key: StorageKey, capsys
) -> None:
    out = tmp_path / "rec" / "r.mcap"
    out.parent.mkdir()
    args = ["record", "--source", "sim?fps=500", "--frames", "12", "--out", str(out)]
    assert main([*args, "--storage-key", str(key.path), "--retention", "0s", "--consent", "test_data"]) == 0
    reader = RecordingReader(out, key=key)
    assert sum(1 for _ in reader) == 12 and reader.encrypted
    assert reader.metadata["thzedge.privacy"]["consent"] == "test_data"
    capsys.readouterr()
    assert main(["recording", "info", str(out)]) == 78
    assert "is encrypted" in capsys.readouterr().err
    assert main(["--json", "recording", "info", str(out), "--storage-key", str(key.path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == 12 and info["encrypted"] and info["tampered_chunks"] == 0
    assert main(["--json", "recording", "sweep", str(out.parent)]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == [str(out)] and not out.exists()


def test_the_daemon_refuses_unsigned_and_wrongly_signed_bundles(
    tiny_bundle: Path, tmp_path: Path, capsys
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    keys = tmp_path / "keys"
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    assert main(["keys", "generate", "--kind", "signing", "--name", "release", "--out", str(keys)]) == 0
    assert main(["keys", "generate", "--kind", "signing", "--name", "rogue", "--out", str(keys)]) == 0
    assert stat.S_IMODE((keys / "release.sign_key").stat().st_mode) == 0o600
    shutil.copy(keys / "release.pub", trusted / "release.pub")
    config = tmp_path / "thzedge.toml"
    config.write_text(f'[metrics]\nenabled = false\n[model]\ntrusted_keys_dir = "{trusted}"\n')
    run = [
        "--config", str(config), "run", "--source", "sim?fps=200", "--model", str(bundle),
        "--publish", f"ipc://{tmp_path}/r.sock", "--max-frames", "3", "--no-reconstruction",
    ]  # fmt: skip
    capsys.readouterr()

    def refused(why: str) -> None:
        assert main(run) == 78
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err

    refused("is not signed")
    assert main(["export", "sign", "--bundle", str(bundle), "--key", str(keys / "rogue.sign_key")]) == 0
    refused("not in [model] trusted_keys_dir")
    assert main(["export", "sign", "--bundle", str(bundle), "--key", str(keys / "release.sign_key")]) == 0
    capsys.readouterr()
    assert main(run) == 0  # signed by the trusted key: it runs
    capsys.readouterr()
    # Junk with a consistent sha256 in the manifest still fails: the manifest is what is signed.
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["thresholds_note"] = "edited"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    refused("does not match manifest.json")


def test_the_daemon_sweeper_deletes_expired_recordings_and_redact_runs_from_the_cli(
    tmp_path: Path, key: StorageKey, capsys
) -> None:
    from edge.config import config_from_dict
    from edge.storage import Sweeper
    from scanner_io.recording import Recorder, RecordingPolicy
    from tests.scanner_io.conftest import synthetic_frames

    d = tmp_path / "recordings"
    d.mkdir()
    for name, retention in (("expired.mcap", 0.0), ("kept.mcap", 86400.0)):
        with Recorder(d / name, key=key, fsync=False, policy=RecordingPolicy(retention_s=retention)) as r:
            for f in synthetic_frames(3):
                r.write(f)
    assert (
        main(["recording", "redact", str(d / "kept.mcap"), "--out", str(tmp_path / "v.mcap")]) == 78
    )  # no key
    assert "encrypted" in capsys.readouterr().err
    args = ["--json", "recording", "redact", str(d / "kept.mcap"), "--out", str(tmp_path / "v.mcap")]
    assert main([*args, "--storage-key", str(key.path)]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 3
    cfg = config_from_dict(
        {"storage": {"sweep_dir": str(d), "sweep_interval_s": 1.0}}, path=tmp_path / "c.toml"
    )
    sweeper = Sweeper(cfg)
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while (d / "expired.mcap").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sweeper.stop()
        sweeper.join(5)
    assert not (d / "expired.mcap").exists() and (d / "kept.mcap").exists()


def test_run_record_seals_under_the_systemd_credential_and_replays_it(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    from daemon_helpers import finish, summary_of, thzedge

    creds = tmp_path / "creds"
    generate_storage_key(creds / "storage.key")  # as LoadCredential=storage.key:... exposes it
    config = tmp_path / "thzedge.toml"
    config.write_text(
        "[metrics]\nenabled = false\n"
        '[storage]\nrequire_encryption = true\nretention_days = 7\nconsent = "test_data"\n'
    )
    rec = tmp_path / "run.mcap"
    common = ["--json", "--config", str(config), "run", "--model", str(tiny_bundle), "--no-reconstruction"]
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    live = thzedge(*common, "--source", "sim?fps=200", "--max-frames", "20", "--record", str(rec),
                   "--publish", f"ipc://{tmp_path}/a.sock", env=env)  # fmt: skip
    rc, out, err = finish(live)
    assert rc == 0, err[-2000:]
    assert b"thzedge-aes256gcm-zstd" in rec.read_bytes()
    from scanner_io.atrest import load_storage_key

    reader = RecordingReader(rec, key=load_storage_key(creds / "storage.key"))
    assert sum(1 for _ in reader) == 20 and reader.metadata["thzedge.privacy"]["consent"] == "test_data"
    assert reader.metadata["thzedge.privacy"]["retention_s"] == repr(7 * 86400.0)
    replay = thzedge(
        *common, "--source", f"replay:{rec}?rate=max", "--publish", f"ipc://{tmp_path}/b.sock", env=env
    )
    rc, out, err = finish(replay)
    assert rc == 0, err[-2000:]
    assert summary_of(out)["frames_in"] == 20
    # Without the credential, require_encryption refuses to start (exit 78), before any frame.
    rc, _, err = finish(
        thzedge(*common, "--source", "sim", "--max-frames", "1", "--publish", f"ipc://{tmp_path}/c.sock")
    )
    assert rc == 78 and "require_encryption" in err
