"""The scanner emulator: streams frames from a source in the acquisition protocol.

It stands in for a scanner's acquisition service: it binds a PUSH socket and sends every frame
as `[topic, header, payload]` (docs/protocol.md). Live streams are sent with NOBLOCK, so a slow
or absent consumer never blocks it — such frames are dropped here and counted by reason, and
the consumer sees the hole as a seq gap. Lockstep streams (`rate="max"`) block instead, so
nothing is dropped (R-ZMQ-2). When the stream is complete (`frames` sent, or a finite source
ended) it sends the end-of-stream message, so the consumer knows nothing more will come; a
stop request (SIGTERM) is not the end of the stream and sends none.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import zmq

from scanner_io.codec import EndOfStream, encode_end_of_stream, send_frame, topic_for
from scanner_io.errors import ConfigError
from scanner_io.frame import Frame
from scanner_io.sources import (
    HEARTBEAT_IVL_MS,
    HEARTBEAT_TIMEOUT_MS,
    MalformedFrame,
    Source,
    open_source,
    zmq_context,
)

log = logging.getLogger(__name__)

DEFAULT_SNDHWM = 8  # frames
DEFAULT_SIM_FPS = 30.0
_MALFORMED_KINDS = ("size_mismatch", "bad_dtype", "bad_version")


@dataclass
class EmulatorStats:
    """What the emulator did: frames sent, dropped (by reason), injected faults."""

    sent: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    malformed_sent: int = 0
    skipped: int = 0
    source_malformed: int = 0
    elapsed_s: float = 0.0
    end_of_stream: bool = False  # the end-of-stream message was handed to the socket

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        return {
            "sent": self.sent,
            "dropped": dict(self.dropped),
            "malformed_sent": self.malformed_sent,
            "skipped": self.skipped,
            "source_malformed": self.source_malformed,
            "elapsed_s": round(self.elapsed_s, 3),
            "end_of_stream": self.end_of_stream,
        }


@dataclass(frozen=True)
class EmulatorSettings:
    """How the emulator streams: pacing, limits, socket options, injected faults."""

    bind: str
    rate: float | str | None = None  # frames/s; "max": lockstep (blocking); None: the source's pacing
    frames: int | None = None
    sndhwm: int = DEFAULT_SNDHWM
    inject_malformed_every: int = 0  # every Nth frame goes out malformed (seq kept readable)
    skip_every: int = 0  # every Nth frame is not sent at all (a seq gap downstream)
    drain_ms: int = 1000  # at a normal end: time for frames in flight to be delivered
    # CURVE server: this scanner's certificate (public + secret) and the directory of the public
    # certificates (`*.key`) of the consumers allowed to connect; unknown keys are refused (ZAP).
    curve_secret_file: Path | None = None
    curve_clients_dir: Path | None = None


CURVE_DOMAIN = "thzedge-acquisition"


def _curve_server(ctx: zmq.Context, sock: zmq.Socket, settings: EmulatorSettings) -> Any:
    """Start a ZAP authenticator with the allowed clients, then make `sock` a CURVE server (fail closed)."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    assert settings.curve_secret_file is not None
    if settings.curve_clients_dir is None or not Path(settings.curve_clients_dir).is_dir():
        raise ConfigError("a CURVE scanner needs --curve-clients DIR with the consumers' public .key files")
    try:
        public, secret = zmq.auth.load_certificate(settings.curve_secret_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{settings.curve_secret_file}: not a CURVE certificate ({exc})") from None
    if not secret:
        raise ConfigError(f"{settings.curve_secret_file} holds no secret key; give the .key_secret file")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("thzedge.scanner.zap"))
    auth.start()
    auth.configure_curve(domain=CURVE_DOMAIN, location=str(settings.curve_clients_dir))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.setsockopt(zmq.ZAP_DOMAIN, CURVE_DOMAIN.encode())
    # Without this libzmq lets handshakes through when no ZAP handler answers (libzmq #2594).
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    return auth


def source_uri_for(uri: str, rate: float | str | None) -> str:
    """Return the source URI the emulator opens: unpaced when the emulator paces itself."""
    base, _, query = uri.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    if base == "sim" or base.startswith("sim://"):
        if rate is not None:
            params.pop("fps", None)
        elif "fps" not in params:
            params["fps"] = str(DEFAULT_SIM_FPS)
    elif base.startswith("replay:") and rate is not None:
        params["rate"] = "max"
    return base + ("?" + urlencode(params) if params else "")


def _malformed_parts(frame: Frame, kind: str) -> list[bytes]:
    header = frame.header.to_dict()
    payload = frame.data.tobytes()
    if kind == "size_mismatch":
        payload = payload[:-1]
    elif kind == "bad_dtype":
        header["dtype"] = "float64"
    else:
        header["v"] = 99
    return [topic_for(frame.header.scanner), json.dumps(header).encode(), payload]


def serve(
    source: Source,
    settings: EmulatorSettings,
    stop: threading.Event | None = None,
    on_bound: Callable[[str], None] | None = None,
) -> EmulatorStats:
    """Bind, stream frames from `source` until it ends, `frames` are sent or `stop` is set.

    Creates, uses and closes its socket in the calling thread. `on_bound` receives the bound
    endpoint (useful with `tcp://127.0.0.1:*`).
    """
    stop = stop or threading.Event()
    stats = EmulatorStats()
    lockstep = settings.rate == "max" or (settings.rate is None and not source.live)
    fps = settings.rate if isinstance(settings.rate, (int, float)) else None
    ctx = zmq_context()
    sock = ctx.socket(zmq.PUSH)
    auth = None
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, settings.sndhwm)
        if settings.bind.startswith("tcp://"):
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if settings.curve_secret_file is not None:
            auth = _curve_server(ctx, sock, settings)  # the authenticator runs before the bind
        sock.bind(settings.bind)
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info(
            "scanner emulator: streaming %s on %s (%s)",
            source.uri,
            endpoint,
            "lockstep" if lockstep else f"{fps} frames/s" if fps else "source pacing",
        )
        if on_bound is not None:
            on_bound(endpoint)
        # Live: never wait. Lockstep: block for room, waking every 100 ms to check `stop`.
        flags = 0 if lockstep else zmq.NOBLOCK
        sock.setsockopt(zmq.SNDTIMEO, 100)
        t0 = time.monotonic()
        n = 0  # frames taken from the source
        last_seq: int | None = None
        scanner: str | None = None
        while not stop.is_set():
            if settings.frames is not None and n >= settings.frames:
                break
            if fps is not None:
                due = t0 + n / fps
                delay = due - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
            item = source.read(0.2)
            if item is None:
                if source.exhausted:
                    break
                continue
            if isinstance(item, MalformedFrame):
                stats.source_malformed += 1
                continue
            n += 1
            last_seq, scanner = item.header.seq, item.header.scanner
            if settings.skip_every and n % settings.skip_every == 0:
                stats.skipped += 1
                continue
            malformed = bool(settings.inject_malformed_every and n % settings.inject_malformed_every == 0)
            parts = None
            if malformed:
                kind = _MALFORMED_KINDS[stats.malformed_sent % len(_MALFORMED_KINDS)]
                parts = _malformed_parts(item, kind)
            while True:
                try:
                    if parts is not None:
                        sock.send_multipart(parts, flags=flags)
                        stats.malformed_sent += 1
                    else:
                        # Each frame is a fresh array that is never written again, so a
                        # zero-copy send cannot see it change (R-ZMQ-6); no tracker needed.
                        send_frame(sock, item.header, item.data, flags=flags)
                    stats.sent += 1
                    break
                except zmq.Again:
                    if not lockstep:
                        # Consumer queue full or no consumer: a live scanner drops, never waits.
                        stats.dropped["backpressure"] = stats.dropped.get("backpressure", 0) + 1
                        break
                    # Lockstep: the send timed out waiting for room; retry unless stopping.
                    if stop.is_set():
                        break
        stats.elapsed_s = time.monotonic() - t0
        if not stop.is_set():
            end = EndOfStream(scanner=scanner or _scanner_of(source), last_seq=last_seq, frames=stats.sent)
            stats.end_of_stream = _send_end(sock, end, stop, settings.drain_ms)
        if (lockstep or stats.end_of_stream) and not stop.is_set():
            # Linger only covers handing frames to the kernel; a peer that is still reading
            # would lose what sits in socket buffers when the connection closes, so a lockstep
            # stream keeps the connection open a little longer before it goes.
            stop.wait(settings.drain_ms / 1000)
    finally:
        # A normal end lets queued frames go out (bounded); a stop request closes at once.
        sock.close(0 if stop.is_set() else settings.drain_ms)
        if auth is not None:
            auth.stop()
    dropped = sum(stats.dropped.values())
    log.info("scanner emulator: sent %d frames, dropped %d", stats.sent, dropped)
    return stats


def _scanner_of(source: Source) -> str:
    # A source that delivered no frame still names its scanner in the end message.
    name = dict(parse_qsl(source.uri.partition("?")[2])).get("scanner", "")
    return name if name else "scanner"


def _send_end(sock: Any, end: EndOfStream, stop: threading.Event, wait_ms: int) -> bool:
    """Send the end-of-stream message; return whether it went out.

    It waits up to `wait_ms` for room, also on a live stream: it is the one message the
    consumer must not miss.
    """
    deadline = time.monotonic() + wait_ms / 1000
    while not stop.is_set():
        try:
            sock.send_multipart(encode_end_of_stream(end), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            if time.monotonic() >= deadline:
                log.warning("scanner emulator: no consumer took the end-of-stream message")
                return False
            stop.wait(0.02)
    return False


def serve_uri(
    source_uri: str,
    settings: EmulatorSettings,
    stop: threading.Event | None = None,
    on_bound: Callable[[str], None] | None = None,
) -> EmulatorStats:
    """Open `source_uri` (paced per `settings.rate`) and `serve` it; closes the source after."""
    source = open_source(source_uri_for(source_uri, settings.rate))
    try:
        return serve(source, settings, stop=stop, on_bound=on_bound)
    finally:
        source.close()


__all__ = ["EmulatorSettings", "EmulatorStats", "serve", "serve_uri", "source_uri_for"]
