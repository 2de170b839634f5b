"""The results protocol (daemon → consumers): result/event messages and the PUB socket that sends them.

Wire layout (docs/protocol.md, "Results"): multipart `[topic, header, *payloads]`.

- topic `result/<scanner>`: one per processed frame; header is UTF-8 JSON (see `FrameResult`);
  payload parts (embedding, reconstruction) follow only when their privacy flags are on, each
  described in `header["parts"]` (index, kind, dtype, shape; little-endian, C order).
- topic `event/<scanner>`: `[topic, header]`; `header["kind"]` is `state`, `error`, `drop` or
  `source`. A `state` event carries the protocol version, model and calibration, and is sent
  when a subscription arrives (the XPUB welcome: a late joiner learns the state at once) and
  again every `state_interval_s` (default 0.5 s) so a consumer also gets it without subscribing
  to anything special; it doubles as the heartbeat that tells idle from dead.

The socket is an XPUB that behaves as a PUB for subscribers. It is owned by one thread
(`OwnedSocket` asserts it, R-ZMQ-4); other threads hand messages over through a queue.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import zmq

from edge.security import EndpointSecurity
from scanner_io.errors import SourceUnavailableError

log = logging.getLogger("thzedge.results")

RESULTS_PROTOCOL_VERSION = 1
# A monotonic deadline, or a callable giving it (None: wait as long as it takes).
Deadline = float | Callable[[], float | None] | None
RESULT_TOPIC_PREFIX = "result/"
EVENT_TOPIC_PREFIX = "event/"
STATUSES: tuple[str, ...] = ("ok", "partial", "error")
EVENT_KINDS: tuple[str, ...] = ("state", "error", "drop", "source", "calibration")


def result_topic(scanner: str) -> bytes:
    """Return the topic bytes of result messages for one scanner."""
    return f"{RESULT_TOPIC_PREFIX}{scanner}".encode()


def event_topic(scanner: str) -> bytes:
    """Return the topic bytes of event messages for one scanner."""
    return f"{EVENT_TOPIC_PREFIX}{scanner}".encode()


@dataclass(frozen=True)
class Provenance:
    """What produced a result: bundle id (manifest sha256), precision, backend, calibration id."""

    bundle: str
    precision: str
    backend: str
    calibration: str

    def to_dict(self) -> dict[str, str]:
        """Return the JSON-ready dict."""
        return {
            "bundle": self.bundle,
            "precision": self.precision,
            "backend": self.backend,
            "calibration": self.calibration,
        }


@dataclass
class FrameResult:
    """One frame's outcome, built by the inference stage and finished by the publisher.

    Arrays are kept here and only leave the process as payload parts when the publisher's
    privacy flags allow it.
    """

    scanner: str
    seq: int
    t_capture_ns: int
    status: str
    provenance: Provenance
    posture: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    errors: list[dict[str, str]] = field(default_factory=list)
    quality: dict[str, Any] | None = None  # why a `no_face` frame has no head in it
    latency_ms: dict[str, float] = field(default_factory=dict)
    t_received_mono: float = 0.0  # host monotonic time the frame entered the daemon
    t_ready_mono: float = 0.0  # host monotonic time the result was handed to the publisher
    embedding: np.ndarray | None = None  # [D] float32; biometric
    reconstruction: np.ndarray | None = None  # [64, 64] float32; biometric
    input: np.ndarray | None = None  # [64, 64] float32 conditioned model input; biometric
    dropped_since_last: int = 0


def encode_result(
    result: FrameResult,
    t_publish_ns: int,
    publish_embedding: bool = False,
    publish_reconstruction: bool = False,
    publish_input: bool = False,
) -> list[bytes]:
    """Return the multipart message of one result; biometric parts only when their flag is on."""
    parts: list[bytes] = []
    described: list[dict[str, Any]] = []
    payloads: list[tuple[str, np.ndarray | None, bool]] = [
        ("embedding", result.embedding, publish_embedding),
        ("reconstruction", result.reconstruction, publish_reconstruction),
        ("input", result.input, publish_input),
    ]
    for kind, array, allowed in payloads:
        if not allowed or array is None:
            continue
        # Fresh little-endian C-order bytes: nothing is shared with a buffer that may be reused.
        buf = np.ascontiguousarray(array, dtype="<f4")
        described.append(
            {"index": 2 + len(parts), "kind": kind, "dtype": "float32", "shape": list(buf.shape)}
        )
        parts.append(buf.tobytes())
    header: dict[str, Any] = {
        "v": RESULTS_PROTOCOL_VERSION,
        "scanner": result.scanner,
        "seq": result.seq,
        "t_capture_ns": result.t_capture_ns,
        "t_publish_ns": t_publish_ns,
        "status": result.status,
        "posture": result.posture,
        "verification": result.verification,
        "errors": result.errors,
        "quality": result.quality,
        "latency_ms": {k: round(v, 3) for k, v in result.latency_ms.items()},
        "provenance": result.provenance.to_dict(),
        "dropped_since_last": result.dropped_since_last,
        "parts": described,
    }
    return [result_topic(result.scanner), json.dumps(header, separators=(",", ":")).encode(), *parts]


# After the last message has left, the connection stays open this long for subscribers to read it.
LAST_EVENT_GRACE_S = 0.25


def encode_event(scanner: str, kind: str, body: dict[str, Any], t_ns: int | None = None) -> list[bytes]:
    """Return the two-part message of one event (`state`, `error`, `drop` or `source`)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
    header = {"v": RESULTS_PROTOCOL_VERSION, "scanner": scanner, "kind": kind, "t_ns": t_ns or time.time_ns()}
    header.update(body)
    return [event_topic(scanner), json.dumps(header, separators=(",", ":")).encode()]


@dataclass(frozen=True)
class DecodedMessage:
    """A decoded result or event (a reference decoder for Python consumers and the benchmark)."""

    topic: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def is_result(self) -> bool:
        return self.topic.startswith(RESULT_TOPIC_PREFIX)


def decode_message(parts: Sequence[bytes]) -> DecodedMessage:
    """Decode one result or event message; raises ValueError on anything off-protocol."""
    if len(parts) < 2:
        raise ValueError(f"expected at least 2 parts (topic, header), got {len(parts)}")
    topic = bytes(parts[0]).decode()
    header = json.loads(bytes(parts[1]))
    if header.get("v") != RESULTS_PROTOCOL_VERSION:
        raise ValueError(f"unsupported results protocol version {header.get('v')!r}")
    arrays: dict[str, np.ndarray] = {}
    for spec in header.get("parts", []) if topic.startswith(RESULT_TOPIC_PREFIX) else []:
        idx = int(spec["index"])
        if idx >= len(parts):
            raise ValueError(f"header names part {idx} but the message has {len(parts)} parts")
        shape = tuple(int(s) for s in spec["shape"])
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        buf = bytes(parts[idx])
        if len(buf) != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"part {idx} has {len(buf)} bytes, header says {shape} {spec['dtype']}")
        arrays[spec["kind"]] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return DecodedMessage(topic=topic, header=header, arrays=arrays)


class OwnedSocket:
    """A ZeroMQ socket that may only be used from the thread that created it (R-ZMQ-4)."""

    def __init__(self, ctx: zmq.Context, socket_type: int) -> None:
        self._owner = threading.get_ident()
        self.socket = ctx.socket(socket_type)
        self.socket.setsockopt(zmq.LINGER, 0)

    def check(self) -> zmq.Socket:
        """Return the socket, or raise RuntimeError when called from another thread."""
        if threading.get_ident() != self._owner:
            raise RuntimeError("a ZeroMQ socket was used from a thread that does not own it")
        return self.socket

    def close(self) -> None:
        """Close the socket (linger 0) from its owning thread."""
        self.check().close(linger=0)


class ResultPublisher:
    """Binds the results socket and sends results and events; use from one thread only.

    `lockstep=True` sets XPUB_NODROP so a full subscriber queue makes sends wait (bounded by the
    stop deadline) instead of dropping: replay at max rate loses nothing (R-ZMQ-2). Otherwise a
    slow subscriber loses its own messages at its HWM and never slows the pipeline (R-ZMQ-1);
    consumers see those losses as seq gaps.
    """

    def __init__(
        self,
        endpoint: str,
        scanner: str,
        hwm: int = 100,
        lockstep: bool = False,
        publish_embedding: bool = False,
        publish_reconstruction: bool = False,
        publish_input: bool = False,
        ctx: zmq.Context | None = None,
        binder: Callable[[zmq.Socket, str], str] | None = None,
        ipc_mode: int = 0o600,
        ipc_group: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.scanner = scanner
        self.lockstep = lockstep
        self.publish_embedding = publish_embedding
        self.publish_reconstruction = publish_reconstruction
        self.publish_input = publish_input
        self._ctx = ctx or zmq.Context.instance()
        self._binder = binder
        self._ipc = (ipc_mode, ipc_group)
        self._owned = OwnedSocket(self._ctx, zmq.XPUB)
        sock = self._owned.socket
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscribe reaches us, so each joiner is welcomed
        if lockstep:
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        try:
            # `binder` (edge.security.EndpointSecurity.bind) adds CURVE + ZAP on tcp and file
            # permissions on ipc; without it, ipc files still get owner-only permissions here.
            self.bound_endpoint = (
                binder(sock, endpoint)
                if binder is not None
                else self._bind(self._ctx, sock, endpoint, ipc_mode, ipc_group)
            )
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise SourceUnavailableError(
                f"cannot bind the results socket at {endpoint}: {exc}; choose another --publish endpoint"
            ) from exc
        except BaseException:
            sock.close(linger=0)
            raise
        self.blocked_s = 0.0

    @staticmethod
    def _bind(ctx: zmq.Context, sock: zmq.Socket, endpoint: str, ipc_mode: int, ipc_group: str | None) -> str:
        if not endpoint.startswith("ipc://"):
            sock.bind(endpoint)
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # Results are biometric decisions: the daemon's own ipc protection (owner-only or one
        # group's file, private directory, a live socket of another process refused; R-NEW-2).
        mode = ipc_mode & (stat.S_IRWXU | stat.S_IRWXG)
        return EndpointSecurity(ctx, ipc_mode=mode, ipc_group=ipc_group).bind(sock, endpoint)

    def rebind(self, attempts: int = 40) -> None:
        """Unbind and bind the endpoint again: every connection drops, subscribers reconnect.

        This is how a revoked CURVE key is cut off: ZAP only judges new handshakes. Messages
        queued for subscribers at that moment are lost (they see a seq gap).
        """
        sock = self._owned.check()
        endpoint = self.bound_endpoint
        sock.unbind(endpoint)
        for attempt in range(attempts):
            try:
                if self._binder is not None:
                    self.bound_endpoint = self._binder(sock, endpoint)
                else:
                    self.bound_endpoint = self._bind(self._ctx, sock, endpoint, *self._ipc)
                return
            except zmq.ZMQError as exc:
                # The listener closes in libzmq's I/O thread: the address may be busy a moment.
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                time.sleep(0.05)

    def poll_subscriptions(self) -> int:
        """Read pending subscribe messages without blocking; return how many were new joins."""
        sock = self._owned.check()
        joins = 0
        # EVENTS is a cheap check; this runs once per published message.
        while cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            msg = sock.recv(zmq.NOBLOCK)
            if msg and msg[0] == 1:
                joins += 1
        return joins

    def send(self, parts: list[bytes], deadline: Deadline = None) -> bool:
        """Send one message; in lockstep wait for room until `deadline` (monotonic). True if sent.

        `deadline` may be a callable, re-read while waiting, so a stop requested during the wait
        still ends it in time.
        """
        sock = self._owned.check()
        if not self.lockstep:
            sock.send_multipart(parts, copy=True)  # PUB semantics: never blocks, drops at HWM
            return True
        t0 = time.monotonic()
        try:
            while True:
                try:
                    sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
                    return True
                except zmq.Again:
                    limit = deadline() if callable(deadline) else deadline
                    if limit is not None and time.monotonic() >= limit:
                        return False
                    sock.poll(20, zmq.POLLOUT)
        finally:
            self.blocked_s += time.monotonic() - t0

    def publish_result(self, result: FrameResult, deadline: Deadline = None) -> int | None:
        """Stamp t_publish_ns and the publish/total latencies, send; return t_publish_ns, None if not sent."""
        now_ns = time.time_ns()
        now = time.monotonic()
        if result.t_ready_mono:
            result.latency_ms["publish"] = (now - result.t_ready_mono) * 1e3
        if result.t_received_mono:
            result.latency_ms["total"] = (now - result.t_received_mono) * 1e3
        parts = encode_result(
            result, now_ns, self.publish_embedding, self.publish_reconstruction, self.publish_input
        )
        if not self.send(parts, deadline):
            return None
        return now_ns

    def publish_event(self, kind: str, body: dict[str, Any], deadline: Deadline = None) -> bool:
        """Send one event on `event/<scanner>`."""
        return self.send(encode_event(self.scanner, kind, body), deadline)

    def publish_last_event(self, kind: str, body: dict[str, Any], timeout_s: float) -> bool:
        """Send a last event and wait up to `timeout_s` until it left; True if it did.

        A socket closed with linger 0 discards what is still queued, so the results sent just
        before a clean stop would never reach connected subscribers. libzmq releases a message
        once it is written out to (or dropped for) every subscriber, in order, so when the last
        one's tracker is done everything before it has left too. Bounded: a stalled subscriber
        costs at most `timeout_s`.
        """
        sock = self._owned.check()
        *head, last = encode_event(self.scanner, kind, body)
        try:
            for part in head:
                sock.send(part, flags=zmq.NOBLOCK | zmq.SNDMORE)
            # Zero-copy forced: pyzmq copies a small message and hands back a tracker that is done
            # at once, which made this wait a no-op. No reference to the Frame is kept here, so
            # the tracker is done exactly when libzmq has released the message.
            tracker = sock.send(
                zmq.Frame(last, track=True, copy=False), flags=zmq.NOBLOCK, copy=False, track=True
            )
        except zmq.Again:  # lockstep and a full subscriber: it will not drain in time either
            return False
        if tracker is None:  # not tracked (cannot happen with track=True): nothing to wait on
            return True
        t_end = time.monotonic() + max(timeout_s, 0.0)
        try:
            tracker.wait(max(timeout_s, 0.0))
        except zmq.NotDone:
            return False
        # Out of this process's queues is not yet read by the subscriber: what its libzmq has taken
        # from the kernel but cannot queue (its RCVHWM full) is lost if the connection closes now.
        # Keep the connection open a little longer, within the same bound.
        time.sleep(max(min(LAST_EVENT_GRACE_S, t_end - time.monotonic()), 0.0))
        return True

    def close(self) -> None:
        """Close the socket with linger 0 and remove an ipc socket file."""
        self._owned.close()
        if self.endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint[len("ipc://") :])
