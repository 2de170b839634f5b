"""The seq rule under attack: every seq slot is a frame, a malformed message or a counted gap.

Issue 14, failures 3 and 4: rejected frames under attacker-chosen scanner names must not grow
per-scanner state; holes before a rejected frame whose seq is readable are gaps too; a rejected
frame with a bad scanner name or a topic mismatch is no false gap; a forged seq of 2^63-1 is a
reset, not 9.2e18 missing frames. Checked on the tracker (a hypothesis property) and over a real
PULL socket (the source, and the daemon under a flood).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner_io.codec import MalformedFrame, decode_frame, encode_frame
from scanner_io.frame import FrameHeader
from scanner_io.seq import MAX_PLAUSIBLE_GAP, MAX_SCANNERS, SeqStep, SeqTracker

pytestmark = pytest.mark.timeout(180)

SCANNER = "flood0"
SHAPE = (32, 32)


def wire(seq: int, kind: str = "frame", scanner: str = SCANNER) -> list[bytes]:
    """One message of `kind` with `seq`: a frame, or a message the decoder rejects."""
    data = np.full(SHAPE, seq % 4000, dtype=np.uint16)
    header = FrameHeader(scanner=scanner, seq=seq, t_capture_ns=time.time_ns(), shape=SHAPE, dtype="uint16")
    parts = [bytes(memoryview(p)) for p in encode_frame(header, data)]
    if kind == "truncated":  # size_mismatch: seq readable
        parts[2] = parts[2][:-2]
    elif kind == "unreadable":  # bad_json: no seq
        parts[1] = b"{not json"
    elif kind == "bad_name":  # bad_field: seq readable, scanner an attacker's string
        h = json.loads(parts[1])
        h["scanner"] = "x" * 8000 + str(seq)
        parts[1] = json.dumps(h).encode()
    elif kind == "mismatch":  # topic_mismatch: header names another (valid) scanner
        h = json.loads(parts[1])
        h["scanner"] = f"other{seq}"
        parts[1] = json.dumps(h).encode()
    return parts


KINDS = ("frame", "truncated", "unreadable", "bad_name", "mismatch")


def feed(tracker: SeqTracker, parts: list[bytes]) -> tuple[bool, int]:
    """Decode like a source and feed the tracker; return (was a frame, missing counted)."""
    try:
        frame = decode_frame(parts)
    except Exception as exc:
        item = MalformedFrame.from_error(exc)  # type: ignore[arg-type]
        return False, tracker.malformed(item.scanner, item.seq).missing
    return True, tracker.frame(frame.header.scanner, frame.header.seq).missing


def test_the_rule_for_hostile_messages() -> None:
    t = SeqTracker()
    assert t.frame("a", 5) == SeqStep()
    assert t.malformed("a", 8) == SeqStep(missing=2)  # holes before a readable malformed seq count
    assert t.frame("a", 9) == SeqStep()
    assert t.malformed("x" * 8000, 10) == SeqStep()  # an unknown name counts on the stream's scanner
    assert t.malformed("other", 11) == SeqStep()
    assert t.frame("a", 12) == SeqStep()  # no false gap for 10 and 11
    assert t.scanners == 1
    assert t.frame("a", 2**63 - 1) == SeqStep(reset_from=12)  # implausible: a reset, not 9.2e18 missing
    assert t.frame("a", 5) == SeqStep(reset_from=2**63 - 1)
    assert t.malformed("a", 5 + MAX_PLAUSIBLE_GAP + 2) == SeqStep()  # a forged malformed seq: unreadable
    assert t.frame("a", 6) == SeqStep()
    assert (t.gaps, t.resets) == (2, 2)


def test_state_is_bounded_by_scanner_count() -> None:
    t = SeqTracker()
    for i in range(10 * MAX_SCANNERS):
        t.frame(f"s{i}", 0)
        t.malformed(f"attacker{i}", 1)
    assert t.scanners == MAX_SCANNERS
    assert t.frame(f"s{10 * MAX_SCANNERS - 1}", 2) == SeqStep()  # the latest ones are still followed


def test_orphan_malformed_before_the_first_frame_is_a_slot() -> None:
    t = SeqTracker()
    assert t.malformed(None, 3) == SeqStep()
    assert t.malformed("x", 5) == SeqStep(missing=1)
    assert t.frame("a", 8) == SeqStep(missing=2)


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[int, str]]:
    """(seq, kind) messages of one scanner, seq increasing with holes; first and last readable."""
    n = draw(st.integers(2, 60))
    seq = draw(st.integers(0, 2**40))
    out = []
    for i in range(n):
        readable = ("frame", "truncated", "bad_name", "mismatch")
        kind = draw(st.sampled_from(readable if i in (0, n - 1) else KINDS))
        out.append((seq, kind))
        seq += 1 + draw(st.one_of(st.just(0), st.integers(0, 5)))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_every_seq_slot_is_a_frame_a_malformed_message_or_a_gap(stream: list[tuple[int, str]]) -> None:
    t = SeqTracker()
    frames = malformed = missing = 0
    for seq, kind in stream:
        is_frame, n = feed(t, wire(seq, kind))
        frames += is_frame
        malformed += not is_frame
        missing += n
    slots = stream[-1][0] - stream[0][0] + 1
    assert frames + malformed + missing == slots
    assert missing == t.gaps and t.resets == 0 and t.scanners == (frames > 0)


# --- over a real socket ---------------------------------------------------------------------


def test_attacker_scanner_names_create_no_state(ipc_endpoint: str, zmq_ctx: zmq.Context) -> None:
    from scanner_io.sources import open_source

    push = zmq_ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind(ipc_endpoint)
    n = 2000
    try:
        with open_source(ipc_endpoint) as src:
            msgs = [wire(0)] + [wire(seq, "bad_name") for seq in range(1, n + 1)] + [wire(n + 1)]
            sender = threading.Thread(target=lambda: [push.send_multipart(m) for m in msgs], daemon=True)
            sender.start()
            got = []
            end = time.monotonic() + 120
            while len(got) < n + 2 and time.monotonic() < end:
                item = src.read(0.5)
                if item is not None:
                    got.append(item)
            sender.join(10)
            assert len(got) == n + 2
            assert all(m.scanner is None for m in got[1:-1] if isinstance(m, MalformedFrame))
            assert src._seq.scanners == 1  # keyed by the one valid name only
            assert src.stats.upstream_gaps == 0  # and no false gap for the rejected seqs
            assert src.stats.malformed == {"bad_field": n}
    finally:
        push.close(0)


class Flooder:
    """A scanner that sends as fast as NOBLOCK allows, dropping (a hole) whenever the HWM is full.

    It sends `frames` frames in all, every other seq a rejected message of some kind, and ends
    with a frame sent blocking, so the consumer's last message is the stream's last seq.
    """

    def __init__(self, sock: zmq.Socket, frames: int) -> None:
        self.sock = sock
        self.want = frames
        self.dropped = self.frames = self.rejected = 0
        self.last_seq = -1
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seq = 0
        self.sock.send_multipart(wire(seq))  # blocks until the consumer is connected
        self.frames += 1
        while self.frames < self.want - 1:
            seq += 1
            kind = KINDS[seq % len(KINDS)] if seq % 2 else "frame"
            try:
                self.sock.send_multipart(wire(seq, kind), zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
                continue
            self.frames += kind == "frame"
            self.rejected += kind != "frame"
        seq += 1
        self.sock.send_multipart(wire(seq))
        self.frames += 1
        self.last_seq = seq


def test_a_flood_through_the_daemon_accounts_for_every_seq_slot(tiny_bundle: Path, tmp_path: Path) -> None:
    """frames_in + malformed + upstream_gap == seq slots sent, under a flood that forces holes.

    A hole is a send that found the scanner's HWM full; the check counts them, whatever either
    side's speed, and only needs the flood to make at least one (a lockstep daemon, HWM 2).
    """
    from edge.pipeline.assemble import RunOptions, run_daemon

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 2)
    endpoint = f"ipc://{tmp_path}/flood.sock"
    push.bind(endpoint)
    n_frames = 1500
    flood = Flooder(push, n_frames)
    flood.thread.start()
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text("[metrics]\nenabled = false\n[calibration]\nallow_uncalibrated = true\n")
    try:
        summary = run_daemon(
            RunOptions(
                source=f"{endpoint}?hwm=2&mode=lockstep",
                model=tiny_bundle,
                config=cfg,
                publish=f"ipc://{tmp_path}/results.sock",
                max_frames=n_frames,
            )
        )
        flood.thread.join(30)
    finally:
        push.close(0)
        ctx.term()
    assert not flood.thread.is_alive() and flood.dropped >= 1, "the flood made no hole"
    slots = flood.last_seq + 1
    malformed = sum(summary.malformed.values())
    assert (summary.frames_in, malformed) == (flood.frames, flood.rejected)
    gaps = summary.dropped["upstream_gap"]
    assert summary.frames_in + malformed + gaps == slots, (
        f"{slots} slots: frames_in={summary.frames_in} malformed={malformed} upstream_gap={gaps}"
        f" (holes made: {flood.dropped})"
    )
