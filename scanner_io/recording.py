"""MCAP recordings of raw frames: a crash-tolerant recorder, a recovering reader, `info`.

Layout (docs/protocol.md, "Recording format"): one channel `/<scanner>/raw` per scanner with
message encoding `thz-raw/v1`; each message is `u32 LE header length | header JSON | payload`,
where header JSON and payload are byte-for-byte the acquisition wire parts. MCAP `sequence` is
the frame seq (mod 2^32), `publish_time` the capture time, `log_time` the host receive time on a
monotonic clock anchored to the wall clock at the start of the recording (so replay pacing
never sees a wall-clock jump). A `/thzedge/events` JSON channel notes malformed frames and
upstream gaps. The device/config manifest is a metadata record, the calibration profile an
attachment. The file is written as `NAME.part` and renamed when finished; chunks are flushed
and fsync'ed every ~1 MiB or 1 s, so a crash loses at most the open chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import struct
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

import numpy as np
from mcap.exceptions import McapError
from mcap.records import Attachment, Channel, Chunk, Footer, Message, Metadata
from mcap.stream_reader import StreamReader, breakup_chunk
from mcap.writer import CompressionType, Writer

from scanner_io.codec import (
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    FrameRejected,
    MalformedFrame,
    array_from_payload,
    encode_header,
    header_from_dict,
    is_scanner_name,
    parse_header_json,
    wire_array,
)
from scanner_io.errors import DataError, FrameDecodeError, SourceUnavailableError
from scanner_io.frame import Frame
from scanner_io.seq import SeqTracker

RAW_ENCODING = "thz-raw/v1"
RAW_SCHEMA_NAME = "thzedge.RawFrame"
EVENTS_TOPIC = "/thzedge/events"
MANIFEST_NAME = "thzedge.manifest"
CALIBRATION_MEDIA_TYPE = "application/x-thzedge-calib"
PROFILE = "thzedge"
PART_SUFFIX = ".part"
DEFAULT_CHUNK_BYTES = 1024 * 1024
DEFAULT_CHUNK_SECONDS = 1.0
# Bounds a reader applies before allocating (operations.md §3.3): no record, chunk or
# attachment larger than this is read, so a corrupt length cannot exhaust memory.
MAX_RECORD_BYTES = 256 * 1024 * 1024
MAX_CHUNK_BYTES = 256 * 1024 * 1024
_LEN = struct.Struct("<I")

# The JSON Schema of the header part, stored in the MCAP Schema record so generic tools can
# describe the channel. The message itself is the thz-raw/v1 envelope, not plain JSON.
HEADER_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "thzedge raw frame header (acquisition protocol v1)",
    "description": (
        "Message encoding thz-raw/v1: uint32 little-endian N, then N bytes of this header as "
        "UTF-8 JSON, then the raw C-contiguous little-endian array (prod(shape) * itemsize bytes)."
    ),
    "type": "object",
    "required": ["v", "scanner", "seq", "t_capture_ns", "shape", "dtype"],
    "properties": {
        "v": {"const": 1},
        "scanner": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
        "seq": {"type": "integer", "minimum": 0},
        "t_capture_ns": {"type": "integer", "minimum": 0},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "maxItems": 3},
        "dtype": {"enum": ["uint8", "uint16", "float32"]},
        "settings": {"type": "object"},
        "sensor_temp_c": {"type": ["number", "null"]},
        "claimed_identity": {"type": ["string", "null"]},
    },
}


def pack_frame(frame: Frame) -> bytes:
    """Return the thz-raw/v1 message body of a frame (length-prefixed header JSON + payload)."""
    header = encode_header(frame.header)
    payload = wire_array(frame.header, np.asarray(frame.data))
    return b"".join((_LEN.pack(len(header)), header, payload.data.cast("B")))


def unpack_frame(data: bytes | memoryview) -> Frame:
    """Decode a thz-raw/v1 message body with the wire decoder's checks; raises FrameDecodeError."""
    view = memoryview(data)
    if view.nbytes < _LEN.size:
        raise FrameRejected("recorded message is shorter than its length prefix", reason="bad_parts")
    (n,) = _LEN.unpack_from(view)
    if n > MAX_HEADER_BYTES or _LEN.size + n > view.nbytes:
        raise FrameRejected(f"recorded header length {n} is out of bounds", reason="too_large")
    payload = view[_LEN.size + n :]
    if payload.nbytes > MAX_PAYLOAD_BYTES:
        raise FrameRejected(f"recorded payload of {payload.nbytes} bytes is too large", reason="too_large")
    # The wire's parser: NaN/Infinity are refused here too, so a replayed header re-encodes.
    header = header_from_dict(parse_header_json(view[_LEN.size : _LEN.size + n]))
    return Frame(header=header, data=array_from_payload(header, payload))


def default_manifest(source: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Return the device/config manifest stored as metadata: host, versions, source, extras."""
    manifest = {
        "thzedge_version": _thzedge_version(),
        "host": platform.node(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if source is not None:
        manifest["source"] = source
    for key, value in (extra or {}).items():
        manifest[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return manifest


def _tar_dir(directory: Path) -> bytes:
    """Pack a directory's regular files into a reproducible tar (fixed times and owners)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            data = path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(directory).as_posix())
            info.size, info.mtime, info.mode = len(data), 0, 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _calibration_bytes(calibration: Any) -> tuple[str, bytes, str | None]:
    """Return (attachment name, bytes, profile id) for a calibration profile.

    A profile is a directory (calibration/profile.py: profile.json + arrays); it is attached as
    a tar of that directory. A CalibrationProfile object is saved first (duck-typed: scanner_io
    never imports calibration). Any other single file is attached as it is.
    """
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if path.is_file() and path.name == "profile.json":
            path = path.parent
        if path.is_dir():
            profile_id = None
            with contextlib.suppress(OSError, ValueError, AttributeError):
                profile_id = json.loads((path / "profile.json").read_text()).get("profile_id")
            return f"calibration/{profile_id or path.name}.tar", _tar_dir(path), profile_id
        if not path.is_file():
            raise SourceUnavailableError(f"calibration profile {path} does not exist")
        return f"calibration/{path.name}", path.read_bytes(), None
    profile_id = str(getattr(calibration, "profile_id", "profile"))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "profile"
        saved = calibration.save(target)
        saved = Path(saved) if saved is not None else target
        if saved.is_file():
            return f"calibration/{saved.name}", saved.read_bytes(), profile_id
        return f"calibration/{profile_id}.tar", _tar_dir(saved), profile_id


def extract_calibration(name: str, data: bytes, dest: str | os.PathLike[str]) -> Path:
    """Write a calibration attachment back to disk and return the profile path to load.

    Tar attachments become a directory (only plain files with safe relative names, bounded in
    size); other attachments become one file named after the attachment.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = Path(name).name
    if not base.endswith(".tar"):
        out = dest / base
        out.write_bytes(data)
        return out
    root = dest / base[: -len(".tar")]
    root.mkdir(exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            rel = Path(member.name)
            if not member.isfile() or rel.is_absolute() or ".." in rel.parts or member.size > MAX_CHUNK_BYTES:
                raise DataError(f"calibration attachment {name} holds an unsafe entry {member.name!r}")
            fh = tar.extractfile(member)
            if fh is None:
                continue
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fh.read())
    return root


class Recorder:
    """Write frames to an MCAP file; a context manager whose exit always finishes the file.

    The file is `path + ".part"` until `close()` renames it to `path`. Chunks are closed,
    flushed and fsync'ed every `chunk_bytes` or `chunk_seconds` (call `tick()` while idle so a
    quiet stream still reaches the disk).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Mapping[str, str] | None = None,
        calibration: Any | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
        fsync: bool = True,
    ) -> None:

        self.path = Path(path)
        self.part_path = self.path.with_name(self.path.name + PART_SUFFIX)
        self.frames_written = 0
        self.events_written = 0
        self._chunk_bytes = chunk_bytes
        self._chunk_seconds = chunk_seconds
        self._fsync = fsync
        self._pending = 0
        self._pending_since: float | None = None
        self._closed = False
        # Raw frames are biometric data: owner-only, whatever the umask.
        fd = os.open(self.part_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._stream: IO[bytes] = os.fdopen(fd, "wb")
        # The writer's own chunk limit is set high so chunks close only here, where they are
        # also flushed and fsync'ed.
        self._writer = Writer(
            self._stream, chunk_size=1 << 40, compression=CompressionType.ZSTD, enable_data_crcs=False
        )
        self._writer.start(profile=PROFILE, library=f"thzedge {_thzedge_version()}")
        self._schema_id = self._writer.register_schema(
            RAW_SCHEMA_NAME, "jsonschema", json.dumps(HEADER_JSON_SCHEMA).encode()
        )
        self._channels: dict[str, int] = {}
        self._events_channel: int | None = None
        # log_time = wall clock at start + monotonic elapsed: deltas never jump.
        self._wall0 = time.time_ns()
        self._mono0 = time.monotonic_ns()
        self._writer.add_metadata(MANIFEST_NAME, dict(manifest or default_manifest()))
        if calibration is not None:
            name, data, profile_id = _calibration_bytes(calibration)
            now = time.time_ns()
            self._writer.add_attachment(now, now, name, CALIBRATION_MEDIA_TYPE, data)
            meta = {"attachment": name, "sha256": hashlib.sha256(data).hexdigest()}
            if profile_id is not None:
                meta["profile_id"] = profile_id
            self._writer.add_metadata("thzedge.calibration", meta)
        self._sync()

    def now_ns(self) -> int:
        """Return the recorder clock: start wall time plus monotonic time elapsed (ns)."""
        return self._wall0 + (time.monotonic_ns() - self._mono0)

    def write(self, frame: Frame, log_time_ns: int | None = None) -> None:
        """Append one frame to its scanner's `/<scanner>/raw` channel."""
        channel = self._channels.get(frame.header.scanner)
        if channel is None:
            channel = self._writer.register_channel(
                f"/{frame.header.scanner}/raw",
                RAW_ENCODING,
                self._schema_id,
                {"scanner": frame.header.scanner},
            )
            self._channels[frame.header.scanner] = channel
        body = pack_frame(frame)
        log_time = self.now_ns() if log_time_ns is None else log_time_ns
        self._writer.add_message(
            channel,
            log_time=log_time,
            data=body,
            publish_time=frame.header.t_capture_ns,
            sequence=frame.header.seq & 0xFFFFFFFF,
        )
        self.frames_written += 1
        self._account(len(body))

    def write_event(self, kind: str, **fields: Any) -> None:
        """Append a JSON event (malformed frame, upstream gap, …) to `/thzedge/events`."""
        if self._events_channel is None:
            self._events_channel = self._writer.register_channel(EVENTS_TOPIC, "json", 0)
        body = json.dumps({"kind": kind, **fields}, sort_keys=True).encode()
        now = self.now_ns()
        self._writer.add_message(self._events_channel, log_time=now, data=body, publish_time=now)
        self.events_written += 1
        self._account(len(body))

    def _account(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        if self._pending >= self._chunk_bytes:
            self._sync()
        else:
            self.tick()

    def tick(self) -> None:
        """Close the open chunk if it has been open longer than `chunk_seconds`."""
        if self._pending_since is not None and time.monotonic() - self._pending_since >= self._chunk_seconds:
            self._sync()

    def _sync(self) -> None:
        self._writer.flush()
        if self._fsync:
            os.fsync(self._stream.fileno())
        self._pending = 0
        self._pending_since = None

    def close(self) -> Path:
        """Finish the file (summary, indexes, footer), fsync it and rename it into place."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            self._writer.finish()
            self._stream.flush()
            if self._fsync:
                os.fsync(self._stream.fileno())
        finally:
            self._stream.close()
        os.replace(self.part_path, self.path)
        return self.path

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _thzedge_version() -> str:
    try:
        return version("thzedge")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class RecordedItem:
    """One raw-frame message read back: the frame (or why it was rejected) and its times."""

    item: Frame | MalformedFrame
    log_time_ns: int
    topic: str


@dataclass(frozen=True)
class AttachmentInfo:
    """An attachment found in a recording."""

    name: str
    media_type: str
    size: int
    sha256: str


MCAP_MAGIC = b"\x89MCAP0\r\n"


def resolve_recording(path: str | os.PathLike[str]) -> Path:
    """Return the file to read: `path`, or `path.part` left by a recorder that did not finish."""
    p = Path(path)
    if not p.is_file():
        part = p.with_name(p.name + PART_SUFFIX)
        if not part.is_file():
            raise SourceUnavailableError(f"recording {p} does not exist")
        p = part
    # A torn end is recoverable; a file that does not even start as MCAP is not a recording.
    with open(p, "rb") as fh:
        if fh.read(len(MCAP_MAGIC)) != MCAP_MAGIC:
            raise DataError(f"{p} is not an MCAP recording (it does not start with the MCAP magic bytes)")
    return p


class RecordingReader:
    """Read a recording front to back, recovering what a crash left; never loads it whole.

    Reads linearly (the footer and summary are not needed, so an unfinished file reads up to
    its last complete chunk). After iteration, `complete` says whether the file ended with a
    footer, `truncated`/`truncation` say why reading stopped early, `bad_chunks` counts chunks
    skipped because their data was corrupt (the records after them are still read), and
    `frames`/`malformed` count what was recovered. Attachments and metadata are collected along the way.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = resolve_recording(path)
        self.complete = False
        self.truncated = False
        self.truncation: str | None = None
        self.frames = 0
        self.malformed = 0
        # Chunks whose data failed its CRC or did not decompress: skipped, reading goes on.
        self.bad_chunks = 0
        self.bad_chunk_errors: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.metadata: dict[str, dict[str, str]] = {}
        self.attachments: list[AttachmentInfo] = []
        self._attachment_data: dict[str, bytes] = {}
        self.keep_attachments = True

    def __iter__(self) -> Iterator[RecordedItem]:
        return self.items()

    def items(self) -> Iterator[RecordedItem]:
        """Yield every raw-frame message in file order, then record how reading ended."""

        self.complete = self.truncated = False
        self.truncation = None
        self.frames = self.malformed = self.bad_chunks = 0
        self.bad_chunk_errors = []
        self.events = []
        channels: dict[int, Channel] = {}
        with open(self.path, "rb") as fh:
            reader = StreamReader(fh, emit_chunks=True, record_size_limit=MAX_RECORD_BYTES)
            records = reader.records
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    break
                except Exception as exc:  # McapError, struct errors, OSError, ...
                    # A crash leaves a torn record at the end: everything before it is good.
                    self.truncated = True
                    self.truncation = f"{type(exc).__name__}: {exc}"[:200]
                    break
                inner = [record]
                if isinstance(record, Chunk):
                    try:
                        if record.uncompressed_size > MAX_CHUNK_BYTES:
                            raise DataError(f"chunk claims {record.uncompressed_size} bytes uncompressed")
                        inner = breakup_chunk(record, validate_crc=True)
                    except Exception as exc:  # CRC mismatch, zstd/lz4 errors, a torn inner record
                        # The chunk's framing held, so the records after it are intact: skip only it.
                        self.bad_chunks += 1
                        self.bad_chunk_errors.append(f"{type(exc).__name__}: {exc}"[:200])
                        continue
                for rec in inner:
                    if isinstance(rec, Channel):
                        channels[rec.id] = rec
                    elif isinstance(rec, Message):
                        item = self._message(rec, channels)
                        if item is not None:
                            yield item
                    elif isinstance(rec, Footer):
                        self.complete = True
                    else:
                        self._collect(rec, keep=self.keep_attachments)

    def _collect(self, rec: Any, keep: bool) -> None:
        """Note an attachment (its bytes too when `keep`) or a metadata record; ignore others."""

        if isinstance(rec, Attachment) and rec.name not in self._attachment_data:
            digest = hashlib.sha256(rec.data).hexdigest()
            self.attachments.append(AttachmentInfo(rec.name, rec.media_type, len(rec.data), digest))
            if keep:
                self._attachment_data[rec.name] = bytes(rec.data)
        elif isinstance(rec, Metadata):
            self.metadata[rec.name] = dict(rec.metadata)

    def _message(self, rec: Any, channels: Mapping[int, Any]) -> RecordedItem | None:
        channel = channels.get(rec.channel_id)
        if channel is None:
            return None
        if channel.topic == EVENTS_TOPIC:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(rec.data))
            return None
        if channel.message_encoding != RAW_ENCODING:
            return None
        try:
            item: Frame | MalformedFrame = unpack_frame(rec.data)
            self.frames += 1
        except FrameDecodeError as exc:
            item = MalformedFrame.from_error(exc)
            self.malformed += 1
        return RecordedItem(item=item, log_time_ns=rec.log_time, topic=channel.topic)

    def read_preamble(self) -> None:
        """Collect the attachments and metadata written before the first chunk, reading no frames.

        The recorder writes the manifest and the calibration profile first, so a replay knows
        them before it yields anything. A torn or empty file simply yields nothing here.
        """

        with open(self.path, "rb") as fh:
            reader = StreamReader(fh, emit_chunks=True, record_size_limit=MAX_RECORD_BYTES)
            try:
                for rec in reader.records:
                    if isinstance(rec, (Chunk, Message)):
                        break
                    self._collect(rec, keep=True)
            except (McapError, ValueError, EOFError, OSError, struct.error):
                pass

    def calibration(self) -> tuple[str, bytes] | None:
        """Return (name, bytes) of the calibration profile attachment seen so far, if any."""
        for info in self.attachments:
            if info.media_type == CALIBRATION_MEDIA_TYPE and info.name in self._attachment_data:
                return info.name, self._attachment_data[info.name]
        return None

    def sensor_maps(self) -> None:
        """A recording stores a built calibration profile, never the sensor's true maps: None."""
        return None


@dataclass
class ScannerSummary:
    """Per-scanner figures of a recording."""

    frames: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    seq_gaps: int = 0
    seq_resets: int = 0
    shapes: list[list[int]] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)


@dataclass
class RecordingInfo:
    """What `thzedge recording info` reports."""

    path: str
    size_bytes: int
    complete: bool
    truncated: bool
    truncation: str | None
    frames: int
    malformed: int
    duration_s: float
    mean_rate_hz: float
    scanners: dict[str, ScannerSummary]
    bad_chunks: int
    attachments: list[AttachmentInfo]
    metadata: dict[str, dict[str, str]]
    events: int

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form (`--json`)."""
        return {
            "path": self.path,
            "size_bytes": self.size_bytes,
            "complete": self.complete,
            "truncated": self.truncated,
            "truncation": self.truncation,
            "frames": self.frames,
            "recovered_frames": self.frames,
            "malformed": self.malformed,
            "bad_chunks": self.bad_chunks,
            "duration_s": self.duration_s,
            "mean_rate_hz": self.mean_rate_hz,
            "scanners": {k: vars(v) for k, v in self.scanners.items()},
            "seq_gaps": sum(s.seq_gaps for s in self.scanners.values()),
            "attachments": [vars(a) for a in self.attachments],
            "metadata": self.metadata,
            "events": self.events,
        }

    def render(self) -> str:
        """Return the human-readable report."""
        status = "complete" if self.complete else "INCOMPLETE (recorder did not finish)"
        lines = [
            f"file        {self.path} ({self.size_bytes} bytes, {status})",
            f"frames      {self.frames}" + (f" recovered ({self.truncation})" if self.truncated else ""),
            f"malformed   {self.malformed}",
            f"bad chunks  {self.bad_chunks} (corrupt data, skipped)" if self.bad_chunks else "",
            f"duration    {self.duration_s:.3f} s",
            f"mean rate   {self.mean_rate_hz:.2f} frames/s",
        ]
        lines = [line for line in lines if line]
        for name, s in sorted(self.scanners.items()):
            lines.append(
                f"scanner     {name}: {s.frames} frames, seq {s.first_seq}..{s.last_seq}, "
                f"{s.seq_gaps} missing, {s.seq_resets} resets, shape {s.shapes}, dtype {s.dtypes}"
            )
        for a in self.attachments:
            lines.append(f"attachment  {a.name} ({a.media_type}, {a.size} bytes, sha256 {a.sha256[:12]})")
        for name in sorted(self.metadata):
            lines.append(f"metadata    {name}: {len(self.metadata[name])} keys")
        if self.events:
            lines.append(f"events      {self.events}")
        return "\n".join(lines)


def recording_info(path: str | os.PathLike[str]) -> RecordingInfo:
    """Scan a recording (finished or cut off by a crash) and summarise it."""
    reader = RecordingReader(path)
    reader.keep_attachments = False
    scanners: dict[str, ScannerSummary] = {}
    seqs = SeqTracker()
    events_seen = 0
    first_t = last_t = None

    def malformed(scanner: Any, seq: Any) -> None:
        step = seqs.malformed(
            scanner if is_scanner_name(scanner) else None, seq if isinstance(seq, int) else None
        )
        if step.missing and seqs.stream in scanners:
            scanners[seqs.stream].seq_gaps += step.missing

    def new_events() -> None:
        # Malformed messages the recorder noted as events come before this frame in file order:
        # they use up seqs exactly as they did for the live consumer (scanner_io.seq).
        nonlocal events_seen
        for event in reader.events[events_seen:]:
            if event.get("kind") == "malformed":
                malformed(event.get("scanner"), event.get("seq"))
        events_seen = len(reader.events)

    for rec in reader:
        new_events()
        if not isinstance(rec.item, Frame):
            malformed(rec.item.scanner, rec.item.seq)
            continue
        h = rec.item.header
        s = scanners.setdefault(h.scanner, ScannerSummary())
        s.frames += 1
        step = seqs.frame(h.scanner, h.seq)
        s.seq_gaps += step.missing
        s.seq_resets += step.reset_from is not None
        if s.first_seq is None:
            s.first_seq = h.seq
        s.last_seq = h.seq
        if list(h.shape) not in s.shapes:
            s.shapes.append(list(h.shape))
        if h.dtype not in s.dtypes:
            s.dtypes.append(h.dtype)
        first_t = rec.log_time_ns if first_t is None else min(first_t, rec.log_time_ns)
        last_t = rec.log_time_ns if last_t is None else max(last_t, rec.log_time_ns)
    new_events()  # malformed messages after the last frame
    duration = (last_t - first_t) / 1e9 if first_t is not None and last_t is not None else 0.0
    rate = (reader.frames - 1) / duration if duration > 0 and reader.frames > 1 else 0.0
    return RecordingInfo(
        path=str(reader.path),
        size_bytes=reader.path.stat().st_size,
        complete=reader.complete,
        truncated=reader.truncated,
        truncation=reader.truncation,
        frames=reader.frames,
        malformed=reader.malformed,
        duration_s=duration,
        mean_rate_hz=rate,
        scanners=scanners,
        bad_chunks=reader.bad_chunks,
        attachments=reader.attachments,
        metadata=reader.metadata,
        events=len(reader.events),
    )


@dataclass
class RecordSummary:
    """What one `record` run wrote."""

    path: str
    frames: int
    malformed: int
    upstream_gaps: int
    duration_s: float
    bytes: int
    source: str
    stopped_by: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        return dict(vars(self))


def record_source(
    source: Any,
    recorder: Recorder,
    frames: int | None = None,
    duration_s: float | None = None,
    stop: Any | None = None,
    progress: Any | None = None,
) -> RecordSummary:
    """Copy frames from an open source into `recorder` until a limit, the source's end or `stop`.

    Malformed messages and upstream seq gaps are written as `/thzedge/events` records. The
    recorder is closed (file finished and renamed) before returning. `progress(n)` is called
    after each frame.
    """
    t0 = time.monotonic()
    written = malformed = 0
    gaps_seen = 0
    stopped_by = "source_end"
    try:
        while True:
            if stop is not None and stop.is_set():
                stopped_by = "signal"
                break
            if frames is not None and written >= frames:
                stopped_by = "frames"
                break
            if duration_s is not None and time.monotonic() - t0 >= duration_s:
                stopped_by = "duration"
                break
            item = source.read(0.1)
            if item is None:
                recorder.tick()
                if source.exhausted:
                    break
                continue
            if isinstance(item, MalformedFrame):
                malformed += 1
                recorder.write_event("malformed", reason=item.reason, seq=item.seq, scanner=item.scanner)
            else:
                recorder.write(item)
                written += 1
                if progress is not None:
                    progress(written)
            gaps = source.stats.upstream_gaps
            if gaps > gaps_seen:
                recorder.write_event("upstream_gap", missing=gaps - gaps_seen, total=gaps)
                gaps_seen = gaps
    finally:
        path = recorder.close()
    return RecordSummary(
        path=str(path),
        frames=written,
        malformed=malformed,
        upstream_gaps=gaps_seen,
        duration_s=round(time.monotonic() - t0, 3),
        bytes=path.stat().st_size,
        source=source.uri,
        stopped_by=stopped_by,
    )
