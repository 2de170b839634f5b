"""The one exception tree of thzedge.

It lives in the bottom layer so every package can raise from it. Messages say what was
expected, what was found and what to do; the CLI prints them as one line with no traceback.
"""

from __future__ import annotations

# Exit codes follow sysexits, as systemd units and shell scripts expect (operations.md §7.3).
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_DATA = 65
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
EXIT_IOERR = 74
EXIT_CONFIG = 78
# Not a sysexits code: the canary replay before READY failed (R-NEW-12). The unit lists it in
# RestartPreventExitStatus=, since a bundle that fails its canary fails it again on every restart.
EXIT_CANARY = 79


class ThzEdgeError(Exception):
    """Base of every error thzedge raises on purpose; carries the CLI exit code."""

    exit_code: int = EXIT_USER_ERROR


class UsageError(ThzEdgeError):
    """The command line is malformed in a way the option parser cannot see (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(ThzEdgeError):
    """A configuration file or setting is invalid (exit 78: systemd must not restart)."""

    exit_code = EXIT_CONFIG


class DataError(ThzEdgeError):
    """Input data (a recording, a dataset, an image) is malformed."""

    exit_code = EXIT_DATA


class FrameDecodeError(DataError):
    """A frame on the wire or in a recording is malformed; `reason` is a short metric label."""

    reason: str = "malformed"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class SourceUnavailableError(ThzEdgeError):
    """A frame source cannot be opened or named."""

    exit_code = EXIT_UNAVAILABLE


class ResourceBusyError(ThzEdgeError):
    """A resource another process holds right now (a port in use): retrying later may work."""

    exit_code = EXIT_UNAVAILABLE


class BundleError(ThzEdgeError):
    """A model bundle is missing, incomplete, tampered with or of an unknown format."""


class CheckpointError(ThzEdgeError):
    """A research checkpoint cannot be imported (layout, keys, shapes, unsafe pickle)."""


class CalibrationError(ThzEdgeError):
    """A calibration profile is missing, invalid or does not match the scanner."""


class StorageError(ThzEdgeError):
    """Writing or reading a file on local storage failed (disk full, I/O error): exit 74, EX_IOERR.

    Retryable (systemd's `Restart=on-failure` restarts), unlike a configuration error. `reason`
    is a short metric label: the errno name (ENOSPC, EIO, ...).
    """

    exit_code = EXIT_IOERR

    def __init__(self, message: str, reason: str = "io_error") -> None:
        super().__init__(message)
        self.reason = reason


class IntegrityError(DataError):
    """Stored data failed authentication: tampered with, or encrypted under another key (exit 65)."""


class InternalError(ThzEdgeError):
    """An invariant of thzedge itself broke (exit 70): a bug to report, not something the user did."""

    exit_code = EXIT_SOFTWARE


class MissingDependencyError(ThzEdgeError):
    """An optional dependency (torch, tensorrt, pycuda, …) is not installed; says what to install."""

    exit_code = EXIT_UNAVAILABLE


class CanaryError(ThzEdgeError):
    """The bundled canary replay gave outputs that differ from its golden digests (exit 79)."""

    exit_code = EXIT_CANARY
