"""Revocable biometric templates (R-NEW-3): a keyed random orthogonal projection per site and epoch.

A gallery that holds plaintext embeddings is a biometric database: whoever copies it holds the
people's face features for ever. A *cancelable* template (Ratha et al. 2001; Teoh et al.,
BioHashing, 2004; Rathgeb & Uhl's 2011 survey) stores a keyed transform of the feature instead:

- **revocable**: rotating the key (a new epoch) and re-enrolling issues new templates; a template
  of the old epoch compared with a probe transformed under the new key scores like an impostor
  (two independent random rotations of the same vector are as far apart as two random vectors);
- **unlinkable**: the same person under two sites' keys gives uncorrelated templates;
- **free in accuracy**: the transform is an orthogonal matrix Q (Haar-distributed, drawn from the
  key), so ‖Qa − Qb‖ = ‖a − b‖ exactly: every distance, threshold and ROC of the plaintext
  embeddings holds unchanged (BioHashing's sign binarisation adds non-invertibility but costs
  accuracy and changes the score scale, so it is not used here).

What it does not give: Q is invertible, so the **key** is as sensitive as the plaintext gallery.
It lives in its own file (mode 0600), apart from the gallery, never in recordings, results or
logs; the gallery stores only the key's id and epoch. A stolen gallery without the key is a set
of vectors rotated by an unknown element of O(128).

Key file (`thzedge keys generate --kind template`): JSON with `kind`, `site`, `epoch`, `secret`
(32 random bytes, hex) and `created`. `key_id` is a hash of secret and epoch: it names a key
without revealing it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scanner_io.errors import ConfigError
from scanner_io.private_file import write_private

__all__ = ["SCHEME", "TemplateKey", "generate_template_key", "load_template_key"]

SCHEME = "orthogonal-projection/v1"
KIND = "thzedge-template-key"
SUFFIX = ".tkey"


@dataclass(frozen=True)
class TemplateKey:
    """One site's template key of one epoch; `project` turns unit embeddings into templates."""

    site: str
    epoch: int
    secret: bytes = field(repr=False)
    created: str = ""
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def key_id(self) -> str:
        """A public name of this key and epoch (16 hex digits; reveals nothing of the secret)."""
        h = hashlib.sha256(b"thzedge-template-key-id\0" + self.secret + self.epoch.to_bytes(8, "big"))
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What a gallery records about its key: scheme, id and epoch (never the secret)."""
        return {"scheme": SCHEME, "key_id": self.key_id, "epoch": self.epoch, "site": self.site}

    def matrix(self, dim: int) -> np.ndarray:
        """The key's orthogonal matrix Q [dim, dim] (Haar-distributed; cached per dimension)."""
        with self._lock:
            q = self._cache.get(dim)
            if q is None:
                seed = hashlib.sha256(
                    b"thzedge-template-projection\0"
                    + self.secret
                    + self.epoch.to_bytes(8, "big")
                    + dim.to_bytes(8, "big")
                ).digest()
                rng = np.random.default_rng(np.frombuffer(seed, np.uint32).astype(np.uint64).tolist())
                g = rng.standard_normal((dim, dim))
                q, r = np.linalg.qr(g)
                q = q * np.sign(np.diag(r))[None, :]  # makes the QR factor Haar-distributed
                q = np.ascontiguousarray(q, dtype=np.float32)
                q.setflags(write=False)
                self._cache[dim] = q
            return q

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Return the templates of embeddings [k, D] (or [D]): Q·e, still unit length."""
        e = np.asarray(embeddings, np.float32)
        single = e.ndim == 1
        rows = e.reshape(1, -1) if single else e
        out = rows @ self.matrix(rows.shape[1]).T
        return out[0] if single else out


def load_template_key(path: Path) -> TemplateKey:
    """Read a template key file; ConfigError (exit 78) naming what is wrong with it."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        if d.get("kind") != KIND:
            raise ValueError(f"kind is {d.get('kind')!r}, not {KIND!r}")
        secret = bytes.fromhex(d["secret"])
        if len(secret) < 16:
            raise ValueError("secret shorter than 16 bytes")
        epoch = int(d["epoch"])
        if epoch < 1:
            raise ValueError("epoch must be >= 1")
        return TemplateKey(str(d.get("site", "")), epoch, secret, str(d.get("created", "")))
    except FileNotFoundError:
        raise ConfigError(
            f"template key {path} does not exist; create one with `thzedge keys generate --kind template`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # The message never quotes the file's content: it holds the secret.
        raise ConfigError(
            f"template key {path} is not a thzedge template key ({type(exc).__name__})"
        ) from None


def generate_template_key(
    out_dir: Path, name: str = "template", rotate: bool = False, site: str = ""
) -> Path:
    """Write `<name>.tkey` (mode 0600); with `rotate`, replace an existing key by the next epoch.

    Without `rotate` an existing key is never overwritten (that would silently revoke every
    template enrolled under it).
    """
    out_dir = Path(out_dir)
    path = out_dir / f"{name}{SUFFIX}"
    epoch = 1
    if path.exists():
        if not rotate:
            raise ConfigError(
                f"{path} exists; `--rotate` replaces it by a new epoch (revoking every template "
                "enrolled under it: re-enrol afterwards)"
            )
        old = load_template_key(path)
        epoch, site = old.epoch + 1, site or old.site
    body = {
        "kind": KIND,
        "site": site,
        "epoch": epoch,
        "secret": secrets.token_bytes(32).hex(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps(body).encode())
    return path
