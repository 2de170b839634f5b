"""The device storage key from the config, and the sweep that enforces recording retention.

`storage_key_from_config` finds the key ([storage] key_file, else the systemd credential or
$THZEDGE_STORAGE_KEY), makes it the process's default (galleries and recording readers find it
without a parameter) and refuses to go on without one when `require_encryption` is set.
"""

from __future__ import annotations

import logging
import threading

from edge.config import Config
from scanner_io.atrest import StorageKey, find_storage_key, use_storage_key
from scanner_io.errors import ConfigError
from scanner_io.recording import RecordingPolicy
from scanner_io.retention import SweepReport, sweep_recordings

log = logging.getLogger("thzedge.storage")


def storage_key_from_config(cfg: Config) -> StorageKey | None:
    """Return the storage key the config names (or the default places give) and make it the default."""
    key = find_storage_key(cfg.storage.key_file)
    if key is None and cfg.storage.require_encryption:
        raise ConfigError(
            "[storage] require_encryption = true, but no storage key was found: create one with "
            "`thzedge keys generate --kind storage --out DIR` and set [storage] key_file, or pass it "
            "as the systemd credential storage.key (LoadCredential=)"
        )
    use_storage_key(key)
    return key


def recording_policy(cfg: Config) -> RecordingPolicy:
    """Return consent and retention for new recordings from [storage]."""
    days = cfg.storage.retention_days
    return RecordingPolicy(
        retention_s=None if days is None else days * 86400.0,
        consent=cfg.storage.consent,
        purpose=cfg.storage.purpose,
    )


class Sweeper(threading.Thread):
    """Deletes expired recordings in [storage] sweep_dir now and every sweep_interval_s until stopped."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(name="thzedge-sweep", daemon=True)
        assert cfg.storage.sweep_dir is not None
        self.directory = cfg.storage.sweep_dir
        self.interval_s = cfg.storage.sweep_interval_s
        self.stop_event = threading.Event()
        self.reports: list[SweepReport] = []

    def run(self) -> None:
        """Sweep, then wait one interval, until `stop()`."""
        while not self.stop_event.is_set():
            try:
                report = sweep_recordings([self.directory])
                self.reports.append(report)
                if report.deleted:
                    log.info("retention sweep: deleted %d expired recording(s)", len(report.deleted))
            except Exception as exc:  # a sweep must never stop the daemon
                log.error("retention sweep of %s failed: %s", self.directory, exc)
            self.stop_event.wait(self.interval_s)

    def stop(self) -> None:
        """Stop the thread (returns at once; the sweep in progress finishes)."""
        self.stop_event.set()
