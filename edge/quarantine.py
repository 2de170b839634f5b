"""Keep the last rejected messages for diagnosis, encrypted, bounded (R-NEW-17).

A scanner that starts sending malformed frames is diagnosed from the frames themselves, but a
frame may show a person: each kept message is sealed under the device storage key
(`scanner_io.atrest`, AES-256-GCM) as one file `<time>-<reason>.thzq` (mode 0600) in the
quarantine directory. At most `max_frames` files and `max_bytes` bytes are kept; the oldest go
first. Without a storage key nothing is kept (one warning): rejected frames are never written
in plaintext. `read_quarantined` opens one file again (reason, seq, scanner, the parts).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanner_io.atrest import StorageKey, seal, unseal
from scanner_io.codec import MalformedFrame
from scanner_io.errors import DataError
from scanner_io.private_file import write_private

__all__ = ["QUARANTINE_KIND", "Quarantine", "QuarantinedMessage", "read_quarantined"]

log = logging.getLogger("thzedge.quarantine")

QUARANTINE_KIND = "thzedge-quarantine"
SUFFIX = ".thzq"
_LEN = struct.Struct("<I")
# A flood of rejected messages must not turn into a flood of disk writes.
MIN_INTERVAL_S = 0.05


@dataclass(frozen=True)
class QuarantinedMessage:
    """One kept message: why it was rejected, and its parts as received."""

    reason: str
    seq: int | None
    scanner: str | None
    t_ns: int
    parts: tuple[bytes, ...]


def _pack(item: MalformedFrame, t_ns: int) -> bytes:
    head = json.dumps(
        {
            "reason": item.reason,
            "seq": item.seq,
            "scanner": item.scanner,
            "t_ns": t_ns,
            "sizes": [len(p) for p in item.raw],
        },
        sort_keys=True,
    ).encode()
    return _LEN.pack(len(head)) + head + b"".join(item.raw)


def read_quarantined(path: Path, key: StorageKey) -> QuarantinedMessage:
    """Open one kept message (for diagnosis); DataError/IntegrityError when it is not intact."""
    data = unseal(Path(path).read_bytes(), key, f"quarantined message {path}", QUARANTINE_KIND)
    if len(data) < _LEN.size:
        raise DataError(f"quarantined message {path} is truncated")
    (n,) = _LEN.unpack_from(data)
    head: dict[str, Any] = json.loads(data[_LEN.size : _LEN.size + n])
    body, parts, at = data[_LEN.size + n :], [], 0
    for size in head["sizes"]:
        parts.append(body[at : at + size])
        at += size
    return QuarantinedMessage(head["reason"], head["seq"], head["scanner"], head["t_ns"], tuple(parts))


class Quarantine:
    """The bounded store of the last rejected messages (one thread, the acquisition stage, uses it)."""

    def __init__(self, directory: Path, key: StorageKey | None, max_frames: int, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.key = key
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.kept = 0
        self.skipped = 0  # not kept: no key, no bytes, too big, or too soon after the last
        self._last = 0.0
        self._warned = False
        if key is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def keep(self, item: MalformedFrame) -> bool:
        """Seal and store one rejected message, evicting the oldest; False when not kept."""
        now = time.monotonic()
        if self.key is None:
            if not self._warned:
                self._warned = True
                log.warning(
                    "quarantine %s: no storage key, rejected frames are not kept (never in plaintext)",
                    self.directory,
                )
            self.skipped += 1
            return False
        if not item.raw or now - self._last < MIN_INTERVAL_S:
            self.skipped += 1
            return False
        t_ns = time.time_ns()
        blob = seal(_pack(item, t_ns), self.key, QUARANTINE_KIND)
        if len(blob) > self.max_bytes:
            self.skipped += 1
            return False
        self._last = now
        safe_reason = "".join(c if c.isalnum() or c == "_" else "_" for c in item.reason)[:32]
        path = self.directory / f"{t_ns:020d}-{safe_reason}{SUFFIX}"
        write_private(path, blob)
        self.kept += 1
        self._evict()
        return True

    def files(self) -> list[Path]:
        """The kept messages, oldest first."""
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def _evict(self) -> None:
        files = self.files()
        sizes = [f.stat().st_size for f in files]
        total = sum(sizes)
        while files and (len(files) > self.max_frames or total > self.max_bytes):
            total -= sizes.pop(0)
            files.pop(0).unlink(missing_ok=True)
