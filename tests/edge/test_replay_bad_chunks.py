"""A replayed recording's skipped chunks are counted by the daemon (issue 14, failure 10).

The reader skips a chunk with a flipped byte (plain: CRC/zstd; sealed: AES-GCM authentication)
and reads on; `thzedge run --source replay:…` must say so in its run summary, its metrics
(`thzedge_replay_bad_chunks_total`) and a `source` event, not only in a log line. Real daemon
process, real MCAP files, real results socket.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from daemon_helpers import Subscriber, run_until_exit, summary_of, thzedge_run, write_config

from scanner_io.atrest import generate_storage_key
from scanner_io.recording import SEALED_CHUNK_COMPRESSION, Recorder, recording_info
from tests.scanner_io.conftest import synthetic_frames
from tests.scanner_io.test_recording_bad_chunk import _flip_in_chunk_data

pytestmark = pytest.mark.timeout(180)
N = 300


def _flip_in_sealed_chunk(path: Path, fraction: float) -> None:
    """Flip one bit in the ciphertext of the sealed chunk nearest `fraction` of the file."""
    raw = bytearray(path.read_bytes())
    name, starts, at = SEALED_CHUNK_COMPRESSION.encode(), [], 0
    while (at := raw.find(name, at)) >= 0:
        at += len(name)
        (length,) = struct.unpack_from("<Q", raw, at)
        if 100 < length <= len(raw) - at:  # a chunk record, not the name in the encryption record
            starts.append(at + 8 + 8 + 12)  # u64 data length, u64 chunk index, nonce
    assert len(starts) > 5, "expected many chunks"
    k = min(range(len(starts)), key=lambda j: abs(starts[j] - fraction * len(raw)))
    raw[starts[k] + 50] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_replay_with_a_tampered_chunk_counts_it_in_summary_and_events(
    tiny_bundle: Path, tmp_path: Path, sealed: bool
) -> None:
    key = generate_storage_key(tmp_path / "keys" / "storage.key") if sealed else None
    path = tmp_path / "rec.mcap"
    with Recorder(path, chunk_bytes=20_000, fsync=False, key=key) as rec:
        for f in synthetic_frames(N, shape=(32, 32)):
            rec.write(f)
    if sealed:
        _flip_in_sealed_chunk(path, 1 / 3)
    else:
        _flip_in_chunk_data(path, 1 / 3)
    info = recording_info(path, key=key)
    assert (info.tampered_chunks if sealed else info.bad_chunks) == 1
    assert info.frames < N

    # The replay ends in a fraction of a second: it starts once this test's subscriber has joined.
    extra = "[publisher]\nwait_subscriber_s = 60\n"
    extra += f'[storage]\nkey_file = "{tmp_path / "keys" / "storage.key"}"\n' if sealed else ""
    cfg = write_config(tmp_path / "thzedge.toml", extra, calibration="allow_uncalibrated = true\n")
    pub = f"ipc://{tmp_path}/results.sock"
    sub = Subscriber(pub)
    env = {k: v for k, v in os.environ.items() if k != "THZEDGE_STORAGE_KEY"}
    daemon = thzedge_run(f"replay:{path}?rate=max", tiny_bundle, cfg, pub, "--no-reconstruction", env=env)
    try:
        rc, out, err = run_until_exit(daemon, sub, timeout=120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sub.close()
    assert rc == 0, err[-2000:]
    summary = summary_of(out)
    assert summary["bad_chunks"] == 1, summary
    assert summary["frames_in"] == info.frames  # everything after the bad chunk was read
    events = [e for e in sub.events if e["kind"] == "source" and e.get("state") == "bad_chunks"]
    assert events and events[-1]["count"] == 1, sub.events[-5:]
