"""Recordings encrypted at rest (R-SEC-7, R-NEW-15/16): sealed chunks, tampering, sweep, redact."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mcap.reader import make_reader

from scanner_io.atrest import (
    KEY_ENV,
    StorageKey,
    generate_storage_key,
    load_storage_key,
    seal,
    unseal,
    use_storage_key,
)
from scanner_io.errors import ConfigError, IntegrityError
from scanner_io.frame import Frame
from scanner_io.recording import (
    ENCRYPTION_NAME,
    PRIVACY_NAME,
    RAW_ENCODING,
    SEALED_CHUNK_COMPRESSION,
    Recorder,
    RecordingPolicy,
    RecordingReader,
    recording_info,
)
from scanner_io.retention import redact_recording, sweep_recordings
from tests.scanner_io.conftest import synthetic_frames

FRAME_BYTES = 128 * 128 * 2
PER_CHUNK = 10


@pytest.fixture(autouse=True)
def _no_default_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    use_storage_key(None)
    yield
    use_storage_key(None)


@pytest.fixture
def key(tmp_path: Path) -> StorageKey:
    return generate_storage_key(tmp_path / "keys" / "storage.key")


def record(path: Path, frames: list[Frame], key: StorageKey | None, **policy: object) -> Path:
    # Chunks close at >= chunk_bytes: exactly PER_CHUNK frames each.
    pol = RecordingPolicy(**policy)  # type: ignore[arg-type]
    with Recorder(path, key=key, chunk_bytes=PER_CHUNK * FRAME_BYTES, fsync=False, policy=pol) as r:
        for f in frames:
            r.write(f)
    return path


def chunk_offsets(data: bytes) -> list[int]:
    """Byte offsets of the ciphertext of each sealed chunk (after index and nonce)."""
    name = SEALED_CHUNK_COMPRESSION.encode()
    out, at = [], 0
    while (at := data.find(name, at)) >= 0:
        at += len(name)
        (length,) = struct.unpack_from("<Q", data, at)
        if FRAME_BYTES < length <= len(data) - at:  # a chunk record, not the name in the encryption record
            out.append(at + 8 + 8 + 12)  # u64 data length, u64 chunk index, nonce
    return out


def test_storage_key_file_is_owner_only_and_a_loose_one_is_refused(tmp_path: Path, key: StorageKey) -> None:
    assert key.path is not None and stat.S_IMODE(key.path.stat().st_mode) == 0o600
    assert load_storage_key(key.path).key_id == key.key_id
    assert key.key.hex() not in repr(key)
    os.chmod(key.path, 0o644)
    with pytest.raises(ConfigError, match="group/others"):
        load_storage_key(key.path)


def test_encrypted_recording_round_trips_and_holds_no_plaintext_frame(
    tmp_path: Path, key: StorageKey
) -> None:
    frames = synthetic_frames(35, seed=3)
    path = record(tmp_path / "enc.mcap", frames, key, retention_s=3600, consent="obtained", purpose="qa")
    raw = path.read_bytes()
    for f in frames:  # not one frame's payload (nor a large piece of it) is in the file
        assert f.data.tobytes()[:64] not in raw
    assert len(chunk_offsets(raw)) == 4
    reader = RecordingReader(path, key=key)
    got = [r.item for r in reader]
    assert len(got) == 35 and reader.complete and reader.tampered_chunks == 0
    for a, b in zip(got, frames, strict=True):
        assert isinstance(a, Frame) and a.header == b.header and np.array_equal(a.data, b.data)
    privacy = reader.metadata[PRIVACY_NAME]
    assert privacy["consent"] == "obtained" and privacy["purpose"] == "qa" and privacy["encrypted"] == "true"
    assert reader.metadata[ENCRYPTION_NAME]["key_id"] == key.key_id
    # The plaintext variant of the same frames does contain them: the check above can fail.
    assert frames[0].data.tobytes()[:64] in record(tmp_path / "plain.mcap", frames, None).read_bytes()


def test_a_cut_off_encrypted_file_reads_up_to_its_last_complete_chunk(
    tmp_path: Path, key: StorageKey
) -> None:
    path = record(tmp_path / "enc.mcap", synthetic_frames(35, seed=4), key)
    raw = path.read_bytes()
    offsets = chunk_offsets(raw)
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(raw[: offsets[2] + 1000])  # inside the third chunk
    reader = RecordingReader(cut, key=key)
    frames = [r.item for r in reader]
    assert len(frames) == 2 * PER_CHUNK and reader.truncated and not reader.complete
    assert [f.header.seq for f in frames] == list(range(20))  # type: ignore[union-attr]


def test_a_flipped_byte_in_one_chunk_is_detected_skipped_and_later_chunks_still_read(
    tmp_path: Path, key: StorageKey
) -> None:
    path = record(tmp_path / "enc.mcap", synthetic_frames(40, seed=5), key)
    raw = bytearray(path.read_bytes())
    raw[chunk_offsets(bytes(raw))[1] + 500] ^= 0x01  # one bit inside chunk 1 (frames 10..19)
    path.write_bytes(bytes(raw))
    reader = RecordingReader(path, key=key)
    seqs = [r.item.header.seq for r in reader]  # type: ignore[union-attr]
    assert seqs == list(range(10)) + list(range(20, 40))
    assert reader.tampered_chunks == 1 and "failed authentication" in reader.integrity_errors[0]
    assert reader.complete  # the file itself is whole; one chunk in it is not authentic
    info = recording_info(path, key=key)
    assert info.tampered_chunks == 1 and "INTEGRITY" in info.render()


def test_editing_the_retention_record_makes_every_chunk_fail(tmp_path: Path, key: StorageKey) -> None:
    path = record(tmp_path / "enc.mcap", synthetic_frames(20, seed=6), key, retention_s=60)
    raw = path.read_bytes()
    edited = raw.replace(b"60.0", b"99.0", 1)  # retention_s "60.0" -> "99.0": same length, same layout
    assert edited != raw
    path.write_bytes(edited)
    reader = RecordingReader(path, key=key)
    assert list(reader) == [] and reader.tampered_chunks == 2


def test_no_key_or_another_key_is_a_one_line_configuration_error(tmp_path: Path, key: StorageKey) -> None:
    path = record(tmp_path / "enc.mcap", synthetic_frames(5, seed=7), key)
    with pytest.raises(ConfigError, match="encrypted"):
        list(RecordingReader(path))
    other = generate_storage_key(tmp_path / "other.key")
    with pytest.raises(ConfigError, match=f"encrypted under key {key.key_id}"):
        list(RecordingReader(path, key=other))


def test_the_environment_or_the_systemd_credential_provides_the_key(
    tmp_path: Path, key: StorageKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = record(tmp_path / "enc.mcap", synthetic_frames(5, seed=8), key)
    creds = tmp_path / "creds"
    creds.mkdir()
    assert key.path is not None
    (creds / "storage.key").write_bytes(key.path.read_bytes())
    os.chmod(creds / "storage.key", 0o600)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert sum(1 for _ in RecordingReader(path)) == 5


def test_sealed_blobs_refuse_tampering_and_other_keys(tmp_path: Path, key: StorageKey) -> None:
    blob = seal(b"references", key, "thzedge-gallery")
    assert unseal(blob, key, "g", "thzedge-gallery") == b"references"
    flipped = bytearray(blob)
    flipped[-3] ^= 0x80
    with pytest.raises(IntegrityError, match="failed authentication"):
        unseal(bytes(flipped), key, "g", "thzedge-gallery")
    with pytest.raises(IntegrityError, match="encrypted under key"):
        unseal(blob, generate_storage_key(tmp_path / "o.key"), "g", "thzedge-gallery")
    with pytest.raises(ConfigError, match="storage key"):
        unseal(blob, None, "g", "thzedge-gallery")


def test_sweep_deletes_only_recordings_past_their_retention(tmp_path: Path, key: StorageKey) -> None:
    d = tmp_path / "rec"
    d.mkdir()
    old = record(d / "old.mcap", synthetic_frames(2), key, retention_s=1)
    fresh = record(d / "fresh.mcap", synthetic_frames(2), None, retention_s=7 * 86400)
    forever = record(d / "forever.mcap", synthetic_frames(2), key)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=5)
    report = sweep_recordings([d], now=later)
    assert report.deleted == [str(old)] and not old.exists()
    assert fresh.exists() and str(fresh) in report.kept
    assert forever.exists() and report.no_retention == [str(forever)]
    # A default retention applies to files without one, counted from their modification time.
    os.utime(forever, (0, 0))
    report = sweep_recordings([d], now=later, default_retention_s=86400)
    assert report.deleted == [str(forever)] and fresh.exists()


def test_redacted_copy_has_no_raw_frames_templates_or_claimed_identities(
    tmp_path: Path, key: StorageKey
) -> None:
    frames = [
        Frame(dataclasses.replace(f.header, claimed_identity="alice-1234"), f.data)
        for f in synthetic_frames(12, seed=9)
    ]
    src = tmp_path / "enc.mcap"
    with Recorder(
        src, key=key, fsync=False, policy=RecordingPolicy(retention_s=86400, consent="obtained")
    ) as r:
        for f in frames:
            r.write(f)
        r.write_event("malformed", reason="size_mismatch", seq=12)
    out = tmp_path / "vendor.mcap"
    summary = redact_recording(src, out, key=key)
    assert summary.frames == 12 and summary.events == 1
    raw = out.read_bytes()
    assert b"alice-1234" not in raw and frames[0].data.tobytes()[:64] not in raw
    with open(out, "rb") as fh:  # the standard mcap reader reads it
        reader = make_reader(fh)
        channels = reader.get_summary().channels.values()  # type: ignore[union-attr]
        assert RAW_ENCODING not in {c.message_encoding for c in channels}
        headers = [json.loads(m.data) for _, c, m in reader.iter_messages() if c.topic.endswith("/header")]
    assert [h["seq"] for h in headers] == list(range(12))
    assert all("claimed_identity" not in h and "embedding" not in h for h in headers)
    meta = RecordingReader(out)
    meta.read_preamble()
    assert meta.metadata[PRIVACY_NAME]["biometric"] == "false"
    assert meta.metadata[PRIVACY_NAME]["consent"] == "obtained"


def test_a_chunk_cut_out_or_repeated_is_reported(tmp_path: Path, key: StorageKey) -> None:
    path = record(tmp_path / "enc.mcap", synthetic_frames(30, seed=11), key)
    raw = path.read_bytes()
    name = SEALED_CHUNK_COMPRESSION.encode()
    starts = [o - 8 - 8 - 12 - len(name) for o in chunk_offsets(raw)]  # the compression string
    # Record start: opcode, length, start/end time, uncompressed size, crc, string length.
    spans = []
    for at in starts:
        (length,) = struct.unpack_from("<Q", raw, at + len(name))
        spans.append((at - (1 + 8 + 8 + 8 + 8 + 4 + 4), at + len(name) + 8 + length))
    cut = raw[: spans[1][0]] + raw[spans[1][1] :]  # chunk 1 removed
    (tmp_path / "cut.mcap").write_bytes(cut)
    reader = RecordingReader(tmp_path / "cut.mcap", key=key)
    assert [r.item.header.seq for r in reader] == list(range(10)) + list(range(20, 30))  # type: ignore[union-attr]
    assert reader.missing_chunks == 1 and reader.tampered_chunks == 0
    again = raw[: spans[1][1]] + raw[spans[0][0] : spans[0][1]] + raw[spans[1][1] :]  # chunk 0 replayed
    (tmp_path / "again.mcap").write_bytes(again)
    reader = RecordingReader(tmp_path / "again.mcap", key=key)
    assert [r.item.header.seq for r in reader] == list(range(30))  # type: ignore[union-attr]
    assert reader.tampered_chunks == 1
