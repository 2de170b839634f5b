"""Retention and sharing of recordings: the sweep that deletes expired files, and redaction.

`sweep_recordings` (R-SEC-7, R-NEW-15) reads each recording's plaintext `thzedge.privacy`
record (no key needed) and deletes the files whose `expires_utc` has passed; files without a
retention are kept unless a default retention is given (then their modification time counts).

`redact_recording` (R-NEW-16) writes a copy for vendors without raw frames and without
templates: per frame only the acquisition header minus `claimed_identity` (a JSON message on
`/<scanner>/header`), the `/thzedge/events` records, the manifest and the calibration profile.
Channels of any other kind are left out (default deny).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcap.writer import CompressionType, Writer

from scanner_io.atrest import StorageKey
from scanner_io.errors import DataError, StorageError, ThzEdgeError
from scanner_io.frame import Frame
from scanner_io.recording import (
    CALIBRATION_MEDIA_TYPE,
    ENCRYPTION_NAME,
    EVENTS_TOPIC,
    MANIFEST_NAME,
    PART_SUFFIX,
    PRIVACY_NAME,
    PROFILE,
    RecordingReader,
    parse_utc,
)

log = logging.getLogger("thzedge.retention")

HEADER_ENCODING = "json"
HEADER_SCHEMA_NAME = "thzedge.RawFrameHeader"
# Header fields that identify a person: never in a redacted copy.
PERSONAL_HEADER_FIELDS = ("claimed_identity",)
# A `.part` file written to this recently belongs to a running recorder: not swept.
IN_USE_S = 60.0


@dataclass
class SweepReport:
    """What one sweep found: deleted, kept (with expiry), without retention, unreadable."""

    deleted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    no_retention: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        return dict(vars(self))

    def render(self) -> str:
        """Return one line per deleted file and a summary line."""
        verb = "would delete" if self.dry_run else "deleted"
        lines = [f"{verb} {p}" for p in self.deleted]
        lines += [f"unreadable {p}: {why}" for p, why in self.errors.items()]
        lines.append(
            f"{verb} {len(self.deleted)}, kept {len(self.kept)}, without retention {len(self.no_retention)}, "
            f"unreadable {len(self.errors)}"
        )
        return "\n".join(lines)


def _recordings(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(
                f for f in p.rglob("*") if f.is_file() and f.name.endswith((".mcap", ".mcap" + PART_SUFFIX))
            )
        elif p.is_file():
            out.append(p)
        else:
            raise ThzEdgeError(f"{p} is neither a recording nor a directory")
    return out


def expiry_of(path: Path, default_retention_s: float | None = None) -> datetime.datetime | None:
    """Return when a recording expires: its privacy record's `expires_utc`, else mtime + default."""
    reader = RecordingReader(path)
    reader.read_preamble()
    privacy = reader.metadata.get(PRIVACY_NAME, {})
    if "expires_utc" in privacy:
        try:
            return parse_utc(privacy["expires_utc"])
        except ValueError:
            raise DataError(f"{path}: malformed expires_utc {privacy['expires_utc']!r}") from None
    if default_retention_s is None:
        return None
    mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return mtime + datetime.timedelta(seconds=default_retention_s)


def sweep_recordings(
    paths: Iterable[Path],
    now: datetime.datetime | None = None,
    default_retention_s: float | None = None,
    dry_run: bool = False,
) -> SweepReport:
    """Delete the recordings in `paths` (files or directories) that are past their retention."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    report = SweepReport(dry_run=dry_run)
    for path in _recordings(paths):
        if path.name.endswith(PART_SUFFIX) and now.timestamp() - path.stat().st_mtime < IN_USE_S:
            continue  # a recorder is still writing it; the next sweep sees it
        try:
            expires = expiry_of(path, default_retention_s)
        except ThzEdgeError as exc:
            report.errors[str(path)] = str(exc)[:200]
            continue
        if expires is None:
            report.no_retention.append(str(path))
        elif expires <= now:
            if not dry_run:
                try:
                    path.unlink()
                except OSError as exc:
                    report.errors[str(path)] = f"cannot delete: {exc.strerror}"
                    continue
                log.info("deleted expired recording %s (expired %s)", path, expires.isoformat())
            report.deleted.append(str(path))
        else:
            report.kept[str(path)] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    return report


@dataclass
class RedactSummary:
    """What `redact_recording` wrote."""

    path: str
    frames: int
    events: int
    tampered_chunks: int

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        return dict(vars(self))


def redact_recording(src: Path, dst: Path, key: StorageKey | None = None) -> RedactSummary:
    """Write `dst`: `src` without raw frames and templates (headers, events, manifest, calibration)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise ThzEdgeError(f"{dst} exists; choose another --out")
    reader = RecordingReader(src, key=key)
    reader.read_preamble()
    tmp = dst.with_name(dst.name + PART_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create {tmp}: {exc.strerror}") from None
    frames = events = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            w = Writer(fh, compression=CompressionType.ZSTD)
            w.start(profile=PROFILE, library="thzedge redact")
            if MANIFEST_NAME in reader.metadata:
                w.add_metadata(MANIFEST_NAME, reader.metadata[MANIFEST_NAME])
            privacy = {
                k: v for k, v in reader.metadata.get(PRIVACY_NAME, {}).items() if k not in ("encrypted",)
            }
            privacy.update(
                {"data_classes": "headers,events", "biometric": "false", "redacted_from": src.name}
            )
            w.add_metadata(PRIVACY_NAME, privacy)
            for name, meta in reader.metadata.items():
                if name not in (MANIFEST_NAME, PRIVACY_NAME, ENCRYPTION_NAME):
                    w.add_metadata(name, meta)
            calib = reader.calibration()
            if calib is not None:
                w.add_attachment(0, 0, calib[0], CALIBRATION_MEDIA_TYPE, calib[1])
            schema = w.register_schema(HEADER_SCHEMA_NAME, "jsonschema", b'{"type": "object"}')
            channels: dict[str, int] = {}
            events_channel = w.register_channel(EVENTS_TOPIC, "json", 0)
            seen = 0
            for rec in reader.items():
                for event in reader.events[seen:]:
                    w.add_message(
                        events_channel, rec.log_time_ns, json.dumps(event).encode(), rec.log_time_ns
                    )
                    events += 1
                seen = len(reader.events)
                if not isinstance(rec.item, Frame):
                    continue
                header = {
                    k: v for k, v in rec.item.header.to_dict().items() if k not in PERSONAL_HEADER_FIELDS
                }
                scanner = rec.item.header.scanner
                if scanner not in channels:
                    channels[scanner] = w.register_channel(f"/{scanner}/header", HEADER_ENCODING, schema)
                w.add_message(
                    channels[scanner],
                    rec.log_time_ns,
                    json.dumps(header, sort_keys=True).encode(),
                    rec.item.header.t_capture_ns,
                    sequence=rec.item.header.seq & 0xFFFFFFFF,
                )
                frames += 1
            for event in reader.events[seen:]:
                w.add_message(events_channel, 0, json.dumps(event).encode(), 0)
                events += 1
            w.finish()
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"writing {dst} failed: {exc.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)
    return RedactSummary(path=str(dst), frames=frames, events=events, tampered_chunks=reader.tampered_chunks)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str, what: str = "--retention") -> float:
    """Parse `7d`, `12h`, `30m`, `90s` or plain seconds into seconds; ThzEdgeError if malformed."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:]) if t else None
    number = t[:-1] if unit is not None else t
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ThzEdgeError(f"{what} {text!r}: expected a duration such as 7d, 12h, 30m or 3600 (seconds)")
    return value
