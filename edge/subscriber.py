"""One results subscriber for thzedge's own consumers (`tail`, `view`): where to connect, and how.

`resolve_target` turns an endpoint or a config source name into a `SubscriberTarget` (the
endpoint and, for tcp, the CURVE keys from the config); `ResultsSubscriber` connects a SUB
socket to it and yields decoded messages (`edge.results.decode_message`, docs/protocol.md).
A subscriber is one more consumer of the daemon's PUB socket: when it falls behind it loses its
own messages at its high-water mark and the daemon never waits for it (live sources).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq

from edge.config import Config, load_config
from edge.results import EVENT_TOPIC_PREFIX, RESULT_TOPIC_PREFIX, DecodedMessage, decode_message
from edge.security import KeyPair, load_keypair, secure_client_socket
from scanner_io.errors import ConfigError, UsageError

log = logging.getLogger("thzedge.subscriber")

# Where systemd puts an instance's RuntimeDirectory (systemd/thzedge@.service: thzedge/%i).
SYSTEMD_RUNTIME_ROOT = Path("/run/thzedge")


@dataclass(frozen=True)
class SubscriberTarget:
    """Where the results are published and the CURVE keys a tcp connection needs (None: plain)."""

    endpoint: str
    server_public: bytes | None = None
    client: KeyPair | None = None

    @property
    def curve(self) -> bool:
        """True when the connection is CURVE-encrypted."""
        return self.server_public is not None


def resolve_target(endpoint: str | None, config: Path | None, source: str | None) -> SubscriberTarget:
    """Find the results endpoint: given, or the one the daemon for config source `source` binds.

    For a source name the config's `[publisher] endpoint` is read with the environment that
    `thzedge@NAME.service` gives the daemon (RUNTIME_DIRECTORY=/run/thzedge/NAME, when that
    directory exists), so the default ipc socket is found without naming it. A tcp endpoint
    is CURVE-secured when `[publisher.curve]` is enabled: the server's public key comes from its
    certificate and the client's pair from `client_key_file`.
    """
    if endpoint is not None and source is not None:
        raise UsageError("give an ENDPOINT or --source NAME, not both")
    if endpoint is None and source is not None:
        runtime = SYSTEMD_RUNTIME_ROOT / source
        if "RUNTIME_DIRECTORY" not in os.environ and runtime.is_dir():
            os.environ["RUNTIME_DIRECTORY"] = str(runtime)
    cfg = load_config(config)
    if source is not None and source not in cfg.sources:
        known = ", ".join(sorted(cfg.sources)) or "none"
        raise ConfigError(
            f"unknown source {source!r} in {cfg.path or 'the built-in defaults'}; known: {known}"
        )
    target = endpoint or cfg.publisher.endpoint
    if "://" not in target:
        raise UsageError(f"{target!r} is not an endpoint: expected ipc://PATH or tcp://HOST:PORT")
    return _with_keys(target, cfg)


def _with_keys(endpoint: str, cfg: Config) -> SubscriberTarget:
    curve = cfg.publisher.curve
    if not endpoint.startswith("tcp://") or not curve.enabled:
        return SubscriberTarget(endpoint)
    if curve.secret_key_file is None or curve.client_key_file is None:
        raise ConfigError(
            "[publisher.curve] is enabled: set client_key_file (a key pair from `thzedge keys generate "
            "--name NAME` whose public .key is in allowed_clients_dir) to subscribe over tcp"
        )
    server = load_keypair(curve.secret_key_file, need_secret=False)
    client = load_keypair(curve.client_key_file, need_secret=True)
    return SubscriberTarget(endpoint, server_public=server.public, client=client)


class ResultsSubscriber:
    """A SUB socket on the results endpoint; use from one thread (the one that made it)."""

    def __init__(
        self,
        target: SubscriberTarget,
        ctx: zmq.Context | None = None,
        results: bool = True,
        events: bool = True,
        rcvhwm: int = 1000,
    ) -> None:
        self.target = target
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self.sock = self._ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.malformed = 0
        try:
            if target.server_public is not None:
                assert target.client is not None  # resolve_target gives both or neither
                secure_client_socket(self.sock, target.server_public, target.client)
            if results:
                self.sock.setsockopt(zmq.SUBSCRIBE, RESULT_TOPIC_PREFIX.encode())
            if events:
                self.sock.setsockopt(zmq.SUBSCRIBE, EVENT_TOPIC_PREFIX.encode())
            self.sock.connect(target.endpoint)
        except BaseException:
            self.close()
            raise

    def receive(self, timeout_s: float) -> DecodedMessage | None:
        """Return the next decoded message, or None when none came within `timeout_s`.

        A message that does not follow the protocol is counted in `malformed` and skipped.
        """
        if not self.sock.poll(max(0, int(timeout_s * 1000))):
            return None
        parts = self.sock.recv_multipart()
        try:
            return decode_message(parts)
        except (ValueError, UnicodeDecodeError) as exc:
            self.malformed += 1
            log.debug("skipping a message that does not follow the results protocol: %s", exc)
            return None

    def drain(self) -> Iterator[DecodedMessage]:
        """Yield every message already queued, without waiting."""
        while True:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                yield decode_message(parts)
            except (ValueError, UnicodeDecodeError):
                self.malformed += 1

    def close(self) -> None:
        """Close the socket (linger 0), and the context when this subscriber made it."""
        self.sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> ResultsSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
