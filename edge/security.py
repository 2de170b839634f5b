"""CURVE encryption with a fail-closed ZAP allow-list for tcp endpoints; safe ipc socket files.

Why this order matters (operations.md §4.6): a CURVE server with no ZAP handler and the libzmq
default `ZAP_ENFORCE_DOMAIN=0` accepts *any* client that knows the server's public key. So:

1. `EndpointSecurity.from_config` loads the server certificate and starts a ZAP authenticator
   (`zmq.auth.thread.ThreadAuthenticator`) on the process's context with the allow-list of
   client public keys, **before** any socket is bound;
2. `bind()` sets `curve_server`, `ZAP_DOMAIN` and `ZAP_ENFORCE_DOMAIN=1` on the socket, so if
   the authenticator is ever gone every handshake fails instead of silently passing;
3. `reload()` (SIGHUP) re-reads the allow-list directory and swaps it in atomically (R-SEC-3).

`ipc://` endpoints are protected by the file system: the socket file gets mode 0600 (or 0660
with a configured group) right after bind, in a directory created 0700 (R-NEW-2).

Key files use the ZeroMQ certificate format (`thzedge keys generate`, compatible with
`zmq.auth.load_certificate`); a file holding just a 40-character Z85 key is accepted too.
"""

from __future__ import annotations

import contextlib
import datetime
import grp
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from edge.config import CurveConfig, PublisherConfig, SourceConfig
from scanner_io.errors import ConfigError, SourceUnavailableError, ThzEdgeError
from scanner_io.private_file import write_private
from scanner_io.sources import CurveClientKeys

log = logging.getLogger("thzedge.security")

DEFAULT_DOMAIN = "thzedge"


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair as Z85 bytes; `secret` is None for a public-only certificate."""

    public: bytes
    secret: bytes | None = None

    def __repr__(self) -> str:  # never print a secret key, even in a debug log
        return f"KeyPair(public={self.public.decode()!r}, secret={'<set>' if self.secret else None})"


def curve_available() -> bool:
    """True when this libzmq was built with CURVE support."""
    return bool(zmq.has("curve"))


def generate_keys(out_dir: Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `<name>.key` (public, 0644) and `<name>.key_secret` (both keys, 0600) into `out_dir`."""
    if not curve_available():
        raise ThzEdgeError("this libzmq has no CURVE support; install a pyzmq wheel built with libsodium")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = out_dir / f"{name}.key", out_dir / f"{name}.key_secret"
    if not overwrite:
        for f in (public_file, secret_file):
            if f.exists():
                raise ThzEdgeError(f"{f} exists; pass --force to overwrite it (old clients stop working)")
    public, secret = zmq.curve_keypair()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write_cert(public_file, public, None, now, 0o644)
    _write_cert(secret_file, public, secret, now, 0o600)
    return public_file, secret_file


def load_keypair(path: Path, need_secret: bool = True) -> KeyPair:
    """Read a certificate (or a bare Z85 key) file; a secret key is required unless told otherwise."""
    path = Path(path)
    try:
        text = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(text) == 40 and b"\n" not in text:  # a bare Z85 key
        if not _is_z85_key(text):
            raise ConfigError(f"{path}: not a valid 40-character Z85 CURVE key")
        if need_secret:
            try:
                return KeyPair(public=zmq.curve_public(text), secret=text)
            except (zmq.ZMQError, ValueError):
                raise ConfigError(f"{path}: not a valid Z85 CURVE secret key") from None
        return KeyPair(public=text)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{path}: not a ZeroMQ certificate ({exc}); create one with `thzedge keys generate`"
        ) from None
    if not _is_z85_key(public) or (secret is not None and not _is_z85_key(secret)):
        raise ConfigError(
            f"{path}: not a ZeroMQ certificate (no valid 40-character Z85 public-key/secret-key); "
            "create one with `thzedge keys generate`"
        )
    if need_secret and not secret:
        raise ConfigError(f"{path} holds only a public key; the server needs its .key_secret file")
    if secret is not None and zmq.curve_public(secret) != public:
        raise ConfigError(f"{path}: its public key does not belong to its secret key; regenerate the pair")
    if need_secret:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "secret key file %s is readable by group/others (mode %o); chmod 600 it", path, mode & 0o777
            )
    return KeyPair(public=public, secret=secret)


def source_curve_keys(src: SourceConfig) -> CurveClientKeys | None:
    """The CURVE client keys of a tcp source, when configured (the scanner is the CURVE server).

    One rule for every command that opens a configured source: `run`, `record`, `enroll`.
    """
    if not src.curve:
        return None
    assert src.curve_server_key is not None and src.curve_client_key is not None
    if not curve_available():
        raise ConfigError("[sources] curve_server_key is set, but this libzmq has no CURVE support")
    server = load_keypair(src.curve_server_key, need_secret=False)
    client = load_keypair(src.curve_client_key)
    assert client.secret is not None  # load_keypair(need_secret=True) guarantees it
    log.info("source %s: CURVE client of scanner key %s", src.uri, server.public.decode())
    return CurveClientKeys(server_public=server.public, public=client.public, secret=client.secret)


def _is_z85_key(key: bytes | None) -> bool:
    """True for a 40-character Z85 text that decodes to a 32-byte CURVE key."""
    if not isinstance(key, bytes) or len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def check_curve_files(curve: CurveConfig) -> int:
    """Load what [publisher.curve] names, as the daemon will; return the number of allowed clients.

    `config validate` runs this so a garbage certificate, a public certificate given as the
    secret, or a missing clients directory fail there (exit 78), not at the daemon's start.
    """
    if not curve.enabled:
        return 0
    if not curve_available():
        raise ConfigError("[publisher.curve] enabled, but this libzmq has no CURVE support")
    assert curve.secret_key_file is not None and curve.allowed_clients_dir is not None  # edge.config
    load_keypair(curve.secret_key_file)
    return len(load_allowed_clients(curve.allowed_clients_dir))


def load_allowed_clients(directory: Path) -> frozenset[bytes]:
    """Return the Z85 public keys of every `*.key` certificate in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(
            f"allowed clients directory {directory} does not exist; create it and put client .key files in it"
        )
    keys = set()
    for f in sorted(directory.glob("*.key")):
        keys.add(load_keypair(f, need_secret=False).public)
    return frozenset(keys)


class ClientAllowList:
    """ZAP credentials provider: allows exactly the keys currently loaded; counts decisions."""

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._keys = frozenset(keys)
        self._lock = threading.Lock()
        self.allowed = 0
        self.denied = 0

    def replace(self, keys: Iterable[bytes]) -> None:
        """Swap the whole allow-list at once."""
        self._keys = frozenset(keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> frozenset[bytes]:
        """The Z85 public keys allowed now."""
        return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the ZAP authenticator for each CURVE handshake with the client's Z85 key."""
        ok = key in self._keys
        with self._lock:
            if ok:
                self.allowed += 1
            else:
                self.denied += 1
        if not ok:
            log.warning(
                "CURVE client rejected: public key %s is not in the allow-list", key.decode(errors="replace")
            )
        return ok


class EndpointSecurity:
    """Binds sockets securely: CURVE + enforced ZAP on tcp, file permissions on ipc."""

    def __init__(
        self,
        context: zmq.Context,
        server_keys: KeyPair | None = None,
        allowed_clients_dir: Path | None = None,
        domain: str = DEFAULT_DOMAIN,
        insecure_dev: bool = False,
        ipc_mode: int = 0o600,
        ipc_group: str | None = None,
    ) -> None:
        self.context = context
        self.server_keys = server_keys
        self.allowed_clients_dir = Path(allowed_clients_dir) if allowed_clients_dir else None
        self.domain = domain
        self.insecure_dev = insecure_dev
        self.ipc_mode = ipc_mode
        self.ipc_group = ipc_group
        self.allow_list = ClientAllowList()
        self.authenticator: ThreadAuthenticator | None = None
        # Counts reloads that revoked a key: a socket bound through this object rebinds when it
        # changes, so a revoked client that is still connected is cut off (R-SEC-3).
        self.revocations = 0

    @classmethod
    def from_config(
        cls, context: zmq.Context, publisher: PublisherConfig, insecure_dev: bool = False
    ) -> EndpointSecurity:
        """Load keys and start the authenticator as the config says (before anything binds)."""
        curve: CurveConfig = publisher.curve
        keys = None
        if curve.enabled:
            if not curve_available():
                raise ConfigError("[publisher.curve] enabled, but this libzmq has no CURVE support")
            assert curve.secret_key_file is not None  # validated by edge.config
            keys = load_keypair(curve.secret_key_file)
        sec = cls(
            context,
            server_keys=keys,
            allowed_clients_dir=curve.allowed_clients_dir,
            domain=curve.domain,
            insecure_dev=insecure_dev,
            ipc_mode=publisher.ipc_mode,
            ipc_group=publisher.ipc_group,
        )
        if keys is not None:
            sec.start()
        return sec

    # -- authenticator ------------------------------------------------------------------------

    def start(self) -> None:
        """Load the allow-list and start the ZAP authenticator thread (idempotent)."""
        if self.authenticator is not None:
            return
        if self.allowed_clients_dir is None:
            raise ConfigError("CURVE needs an allowed clients directory (public keys of permitted consumers)")
        self.allow_list.replace(load_allowed_clients(self.allowed_clients_dir))
        if not len(self.allow_list):
            log.warning(
                "CURVE allow-list %s is empty: every client will be rejected", self.allowed_clients_dir
            )
        auth = ThreadAuthenticator(self.context, log=logging.getLogger("thzedge.zap"))
        auth.start()
        auth.configure_curve_callback(domain=self.domain, credentials_provider=self.allow_list)
        self.authenticator = auth
        log.info(
            "ZAP authenticator running for domain %r with %d client key(s)", self.domain, len(self.allow_list)
        )

    def reload(self) -> int:
        """Re-read the allow-list directory (SIGHUP); a broken directory keeps the old list and raises."""
        if self.allowed_clients_dir is None or self.authenticator is None:
            return 0
        keys = load_allowed_clients(self.allowed_clients_dir)
        revoked = self.allow_list.keys - keys
        self.allow_list.replace(keys)
        if revoked:
            # ZAP only judges new handshakes: the sockets this protects are rebound (see
            # `revocations`), which drops every connection; allowed clients reconnect.
            self.revocations += 1
            log.warning(
                "CURVE allow-list reloaded: %d key(s) revoked; dropping connected clients", len(revoked)
            )
        log.info("CURVE allow-list reloaded: %d client key(s)", len(keys))
        return len(keys)

    def close(self) -> None:
        """Stop the authenticator; call after the sockets it protects are closed."""
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    @property
    def authenticator_running(self) -> bool:
        return self.authenticator is not None and self.authenticator.is_alive()

    # -- binding -----------------------------------------------------------------------------

    def __call__(self, sock: zmq.Socket, endpoint: str) -> str:
        """Bind (this object is the publisher's binder); see `bind`."""
        return self.bind(sock, endpoint)

    def bind(self, sock: zmq.Socket, endpoint: str) -> str:
        """Bind `sock` to `endpoint` with the protection its transport needs; return the endpoint."""
        if endpoint.startswith("tcp://"):
            return self._bind_tcp(sock, endpoint)
        if endpoint.startswith("ipc://"):
            return self._bind_ipc(sock, endpoint)
        sock.bind(endpoint)  # inproc: never leaves the process
        return endpoint

    def _bind_tcp(self, sock: zmq.Socket, endpoint: str) -> str:
        if self.server_keys is None:
            if not self.insecure_dev:
                raise ConfigError(
                    f"refusing to bind {endpoint} without CURVE: enable [publisher.curve] or set "
                    "[daemon] insecure_dev = true for development (R-SEC-1)"
                )
            log.warning("binding %s WITHOUT encryption or authentication (insecure_dev)", endpoint)
            sock.bind(endpoint)
            return _last_endpoint(sock, endpoint)
        # Fail closed: never bind a CURVE server unless the ZAP handler is up (R-SEC-2).
        if not self.authenticator_running:
            raise ThzEdgeError(f"refusing to bind {endpoint}: the ZAP authenticator is not running")
        secure_server_socket(sock, self.server_keys, self.domain)
        sock.bind(endpoint)
        bound = _last_endpoint(sock, endpoint)
        log.info("bound %s with CURVE (domain %r)", bound, self.domain)
        return bound

    def _bind_ipc(self, sock: zmq.Socket, endpoint: str) -> str:
        path = Path(endpoint[len("ipc://") :])
        if not path.is_absolute() or str(path).startswith("@"):
            raise ConfigError(
                f"{endpoint}: use an absolute socket path (abstract sockets have no permissions)"
            )
        prepare_ipc_dir(path.parent, group=self.ipc_group)
        if ipc_socket_is_live(path):
            # libzmq would unlink the live file and bind anyway, silently cutting the other
            # process's subscribers off.
            raise SourceUnavailableError(
                f"{endpoint} is in use by another running process (a second daemon?); "
                "give this one its own endpoint with --publish or [publisher] endpoint"
            )
        sock.bind(endpoint)
        secure_ipc_file(path, self.ipc_mode, self.ipc_group)
        return endpoint

    def __enter__(self) -> EndpointSecurity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def secure_server_socket(sock: zmq.Socket, keys: KeyPair, domain: str = DEFAULT_DOMAIN) -> None:
    """Make `sock` a CURVE server that demands ZAP approval (set before bind)."""
    if keys.secret is None:
        raise ConfigError("a CURVE server needs its secret key")
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    # Without this libzmq lets handshakes through when no ZAP handler answers (libzmq #2594).
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def secure_client_socket(sock: zmq.Socket, server_public: bytes, client: KeyPair) -> None:
    """Make `sock` a CURVE client of a server with public key `server_public` (set before connect)."""
    if client.secret is None:
        raise ConfigError("a CURVE client needs its own secret key")
    sock.curve_serverkey = server_public
    sock.curve_publickey = client.public
    sock.curve_secretkey = client.secret


def ipc_socket_is_live(path: Path) -> bool:
    """Return True when a process accepts connections on the unix socket at `path`.

    A file left behind by a crashed process refuses the connection and is not live.
    """
    if not path.is_socket():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def prepare_ipc_dir(directory: Path, group: str | None = None) -> None:
    """Create the socket directory 0700 (0750 with a group) if missing; refuse one others control.

    Missing parents are created 0700 too. An existing directory must belong to this user (or to
    root and be writable by root only, or sticky like /tmp): in a directory another user owns or
    may write to, that user could swap the socket and receive the consumers' connections.
    """
    if not directory.exists():
        missing = [d for d in (directory, *directory.parents) if not d.exists()]
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another instance made it meanwhile
                d.mkdir(mode=0o700)
            _check_ipc_dir(d)
        if group:
            os.chmod(directory, 0o750)
            os.chown(directory, -1, _gid(group))
        return
    _check_ipc_dir(directory)


def _check_ipc_dir(directory: Path) -> None:
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"ipc socket directory {directory} is not a directory (a symlink?); use a private one"
        )
    mode, me = st.st_mode, os.geteuid()
    writable_by_others = mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX
    if st.st_uid not in (me, 0):
        raise ConfigError(
            f"ipc socket directory {directory} belongs to uid {st.st_uid}, not to this user (uid {me}): "
            "another user could take over the socket; remove it, or set RuntimeDirectory= / "
            "XDG_RUNTIME_DIR, or use an ipc:// path in a directory of your own"
        )
    if writable_by_others:
        raise ConfigError(
            f"ipc socket directory {directory} is writable by group or others (mode {stat.S_IMODE(mode):o}); "
            "chmod go-w it or use a private directory"
        )


def secure_ipc_file(path: Path, mode: int = 0o600, group: str | None = None) -> None:
    """Set the socket file's mode (and group) so only the owner (and that group) can connect."""
    if group:
        os.chown(path, -1, _gid(group))
    os.chmod(path, mode)


def _gid(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"[publisher] ipc_group {group!r} does not exist on this host") from None


def _last_endpoint(sock: zmq.Socket, fallback: str) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT) or fallback


def _write_cert(path: Path, public: bytes, secret: bytes | None, created: str, mode: int) -> None:
    kind = "secret (keep private)" if secret else "public"
    lines = [
        f"#   ****  thzedge CURVE certificate: {kind}  ****",
        "#   ZeroMQ CURVE certificate format; zmq.auth.load_certificate reads it.",
        "metadata",
        '    created-by = "thzedge keys generate"',
        f'    created = "{created}"',
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    write_private(path, ("\n".join(lines) + "\n").encode(), mode)
