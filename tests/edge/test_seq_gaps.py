"""One stream, one upstream-loss figure: the source, `thzedge record`, `thzedge run` and
`recording info` all count missing seqs by `scanner_io.seq.SeqTracker`'s rule.

The stream goes over a real PUSH socket and holds every case of the rule: plain gaps, a
malformed message whose seq is readable (it used that seq up), one whose seq is not (it explains
one missing seq), and a scanner restart (seq going back).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from scanner_io.codec import encode_frame
from scanner_io.frame import FrameHeader
from scanner_io.seq import SeqStep, SeqTracker

pytestmark = pytest.mark.timeout(90)

SCANNER = "gap0"
# 0 1 2 [3 malformed, seq readable] 4 [5 6 lost] 7 [unreadable malformed] 9 10 [11-13 lost] 14,
# then a restart: 0 1 [2 lost] 3.
EXPECTED_GAPS = 2 + 3 + 1


def _frame(seq: int) -> list[bytes]:
    data = np.random.default_rng(seq).integers(100, 4000, size=(96, 96), dtype=np.uint16)
    header = FrameHeader(
        scanner=SCANNER, seq=seq, t_capture_ns=time.time_ns(), shape=(96, 96), dtype="uint16"
    )
    return [bytes(memoryview(p)) for p in encode_frame(header, data)]


def _stream() -> tuple[list[list[bytes]], int]:
    """The messages, and how many of them are valid frames."""
    truncated = _frame(3)
    truncated[2] = truncated[2][:-2]  # size_mismatch: the header (and its seq) is readable
    garbage = [_frame(8)[0], b"{not json", b"\x00" * 16]  # bad_json: no seq can be read
    msgs = [_frame(0), _frame(1), _frame(2), truncated, _frame(4), _frame(7), garbage]
    msgs += [_frame(s) for s in (9, 10, 14, 0, 1, 3)]
    return msgs, len(msgs) - 2


def test_the_tracker_rule() -> None:
    t = SeqTracker()
    assert t.frame("a", 5) == SeqStep()
    t.malformed("a", 6)  # seq 6 used up by a rejected message
    assert t.frame("a", 7) == SeqStep()
    t.malformed(None, None)  # unreadable: explains one missing seq of the next gap
    assert t.frame("a", 10) == SeqStep(missing=1)
    assert t.frame("a", 10) == SeqStep(reset_from=10)  # a repeat is a restart, not a gap
    assert t.frame("a", 3) == SeqStep(reset_from=10)
    assert t.frame("b", 100) == SeqStep()  # scanners are tracked apart
    assert (t.gaps, t.resets) == (1, 2)


class Scanner:
    """A PUSH socket bound at `endpoint` that sends the stream once a consumer connects."""

    def __init__(self, endpoint: str, msgs: list[list[bytes]]) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.sent = threading.Event()
        self._thread = threading.Thread(target=self._send, args=(msgs,), daemon=True)
        self._thread.start()

    def _send(self, msgs: list[list[bytes]]) -> None:
        for m in msgs:
            self.sock.send_multipart(m)  # blocks until the consumer's PULL is connected
        self.sent.set()

    def close(self) -> None:
        self._thread.join(10)
        self.sock.close(0)
        self.ctx.term()


def test_source_record_run_and_recording_info_count_the_same_gaps(tiny_bundle: Path, tmp_path: Path) -> None:
    from edge.pipeline.assemble import RunOptions, run_daemon
    from scanner_io.recording import Recorder, record_source, recording_info
    from scanner_io.sources import open_source

    msgs, n_frames = _stream()

    # `thzedge record`: the source counts, the recording keeps frames and malformed events.
    endpoint = f"ipc://{tmp_path}/scanner-a.sock"
    scanner = Scanner(endpoint, msgs)
    try:
        with open_source(endpoint) as src:
            recorded = record_source(src, Recorder(tmp_path / "rec.mcap", fsync=False), frames=n_frames)
            source_gaps = src.stats.upstream_gaps
    finally:
        scanner.close()
    assert recorded.frames == n_frames and recorded.malformed == 2

    # `thzedge run` on the same stream, recording it too.
    endpoint = f"ipc://{tmp_path}/scanner-b.sock"
    cfg = tmp_path / "thzedge.toml"
    # Counting only: the synthetic frames need no calibration (they are published `uncalibrated`).
    cfg.write_text("[metrics]\nenabled = false\n[calibration]\nallow_uncalibrated = true\n")
    scanner = Scanner(endpoint, msgs)
    try:
        summary = run_daemon(
            RunOptions(
                source=f"{endpoint}?mode=lockstep",
                model=tiny_bundle,
                config=cfg,
                publish=f"ipc://{tmp_path}/results.sock",
                record=tmp_path / "run.mcap",
                max_frames=n_frames,
            )
        )
    finally:
        scanner.close()
    assert summary.frames_in == n_frames and sum(summary.malformed.values()) == 2

    assert source_gaps == EXPECTED_GAPS
    assert recorded.upstream_gaps == EXPECTED_GAPS
    assert summary.dropped["upstream_gap"] == EXPECTED_GAPS
    assert recording_info(tmp_path / "rec.mcap").to_dict()["seq_gaps"] == EXPECTED_GAPS
    assert recording_info(tmp_path / "run.mcap").to_dict()["seq_gaps"] == EXPECTED_GAPS
