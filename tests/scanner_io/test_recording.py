"""MCAP recording and replay: bit-exact round trips, the mcap library's own reader, pacing,
loops, calibration attachment, bounded reads, and SIGKILL recovery in a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scanner_io.frame import Frame
from scanner_io.recording import (
    CALIBRATION_MEDIA_TYPE,
    MANIFEST_NAME,
    RAW_ENCODING,
    Recorder,
    RecordingReader,
    default_manifest,
    extract_calibration,
    record_source,
    recording_info,
)
from scanner_io.sources import MalformedFrame, ReplaySource, open_source
from tests.scanner_io.conftest import synthetic_frames

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, frames: list[Frame], **kw) -> Path:
    with Recorder(path, manifest=default_manifest(source="test", extra={"site": "lab"}), **kw) as rec:
        for f in frames:
            rec.write(f)
    return path


def _replay_all(uri: str) -> tuple[list[Frame | MalformedFrame], ReplaySource]:
    src = open_source(uri)
    assert isinstance(src, ReplaySource)
    items = list(src)
    src.close()
    return items, src


def _same(a: Frame, b: Frame) -> bool:
    return a.header == b.header and a.data.dtype == b.data.dtype and a.data.tobytes() == b.data.tobytes()


def test_record_then_replay_is_bit_exact_and_repeatable(tmp_path: Path) -> None:
    frames = synthetic_frames(60) + synthetic_frames(
        3, shape=(2, 32, 32), dtype="float32", scanner="cube1", seed=4
    )
    path = _write(tmp_path / "rec.mcap", frames, chunk_bytes=64 * 1024)
    assert path.is_file() and not (tmp_path / "rec.mcap.part").exists()
    first, src = _replay_all(f"replay:{path}?rate=max")
    second, _ = _replay_all(f"replay:{path}?rate=max")
    assert not src.live and src.recovered == 63 and not src.truncated
    assert len(first) == len(second) == 63
    assert all(_same(a, b) for a, b in zip(frames, first, strict=True))
    assert all(_same(a, b) for a, b in zip(first, second, strict=True))


def test_the_mcap_librarys_own_reader_opens_the_file(tmp_path: Path) -> None:
    from mcap.reader import make_reader

    frames = synthetic_frames(20, shape=(32, 32))
    calib = tmp_path / "profile.calib"
    calib.write_bytes(b"calibration profile bytes")
    path = _write(tmp_path / "rec.mcap", frames, calibration=calib)
    with open(path, "rb") as fh:
        reader = make_reader(fh)
        summary = reader.get_summary()
        assert summary is not None and summary.statistics.message_count == 20
        messages = list(reader.iter_messages())
        assert [m.sequence for _, _, m in messages] == list(range(20))
        schema, channel, message = messages[0]
        assert channel.topic == "/scanner0/raw" and channel.message_encoding == RAW_ENCODING
        assert schema.encoding == "jsonschema" and json.loads(schema.data)["required"][0] == "v"
        assert message.publish_time == frames[0].header.t_capture_ns
        # The envelope is documented: u32 length, header JSON, raw payload.
        n = int.from_bytes(message.data[:4], "little")
        assert json.loads(message.data[4 : 4 + n]) == frames[0].header.to_dict()
        assert message.data[4 + n :] == frames[0].data.tobytes()
        attachments = list(reader.iter_attachments())
        assert [(a.name, a.media_type, a.data) for a in attachments] == [
            ("calibration/profile.calib", CALIBRATION_MEDIA_TYPE, b"calibration profile bytes")
        ]
        metadata = {m.name: m.metadata for m in reader.iter_metadata()}
        assert metadata[MANIFEST_NAME]["site"] == "lab" and "thzedge_version" in metadata[MANIFEST_NAME]


def test_info_reports_frames_gaps_scanners_and_attachments(tmp_path: Path) -> None:
    from calibration.profile import CalibrationProfile

    frames = [f for f in synthetic_frames(30, shape=(16, 16)) if f.header.seq not in (5, 6, 20)]
    profile = CalibrationProfile.identity("scanner0", (16, 16))
    path = _write(tmp_path / "rec.mcap", frames, calibration=profile)
    info = recording_info(path)
    d = info.to_dict()
    assert d["frames"] == 27 and d["complete"] and not d["truncated"]
    assert d["scanners"]["scanner0"]["seq_gaps"] == 3 and d["seq_gaps"] == 3
    assert d["attachments"][0]["name"] == f"calibration/{profile.profile_id}.tar"
    assert d["metadata"]["thzedge.calibration"]["profile_id"] == profile.profile_id
    assert "27" in info.render() and "3 missing" in info.render()
    # Replay hands back the embedded profile; it loads as the same content-addressed profile.
    src = open_source(f"replay:{path}?rate=max")
    name, data = src.calibration()  # known before the first frame is read
    assert src.manifest["site"] == "lab"
    assert len(list(src)) == 27 and src.calibration() == (name, data)
    src.close()
    restored = CalibrationProfile.load(extract_calibration(name, data, tmp_path / "calib"))
    assert restored.profile_id == profile.profile_id
    # A profile directory given by path is attached the same way, bit for bit.
    saved = profile.save(tmp_path / "saved")
    again = _write(tmp_path / "rec2.mcap", frames[:1], calibration=saved)
    reader = RecordingReader(again)
    list(reader)
    assert reader.calibration() == (name, data)


def test_sim_source_is_deterministic_finite_and_paced() -> None:
    a = list(open_source("sim?seed=3&frames=4&identities=5"))
    b = list(open_source("sim?seed=3&frames=4&identities=5"))
    assert [f.header.seq for f in a] == list(range(4))
    assert all(x.data.tobytes() == y.data.tobytes() for x, y in zip(a, b, strict=True))
    assert a[0].data.dtype == np.uint16 and a[0].truth is not None
    src = open_source("sim?seed=3&fps=20&frames=3")
    assert src.live and not open_source("sim?frames=1").live
    t0 = time.monotonic()
    assert len(list(src)) == 3 and src.exhausted and src.state == "ended"
    assert time.monotonic() - t0 >= 0.09  # frames 1 and 2 are due 50 ms apart


def test_replay_paces_by_recorded_time_and_loops(tmp_path: Path) -> None:
    frames = synthetic_frames(6, shape=(8, 8))
    path = tmp_path / "paced.mcap"
    with Recorder(path) as rec:
        for i, f in enumerate(frames):
            rec.write(f, log_time_ns=1_000_000_000 + i * 40_000_000)  # 40 ms apart
    src = open_source(f"replay:{path}?rate=2&loop=2")
    assert src.live
    t0 = time.monotonic()
    items = list(src)
    elapsed = time.monotonic() - t0
    src.close()
    assert [i.header.seq for i in items] == list(range(6)) * 2
    # 2 passes of 5 intervals of 20 ms plus one interval between passes: ~0.22 s of schedule.
    assert elapsed >= 0.2
    # A short read timeout returns None while waiting for the schedule instead of blocking.
    src = open_source(f"replay:{path}?rate=0.5")
    assert src.read(1) is not None and src.read(0.01) is None
    src.close()


def test_record_source_writes_events_for_malformed_frames_and_gaps(tmp_path: Path) -> None:
    base = _write(tmp_path / "in.mcap", [f for f in synthetic_frames(10, shape=(8, 8)) if f.header.seq != 4])
    src = open_source(f"replay:{base}?rate=max")
    summary = record_source(src, Recorder(tmp_path / "out.mcap"), frames=None)
    src.close()
    assert summary.frames == 9 and summary.upstream_gaps == 1 and summary.stopped_by == "source_end"
    reader = RecordingReader(tmp_path / "out.mcap")
    assert len(list(reader)) == 9
    assert reader.events == [{"kind": "upstream_gap", "missing": 1, "total": 1}]


def test_corrupt_lengths_are_bounded_and_reported_not_allocated(tmp_path: Path) -> None:
    path = _write(tmp_path / "rec.mcap", synthetic_frames(5, shape=(8, 8)))
    data = bytearray(path.read_bytes())
    # Cut the file in the middle of its first chunk, then claim an absurd record length.
    cut = data[: len(data) // 3]
    (tmp_path / "cut.mcap").write_bytes(bytes(cut))
    info = recording_info(tmp_path / "cut.mcap")
    assert info.truncated and not info.complete
    bomb = bytes(data[:8]) + b"\x06" + (2**62).to_bytes(8, "little") + b"\0" * 32
    (tmp_path / "bomb.mcap").write_bytes(bomb)
    info = recording_info(tmp_path / "bomb.mcap")
    assert info.truncated and info.frames == 0 and "RecordLengthLimitExceeded" in (info.truncation or "")


def _serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge", *args]


def test_sigkill_mid_recording_leaves_a_file_that_replays_what_was_flushed(tmp_path: Path) -> None:
    frames = synthetic_frames(50, shape=(64, 64))
    source_file = _write(tmp_path / "source.mcap", frames)
    out = tmp_path / "killed.mcap"
    # A real recorder process, fed forever by a looping replay, with small fsync'ed chunks.
    proc = subprocess.Popen(
        _serve_cmd(
            "record",
            "--source",
            f"replay:{source_file}?rate=400&loop=0",
            "--out",
            str(out),
            "--chunk-kib",
            "64",
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    part = tmp_path / "killed.mcap.part"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not part.exists() or part.stat().st_size < 600_000):
            time.sleep(0.05)
        assert part.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no .part file"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert not out.exists()
    # info on the name given to --out finds the unfinished .part and reports what it recovered.
    result = subprocess.run(
        _serve_cmd("--json", "recording", "info", str(out)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert not info["complete"] and info["recovered_frames"] >= 50
    replayed, src = _replay_all(f"replay:{out}?rate=max")
    assert src.recovered == info["recovered_frames"] == len(replayed)
    by_seq = {f.header.seq: f for f in frames}
    assert all(isinstance(r, Frame) and _same(r, by_seq[r.header.seq]) for r in replayed)


def test_cli_record_from_a_tcp_emulator_and_info(tmp_path: Path, tcp_endpoint: str) -> None:
    frames = synthetic_frames(40, shape=(32, 32))
    source_file = _write(tmp_path / "source.mcap", frames)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        _serve_cmd(
            "scanner", "serve", "--source", f"replay:{source_file}", "--bind", tcp_endpoint, "--rate", "max"
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        out = tmp_path / "rec.mcap"
        # No --frames: the recording ends when the scanner sends its end of stream.
        rec = subprocess.run(
            _serve_cmd("--json", "record", "--source", tcp_endpoint, "--out", str(out)),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert rec.returncode == 0, rec.stderr
        assert json.loads(rec.stdout)["frames"] == 40
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(5)
    replayed, _ = _replay_all(f"replay:{out}?rate=max")
    assert all(_same(a, b) for a, b in zip(frames, replayed, strict=True))
    info = subprocess.run(
        _serve_cmd("recording", "info", str(out)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert info.returncode == 0 and "frames      40" in info.stdout and "complete" in info.stdout


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        _serve_cmd("recording", "info", str(tmp_path / "none.mcap")),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 69 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = subprocess.run(
        _serve_cmd(
            "record", "--source", "sim", "--out", str(tmp_path / "x.mcap"), "--frames", "1", "--duration", "1"
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 1 and "not both" in r.stderr


def test_frames_from_replay_are_read_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "rec.mcap", synthetic_frames(1, shape=(4, 4)))
    items, _ = _replay_all(f"replay:{path}?rate=max")
    with pytest.raises(ValueError):
        items[0].data[0, 0] = 1
    assert np.asarray(items[0].data).shape == (4, 4)


def test_a_foreign_recordings_nan_header_is_rejected_like_on_the_wire(tmp_path: Path) -> None:
    """Replay validates like the wire: a header with NaN is a bad_json frame, not one that
    later crashes re-encoding (record or serve a replay)."""
    import struct

    from mcap.writer import Writer

    path = tmp_path / "foreign.mcap"
    good = b'{"v":1,"scanner":"s0","seq":0,"t_capture_ns":1,"shape":[2,2],"dtype":"uint8","settings":{"g":1}}'
    with open(path, "wb") as fh:
        w = Writer(fh)
        w.start()
        ch = w.register_channel("/s0/raw", RAW_ENCODING, w.register_schema("x", "jsonschema", b"{}"))
        for i, hdr in enumerate((good, good.replace(b'"g":1', b'"g":NaN').replace(b'"seq":0', b'"seq":1'))):
            w.add_message(ch, log_time=i, data=struct.pack("<I", len(hdr)) + hdr + bytes(4), publish_time=i)
        w.finish()
    items, _ = _replay_all(f"replay:{path}?rate=max")
    assert isinstance(items[0], Frame) and items[0].header.settings == {"g": 1}
    assert isinstance(items[1], MalformedFrame) and items[1].reason == "bad_json"
    assert "NaN" in items[1].message and items[1].seq is None


def test_a_file_that_is_not_mcap_is_a_data_error_not_a_cut_off_recording(tmp_path: Path) -> None:
    """A torn end is recovered; a file that never was MCAP is refused (exit 65), not read as 0 frames."""
    from edge.cli import main
    from scanner_io.errors import EXIT_DATA, DataError

    garbage = tmp_path / "garbage.mcap"
    garbage.write_bytes(b"this is not a recording\n" * 10)
    with pytest.raises(DataError, match="not an MCAP recording"):
        recording_info(garbage)
    with pytest.raises(DataError, match="not an MCAP recording"):
        open_source(f"replay:{garbage}?rate=max")
    assert main(["recording", "info", str(garbage)]) == EXIT_DATA
    # A recording cut off after its first bytes still opens (and reports what it recovered).
    good = _write(tmp_path / "rec.mcap", synthetic_frames(5))
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(good.read_bytes()[:40])
    assert recording_info(cut).frames == 0


def test_recordings_are_owner_only(tmp_path: Path) -> None:
    """Raw frames are biometric data: the file is 0600 whatever the umask."""
    old = os.umask(0o022)
    try:
        path = _write(tmp_path / "rec.mcap", synthetic_frames(2))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600


# --- replay of several recordings ---------------------------------------------------------------


def _write_at(path: Path, frames: list[Frame], t0_ns: int, step_ns: int = 20_000_000) -> Path:
    """Write a finished recording whose frames were logged at t0, t0 + step, ..."""
    from scanner_io.recording import Recorder

    rec = Recorder(path, fsync=False)
    for i, f in enumerate(frames):
        rec.write(f, log_time_ns=t0_ns + i * step_ns)
    rec.close()
    return path


def _seqs(uri: str) -> list[int]:
    src = open_source(uri)
    try:
        return [item.header.seq for item in src if isinstance(item, Frame)]
    finally:
        src.close()


def test_replay_of_a_directory_or_a_glob_plays_the_recordings_in_name_order(tmp_path: Path) -> None:
    from scanner_io.errors import SourceUnavailableError

    day = tmp_path / "day"
    day.mkdir()
    t0 = 1_800_000_000_000_000_000
    # Written out of order, with hours between them: names decide the order, not the clock.
    _write_at(day / "b-1200.mcap", synthetic_frames(3, shape=(4, 4), start_seq=10), t0)
    _write_at(day / "a-0800.mcap", synthetic_frames(2, shape=(4, 4), start_seq=0), t0 + 3600 * 10**9)
    _write_at(day / "c-1500.mcap", synthetic_frames(2, shape=(4, 4), start_seq=20), t0 + 7200 * 10**9)
    part = _write_at(tmp_path / "d-1800.mcap", synthetic_frames(1, shape=(4, 4), start_seq=30), t0)
    part.rename(day / "d-1800.mcap.part")  # what a crashed recorder leaves
    (day / "notes.txt").write_text("not a recording")
    assert _seqs(f"replay:{day}?rate=max") == [0, 1, 10, 11, 12, 20, 21, 30]
    assert _seqs(f"replay:{day}/[bc]-*.mcap?rate=max") == [10, 11, 12, 20, 21]
    assert _seqs(f"replay:{day}?rate=max&loop=2") == [0, 1, 10, 11, 12, 20, 21, 30] * 2
    # Paced: the recordings follow one another at the recorded frame rate (20 ms), so the hours
    # between them are not waited for (the test's own timeout would stop that).
    start = time.monotonic()
    assert _seqs(f"replay:{day}/*.mcap?rate=1") == [0, 1, 10, 11, 12, 20, 21]
    assert time.monotonic() - start < 60
    with pytest.raises(SourceUnavailableError, match="no recording matches"):
        open_source(f"replay:{day}/z*.mcap")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceUnavailableError, match=r"no recordings \(\*\.mcap\)"):
        open_source(f"replay:{empty}")


def test_recording_info_text_has_no_python_reprs(tmp_path: Path) -> None:
    frames = synthetic_frames(2, shape=(4, 4)) + synthetic_frames(
        1, shape=(8, 16, 4), dtype="float32", start_seq=2
    )
    path = _write_at(tmp_path / "mixed.mcap", frames, 1_800_000_000_000_000_000)
    out = subprocess.run(
        [sys.executable, "-m", "edge", "recording", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("scanner ")]
    assert line.endswith("seq 0..2, 0 missing, 0 resets, shape 4x4, 8x16x4, dtype uint16, float32"), line
    assert not any(c in out.stdout for c in "[]'{}"), out.stdout


def test_simulated_frames_keep_their_truth_labels_on_a_truth_channel(tmp_path):
    """A replay of a simulator recording carries each frame's truth labels (for `run --score`)."""
    from scanner_io.recording import RecordedTruth, RecordingReader

    src = open_source("sim?seed=3&identities=2-4&frames=6&claim=1&impostor_rate=0.5&session=1")
    frames = list(src)
    path = tmp_path / "t.mcap"
    with Recorder(path) as rec:
        for f in frames:
            rec.write(f)
        rec.write(Frame(header=frames[0].header, data=frames[0].data))  # no truth: no label
    items = [r.item for r in RecordingReader(path)]
    assert len(items) == 7
    for f, got in zip(frames, items, strict=False):
        assert got.truth == RecordedTruth.from_sim(f.truth)
        assert got.truth.claimed_identity == f.header.claimed_identity
        np.testing.assert_array_equal(got.data, f.data)
    assert items[-1].truth is None
    # Replaying it gives the same frames with the same labels.
    replayed = list(open_source(f"replay:{path}?rate=max"))
    assert [r.truth for r in replayed] == [i.truth for i in items]
