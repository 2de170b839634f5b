"""Frame sources behind one interface, opened from a URI with `open_source`.

- `sim[?seed=0&fps=30&identities=20&frames=N&scanner=sim0]`: the THz simulator; paced at `fps`
  (live) or, without `fps`, as fast as the consumer reads (lockstep). Who walks past:
  `identities=N` (people 0..N-1) or a set `identities=3,5,9` / `identities=30-59`, or one person
  `identity=K`; `session=S` is another capture session of the same people (other poses,
  clothing, speckle and sensor temperature); `claim=1&impostor_rate=R` puts a claimed identity
  in each header (a wrong one with probability R). Calibration scenes and forced drift:
  `scene=face|dark|flat`, `level=L` (flat), `temp_offset_c=`, `gain_drift=`,
  `defects=default|full`, `start=K` (stream position).
- `replay:PATH.mcap[?rate=1.0|max&loop=N]`: a recording; `max` is lockstep, a number paces by
  the recorded timestamps on the monotonic clock; `loop=N` plays it N times (0: forever).
  PATH may also be a directory (its `*.mcap` recordings) or a glob (`recs/day1-*.mcap`): the
  recordings play one after the other in name order, as one stream.
- `tcp://HOST:PORT` / `ipc://PATH` (optional `?hwm=4&stall_s=2&reconnect_max_ms=5000` and
  `max_frame_bytes=N`, the largest payload accepted, which also sets `ZMQ_MAXMSGSIZE`): the
  acquisition protocol. The source connects a PULL socket to the scanner's bound PUSH socket,
  reconnects with bounded backoff, reports up / stalled / down and counts sequence gaps. The
  scanner's end-of-stream message ends it (state "ended", `exhausted`) once the frames before
  it have been read.

A source's `read(timeout_s)` returns a Frame, a MalformedFrame (rejected message; the stream
goes on) or None (nothing within the timeout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import logging
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, parse_qsl, urlencode

import zmq
from zmq.utils.monitor import recv_monitor_message

from scanner_io.choices import Choice
from scanner_io.codec import (
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_SCANNER_LEN,
    TOPIC_PREFIX,
    EndOfStream,
    MalformedFrame,
    decode_message,
)
from scanner_io.errors import ConfigError, FrameDecodeError, SourceUnavailableError
from scanner_io.frame import Frame
from scanner_io.osthread import name_native_thread
from scanner_io.ratelog import RateLimitedLog
from scanner_io.recording import PART_SUFFIX, RecordingReader
from scanner_io.seq import SeqTracker
from scanner_io.simulator import ScannerSimulator, SensorMaps, SimConfig, full_defects_config

__all__ = [
    "FrameSource",
    "MalformedFrame",
    "QueuePolicy",
    "ReplaySource",
    "SimSource",
    "Source",
    "SourceStats",
    "ZmqSource",
    "is_scanner_uri",
    "open_source",
    "split_queue_mode",
    "zmq_context",
]

log = logging.getLogger(__name__)

STATES = ("up", "stalled", "down", "ended", "failed")
# Socket defaults for the acquisition PULL socket (docs/protocol.md, "Socket pattern").
# Whole messages, not parts or bytes: libzmq holds up to this many complete messages unread.
DEFAULT_RCVHWM = 4
DEFAULT_STALL_S = 2.0
RECONNECT_IVL_MS = 100
DEFAULT_RECONNECT_MAX_MS = 5000
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
HANDOFF_QUEUE = 4  # frames decoded ahead of the consumer
# A peer lost and no connection back for this long past the reconnect backoff: recreate the
# socket. libzmq drops a peer that sends a part over MAXMSGSIZE and then does not reconnect.
RECREATE_GRACE_S = 2.0
# Whole-message bounds (docs/protocol.md): three parts, and no more bytes than a maximal frame.
MAX_PARTS = 3
TOPIC_MAX_BYTES = len(TOPIC_PREFIX) + MAX_SCANNER_LEN
MAX_MESSAGE_BYTES = TOPIC_MAX_BYTES + MAX_HEADER_BYTES + MAX_PAYLOAD_BYTES


def message_bytes_limit(max_frame_bytes: int) -> int:
    """The most bytes one acquisition message may hold when payloads are at most max_frame_bytes."""
    return TOPIC_MAX_BYTES + MAX_HEADER_BYTES + max_frame_bytes


def part_bytes_limit(max_frame_bytes: int) -> int:
    """ZMQ_MAXMSGSIZE for payloads of at most max_frame_bytes: the largest part (header or payload)."""
    return max(max_frame_bytes, MAX_HEADER_BYTES, TOPIC_MAX_BYTES)


def zmq_context() -> zmq.Context:
    """Return the process's one zmq Context (created on first use)."""
    return zmq.Context.instance()


@dataclass
class SourceStats:
    """Counters of one source; `upstream_gaps` counts frames missing from the seq sequence."""

    received: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    upstream_gaps: int = 0
    seq_resets: int = 0
    connects: int = 0
    disconnects: int = 0
    recreated: int = 0  # sockets recreated because the peer was lost and did not come back
    bad_chunks: int = 0  # replay: recording chunks skipped (corrupt, failed authentication, missing)

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        return {
            "received": self.received,
            "malformed": dict(self.malformed),
            "malformed_total": self.malformed_total,
            "upstream_gaps": self.upstream_gaps,
            "seq_resets": self.seq_resets,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "recreated": self.recreated,
            "bad_chunks": self.bad_chunks,
        }


@runtime_checkable
class FrameSource(Protocol):
    """What a consumer (the daemon, enrolment, the recorder) needs of a frame source."""

    live: bool  # True: the consumer drops oldest when behind; False: lockstep, nothing dropped

    def read(self, timeout_s: float) -> Frame | MalformedFrame | None:
        """Return the next frame, a rejected message, or None if nothing came within timeout_s."""
        ...

    @property
    def exhausted(self) -> bool:
        """True once a finite source has delivered everything."""
        ...

    @property
    def state(self) -> str:
        """One of "up", "stalled", "down", "ended", "failed" (a live source that cannot recover)."""
        ...

    def calibration(self) -> tuple[str, bytes] | None:
        """Return the calibration profile attachment (name, bytes) the source carries, else None."""
        ...

    def sensor_maps(self) -> SensorMaps | None:
        """Return the sensor's true maps if the source knows them (the simulator), else None."""
        ...

    def close(self) -> None:
        """Release the source; safe to call twice."""
        ...


class QueuePolicy(Choice):
    """What the consumer's bounded queue does when full: follow the source, block, or drop oldest."""

    auto = "auto"  # live source → drop_oldest, lockstep source → block
    block = "block"
    drop_oldest = "drop_oldest"


def is_scanner_uri(uri: str) -> bool:
    """True for a live scanner link (tcp://, ipc://): frames that carry no calibration of their own."""
    return uri.startswith(("tcp://", "ipc://"))


def split_queue_mode(uri: str) -> tuple[str, QueuePolicy]:
    """Take the consumer's own `mode=live|lockstep` parameter off a tcp:// or ipc:// source URI.

    A ZeroMQ source is live by default (drop oldest when the consumer falls behind). With
    `mode=lockstep` the daemon's queue blocks instead, the PULL socket stops reading and the
    scanner (e.g. `thzedge scanner serve --rate max`) blocks in turn: nothing is dropped end to
    end. Returns (URI without the parameter, queue policy).
    """
    if not uri.startswith(("tcp://", "ipc://")) or "?" not in uri:
        return uri, QueuePolicy.auto
    base, _, query = uri.partition("?")
    params = parse_qsl(query, keep_blank_values=True)
    modes = [v for k, v in params if k == "mode"]
    if not modes:
        return uri, QueuePolicy.auto
    if modes[-1] not in ("live", "lockstep"):
        raise ConfigError(f"source {uri!r}: mode={modes[-1]!r}; expected mode=live or mode=lockstep")
    rest = [(k, v) for k, v in params if k != "mode"]
    policy = QueuePolicy.block if modes[-1] == "lockstep" else QueuePolicy.drop_oldest
    return base + ("?" + urlencode(rest) if rest else ""), policy


class Source(ABC):
    """A stream of raw frames; see the module docstring for the URIs."""

    uri: str
    live: bool  # True: the consumer drops oldest when behind; False: lockstep, nothing dropped

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.stats = SourceStats()
        self._seq = SeqTracker()
        self._closed = False

    @abstractmethod
    def read(self, timeout_s: float) -> Frame | MalformedFrame | None:
        """Return the next frame, a rejected message, or None if nothing came within timeout_s."""

    def _observe(self, item: Frame | MalformedFrame) -> None:
        """Count one delivered item in `stats` (seq gaps and resets by the one `SeqTracker` rule)."""
        if isinstance(item, MalformedFrame):
            self.stats.malformed[item.reason] = self.stats.malformed.get(item.reason, 0) + 1
            self._seq.malformed(item.scanner, item.seq)  # holes before it land in `gaps`
        else:
            self.stats.received += 1
            self._seq.frame(item.header.scanner, item.header.seq)
        self.stats.upstream_gaps = self._seq.gaps
        self.stats.seq_resets = self._seq.resets

    def calibration(self) -> tuple[str, bytes] | None:
        """Return the calibration profile attachment (name, bytes) the source carries, else None."""
        return None

    @property
    def exhausted(self) -> bool:
        """True once a finite source has delivered everything."""
        return False

    def sensor_maps(self) -> SensorMaps | None:
        """Return the sensor's true dark/gain/bad-pixel maps if the source knows them, else None.

        Only the simulator knows them; calibration.simulated.profile_from_sensor_maps turns them into a
        calibration profile, so `--source sim` can be calibrated without a configured profile.
        """
        return None

    @property
    def state(self) -> str:
        """One of "up", "stalled", "down", "ended"."""
        if self._closed or self.exhausted:
            return "ended"
        return "up"

    def close(self) -> None:
        """Release the source; safe to call twice."""
        self._closed = True

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame | MalformedFrame]:
        """Yield items until the source is exhausted or closed (blocking reads)."""
        while not self._closed:
            item = self.read(0.25)
            if item is not None:
                yield item
            elif self.exhausted:
                return


class _Pacer:
    """Paces items on the monotonic clock against a schedule, without accumulating drift."""

    def __init__(self) -> None:
        self._t0: float | None = None

    def wait_until(self, offset_s: float, timeout_s: float) -> bool:
        """Sleep until start + offset_s; return False if that is further away than timeout_s."""
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now - offset_s
        delay = self._t0 + offset_s - now
        if delay > timeout_s:
            time.sleep(max(timeout_s, 0.0))
            return False
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:
            # More than a second behind (slow consumer): re-anchor instead of bursting.
            self._t0 = now - offset_s
        return True


class SimSource(Source):
    """The THz scanner simulator as a source (scanner_io.simulator.ScannerSimulator)."""

    def __init__(
        self,
        uri: str,
        seed: int = 0,
        fps: float | None = None,
        identities: int = 20,
        frames: int | None = None,
        scanner: str = "sim0",
        scene: str = "face",
        level: float = 1.0,
        temp_offset_c: float = 0.0,
        gain_drift: float = 0.0,
        defects: str = "default",
        start: int = 0,
        session: int = 0,
        people: tuple[int, ...] | None = None,
        claim: bool = False,
        impostor_rate: float = 0.0,
    ) -> None:
        super().__init__(uri)
        if defects not in ("default", "full"):
            raise ConfigError(f"defects={defects!r} in source {uri!r} is invalid: use default or full")
        self.live = fps is not None
        self._sim = ScannerSimulator(
            seed=seed,
            identities=identities,
            session=session,
            people=people,
            claim_identity=claim,
            impostor_rate=impostor_rate,
            scanner=scanner,
            config=full_defects_config() if defects == "full" else SimConfig(),
            scene=scene,
            level=level,
            temp_offset_c=temp_offset_c,
            gain_drift=gain_drift,
        )
        self._sim.seek(start)
        self._fps = fps
        self._limit = frames
        self._count = 0
        self._pacer = _Pacer()

    @property
    def exhausted(self) -> bool:
        return self._limit is not None and self._count >= self._limit

    def read(self, timeout_s: float) -> Frame | MalformedFrame | None:
        if self._closed or self.exhausted:
            return None
        if self._fps is not None and not self._pacer.wait_until(self._count / self._fps, timeout_s):
            return None
        frame = self._sim.next_frame()
        self._count += 1
        self._observe(frame)
        return frame

    @property
    def simulator(self) -> ScannerSimulator:
        """The simulator behind this source (its people, session and truth)."""
        return self._sim

    def sensor_maps(self) -> SensorMaps:
        """Return the simulated sensor's true maps as calibrated at the start of its session.

        Session 0 is calibrated at the calibration temperature; another session's sensor starts
        elsewhere (`ScannerSimulator.session_temp_c`), and a site calibrates each day, so the
        profile a `sim?session=S` source carries is that session's.
        """
        sim = self._sim
        return sim.sensor_maps(sim.config.reference_temp_c + sim.session_temp_c)


def replay_paths(spec: str) -> list[str]:
    """Expand a `replay:` path: one recording, a directory of them, or a glob; in name order.

    A directory contributes its `*.mcap` files, and the `.mcap.part` a crashed recorder left
    where no finished file of that name exists. Nothing to play is SourceUnavailableError.
    """
    if glob.has_magic(spec):
        found = sorted(glob.glob(spec))
        if not found:
            raise SourceUnavailableError(f"no recording matches {spec!r}")
        return found
    path = Path(spec)
    if not path.is_dir():
        return [spec]
    names = {p.name for p in path.iterdir() if p.is_file()}
    picked = [n for n in names if n.endswith(".mcap")] + [
        n for n in names if n.endswith(".mcap" + PART_SUFFIX) and n[: -len(PART_SUFFIX)] not in names
    ]
    if not picked:
        raise SourceUnavailableError(f"no recordings (*.mcap) in directory {spec}")
    return [str(path / n) for n in sorted(picked)]


class ReplaySource(Source):
    """Frames from MCAP recordings, bit-identical to what was recorded.

    `rate=None` is lockstep (as fast as read, nothing dropped); a number paces by the
    recorded log times divided by the rate. Several recordings play one after the other as one
    stream: each starts one mean frame interval after the previous one's last frame (as a
    `loop` pass does), however far apart they were recorded. After the end, `recovered` is the
    number of frames read and `truncated` says whether a file was cut off (crash) before its
    footer. The manifest and calibration are the first recording's.
    """

    def __init__(self, uri: str, path: str | list[str], rate: float | None = 1.0, loop: int = 1) -> None:
        super().__init__(uri)
        self.live = rate is not None
        self.paths = [path] if isinstance(path, str) else list(path)
        # Every file is opened (and checked) now, so a missing one fails before the first frame.
        self._readers = [RecordingReader(p) for p in self.paths]  # SourceUnavailableError if missing
        for reader in self._readers:
            reader.read_preamble()
        self._file = 0
        self._reader = self._readers[0]
        self.path = self._reader.path
        # The device/config manifest the recorder stored (empty for foreign files).
        self.manifest: dict[str, str] = dict(self._reader.metadata.get("thzedge.manifest", {}))
        self._rate = rate
        self._loops = loop
        self._pass = 0
        self._iter: Iterator[Any] | None = None
        self._done = False
        self._pacer = _Pacer()
        self._first_t: int | None = None
        self._pass_offset_s = 0.0
        self._last_offset_s = 0.0
        self._pending: Any = None
        self._played = 0  # frames of the current pass, over all files
        self.recovered = 0
        self._bad_chunks_done = 0  # skipped chunks of the files finished in the first pass
        self.truncated = False
        self.truncation: str | None = None

    @property
    def exhausted(self) -> bool:
        return self._done and self._pending is None

    def calibration(self) -> tuple[str, bytes] | None:
        """Return the embedded calibration profile attachment (name, bytes), if the file has one."""
        return self._readers[0].calibration()

    def _file_ended(self) -> None:
        reader = self._reader
        if self._pass == 0:
            self.recovered += reader.frames
            self._bad_chunks_done += _skipped_chunks(reader)
            self.stats.bad_chunks = self._bad_chunks_done
            if reader.bad_chunks:
                log.warning(
                    "recording %s: skipped %d corrupt chunk(s) (%s)",
                    reader.path,
                    reader.bad_chunks,
                    reader.bad_chunk_errors[0],
                )
            if reader.truncated:
                self.truncated = True
                self.truncation = reader.truncation
                log.warning(
                    "recording %s is cut off (%s): recovered %d frames",
                    reader.path,
                    reader.truncation,
                    reader.frames,
                )
        self._played += reader.frames
        # The next file (or pass) starts one mean interval (of this file) after its last frame;
        # `_pass_offset_s` is where this file's first frame was scheduled.
        step = (self._last_offset_s - self._pass_offset_s) / max(reader.frames - 1, 1)
        self._pass_offset_s = self._last_offset_s + step
        self._first_t = None
        self._iter = None

    def _next_record(self) -> Any:
        while not self._done:
            if self._iter is None:
                self._iter = self._reader.items()
            try:
                return next(self._iter)
            except StopIteration:
                self._file_ended()
                if self._file + 1 < len(self._readers):
                    self._file += 1
                    self._reader = self._readers[self._file]
                    continue
                self._pass += 1
                if (self._loops and self._pass >= self._loops) or self._played == 0:
                    self._done = True
                    return None
                self._file, self._reader, self._played = 0, self._readers[0], 0
        return None

    def read(self, timeout_s: float) -> Frame | MalformedFrame | None:
        if self._closed:
            return None
        if self._pending is None:
            self._pending = self._next_record()
            if self._pending is None:
                return None
        rec = self._pending
        if self._rate is not None:
            if self._first_t is None:
                self._first_t = rec.log_time_ns
            offset = self._pass_offset_s + (rec.log_time_ns - self._first_t) / 1e9 / self._rate
            if not self._pacer.wait_until(offset, timeout_s):
                return None
            self._last_offset_s = offset
        self._pending = None
        if self._pass == 0 and self._iter is not None:  # this file's chunks skipped so far, live
            self.stats.bad_chunks = self._bad_chunks_done + _skipped_chunks(self._reader)
        self._observe(rec.item)
        return rec.item


def _skipped_chunks(reader: RecordingReader) -> int:
    """Chunks a reader skipped: corrupt (CRC, zstd), sealed ones failing authentication, missing."""
    return reader.bad_chunks + reader.tampered_chunks + reader.missing_chunks


@dataclass(frozen=True)
class CurveClientKeys:
    """CURVE client keys of an acquisition link (Z85): the scanner's public key, then our own pair."""

    server_public: bytes
    public: bytes
    secret: bytes = field(repr=False)


class ZmqSource(Source):
    """The acquisition protocol over ZeroMQ: a PULL socket connected to the scanner's PUSH.

    The socket lives in one I/O thread that creates, uses and closes it (sockets are not
    thread-safe); decoded frames reach `read()` through a small queue. When the consumer falls
    behind, the thread stops receiving, ZeroMQ's high-water marks fill and the scanner, which
    sends with NOBLOCK, drops and counts — it never blocks. Those losses show up here as
    `upstream_gaps`. The scanner's end-of-stream message travels through the same queue, behind
    the frames sent before it; once `read()` reaches it the source is exhausted and "ended"
    (`end` holds the message) and the I/O thread has closed its socket.
    """

    def __init__(
        self,
        uri: str,
        endpoint: str,
        hwm: int = DEFAULT_RCVHWM,
        stall_s: float = DEFAULT_STALL_S,
        reconnect_max_ms: int = DEFAULT_RECONNECT_MAX_MS,
        curve: CurveClientKeys | None = None,
        max_frame_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        super().__init__(uri)
        if not 1 <= max_frame_bytes <= MAX_PAYLOAD_BYTES:
            raise ConfigError(
                f"max_frame_bytes={max_frame_bytes} in source {uri!r} must be in [1, {MAX_PAYLOAD_BYTES}]"
            )
        # The largest payload this link accepts: libzmq drops a peer that sends any part larger
        # than part_bytes_limit() before allocating it, so a hostile message holds at most that
        # much per part (docs/protocol.md, "Validation").
        self.max_frame_bytes = max_frame_bytes
        self._max_message_bytes = message_bytes_limit(max_frame_bytes)
        # Keep the bytes of rejected messages on MalformedFrame.raw (set before reading starts).
        self.keep_rejected = False
        self.live = True
        self.endpoint = endpoint
        # Encrypted and authenticated towards a scanner that is a CURVE server (tcp links).
        self._curve = curve
        self._hwm = hwm
        self._stall_s = stall_s
        self._reconnect_max_ms = reconnect_max_ms
        self._queue: queue.Queue[Frame | MalformedFrame | EndOfStream] = queue.Queue(maxsize=HANDOFF_QUEUE)
        self.end: EndOfStream | None = None  # set when read() reaches the scanner's end of stream
        self._stop = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._peers = 0
        self._last_frame = time.monotonic()
        self._lost_since: float | None = None  # when the last peer went away (None: connected)
        self._failed: BaseException | None = None
        self._rejected_log = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._run, name=f"source {endpoint}", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            self._thread.join(2)
            raise SourceUnavailableError(f"cannot connect to {endpoint}: {self._error}")

    @property
    def exhausted(self) -> bool:
        return self.end is not None

    @property
    def state(self) -> str:
        if self._closed or self.end is not None:
            return "ended"
        if self._failed is not None:
            return "failed"
        if self._peers <= 0:
            return "down"
        if time.monotonic() - self._last_frame > self._stall_s:
            return "stalled"
        return "up"

    @property
    def failure(self) -> str | None:
        """Why the source failed for good (state "failed"), else None."""
        return None if self._failed is None else f"{type(self._failed).__name__}: {self._failed}"

    def read(self, timeout_s: float) -> Frame | MalformedFrame | None:
        if self._closed or self.end is not None:
            return None
        try:
            item = self._queue.get(timeout=max(timeout_s, 0.0)) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, EndOfStream):
            self.end = item
            return None
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(5)

    def _configure(self, sock: Any) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self._reconnect_max_ms)
        # Per-part limit: libzmq drops a peer that sends anything larger (oversized frames).
        sock.setsockopt(zmq.MAXMSGSIZE, part_bytes_limit(self.max_frame_bytes))
        if self._curve is not None:
            sock.curve_serverkey = self._curve.server_public
            sock.curve_publickey = self._curve.public
            sock.curve_secretkey = self._curve.secret
        if self.endpoint.startswith("tcp://"):
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)

    def _open(self) -> tuple[Any, Any]:
        """Create, configure and connect the PULL socket and its monitor (in the I/O thread)."""
        sock = mon = None
        try:
            sock = zmq_context().socket(zmq.PULL)
            self._configure(sock)
            mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            mon.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
        except BaseException:
            self._close_sockets(sock, mon)
            raise
        # Blocking receives with a short timeout (not poll + recv): one GIL release per frame.
        sock.setsockopt(zmq.RCVTIMEO, 50)
        return sock, mon

    @staticmethod
    def _close_sockets(sock: Any, mon: Any) -> None:
        if sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
        for s in (mon, sock):
            if s is not None:
                s.close(0)

    def _drain_monitor(self, mon: Any, wait_ms: int = 0) -> None:
        while mon.poll(wait_ms):
            wait_ms = 0
            event = recv_monitor_message(mon)["event"]
            if event == zmq.EVENT_CONNECTED:
                self._peers += 1
                self.stats.connects += 1
                self._last_frame = time.monotonic()
                self._lost_since = None
                log.info("source %s: connected", self.endpoint)
            elif event == zmq.EVENT_DISCONNECTED:
                self._peers = max(self._peers - 1, 0)
                self.stats.disconnects += 1
                if self._peers == 0:
                    self._lost_since = time.monotonic()
                log.warning("source %s: peer disconnected; reconnecting", self.endpoint)

    def _recv_bounded(self, sock: Any) -> list[Any] | MalformedFrame:
        """Receive one whole message, keeping at most MAX_PARTS parts and message_bytes_limit().

        Parts past either bound are received and released one by one, never kept, and the
        message is rejected (`bad_parts` / `too_large`). Raises zmq.Again when nothing came.
        """
        first = sock.recv(copy=False)
        parts: list[Any] = [first]
        count, total, more = 1, len(first), first.more
        while more:  # the rest of the message is already here: libzmq delivers it whole
            part = sock.recv(copy=False)
            count, total, more = count + 1, total + len(part), part.more
            if count > MAX_PARTS or total > self._max_message_bytes:
                parts = []  # released now; later parts are only counted
            elif parts:
                parts.append(part)
        if count > MAX_PARTS:
            return MalformedFrame("bad_parts", f"expected {MAX_PARTS} message parts, got {count}")
        if total > self._max_message_bytes:
            return MalformedFrame("too_large", f"message of {total} bytes exceeds {self._max_message_bytes}")
        if count == MAX_PARTS and len(parts[2]) > self.max_frame_bytes:
            return MalformedFrame(
                "too_large",
                f"payload of {len(parts[2])} bytes exceeds max_frame_bytes={self.max_frame_bytes}",
            )
        return parts

    def _run(self) -> None:
        name_native_thread("thz-source")
        try:
            sock, mon = self._open()
        except zmq.ZMQError as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        recreate_after_s = self._reconnect_max_ms / 1000 + RECREATE_GRACE_S
        pending: Frame | MalformedFrame | EndOfStream | None = None
        next_monitor = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_monitor:
                    self._drain_monitor(mon)
                    next_monitor = now + 0.05
                    lost = self._lost_since
                    if self._peers <= 0 and lost is not None and now - lost > recreate_after_s:
                        # The peer is gone and libzmq did not bring it back: start afresh.
                        self._close_sockets(sock, mon)
                        sock = mon = None
                        sock, mon = self._open()
                        self.stats.recreated += 1
                        self._lost_since = time.monotonic()  # again after the same wait if still gone
                        log.warning(
                            "source %s: peer lost for %.0f s without a reconnect; socket recreated",
                            self.endpoint,
                            now - lost,
                        )
                if pending is not None:
                    # Consumer behind: hold this item and stop receiving, so HWMs apply upstream.
                    try:
                        self._queue.put(pending, timeout=0.05)
                    except queue.Full:
                        continue
                    if isinstance(pending, EndOfStream):
                        return  # the stream is over: nothing after it is read
                    pending = None
                try:
                    got = self._recv_bounded(sock)
                except zmq.Again:
                    continue
                if self._peers <= 0:
                    # A message proves a peer: take its (possibly still queued) connect event now,
                    # so `state` never reads "down" while frames flow.
                    self._drain_monitor(mon, wait_ms=100)
                message: Frame | MalformedFrame | EndOfStream
                if isinstance(got, MalformedFrame):
                    message = got
                else:
                    try:
                        message = decode_message(got)
                        self._last_frame = time.monotonic()
                    except FrameDecodeError as exc:
                        message = MalformedFrame.from_error(exc)
                        if self.keep_rejected:  # for the daemon's quarantine (R-NEW-17)
                            message = dataclasses.replace(message, raw=tuple(p.bytes for p in got))
                if isinstance(message, MalformedFrame):
                    self._rejected_log.warning(
                        message.reason,
                        "source %s: rejected message (%s): %s",
                        self.endpoint,
                        message.reason,
                        message.message[:200],
                    )
                if isinstance(message, EndOfStream):
                    self._ending(message)
                    pending = message  # queued behind the frames before it, then the thread ends
                    continue
                item: Frame | MalformedFrame = message
                self._observe(item)
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    pending = item
        except Exception as exc:  # ZMQError mostly; anything else would kill the thread silently
            # The socket cannot be recreated (or used): a source that cannot recover says so,
            # so the consumer stops (and the daemon's watchdog with it) instead of waiting forever.
            self._failed = exc
            log.error("source %s failed and cannot recover: %s", self.endpoint, exc)
        finally:
            self._close_sockets(sock, mon)

    def _ending(self, end: EndOfStream) -> None:
        last = self._seq.last(end.scanner)
        lost = end.last_seq - last if end.last_seq is not None and last is not None else 0
        log.info(
            "source %s: %s ended its stream after %d frame(s) (last seq %s)",
            self.endpoint,
            end.scanner,
            end.frames,
            end.last_seq,
        )
        if lost > 0:
            log.warning("source %s: the last %d frame(s) before the end did not arrive", self.endpoint, lost)


# --- URI parsing ----------------------------------------------------------------------------


def _query(uri: str, rest: str, allowed: dict[str, type]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, values in parse_qs(rest, keep_blank_values=True, strict_parsing=False).items():
        if key not in allowed:
            near = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"unknown parameter {key!r} in source {uri!r}{hint}; valid: {', '.join(allowed)}"
            )
        raw = values[-1]
        kind = allowed[key]
        try:
            if kind is float and key == "rate" and raw == "max":
                out[key] = None
            elif kind is float:
                value = float(raw)
                if not math.isfinite(value) or value <= 0:
                    raise ValueError("must be a positive number")
                out[key] = value
            elif kind is int:
                out[key] = int(raw)
                if out[key] < 0:
                    raise ValueError("must not be negative")
            else:
                out[key] = raw
        except ValueError as exc:
            raise ConfigError(f"parameter {key}={raw!r} in source {uri!r} is invalid: {exc}") from None
    return out


def _split(uri: str, prefix_len: int) -> tuple[str, str]:
    body = uri[prefix_len:]
    base, _, rest = body.partition("?")
    return base, rest


# sim URI parameters; scene/level/temp_offset_c/gain_drift/defects/start make calibration scenes
# and forced drift (docs/simulator.md).
_SIM_PARAMS: dict[str, type] = {
    "seed": int,
    "fps": float,
    "identities": str,
    "frames": int,
    "scanner": str,
    "scene": str,
    "level": float,
    "temp_offset_c": str,
    "gain_drift": str,
    "defects": str,
    "start": int,
    "session": int,
    "identity": int,
    "claim": int,
    "impostor_rate": str,
}


def _people(uri: str, raw: str) -> tuple[int, ...] | int:
    """Parse `identities=`: a count N, or a set of indices `3,5,9` / ranges `30-59` (inclusive)."""
    try:
        if raw.isdigit():
            return int(raw)
        out: list[int] = []
        for part in raw.split(","):
            lo, dash, hi = part.strip().partition("-")
            a = int(lo)
            b = int(hi) if dash else a
            if a < 0 or b < a:
                raise ValueError(part)
            out.extend(range(a, b + 1))
        if not out:
            raise ValueError(raw)
        return tuple(out)
    except ValueError:
        raise ConfigError(
            f"parameter identities={raw!r} in source {uri!r} is invalid: give a count (20), "
            "or identity indices and ranges (3,5,30-59)"
        ) from None


def _signed_float(uri: str, key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"parameter {key}={raw!r} in source {uri!r} is invalid: must be a number")
    return value


URI_FORMS = "sim[?seed=..&fps=..], replay:FILE.mcap[?rate=1.0|max&loop=N], tcp://HOST:PORT, ipc://PATH"


def open_source(
    uri: str, names: Mapping[str, str] | None = None, curve: CurveClientKeys | None = None
) -> Source:
    """Open a source from a URI, or from a name (`scanner0`) resolved through `names`.

    `curve` makes a tcp source a CURVE client of the scanner (other sources ignore it).
    """
    names = names or {}
    if uri in names:
        resolved = names[uri]
        if resolved in names:
            raise ConfigError(f"source name {uri!r} resolves to another name {resolved!r}; give a URI")
        return open_source(resolved, curve=curve)
    if uri == "sim" or uri.startswith(("sim?", "sim://")):
        rest = uri.split("?", 1)[1] if "?" in uri else ""
        q = _query(uri, rest, _SIM_PARAMS)
        for key in ("temp_offset_c", "gain_drift"):  # signed, unlike the other numbers
            if key in q:
                q[key] = _signed_float(uri, key, q[key])
        if "identities" in q:
            people = _people(uri, q.pop("identities"))
            if isinstance(people, int):
                q["identities"] = people
            else:
                q["people"] = people
        if "identity" in q:
            if "people" in q:
                raise ConfigError(f"source {uri!r}: give identity=K or a set identities=..., not both")
            q["people"] = (q.pop("identity"),)
        if "claim" in q:
            if q["claim"] not in (0, 1):
                raise ConfigError(f"parameter claim={q['claim']} in source {uri!r} is invalid: use 0 or 1")
            q["claim"] = bool(q["claim"])
        if "impostor_rate" in q:
            rate = _signed_float(uri, "impostor_rate", q["impostor_rate"])
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"parameter impostor_rate={rate:g} in source {uri!r} must be in [0, 1]")
            q["impostor_rate"] = rate
        return SimSource(uri, **q)
    if uri.startswith("replay:"):
        path, rest = _split(uri, len("replay:"))
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ConfigError(f"source {uri!r} names no file; use replay:PATH.mcap")
        q = _query(uri, rest, {"rate": float, "loop": int})
        return ReplaySource(uri, replay_paths(path), rate=q.get("rate", 1.0), loop=q.get("loop", 1))
    if uri.startswith(("tcp://", "ipc://")):
        endpoint, rest = _split(uri, 0)
        q = _query(uri, rest, {"hwm": int, "stall_s": float, "reconnect_max_ms": int, "max_frame_bytes": int})
        if q.get("hwm", 1) < 1:
            raise ConfigError(f"hwm in {uri!r} must be at least 1 frame")
        return ZmqSource(uri, endpoint, **q, curve=curve if uri.startswith("tcp://") else None)
    if ":" not in uri and "/" not in uri:
        known = ", ".join(sorted(names)) if names else "none configured"
        near = difflib.get_close_matches(uri, list(names), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SourceUnavailableError(
            f"unknown source name {uri!r}{hint}; configured names: {known}; or give a URI: {URI_FORMS}"
        )
    raise SourceUnavailableError(f"unsupported source {uri!r}; use one of: {URI_FORMS}")
