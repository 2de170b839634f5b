"""MCAP recordings of raw frames: a crash-tolerant recorder, a recovering reader, `info`.

Layout (docs/protocol.md, "Recording format"): one channel `/<scanner>/raw` per scanner with
message encoding `thz-raw/v1`; each message is `u32 LE header length | header JSON | payload`,
where header JSON and payload are byte-for-byte the acquisition wire parts. MCAP `sequence` is
the frame seq (mod 2^32), `publish_time` the capture time, `log_time` the host receive time on a
monotonic clock anchored to the wall clock at the start of the recording (so replay pacing
never sees a wall-clock jump). A `/thzedge/events` JSON channel notes malformed frames and
upstream gaps. A frame from the simulator also gets its truth labels (identity, posture,
sample, claimed identity; no images) on a `/<scanner>/truth` JSON channel, written just before
its raw message, so a replay can be scored (`thzedge run --score`). The device/config
manifest is a metadata record, the calibration profile an attachment. The file is written as
`NAME.part` and renamed when finished; chunks are flushed and fsync'ed every ~1 MiB or 1 s, so
a crash loses at most the open chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import io
import json
import logging
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
import zstandard
from mcap.data_stream import RecordBuilder
from mcap.exceptions import McapError
from mcap.records import Attachment, Channel, Chunk, DataEnd, Footer, Header, Message, Metadata, Schema
from mcap.stream_reader import StreamReader, breakup_chunk
from mcap.writer import CompressionType, Writer

from scanner_io.atrest import ALGORITHM, StorageKey, find_storage_key
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
from scanner_io.errors import (
    ConfigError,
    DataError,
    FrameDecodeError,
    IntegrityError,
    SourceUnavailableError,
    StorageError,
)
from scanner_io.frame import Frame
from scanner_io.seq import SeqTracker
from scanner_io.simulator import SimTruth

log = logging.getLogger("thzedge.recording")

RAW_ENCODING = "thz-raw/v1"
RAW_SCHEMA_NAME = "thzedge.RawFrame"
EVENTS_TOPIC = "/thzedge/events"
TRUTH_SUFFIX = "/truth"  # `/<scanner>/truth`: simulator truth labels, JSON
# A truth message waits at most this many frames for its raw message (bounds a hostile file).
_MAX_PENDING_TRUTH = 64


@dataclass(frozen=True)
class RecordedTruth:
    """The simulator truth a recording keeps for one frame: labels only, no images."""

    identity: int
    identity_name: str
    posture: int
    sample: int
    concealed: bool
    sensor_temp_c: float
    claimed_identity: str | None = None

    @classmethod
    def from_sim(cls, t: SimTruth) -> RecordedTruth:
        """The labels of a frame's `SimTruth`."""
        return cls(
            int(t.identity),
            str(t.identity_name),
            int(t.posture),
            int(t.sample),
            bool(t.concealed),
            float(t.sensor_temp_c),
            t.claimed_identity,
        )

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RecordedTruth:
        """Read the `/<scanner>/truth` message form; ValueError/KeyError/TypeError when malformed."""
        claimed = d.get("claimed_identity")
        return cls(
            int(d["identity"]),
            str(d["identity_name"]),
            int(d["posture"]),
            int(d["sample"]),
            bool(d["concealed"]),
            float(d["sensor_temp_c"]),
            None if claimed is None else str(claimed),
        )


MANIFEST_NAME = "thzedge.manifest"
CALIBRATION_MEDIA_TYPE = "application/x-thzedge-calib"
# Consent and retention of the biometric data in the file (R-NEW-15); plaintext, so a sweep needs
# no key, and authenticated: every sealed chunk's AAD covers it, so an edit makes chunks fail.
PRIVACY_NAME = "thzedge.privacy"
ENCRYPTION_NAME = "thzedge.encryption"
# A sealed chunk: `compression` names the scheme; data = u64 LE chunk index | nonce | AES-GCM(zstd(records)).
SEALED_CHUNK_COMPRESSION = "thzedge-aes256gcm-zstd"
_INDEX = struct.Struct("<Q")
PROFILE = "thzedge"
PART_SUFFIX = ".part"
DEFAULT_CHUNK_BYTES = 1024 * 1024
DEFAULT_CHUNK_SECONDS = 1.0
# Bounds a reader applies before allocating (operations.md §3.3): no record, chunk or
# attachment larger than this is read, so a corrupt length cannot exhaust memory.
MAX_RECORD_BYTES = 256 * 1024 * 1024
MAX_CHUNK_BYTES = 256 * 1024 * 1024
_LEN = struct.Struct("<I")
MCAP_MAGIC = b"\x89MCAP0\r\n"

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
        "visit": {"type": ["integer", "null"], "minimum": 0},
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


@dataclass(frozen=True)
class RecordingPolicy:
    """Consent and retention of a recording, stored as its `thzedge.privacy` metadata record.

    `retention_s` None keeps the file until deleted by hand (a sweep only reports it);
    `consent` says on what basis the scans were recorded (e.g. `obtained`, `test_data`).
    """

    retention_s: float | None = None
    consent: str = "unspecified"
    purpose: str = "unspecified"

    def metadata(self, created: datetime.datetime, encrypted: bool) -> dict[str, str]:
        """Return the metadata record's string map for a file created at `created` (UTC)."""
        meta = {
            "data_classes": "raw",
            "biometric": "true",
            "consent": self.consent,
            "purpose": self.purpose,
            "created_utc": _iso(created),
            "encrypted": "true" if encrypted else "false",
        }
        if self.retention_s is not None:
            meta["retention_s"] = repr(float(self.retention_s))
            meta["expires_utc"] = _iso(created + datetime.timedelta(seconds=self.retention_s))
        return meta


def _iso(t: datetime.datetime) -> str:
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> datetime.datetime:
    """Parse the `YYYY-MM-DDTHH:MM:SSZ` times of the privacy record; ValueError if malformed."""
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


def _chunk_aad(file_id: bytes, index: int, bound: bytes) -> bytes:
    """What every sealed chunk authenticates besides its content: the file, its place, the metadata."""
    return b"thzedge-chunk-v1\0" + file_id + _INDEX.pack(index) + bound


def _bound_metadata(privacy: Mapping[str, str], encryption: Mapping[str, str]) -> bytes:
    """The digest of the plaintext metadata that sealed chunks are bound to."""
    text = json.dumps({"privacy": dict(privacy), "encryption": dict(encryption)}, sort_keys=True)
    return hashlib.sha256(text.encode()).digest()


class SealedChunkWriter:
    """An MCAP writer whose chunks are zstd-compressed, then sealed with AES-256-GCM (R-NEW-15).

    The subset of `mcap.writer.Writer` the Recorder uses. Each chunk repeats the schemas and
    channels its messages use, so every chunk decrypts and parses on its own: a file cut off by
    a crash reads up to its last complete chunk, and a chunk that fails authentication is
    skipped without losing the ones after it. Metadata and attachments stay outside the chunks
    in plaintext (no biometric data: manifest, consent/retention, the calibration profile).
    """

    def __init__(self, stream: IO[bytes], key: StorageKey, file_id: bytes, bound: bytes) -> None:
        self._stream = stream
        self._key = key
        self._file_id = file_id
        self._bound = bound
        self._out = RecordBuilder()
        self._chunk = RecordBuilder()
        self._schemas: dict[int, Schema] = {}
        self._channels: dict[int, Channel] = {}
        self._in_chunk: set[int] = set()
        self._messages = 0
        self._t0 = self._t1 = 0
        self.chunks = 0
        self._zstd = zstandard.ZstdCompressor(level=3)

    def start(self, profile: str = "", library: str = "") -> None:
        """Write the magic and the header record."""
        self._stream.write(MCAP_MAGIC)
        Header(profile, library).write(self._out)
        self._emit()

    def register_schema(self, name: str, encoding: str, data: bytes) -> int:
        """Remember a schema (written into each chunk that needs it); returns its id."""
        schema_id = len(self._schemas) + 1
        self._schemas[schema_id] = Schema(id=schema_id, name=name, encoding=encoding, data=data)
        return schema_id

    def register_channel(
        self, topic: str, message_encoding: str, schema_id: int, metadata: dict[str, str] | None = None
    ) -> int:
        """Remember a channel (written into each chunk that uses it); returns its id."""
        channel_id = len(self._channels) + 1
        self._channels[channel_id] = Channel(
            id=channel_id,
            topic=topic,
            message_encoding=message_encoding,
            schema_id=schema_id,
            metadata=dict(metadata or {}),
        )
        return channel_id

    def add_message(
        self, channel_id: int, log_time: int, data: bytes, publish_time: int, sequence: int = 0
    ) -> None:
        """Append a message to the open chunk."""
        if channel_id not in self._in_chunk:
            channel = self._channels[channel_id]
            if channel.schema_id and channel.schema_id in self._schemas:
                self._schemas[channel.schema_id].write(self._chunk)
            channel.write(self._chunk)
            self._in_chunk.add(channel_id)
        Message(
            channel_id=channel_id, log_time=log_time, data=data, publish_time=publish_time, sequence=sequence
        ).write(self._chunk)
        self._t0 = log_time if self._messages == 0 else min(self._t0, log_time)
        self._t1 = max(self._t1, log_time)
        self._messages += 1

    def add_metadata(self, name: str, data: dict[str, str]) -> None:
        """Write a plaintext metadata record."""
        Metadata(name=name, metadata=dict(data)).write(self._out)
        self._emit()

    def add_attachment(
        self, create_time: int, log_time: int, name: str, media_type: str, data: bytes
    ) -> None:
        """Write a plaintext attachment record."""
        Attachment(
            create_time=create_time, log_time=log_time, name=name, media_type=media_type, data=data
        ).write(self._out)
        self._emit()

    def _seal_chunk(self) -> None:
        if self._messages == 0:
            return
        plain = self._chunk.end()
        blob = self._key.seal(self._zstd.compress(plain), _chunk_aad(self._file_id, self.chunks, self._bound))
        Chunk(
            compression=SEALED_CHUNK_COMPRESSION,
            data=_INDEX.pack(self.chunks) + blob,
            message_start_time=self._t0,
            message_end_time=self._t1,
            uncompressed_crc=0,  # GCM's tag authenticates the content; a CRC adds nothing
            uncompressed_size=len(plain),
        ).write(self._out)
        self.chunks += 1
        self._in_chunk.clear()
        self._messages = 0
        self._t0 = self._t1 = 0
        self._emit()

    def _emit(self) -> None:
        self._stream.write(self._out.end())

    def flush(self) -> None:
        """Seal the open chunk and write everything to the stream (not fsync'ed)."""
        self._seal_chunk()
        self._stream.flush()

    def finish(self) -> None:
        """Seal the last chunk and write the data end, footer (no summary) and closing magic."""
        self._seal_chunk()
        DataEnd(0).write(self._out)
        Footer(0, 0, 0).write(self._out)
        self._emit()
        self._stream.write(MCAP_MAGIC)
        self._stream.flush()


class ChunkOpener:
    """Decrypts the sealed chunks of one recording, in order; counts what fails and why."""

    def __init__(self, key: StorageKey, encryption: Mapping[str, str], privacy: Mapping[str, str]) -> None:
        self.key = key
        try:
            self.file_id = bytes.fromhex(encryption["file_id"])
        except (KeyError, ValueError):
            raise IntegrityError("the encryption record has no valid file id (file damaged)") from None
        self.bound = _bound_metadata(privacy, encryption)
        self.expected = 0
        self.tampered = 0
        self.missing = 0
        self.errors: list[str] = []

    def _skip(self, exc: IntegrityError) -> list[Any]:
        self.tampered += 1
        self.errors.append(str(exc))
        log.warning("recording chunk skipped: %s", exc)
        return []

    def records(self, chunk: Chunk) -> list[Any]:
        """Return the records of one sealed chunk, or [] (counted) when it fails authentication."""
        data = bytes(chunk.data)
        index = _INDEX.unpack_from(data)[0] if len(data) >= _INDEX.size else -1
        if 0 <= index < self.expected:  # a repeated or reordered chunk: AEAD alone would accept a copy
            return self._skip(IntegrityError(f"sealed chunk {index} again after chunk {self.expected - 1}"))
        try:
            plain_z = self.key.open(
                data[_INDEX.size :], _chunk_aad(self.file_id, index, self.bound), f"sealed chunk {index}"
            )
            if index > self.expected:  # authentic, but chunks before it are gone
                self.missing += index - self.expected
                self.errors.append(f"{index - self.expected} chunk(s) missing before chunk {index}")
            plain = zstandard.ZstdDecompressor().decompress(plain_z, max_output_size=MAX_CHUNK_BYTES)
        except IntegrityError as exc:
            self.expected += 1  # it takes the place of the chunk that should be here
            return self._skip(exc)
        self.expected = index + 1
        return breakup_chunk(
            Chunk(
                compression="",
                data=plain,
                message_end_time=chunk.message_end_time,
                message_start_time=chunk.message_start_time,
                uncompressed_crc=0,
                uncompressed_size=len(plain),
            )
        )


class Recorder:
    """Write frames to an MCAP file; a context manager whose exit always finishes the file.

    The file is `path + ".part"` until `close()` renames it to `path`. Chunks are closed,
    flushed and fsync'ed every `chunk_bytes` or `chunk_seconds` (call `tick()` while idle so a
    quiet stream still reaches the disk). With a storage `key` every chunk is sealed
    (`SealedChunkWriter`); `policy` (consent, retention) is written as `thzedge.privacy` either way.

    Storage failures (disk full, I/O error) raise `StorageError` and leave the recorder
    `failed`: the `.part` file keeps every chunk completed before, and `close()` only releases it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Mapping[str, str] | None = None,
        calibration: Any | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
        fsync: bool = True,
        key: StorageKey | None = None,
        policy: RecordingPolicy | None = None,
    ) -> None:

        self.path = Path(path)
        self.part_path = self.path.with_name(self.path.name + PART_SUFFIX)
        self.frames_written = 0
        self.events_written = 0
        self.encrypted = key is not None
        self.failed: StorageError | None = None
        self._chunk_bytes = chunk_bytes
        self._chunk_seconds = chunk_seconds
        self._fsync = fsync
        self._pending = 0
        self._pending_since: float | None = None
        self._closed = False
        created = datetime.datetime.now(datetime.timezone.utc)
        privacy = (policy or RecordingPolicy()).metadata(created, encrypted=key is not None)
        # Raw frames are biometric data: owner-only, whatever the umask.
        try:
            fd = os.open(self.part_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            raise StorageError(
                f"cannot create recording {self.part_path}: {exc.strerror}", reason=reason
            ) from None
        self._stream: IO[bytes] = os.fdopen(fd, "wb")
        self._writer: Writer | SealedChunkWriter
        with self._storage("starting the file"):
            if key is not None:
                encryption = {
                    "alg": ALGORITHM,
                    "key_id": key.key_id,
                    "file_id": os.urandom(16).hex(),
                    "chunks": SEALED_CHUNK_COMPRESSION,
                }
                bound = _bound_metadata(privacy, encryption)
                self._writer = SealedChunkWriter(
                    self._stream, key, bytes.fromhex(encryption["file_id"]), bound
                )
            else:
                # The writer's own chunk limit is set high so chunks close only here, where they
                # are also flushed and fsync'ed.
                self._writer = Writer(
                    self._stream, chunk_size=1 << 40, compression=CompressionType.ZSTD, enable_data_crcs=False
                )
            self._writer.start(profile=PROFILE, library=f"thzedge {_thzedge_version()}")
            self._schema_id = self._writer.register_schema(
                RAW_SCHEMA_NAME, "jsonschema", json.dumps(HEADER_JSON_SCHEMA).encode()
            )
            self._channels: dict[str, int] = {}
            self._truth_channels: dict[str, int] = {}
            self._events_channel: int | None = None
            # log_time = wall clock at start + monotonic elapsed: deltas never jump.
            self._wall0 = time.time_ns()
            self._mono0 = time.monotonic_ns()
            self._writer.add_metadata(MANIFEST_NAME, dict(manifest or default_manifest()))
            self._writer.add_metadata(PRIVACY_NAME, privacy)
            if key is not None:
                self._writer.add_metadata(ENCRYPTION_NAME, encryption)
            if calibration is not None:
                name, data, profile_id = _calibration_bytes(calibration)
                now = time.time_ns()
                self._writer.add_attachment(now, now, name, CALIBRATION_MEDIA_TYPE, data)
                meta = {"attachment": name, "sha256": hashlib.sha256(data).hexdigest()}
                if profile_id is not None:
                    meta["profile_id"] = profile_id
                self._writer.add_metadata("thzedge.calibration", meta)
            self._sync()

    @contextlib.contextmanager
    def _storage(self, doing: str) -> Iterator[None]:
        """Turn an OSError of the file into one StorageError, and stop using the file."""
        if self.failed is not None:
            raise self.failed
        try:
            yield
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self.failed = StorageError(
                f"recording {self.path} stopped while {doing}: {exc.strerror or exc} ({name}); "
                f"{self.frames_written} frames written; every completed chunk is readable in "
                f"{self.part_path}",
                reason=name,
            )
            self._release()
            raise self.failed from None

    def _release(self) -> None:
        """Close the file without finishing it (after a failure); the .part stays for recovery."""
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            self._stream.close()

    def add_attachment(self, name: str, media_type: str, data: bytes) -> None:
        """Store a named blob (a golden's expected results, …) in the file, beside the frames."""
        now = self.now_ns()
        self._writer.add_attachment(now, now, name, media_type, data)
        self._account(len(data))

    def add_metadata(self, name: str, values: Mapping[str, str]) -> None:
        """Store a named string map (pins, provenance) as an MCAP metadata record."""
        self._writer.add_metadata(name, dict(values))

    def now_ns(self) -> int:
        """Return the recorder clock: start wall time plus monotonic time elapsed (ns)."""
        return self._wall0 + (time.monotonic_ns() - self._mono0)

    def write(self, frame: Frame, log_time_ns: int | None = None) -> None:
        """Append one frame to its scanner's `/<scanner>/raw` channel."""
        with self._storage("writing a frame"):
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
            if isinstance(frame.truth, SimTruth):
                self._write_truth(frame, log_time)
            self._writer.add_message(
                channel,
                log_time=log_time,
                data=body,
                publish_time=frame.header.t_capture_ns,
                sequence=frame.header.seq & 0xFFFFFFFF,
            )
            self.frames_written += 1
            self._account(len(body))

    def _write_truth(self, frame: Frame, log_time: int) -> None:
        """Write a simulated frame's truth labels before its raw message (the reader pairs them)."""
        assert isinstance(frame.truth, SimTruth)
        scanner = frame.header.scanner
        channel = self._truth_channels.get(scanner)
        if channel is None:
            channel = self._writer.register_channel(
                f"/{scanner}{TRUTH_SUFFIX}", "json", 0, {"scanner": scanner}
            )
            self._truth_channels[scanner] = channel
        labels = dataclasses.asdict(RecordedTruth.from_sim(frame.truth))
        body = json.dumps({"seq": frame.header.seq, **labels}, sort_keys=True).encode()
        self._writer.add_message(
            channel,
            log_time=log_time,
            data=body,
            publish_time=frame.header.t_capture_ns,
            sequence=frame.header.seq & 0xFFFFFFFF,
        )
        self._account(len(body))

    def write_event(self, kind: str, **fields: Any) -> None:
        """Append a JSON event (malformed frame, upstream gap, …) to `/thzedge/events`."""
        with self._storage("writing an event"):
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
            self._tick()

    def tick(self) -> None:
        """Close the open chunk if it has been open longer than `chunk_seconds`."""
        with self._storage("closing a chunk"):
            self._tick()

    def _tick(self) -> None:
        if self._pending_since is not None and time.monotonic() - self._pending_since >= self._chunk_seconds:
            self._sync()

    def _sync(self) -> None:
        self._writer.flush()
        if self._fsync:
            os.fsync(self._stream.fileno())
        self._pending = 0
        self._pending_since = None

    def close(self) -> Path:
        """Finish the file (summary, indexes, footer), fsync it and rename it into place.

        After a storage failure this only releases the file and raises that failure again.
        """
        if self.failed is not None:
            self._release()
            raise self.failed
        if self._closed:
            return self.path
        with self._storage("finishing the file"):
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
        if self.failed is not None and exc[0] is not None:
            self._release()  # the failure is already on its way up
            return
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

    def __init__(self, path: str | os.PathLike[str], key: StorageKey | None = None) -> None:
        self.path = resolve_recording(path)
        self._key = key
        self._opener: ChunkOpener | None = None
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
        # Truth labels read ahead of their raw frame, by (scanner, seq).
        self._truth: dict[tuple[str, int], RecordedTruth] = {}

    def __iter__(self) -> Iterator[RecordedItem]:
        return self.items()

    def items(self) -> Iterator[RecordedItem]:
        """Yield every raw-frame message in file order, then record how reading ended."""

        self.complete = self.truncated = False
        self.truncation = None
        self.frames = self.malformed = self.bad_chunks = 0
        self.bad_chunk_errors = []
        self.events = []
        self._opener = None
        self._truth = {}
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
                        inner = self._chunk_records(record)
                    except ConfigError:  # encrypted and no (or another) key: not a corrupt chunk
                        raise
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

    @property
    def encrypted(self) -> bool:
        """True when the file's chunks are sealed (known once the preamble or items were read)."""
        return ENCRYPTION_NAME in self.metadata

    @property
    def tampered_chunks(self) -> int:
        """Sealed chunks that failed authentication and were skipped, not decoded (R-NEW-15)."""
        return self._opener.tampered if self._opener is not None else 0

    @property
    def missing_chunks(self) -> int:
        """Sealed chunks absent between authentic ones (cut out of the file)."""
        return self._opener.missing if self._opener is not None else 0

    @property
    def integrity_errors(self) -> list[str]:
        """What failed authentication, one line each (no content)."""
        return list(self._opener.errors) if self._opener is not None else []

    def _chunk_records(self, chunk: Chunk) -> list[Any]:
        """The records of a chunk: sealed ones are authenticated and decrypted, others CRC-checked."""
        if chunk.compression != SEALED_CHUNK_COMPRESSION:
            return breakup_chunk(chunk, validate_crc=True)
        if self._opener is None:
            encryption = self.metadata.get(ENCRYPTION_NAME)
            if encryption is None:
                raise IntegrityError("sealed chunk in a recording without an encryption record")
            key = self._key if self._key is not None else find_storage_key()
            if key is None:
                raise ConfigError(
                    f"recording {self.path} is encrypted (key {encryption.get('key_id')}); give the "
                    "storage key ([storage] key_file, $THZEDGE_STORAGE_KEY or the systemd "
                    "credential storage.key)"
                )
            if encryption.get("key_id") != key.key_id:
                raise ConfigError(
                    f"recording {self.path} is encrypted under key {encryption.get('key_id')}, "
                    f"but the configured storage key is {key.key_id}"
                )
            self._opener = ChunkOpener(key, encryption, self.metadata.get(PRIVACY_NAME, {}))
        return self._opener.records(chunk)

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
        if channel.topic.endswith(TRUTH_SUFFIX) and channel.message_encoding == "json":
            self._note_truth(channel.topic, rec.data)
            return None
        if channel.message_encoding != RAW_ENCODING:
            return None
        try:
            frame = unpack_frame(rec.data)
            truth = self._truth.pop((frame.header.scanner, frame.header.seq), None)
            if truth is not None:
                frame = dataclasses.replace(frame, truth=truth)
            item: Frame | MalformedFrame = frame
            self.frames += 1
        except FrameDecodeError as exc:
            item = MalformedFrame.from_error(exc)
            self.malformed += 1
        return RecordedItem(item=item, log_time_ns=rec.log_time, topic=channel.topic)

    def _note_truth(self, topic: str, data: bytes) -> None:
        """Keep a truth message until its raw frame comes; a malformed one is ignored."""
        try:
            d = json.loads(data)
            key = (topic[1 : -len(TRUTH_SUFFIX)], int(d["seq"]))
            self._truth[key] = RecordedTruth.from_json(d)
        except (ValueError, KeyError, TypeError):
            return
        while len(self._truth) > _MAX_PENDING_TRUTH:
            self._truth.pop(next(iter(self._truth)))

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

    def attachment(self, name: str) -> bytes | None:
        """Return the bytes of the attachment called `name` seen so far, or None."""
        return self._attachment_data.get(name)

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
    encrypted: bool = False
    tampered_chunks: int = 0
    missing_chunks: int = 0
    integrity_errors: list[str] = field(default_factory=list)

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
            "encrypted": self.encrypted,
            "tampered_chunks": self.tampered_chunks,
            "missing_chunks": self.missing_chunks,
            "integrity_errors": self.integrity_errors,
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
            # Plain words, not Python reprs: 128x128 (or "128x128, 64x64" when it changed).
            shapes = ", ".join("x".join(str(d) for d in shape) for shape in s.shapes) or "none"
            seqs = f"seq {s.first_seq}..{s.last_seq}" if s.first_seq is not None else "no seq"
            lines.append(
                f"scanner     {name}: {s.frames} frames, {seqs}, {s.seq_gaps} missing, "
                f"{s.seq_resets} resets, shape {shapes}, dtype {', '.join(s.dtypes) or 'none'}"
            )
        for a in self.attachments:
            lines.append(f"attachment  {a.name} ({a.media_type}, {a.size} bytes, sha256 {a.sha256[:12]})")
        for name in sorted(self.metadata):
            lines.append(f"metadata    {name}: {len(self.metadata[name])} keys")
        if self.events:
            lines.append(f"events      {self.events}")
        enc = self.metadata.get(ENCRYPTION_NAME)
        scheme = f"{enc.get('alg')} per chunk, key {enc.get('key_id')}" if enc else "none (plaintext)"
        lines.append(f"encryption  {scheme}")
        if self.tampered_chunks or self.missing_chunks:
            lines.append(
                f"INTEGRITY   {self.tampered_chunks} chunk(s) failed authentication (skipped, not decoded), "
                f"{self.missing_chunks} missing"
            )
        return "\n".join(lines)


def recording_info(path: str | os.PathLike[str], key: StorageKey | None = None) -> RecordingInfo:
    """Scan a recording (finished or cut off by a crash) and summarise it."""
    reader = RecordingReader(path, key=key)
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
        encrypted=reader.encrypted,
        tampered_chunks=reader.tampered_chunks,
        missing_chunks=reader.missing_chunks,
        integrity_errors=reader.integrity_errors,
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
