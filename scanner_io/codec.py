"""The acquisition wire codec: one frame as a ZeroMQ multipart `[topic, header JSON, payload]`.

The format is specified in docs/protocol.md (acquisition part). Two messages exist: a frame
(topic `frame/<scanner>`) and the end of a stream (topic `end/<scanner>`, empty payload), after
which the scanner sends nothing more. `decode_message` decodes either, `decode_frame` frames
only (recordings hold nothing else). Both treat every message as hostile: they check sizes
before they parse or allocate anything, and the only exception they raise is
`FrameDecodeError` (as `FrameRejected`) with a short `reason` label that is safe to use as a
metric label. A message of a kind this receiver does not know is rejected as `bad_topic`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from scanner_io.errors import FrameDecodeError
from scanner_io.frame import ALLOWED_DTYPES, PROTOCOL_VERSION, Frame, FrameHeader

TOPIC_PREFIX = b"frame/"
END_TOPIC_PREFIX = b"end/"
END_OF_STREAM = "end_of_stream"  # the `kind` of the end-of-stream header
# Limits a receiver enforces before anything is allocated (documented in docs/protocol.md).
MAX_HEADER_BYTES = 16 * 1024
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_RANK = 3
MAX_DIM = 16384
MAX_SCANNER_LEN = 64
MAX_IDENTITY_LEN = 128
MAX_SETTINGS = 64
# A JSON integer field must fit a signed 64-bit integer (what C/C++ scanner firmware uses).
MAX_INT64 = 2**63 - 1
SCANNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Payloads at least this large go zero-copy; below it copying is cheaper (pyzmq's own default).
ZERO_COPY_THRESHOLD = 65536

# Every reason label decode_frame can produce, for metrics that pre-register their labels.
DECODE_REASONS: tuple[str, ...] = (
    "bad_parts",
    "too_large",
    "bad_topic",
    "bad_json",
    "missing_field",
    "bad_field",
    "bad_version",
    "bad_dtype",
    "bad_shape",
    "size_mismatch",
    "topic_mismatch",
    "non_finite",
)

_REQUIRED = ("v", "scanner", "seq", "t_capture_ns", "shape", "dtype")
_OPTIONAL = ("settings", "sensor_temp_c", "claimed_identity", "visit")
_END_REQUIRED = ("v", "kind", "scanner", "last_seq", "frames")


@dataclass(frozen=True)
class EndOfStream:
    """The scanner's word that its stream is over: no frame follows it on this connection.

    `last_seq` is the seq of the last frame the scanner captured (sent or dropped; None when it
    captured none), `frames` how many frames it sent, so a receiver can tell what it missed.
    """

    scanner: str
    last_seq: int | None
    frames: int
    v: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Return the header JSON object of the end-of-stream message."""
        return {
            "v": self.v,
            "kind": END_OF_STREAM,
            "scanner": self.scanner,
            "last_seq": self.last_seq,
            "frames": self.frames,
        }


@dataclass(frozen=True)
class MalformedFrame:
    """A rejected message as sources and replay surface it: the stream goes on after it."""

    reason: str
    message: str
    seq: int | None = None
    scanner: str | None = None
    # The message as received, when the source was asked to keep it (R-NEW-17 quarantine);
    # bounded by the source's message limits.
    raw: tuple[bytes, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_error(cls, exc: FrameDecodeError) -> MalformedFrame:
        """Build the record of a rejection from the decoder's error."""
        return cls(
            reason=exc.reason,
            message=str(exc),
            seq=getattr(exc, "seq", None),
            scanner=getattr(exc, "scanner", None),
        )


class FrameRejected(FrameDecodeError):
    """A message the decoder refused; carries the `seq` and `scanner` when they could be read."""

    def __init__(self, message: str, reason: str, seq: int | None = None, scanner: str | None = None):
        super().__init__(message, reason=reason)
        self.seq = seq
        self.scanner = scanner


def topic_for(scanner: str) -> bytes:
    """Return the wire topic of a scanner's frames (`frame/<scanner>`)."""
    return TOPIC_PREFIX + scanner.encode("utf-8")


def encode_header(header: FrameHeader) -> bytes:
    """Serialise a header to the compact UTF-8 JSON carried in part 1."""
    return json.dumps(header.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")


def wire_array(header: FrameHeader, array: np.ndarray) -> np.ndarray:
    """Return `array` as the C-contiguous little-endian array the header describes.

    No copy is made when the array already is one (the common case); otherwise a fresh array
    is made, so the caller's buffer is never touched.
    """
    if header.dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {header.dtype!r} is not allowed on the wire; use one of {ALLOWED_DTYPES}")
    want = np.dtype(header.dtype).newbyteorder("<")
    if array.dtype.kind != want.kind or array.dtype.itemsize != want.itemsize:
        raise ValueError(f"array dtype {array.dtype} does not match header dtype {header.dtype}")
    if tuple(array.shape) != tuple(header.shape):
        raise ValueError(f"array shape {array.shape} does not match header shape {tuple(header.shape)}")
    return np.ascontiguousarray(array, dtype=want)


def encode_frame(header: FrameHeader, array: np.ndarray) -> list[Any]:
    """Encode one frame as `[topic, header JSON, payload]` for `send_multipart`.

    The payload is a read-only memoryview over the array's own buffer (no copy when the array
    is C-contiguous little-endian). Send it with `send_frame`, which picks zero-copy for large
    payloads; the caller must not mutate the array until that send's tracker is done (R-ZMQ-6).
    """
    arr = wire_array(header, array)
    payload = arr.data.cast("B").toreadonly()
    if payload.nbytes > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {payload.nbytes} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    return [topic_for(header.scanner), encode_header(header), payload]


def send_frame(socket: Any, header: FrameHeader, array: np.ndarray, flags: int = 0) -> Any | None:
    """Send one frame on a ZeroMQ socket; return the payload's MessageTracker for zero-copy sends.

    Payloads of at least ZERO_COPY_THRESHOLD bytes go with `copy=False, track=True`; smaller ones
    are copied (cheaper). pyzmq returns the tracker of the *last* part, which is the payload
    here, so `tracker.done` says exactly when the array may be reused. Raises zmq.Again with
    NOBLOCK when the peer's queue is full.
    """
    parts = encode_frame(header, array)
    if parts[2].nbytes >= ZERO_COPY_THRESHOLD:
        return socket.send_multipart(parts, flags=flags, copy=False, track=True)
    socket.send_multipart(parts, flags=flags, copy=True)
    return None


def encode_end_of_stream(end: EndOfStream) -> list[bytes]:
    """Encode the end-of-stream message as `[topic, header JSON, empty payload]`."""
    header = json.dumps(end.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")
    return [END_TOPIC_PREFIX + end.scanner.encode("utf-8"), header, b""]


def _fail(reason: str, message: str, seq: int | None = None, scanner: str | None = None) -> FrameRejected:
    return FrameRejected(message, reason=reason, seq=seq, scanner=scanner)


def _as_buffer(part: Any) -> memoryview:
    # zmq.Frame (recv copy=False) exposes .buffer; bytes/bytearray/memoryview are buffers already.
    buf = getattr(part, "buffer", part)
    try:
        view = memoryview(buf)
    except TypeError as exc:
        raise _fail("bad_parts", f"message part of type {type(part).__name__} is not a buffer") from exc
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_constant(token: str) -> Any:
    # json accepts NaN/Infinity by default; they are not JSON and not allowed in a header.
    raise ValueError(f"non-standard JSON constant {token}")


# One decoder for every header: `json.loads` with an option builds a new one per call.
_HEADER_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_header_json(raw: memoryview) -> dict[str, Any]:
    """Parse header bytes as a strict JSON object (no NaN/Infinity); raises FrameRejected("bad_json")."""
    try:
        text = bytes(raw).decode("utf-8")
        obj = _HEADER_DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail("bad_json", f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _fail("bad_json", f"header must be a JSON object, got {type(obj).__name__}")
    return obj


def is_scanner_name(value: Any) -> TypeGuard[str]:
    """True when `value` is a valid scanner name: 1-64 characters of [A-Za-z0-9_.-]."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= MAX_SCANNER_LEN
        and SCANNER_RE.fullmatch(value) is not None
    )


def _peek_seq(obj: dict[str, Any]) -> int | None:
    seq = obj.get("seq")
    return seq if _is_int(seq) and 0 <= seq <= MAX_INT64 else None


def header_from_dict(obj: dict[str, Any]) -> FrameHeader:
    """Validate a parsed header object and build the FrameHeader; raises FrameRejected."""
    seq = _peek_seq(obj)
    scanner = obj.get("scanner")
    if not is_scanner_name(scanner):
        scanner = None

    def bad(reason: str, message: str) -> FrameRejected:
        # Only a valid name travels with a rejection: an attacker's string never becomes a key.
        return _fail(reason, message, seq=seq, scanner=scanner)

    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise bad("missing_field", f"header lacks required field(s) {', '.join(missing)}")
    v = obj["v"]
    if not _is_int(v):
        raise bad("bad_field", "header field 'v' must be an integer")
    if v != PROTOCOL_VERSION:
        raise bad(
            "bad_version", f"protocol version {v} is not supported (this receiver speaks v{PROTOCOL_VERSION})"
        )
    if scanner is None:
        raise bad("bad_field", "header field 'scanner' must be 1-64 characters of [A-Za-z0-9_.-]")
    for name in ("seq", "t_capture_ns"):
        value = obj[name]
        if not _is_int(value) or not 0 <= value <= MAX_INT64:
            raise bad("bad_field", f"header field {name!r} must be an integer in [0, 2^63)")
    dtype = obj["dtype"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise bad("bad_dtype", f"dtype {str(dtype)[:32]!r} is not one of {', '.join(ALLOWED_DTYPES)}")
    shape = obj["shape"]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_RANK
        or not all(_is_int(d) and 1 <= d <= MAX_DIM for d in shape)
    ):
        raise bad("bad_shape", f"shape must be a list of 1-{MAX_RANK} integers in [1, {MAX_DIM}]")
    settings = obj.get("settings", {})
    if not isinstance(settings, dict) or len(settings) > MAX_SETTINGS:
        raise bad("bad_field", f"header field 'settings' must be an object with at most {MAX_SETTINGS} keys")
    for key, value in settings.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise bad("bad_field", f"settings[{key[:32]!r}] must be a string, number, boolean or null")
    temp = obj.get("sensor_temp_c")
    if temp is not None and (
        isinstance(temp, bool) or not isinstance(temp, (int, float)) or not math.isfinite(temp)
    ):
        raise bad("bad_field", "header field 'sensor_temp_c' must be a finite number or null")
    ident = obj.get("claimed_identity")
    if ident is not None and (not isinstance(ident, str) or len(ident) > MAX_IDENTITY_LEN):
        raise bad(
            "bad_field", f"header field 'claimed_identity' must be a string of at most {MAX_IDENTITY_LEN}"
        )
    visit = obj.get("visit")
    if visit is not None and (not _is_int(visit) or not 0 <= visit <= MAX_INT64):
        raise bad("bad_field", "header field 'visit' must be an integer in [0, 2^63) or null")
    return FrameHeader(
        scanner=scanner,
        seq=obj["seq"],
        t_capture_ns=obj["t_capture_ns"],
        shape=tuple(shape),
        dtype=dtype,
        v=v,
        settings=dict(settings),
        sensor_temp_c=temp,
        claimed_identity=ident,
        visit=visit,
    )


def array_from_payload(header: FrameHeader, payload: Any) -> np.ndarray:
    """Check the payload length against the header and wrap it as a read-only array (no copy)."""
    view = _as_buffer(payload)
    dtype = np.dtype(header.dtype).newbyteorder("<")
    expected = math.prod(header.shape) * dtype.itemsize
    if view.nbytes != expected:
        raise _fail(
            "size_mismatch",
            f"payload is {view.nbytes} bytes; shape {list(header.shape)} of {header.dtype} needs {expected}",
            seq=header.seq,
            scanner=header.scanner,
        )
    arr = np.frombuffer(view, dtype=dtype).reshape(header.shape)
    if arr.flags.writeable:
        # Frames are immutable once decoded: consumers copy before any in-place work.
        arr.flags.writeable = False
    if dtype.kind == "f" and not np.isfinite(arr).all():
        raise _fail(
            "non_finite", "float32 payload contains NaN or infinity", seq=header.seq, scanner=header.scanner
        )
    return arr


def _checked_parts(parts: Sequence[Any]) -> tuple[memoryview, memoryview, memoryview]:
    """Check the part count and sizes of any message before anything is parsed."""
    try:
        n = len(parts)
    except TypeError:
        raise _fail("bad_parts", "message is not a sequence of parts") from None
    if n != 3:
        raise _fail("bad_parts", f"expected 3 message parts [topic, header, payload], got {n}")
    topic, raw_header, payload = (_as_buffer(p) for p in parts)
    if raw_header.nbytes > MAX_HEADER_BYTES:
        raise _fail("too_large", f"header of {raw_header.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    if payload.nbytes > MAX_PAYLOAD_BYTES:
        raise _fail("too_large", f"payload of {payload.nbytes} bytes exceeds {MAX_PAYLOAD_BYTES}")
    if topic.nbytes > len(TOPIC_PREFIX) + MAX_SCANNER_LEN:
        raise _fail("bad_topic", "topic must be 'frame/<scanner>' or 'end/<scanner>'")
    return topic, raw_header, payload


def decode_frame(parts: Sequence[Any]) -> Frame:
    """Validate and decode one multipart message into a Frame; raises only FrameDecodeError.

    Checks, in order: part count, sizes (before any parsing), topic, header JSON, required
    fields and their types, protocol version, dtype allowlist, shape rank and bounds,
    topic/scanner agreement, payload length = prod(shape) × itemsize, finite float values.
    The returned array is a read-only view over the received payload.
    """
    topic, raw_header, payload = _checked_parts(parts)
    if bytes(topic[: len(TOPIC_PREFIX)]) != TOPIC_PREFIX:
        raise _fail("bad_topic", "topic must be 'frame/<scanner>'")
    return _frame_from(topic, raw_header, payload)


def _frame_from(topic: memoryview, raw_header: memoryview, payload: memoryview) -> Frame:
    header = header_from_dict(parse_header_json(raw_header))
    if bytes(topic) != topic_for(header.scanner):
        raise _fail(
            "topic_mismatch",
            f"topic does not match header scanner {header.scanner!r}",
            seq=header.seq,
            scanner=header.scanner,
        )
    return Frame(header=header, data=array_from_payload(header, payload))


def decode_message(parts: Sequence[Any]) -> Frame | EndOfStream:
    """Decode a frame or an end-of-stream message; raises only FrameDecodeError.

    A message of any other kind (another topic) is rejected as `bad_topic`, like one that is
    garbled: receivers count it and go on, so a scanner that speaks a newer message to an older
    receiver costs one counted rejection, never the stream.
    """
    topic, raw_header, payload = _checked_parts(parts)
    if bytes(topic[: len(TOPIC_PREFIX)]) == TOPIC_PREFIX:
        return _frame_from(topic, raw_header, payload)
    if bytes(topic[: len(END_TOPIC_PREFIX)]) != END_TOPIC_PREFIX:
        raise _fail("bad_topic", "topic must be 'frame/<scanner>' or 'end/<scanner>'")
    obj = parse_header_json(raw_header)
    missing = [k for k in _END_REQUIRED if k not in obj]
    if missing:
        raise _fail("missing_field", f"end-of-stream header lacks field(s) {', '.join(missing)}")
    v, kind, scanner, last_seq, frames = (obj[k] for k in _END_REQUIRED)
    if not _is_int(v):
        raise _fail("bad_field", "header field 'v' must be an integer")
    if v != PROTOCOL_VERSION:
        raise _fail(
            "bad_version", f"protocol version {v} is not supported (this receiver speaks v{PROTOCOL_VERSION})"
        )
    if kind != END_OF_STREAM:
        raise _fail("bad_field", f"end-of-stream header field 'kind' must be {END_OF_STREAM!r}")
    if (
        not isinstance(scanner, str)
        or not 1 <= len(scanner) <= MAX_SCANNER_LEN
        or not SCANNER_RE.fullmatch(scanner)
    ):
        raise _fail("bad_field", "header field 'scanner' must be 1-64 characters of [A-Za-z0-9_.-]")
    if last_seq is not None and (not _is_int(last_seq) or not 0 <= last_seq <= MAX_INT64):
        raise _fail("bad_field", "header field 'last_seq' must be null or an integer in [0, 2^63)")
    if not _is_int(frames) or not 0 <= frames <= MAX_INT64:
        raise _fail("bad_field", "header field 'frames' must be an integer in [0, 2^63)")
    if bytes(topic) != END_TOPIC_PREFIX + scanner.encode("utf-8"):
        raise _fail("topic_mismatch", f"topic does not match header scanner {scanner!r}", scanner=scanner)
    if payload.nbytes:
        raise _fail("size_mismatch", f"end-of-stream payload must be empty, got {payload.nbytes} bytes")
    return EndOfStream(scanner=scanner, last_seq=last_seq, frames=frames, v=v)
