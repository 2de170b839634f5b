"""Recordings and results that Foxglove can open: read back with the `mcap` library's own reader."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from mcap.reader import make_reader

from edge.cli import main
from scanner_io.foxglove import RAW_IMAGE_SCHEMA, raw_image
from scanner_io.recording import RecordingReader
from scanner_io.sources import Frame


def _messages(path: Path) -> list[tuple[object, object, dict]]:
    with open(path, "rb") as f:
        return [(s, c, json.loads(m.data)) for s, c, m in make_reader(f).iter_messages()]


def _decode(msg: dict) -> np.ndarray:
    dtype = {"16UC1": "<u2", "32FC1": "<f4", "mono8": "u1"}[msg["encoding"]]
    data = base64.b64decode(msg["data"])
    assert len(data) == msg["step"] * msg["height"]
    return np.frombuffer(data, dtype).reshape(msg["height"], msg["width"])


def test_export_foxglove_writes_raw_images_with_the_well_known_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = tmp_path / "scan.mcap"
    assert main(["record", "--source", "sim?seed=4", "--out", str(rec), "--frames", "6"]) == 0
    out = tmp_path / "scan.foxglove.mcap"
    capsys.readouterr()
    assert main(["--json", "recording", "export", str(rec), "--out", str(out), "--foxglove"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 6 and summary["topics"] == ["/sim0/image"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # raw frames are personal data
    originals = [r.item for r in RecordingReader(rec) if isinstance(r.item, Frame)]
    msgs = _messages(out)
    assert len(msgs) == 6
    for (schema, channel, msg), frame in zip(msgs, originals, strict=True):
        assert schema.name == "foxglove.RawImage" and schema.encoding == "jsonschema"
        assert json.loads(schema.data) == RAW_IMAGE_SCHEMA
        assert channel.topic == "/sim0/image" and channel.message_encoding == "json"
        assert set(msg) == set(RAW_IMAGE_SCHEMA["properties"])
        assert msg["frame_id"] == "sim0" and msg["encoding"] == "16UC1"
        t = frame.header.t_capture_ns
        assert msg["timestamp"] == {"sec": t // 10**9, "nsec": t % 10**9}
        np.testing.assert_array_equal(_decode(msg), frame.data)
    assert main(["recording", "export", str(rec), "--out", str(out)]) == 2  # no format named


def test_raw_image_encodings_and_refusals() -> None:
    img = raw_image(np.arange(12, dtype=np.float32).reshape(3, 4), 1_500_000_000, "s")
    assert (
        img["encoding"] == "32FC1" and img["step"] == 16 and img["timestamp"] == {"sec": 1, "nsec": 5 * 10**8}
    )
    np.testing.assert_array_equal(_decode(img), np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(Exception, match="2-D"):
        raw_image(np.zeros((2, 2, 2), np.float64), 0, "s")


def test_an_encrypted_recording_exports_with_its_key_and_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("cryptography")
    from scanner_io.atrest import KEY_ENV, generate_storage_key, use_storage_key
    from scanner_io.recording import Recorder
    from tests.scanner_io.conftest import synthetic_frames

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    use_storage_key(None)
    key = generate_storage_key(tmp_path / "storage.key")
    frames = synthetic_frames(5, seed=1)
    rec = tmp_path / "enc.mcap"
    with Recorder(rec, key=key, fsync=False) as r:
        for f in frames:
            r.write(f)
    out = tmp_path / "enc.foxglove.mcap"
    assert main(["recording", "export", str(rec), "--out", str(out), "--foxglove"]) == 78  # no key: one line
    assert "is encrypted" in capsys.readouterr().err
    assert not out.exists() and not Path(f"{out}.part").exists()  # nothing half-written is left
    argv = ["recording", "export", str(rec), "--out", str(out), "--foxglove", "--storage-key", str(key.path)]
    assert main(argv) == 0
    assert "holds its raw frames in plaintext" in capsys.readouterr().err
    decoded = [_decode(m) for _, _, m in _messages(out)]
    assert len(decoded) == 5
    for img, frame in zip(decoded, frames, strict=True):
        np.testing.assert_array_equal(img, frame.data)
