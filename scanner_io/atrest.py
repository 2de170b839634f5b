"""Biometric data at rest: the device storage key and authenticated encryption (R-SEC-7, R-NEW-15).

Recordings (per MCAP chunk, `scanner_io.recording`) and galleries (whole file, `seal`/`unseal`)
are encrypted with AES-256-GCM under one device key. The key is a file made by
`thzedge keys generate --kind storage` (mode 0600); under systemd it is delivered with
`LoadCredential=storage.key:...` and read from `$CREDENTIALS_DIRECTORY/storage.key`, so it never
sits readable next to the data it protects. GCM authenticates every byte: a flipped bit, a
chunk moved from another file or a different key is refused (`IntegrityError`), never decoded.

`cryptography` is an optional dependency (the `secure` extra); it is imported only here, and
only when a key is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanner_io.errors import ConfigError, DataError, IntegrityError, MissingDependencyError, ThzEdgeError
from scanner_io.private_file import write_private

log = logging.getLogger("thzedge.atrest")

ALGORITHM = "AES-256-GCM"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_FILE_PREFIX = "thzedge-storage-key-v1 "
# systemd `LoadCredential=storage.key:/etc/thzedge/keys/storage.key` puts it here.
CREDENTIAL_NAME = "storage.key"
# A key file named by the environment (a shell, a test, a unit without credentials).
KEY_ENV = "THZEDGE_STORAGE_KEY"
# Sealed files (galleries) start with this, then u32 LE header length, header JSON, nonce, ciphertext.
SEALED_MAGIC = b"THZSEAL1"
_LEN = struct.Struct("<I")
MAX_SEALED_HEADER = 64 * 1024


def _aesgcm() -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:  # pragma: no cover - depends on the install
        raise MissingDependencyError(
            "encryption at rest needs the `cryptography` package: pip install 'thzedge[secure]'"
        ) from None
    return AESGCM


@dataclass(frozen=True)
class StorageKey:
    """The device's AES-256 storage key and its public id (`key_id`, safe to log and store)."""

    key: bytes = field(repr=False)
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ConfigError(f"a storage key is {KEY_BYTES} bytes, got {len(self.key)}")

    @property
    def key_id(self) -> str:
        """A short fingerprint naming the key in files and messages (not the key itself)."""
        return hashlib.sha256(b"thzedge-storage-key-id\0" + self.key).hexdigest()[:16]

    def __repr__(self) -> str:  # never print the key, even in a debug log
        return f"StorageKey(key_id={self.key_id!r}, path={str(self.path) if self.path else None!r})"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate `plaintext` (bound to `aad`); returns nonce + ciphertext + tag."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + _aesgcm()(self.key).encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes, what: str = "data") -> bytes:
        """Decrypt `blob` from `seal`; IntegrityError when it (or `aad`) was altered or the key differs."""
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise IntegrityError(f"{what}: encrypted block of {len(blob)} bytes is too short")
        from cryptography.exceptions import InvalidTag

        try:
            return bytes(_aesgcm()(self.key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad))
        except InvalidTag:
            raise IntegrityError(
                f"{what} failed authentication: tampered with, or encrypted under another key "
                f"(the configured key is {self.key_id})"
            ) from None


def generate_storage_key(path: Path, overwrite: bool = False) -> StorageKey:
    """Write a new random storage key to `path` with mode 0600 and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise ThzEdgeError(
            f"{path} exists; pass --force to overwrite it (data encrypted under it becomes unreadable)"
        )
    key = StorageKey(os.urandom(KEY_BYTES), path)
    text = f"{KEY_FILE_PREFIX}{base64.b64encode(key.key).decode()}\n"
    write_private(path, text.encode())  # never readable by others, not even briefly
    return key


def load_storage_key(path: Path) -> StorageKey:
    """Read a key file written by `generate_storage_key`; a file others can read is refused."""
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read storage key {path}: {exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"storage key {path} is accessible to group/others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
        )
    if not text.startswith(KEY_FILE_PREFIX):
        raise ConfigError(
            f"{path} is not a thzedge storage key; create one with `thzedge keys generate --kind storage`"
        )
    try:
        raw = base64.b64decode(text[len(KEY_FILE_PREFIX) :], validate=True)
    except ValueError:
        raise ConfigError(f"{path}: storage key is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{path}: storage key is {len(raw)} bytes, expected {KEY_BYTES}")
    return StorageKey(raw, path)


# The key a process configured once (the daemon or a command from its config file); found by
# `find_storage_key()` before the environment, so readers deep in a library need no parameter.
_configured: list[StorageKey | None] = [None]


def use_storage_key(key: StorageKey | None) -> None:
    """Make `key` the process's default storage key (None: back to the environment's)."""
    _configured[0] = key


def default_key_path() -> Path | None:
    """Where a key is found without configuration: $THZEDGE_STORAGE_KEY, else the systemd credential."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        p = Path(creds) / CREDENTIAL_NAME
        if p.is_file():
            return p
    return None


def find_storage_key(explicit: Path | None = None) -> StorageKey | None:
    """Return the storage key: `explicit`, else the default places (`default_key_path`), else None."""
    if explicit is None and _configured[0] is not None:
        return _configured[0]
    path = explicit if explicit is not None else default_key_path()
    return load_storage_key(path) if path is not None else None


# -- whole-file envelopes (galleries) ----------------------------------------------------------


def is_sealed(data: bytes) -> bool:
    """True when `data` is a sealed (encrypted) file."""
    return data[: len(SEALED_MAGIC)] == SEALED_MAGIC


def seal(data: bytes, key: StorageKey, kind: str, extra: Mapping[str, Any] | None = None) -> bytes:
    """Return `data` encrypted as one sealed file; the plaintext header (kind, key id) is authenticated."""
    header = json.dumps(
        {"v": 1, "kind": kind, "alg": ALGORITHM, "key_id": key.key_id, **(extra or {})}, sort_keys=True
    ).encode()
    prefix = SEALED_MAGIC + _LEN.pack(len(header)) + header
    return prefix + key.seal(data, prefix)


def sealed_header(data: bytes, what: str) -> tuple[dict[str, Any], bytes, bytes]:
    """Split a sealed file into (header, authenticated prefix, encrypted body); DataError if malformed."""
    if not is_sealed(data) or len(data) < len(SEALED_MAGIC) + _LEN.size:
        raise DataError(f"{what} is not a sealed thzedge file")
    (n,) = _LEN.unpack_from(data, len(SEALED_MAGIC))
    end = len(SEALED_MAGIC) + _LEN.size + n
    if n > MAX_SEALED_HEADER or end > len(data):
        raise IntegrityError(f"{what}: sealed header length {n} is out of bounds (file damaged)")
    try:
        header = json.loads(data[len(SEALED_MAGIC) + _LEN.size : end])
    except ValueError:
        raise IntegrityError(f"{what}: sealed header is not JSON (file damaged)") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{what}: sealed header is not a JSON object (file damaged)")
    return header, data[:end], data[end:]


def unseal(data: bytes, key: StorageKey | None, what: str, kind: str) -> bytes:
    """Decrypt a sealed file of `kind`; errors name the key ids, never the content."""
    header, prefix, body = sealed_header(data, what)
    if header.get("kind") != kind:
        raise DataError(f"{what} is a sealed {header.get('kind')!r}, not a {kind}")
    if key is None:
        raise ConfigError(
            f"{what} is encrypted (key {header.get('key_id')}); give the storage key "
            f"(--storage-key FILE where the command has it, [storage] key_file, ${KEY_ENV}, "
            f"or the systemd credential {CREDENTIAL_NAME})"
        )
    if header.get("key_id") != key.key_id:
        raise IntegrityError(
            f"{what} is encrypted under key {header.get('key_id')}, but the configured key is {key.key_id}"
        )
    return key.open(body, prefix, what)
