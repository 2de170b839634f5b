"""MCAP files that Foxglove and Lichtblick can show: images as `foxglove.RawImage`, results as JSON.

thzedge's own recordings use the private `thz-raw/v1` envelope (docs/protocol.md), which no
MCAP viewer decodes. `export_foxglove` rewrites a recording's raw frames as `foxglove.RawImage`
messages (message encoding `json`, schema encoding `jsonschema`, the well-known schema below),
one channel `/<scanner>/image` per scanner, plus its events and manifest, so the frames play
back in a viewer's Image panel. `JsonChannelWriter` is the small writer both this export and
the daemon's results recorder (`edge/results_mcap.py`) use: JSON-schema channels whose numeric
fields a viewer's Plot panel draws over time.

Both files are written as `NAME.part`, mode 0600 (frames and results are personal data), and
renamed when finished.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from mcap.writer import CompressionType, Writer

from scanner_io.atrest import StorageKey
from scanner_io.errors import DataError
from scanner_io.frame import Frame
from scanner_io.recording import ENCRYPTION_NAME, EVENTS_TOPIC, MANIFEST_NAME, PART_SUFFIX, RecordingReader

RAW_IMAGE_SCHEMA_NAME = "foxglove.RawImage"
# The well-known schema as the Foxglove SDK publishes it for JSON encoding (bytes as base64).
RAW_IMAGE_SCHEMA: dict[str, Any] = {
    "title": "foxglove.RawImage",
    "description": "A raw image",
    "type": "object",
    "properties": {
        "timestamp": {
            "type": "object",
            "title": "time",
            "properties": {
                "sec": {"type": "integer", "minimum": 0},
                "nsec": {"type": "integer", "minimum": 0, "maximum": 999999999},
            },
            "description": "Timestamp of image",
        },
        "frame_id": {"type": "string", "description": "Frame of reference for the image."},
        "width": {"type": "integer", "minimum": 0, "description": "Image width"},
        "height": {"type": "integer", "minimum": 0, "description": "Image height"},
        "encoding": {
            "type": "string",
            "description": "Encoding of the raw image data: mono8, 16UC1 or 32FC1 (little endian) here",
        },
        "step": {"type": "integer", "minimum": 0, "description": "Byte length of a single row"},
        "data": {"type": "string", "contentEncoding": "base64", "description": "Raw image data"},
    },
}
# dtype → RawImage encoding (Foxglove's names; 16UC1 and 32FC1 are little-endian).
IMAGE_ENCODINGS = {"uint8": "mono8", "uint16": "16UC1", "float32": "32FC1"}


def time_of(t_ns: int) -> dict[str, int]:
    """A Foxglove `time` ({sec, nsec}) from nanoseconds since the epoch."""
    return {"sec": t_ns // 1_000_000_000, "nsec": t_ns % 1_000_000_000}


def raw_image(array: np.ndarray, t_ns: int, frame_id: str) -> dict[str, Any]:
    """A `foxglove.RawImage` JSON message of a 2-D uint8, uint16 or float32 array."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] == 1:  # a single-plane frame
        a = a[0]
    if a.ndim != 2 or a.dtype.name not in IMAGE_ENCODINGS:
        raise DataError(f"a RawImage needs a 2-D uint8/uint16/float32 array, got {a.dtype} {a.shape}")
    le = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return {
        "timestamp": time_of(t_ns),
        "frame_id": frame_id,
        "width": int(a.shape[1]),
        "height": int(a.shape[0]),
        "encoding": IMAGE_ENCODINGS[a.dtype.name],
        "step": int(a.shape[1] * a.dtype.itemsize),
        "data": base64.b64encode(le.tobytes()).decode("ascii"),
    }


@dataclass(frozen=True)
class ChannelSpec:
    """A JSON channel: topic, schema name and JSON Schema."""

    topic: str
    schema_name: str
    schema: Mapping[str, Any]


class JsonChannelWriter:
    """An MCAP writer of JSON messages on JSON-schema channels; `.part` + rename, mode 0600.

    A context manager: a clean exit finishes the file, an exception deletes the `.part`.
    Use from one thread.
    """

    def __init__(self, path: str | os.PathLike[str], profile: str = "") -> None:
        self.path = Path(path)
        self.part_path = self.path.with_name(self.path.name + PART_SUFFIX)
        fd = os.open(self.part_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._stream: IO[bytes] = os.fdopen(fd, "wb")
        self._writer = Writer(self._stream, compression=CompressionType.ZSTD)
        self._writer.start(profile=profile, library="thzedge")
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self.messages = 0
        self._closed = False

    def channel(self, spec: ChannelSpec, metadata: Mapping[str, str] | None = None) -> int:
        """Register `spec` once (schema and channel); return its channel id."""
        cid = self._channels.get(spec.topic)
        if cid is not None:
            return cid
        sid = self._schemas.get(spec.schema_name)
        if sid is None:
            sid = self._writer.register_schema(
                spec.schema_name, "jsonschema", json.dumps(spec.schema).encode()
            )
            self._schemas[spec.schema_name] = sid
        cid = self._writer.register_channel(spec.topic, "json", sid, dict(metadata or {}))
        self._channels[spec.topic] = cid
        return cid

    def write(
        self,
        spec: ChannelSpec,
        message: Mapping[str, Any],
        log_time_ns: int,
        publish_time_ns: int | None = None,
        sequence: int = 0,
    ) -> None:
        """Append one JSON message on the channel of `spec`."""
        cid = self.channel(spec)
        self._writer.add_message(
            cid,
            log_time=log_time_ns,
            publish_time=log_time_ns if publish_time_ns is None else publish_time_ns,
            data=json.dumps(message, separators=(",", ":")).encode(),
            sequence=sequence & 0xFFFFFFFF,
        )
        self.messages += 1

    def add_metadata(self, name: str, values: Mapping[str, str]) -> None:
        """Add a metadata record."""
        self._writer.add_metadata(name, dict(values))

    def close(self) -> Path:
        """Finish the file and rename it into place."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            self._writer.finish()
            self._stream.flush()
            os.fsync(self._stream.fileno())
        finally:
            self._stream.close()
        os.replace(self.part_path, self.path)
        return self.path

    def __enter__(self) -> JsonChannelWriter:
        return self

    def abort(self) -> None:
        """Stop writing and delete the unfinished `.part` file (nothing half-done is left as NAME)."""
        if self._closed:
            return
        self._closed = True
        self._stream.close()
        with contextlib.suppress(OSError):
            os.unlink(self.part_path)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def image_channel(topic: str) -> ChannelSpec:
    """A `foxglove.RawImage` channel on `topic`."""
    return ChannelSpec(topic, RAW_IMAGE_SCHEMA_NAME, RAW_IMAGE_SCHEMA)


EVENT_SPEC = ChannelSpec(
    EVENTS_TOPIC,
    "thzedge.RecordingEvent",
    {"title": "thzedge.RecordingEvent", "type": "object", "properties": {"kind": {"type": "string"}}},
)


@dataclass(frozen=True)
class FoxgloveExport:
    """What `export_foxglove` wrote."""

    path: Path
    frames: int
    malformed: int
    extra_images: int
    topics: tuple[str, ...]
    # The recording was encrypted at rest; the export is not (viewers cannot read sealed chunks).
    decrypted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        return {
            "path": str(self.path),
            "frames": self.frames,
            "malformed_skipped": self.malformed,
            "extra_images": self.extra_images,
            "topics": list(self.topics),
            "decrypted": self.decrypted,
        }


# (topic suffix, 2-D array) images derived from a frame, e.g. the conditioned model input.
DerivedImages = Callable[[Frame], Mapping[str, np.ndarray]]


def export_foxglove(
    recording: str | os.PathLike[str],
    out: str | os.PathLike[str],
    derived: DerivedImages | None = None,
    key: StorageKey | None = None,
) -> FoxgloveExport:
    """Rewrite a recording's raw frames as `foxglove.RawImage` on `/<scanner>/image`.

    `derived(frame)` may add more images per frame (`/<scanner>/<suffix>`, e.g. the conditioned
    input that edge computes). Malformed frames are skipped (counted); the events channel and
    the manifest are copied. An encrypted recording needs its storage `key`; the export itself is
    plaintext (viewers cannot read sealed chunks), mode 0600 like every recording.
    """
    reader = RecordingReader(recording, key=key)
    reader.keep_attachments = False
    frames = malformed = extra = 0
    last_log = 0
    topics: list[str] = []
    with JsonChannelWriter(out, profile="foxglove") as w:
        for rec in reader:
            if not isinstance(rec.item, Frame):
                malformed += 1
                continue
            frame = rec.item
            last_log = rec.log_time_ns
            scanner = frame.header.scanner
            images = {"image": frame.data}
            if derived is not None:
                images.update(derived(frame))
            for suffix, array in images.items():
                spec = image_channel(f"/{scanner}/{suffix}")
                if spec.topic not in topics:
                    topics.append(spec.topic)
                msg = raw_image(array, frame.header.t_capture_ns, scanner)
                w.write(spec, msg, rec.log_time_ns, frame.header.t_capture_ns, frame.header.seq)
            frames += 1
            extra += len(images) - 1
        for event in reader.events:
            # The reader keeps events without their times: they go at the end of the timeline.
            w.write(EVENT_SPEC, event, last_log)
        if MANIFEST_NAME in reader.metadata:
            w.add_metadata(MANIFEST_NAME, reader.metadata[MANIFEST_NAME])
    if reader.events and EVENTS_TOPIC not in topics:
        topics.append(EVENTS_TOPIC)
    decrypted = ENCRYPTION_NAME in reader.metadata
    return FoxgloveExport(Path(out), frames, malformed, extra, tuple(topics), decrypted)
