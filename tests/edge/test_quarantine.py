"""R-NEW-17: the last N rejected messages are kept for diagnosis, sealed, the oldest evicted."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from daemon_helpers import NOISE_FRAMES, Subscriber, finish, identity_profile, thzedge_run, write_config

from edge.quarantine import Quarantine, read_quarantined
from scanner_io.atrest import generate_storage_key
from scanner_io.codec import MalformedFrame, encode_frame
from scanner_io.frame import FrameHeader

pytestmark = pytest.mark.timeout(120)

MARK = 0x5A5A  # the payload value: findable in any plaintext copy of a frame


def _parts(seq: int, truncate: bool) -> list[bytes]:
    header = FrameHeader(scanner="scn0", seq=seq, t_capture_ns=time.time_ns(), shape=(96, 96), dtype="uint16")
    data = np.random.default_rng(seq).integers(100, 4000, size=(96, 96), dtype=np.uint16)
    data[:4] = MARK
    parts = [bytes(memoryview(p)) for p in encode_frame(header, data)]
    if truncate:
        parts[2] = parts[2][:-10]  # a payload shorter than the header says: size_mismatch
    return parts


def test_the_daemon_keeps_exactly_the_last_n_rejected_frames_sealed(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    key = generate_storage_key(tmp_path / "keys" / "storage.key")
    qdir = tmp_path / "quarantine"
    cfg = write_config(
        tmp_path / "thzedge.toml",
        f'[storage]\nkey_file = "{key.path}"\nquarantine_dir = "{qdir}"\nquarantine_frames = 3\n',
        calibration=NOISE_FRAMES,
    )
    scan, pub = f"ipc://{tmp_path}/scanner.sock", f"ipc://{tmp_path}/r.sock"
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind(scan)
    sub = Subscriber(pub)
    cal = identity_profile(tmp_path / "cal")
    daemon = thzedge_run(scan, tiny_bundle, cfg, pub, "--max-frames", "2", calibration=cal)
    sent = {}
    try:
        sub.wait_state(proc=daemon)
        for seq in range(5):  # N + 2 rejected messages, then two good frames end the run
            sent[seq] = _parts(seq, truncate=True)
            push.send_multipart(sent[seq])
            time.sleep(0.15)  # the quarantine writes at most one message per 50 ms
        for seq in (5, 6):
            push.send_multipart(_parts(seq, truncate=False))
        rc, out, err = finish(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sub.close()
        push.close(0)
        ctx.term()
    assert rc == 0, err
    files = sorted(qdir.glob("*.thzq"))
    assert len(files) == 3
    kept = [read_quarantined(f, key) for f in files]
    assert [m.seq for m in kept] == [2, 3, 4]  # the oldest two were evicted
    assert all(m.reason == "size_mismatch" and m.scanner == "scn0" for m in kept)
    assert [list(m.parts) for m in kept] == [sent[s] for s in (2, 3, 4)]
    mark = np.full(4 * 96, MARK, np.uint16).tobytes()
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert mark not in f.read_bytes()  # encrypted: the frame's bytes never lie on disk


def test_without_a_storage_key_nothing_is_kept(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q", None, max_frames=3, max_bytes=1 << 20)
    item = MalformedFrame("size_mismatch", "short payload", seq=1, scanner="scn0", raw=(b"x", b"y"))
    assert not q.keep(item)
    assert not (tmp_path / "q").exists() and q.skipped == 1


def test_the_byte_bound_evicts_the_oldest(tmp_path: Path) -> None:
    key = generate_storage_key(tmp_path / "storage.key")
    q = Quarantine(tmp_path / "q", key, max_frames=100, max_bytes=3 * 1024)
    for seq in range(4):
        item = MalformedFrame("too_large", "big", seq=seq, raw=(b"h", bytes(1000)))
        assert q.keep(item)
        time.sleep(0.06)
    assert [read_quarantined(f, key).seq for f in q.files()] == [2, 3]  # 4 × ~1.1 KB > 3 KiB
    assert not q.keep(MalformedFrame("too_large", "bigger", seq=9, raw=(bytes(4096),)))  # alone too big
