"""Signed model bundles: Ed25519 over `manifest.json`, checked before anything else is read.

Checksums detect corruption, not tampering: whoever can replace a bundle file can also rewrite
its sha256 in the manifest. A signature by a key the device trusts closes that gap. The
manifest lists every file's sha256, so signing its exact bytes pins the whole bundle.

- `thzedge keys generate --kind signing` writes `NAME.sign_key` (secret, 0600; stays with the
  release engineer) and `NAME.pub` (public; goes into the devices' trusted keys directory).
- `thzedge export sign --bundle B --key NAME.sign_key` writes `B/manifest.json.sig`.
- A device with `[model] trusted_keys_dir` refuses a bundle without a signature, signed by a
  key it does not trust, or whose manifest changed after signing (exit 78).
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

from edge.bundle import MANIFEST_NAME
from scanner_io.errors import BundleError, ConfigError, MissingDependencyError, ThzEdgeError
from scanner_io.private_file import write_private

SIGNATURE_NAME = MANIFEST_NAME + ".sig"
ALGORITHM = "Ed25519"
PUBLIC_PREFIX = "thzedge-ed25519-public-v1 "
SECRET_PREFIX = "thzedge-ed25519-secret-v1 "
PUBLIC_SUFFIX = ".pub"
SECRET_SUFFIX = ".sign_key"
MAX_SIGNATURE_BYTES = 4096


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - depends on the install
        raise MissingDependencyError(
            "signed bundles need the `cryptography` package: pip install 'thzedge[secure]'"
        ) from None
    return ed25519


def key_id(public: bytes) -> str:
    """A short fingerprint of a public key, as stored in signatures and shown in messages."""
    return hashlib.sha256(b"thzedge-signing-key-id\0" + public).hexdigest()[:16]


def _write(path: Path, text: str, mode: int) -> None:
    write_private(path, text.encode(), mode)


def generate_signing_key(out_dir: Path, name: str, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write NAME.pub (0644) and NAME.sign_key (0600); return both paths and the key id."""
    ed = _ed25519()
    from cryptography.hazmat.primitives import serialization

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = out_dir / f"{name}{PUBLIC_SUFFIX}", out_dir / f"{name}{SECRET_SUFFIX}"
    if not overwrite:
        for f in (public_file, secret_file):
            if f.exists():
                raise ThzEdgeError(f"{f} exists; pass --force to overwrite it")
    secret = ed.Ed25519PrivateKey.generate()
    raw_secret = secret.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = secret.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    _write(secret_file, f"{SECRET_PREFIX}{base64.b64encode(raw_secret).decode()}\n", 0o600)
    _write(public_file, f"{PUBLIC_PREFIX}{base64.b64encode(public).decode()}\n", 0o644)
    return public_file, secret_file, key_id(public)


def _read_key(path: Path, prefix: str, what: str) -> bytes:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    if not text.startswith(prefix):
        raise ConfigError(
            f"{path} is not a thzedge {what}; create one with `thzedge keys generate --kind signing`"
        )
    try:
        raw = base64.b64decode(text[len(prefix) :], validate=True)
    except ValueError:
        raise ConfigError(f"{path}: {what} is not valid base64") from None
    if len(raw) != 32:
        raise ConfigError(f"{path}: {what} is {len(raw)} bytes, expected 32")
    return raw


def load_public_key(path: Path) -> bytes:
    """Read a NAME.pub file; returns the raw 32-byte Ed25519 public key."""
    return _read_key(path, PUBLIC_PREFIX, "signing public key")


def load_trusted_keys(directory: Path) -> dict[str, bytes]:
    """Return key id → public key for every `*.pub` in `directory`; an empty or missing one is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(
            f"[model] trusted_keys_dir {directory} does not exist; put the release keys' .pub files in it"
        )
    keys = {key_id(k): k for k in (load_public_key(f) for f in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")))}
    if not keys:
        raise ConfigError(
            f"[model] trusted_keys_dir {directory} holds no *.pub key: every bundle would be refused"
        )
    return keys


def sign_bundle(bundle_dir: Path, secret_key_file: Path) -> Path:
    """Sign the bundle's manifest.json with the key in `secret_key_file`; write manifest.json.sig."""
    ed = _ed25519()
    from cryptography.hazmat.primitives import serialization

    secret_key_file = Path(secret_key_file)
    if secret_key_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"signing key {secret_key_file} is readable by group/others; chmod 600 it")
    secret = ed.Ed25519PrivateKey.from_private_bytes(_read_key(secret_key_file, SECRET_PREFIX, "signing key"))
    manifest = Path(bundle_dir) / MANIFEST_NAME
    if not manifest.is_file():
        raise BundleError(f"{bundle_dir} is not a thzedge bundle ({MANIFEST_NAME} is missing)")
    raw = manifest.read_bytes()
    public = secret.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    record = {
        "v": 1,
        "alg": ALGORITHM,
        "key_id": key_id(public),
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "signature": base64.b64encode(secret.sign(raw)).decode(),
    }
    out = Path(bundle_dir) / SIGNATURE_NAME
    _write(out, json.dumps(record, indent=2, sort_keys=True) + "\n", 0o644)
    return out


def verify_bundle_signature(bundle_dir: Path, trusted_keys_dir: Path) -> str:
    """Check manifest.json.sig against the trusted keys; return the signer's key id or raise ConfigError."""
    ed = _ed25519()
    from cryptography.exceptions import InvalidSignature

    trusted = load_trusted_keys(trusted_keys_dir)
    bundle_dir = Path(bundle_dir)
    sig_path = bundle_dir / SIGNATURE_NAME
    hint = "sign it with `thzedge export sign --bundle B --key NAME.sign_key`"
    if not sig_path.is_file():
        raise ConfigError(
            f"bundle {bundle_dir} is not signed, and [model] trusted_keys_dir requires a signature; {hint}"
        )
    try:
        blob = sig_path.read_bytes()
        record = json.loads(blob) if len(blob) <= MAX_SIGNATURE_BYTES else None
        signature = base64.b64decode(record["signature"], validate=True)  # type: ignore[index]
        signer = str(record["key_id"])  # type: ignore[index]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"bundle {bundle_dir}: {SIGNATURE_NAME} is malformed; {hint}") from None
    if signer not in trusted:
        raise ConfigError(
            f"bundle {bundle_dir} is signed by key {signer}, which is not in [model] trusted_keys_dir "
            f"{trusted_keys_dir} (trusted: {', '.join(sorted(trusted))})"
        )
    try:
        raw = (bundle_dir / MANIFEST_NAME).read_bytes()
    except OSError as exc:
        raise ConfigError(f"bundle {bundle_dir}: cannot read {MANIFEST_NAME}: {exc.strerror}") from None
    try:
        ed.Ed25519PublicKey.from_public_bytes(trusted[signer]).verify(signature, raw)
    except InvalidSignature:
        raise ConfigError(
            f"bundle {bundle_dir}: the signature by key {signer} does not match {MANIFEST_NAME} "
            "(the bundle changed after it was signed); refusing to load it"
        ) from None
    return signer
