"""What a device check reports: `CheckResult(name, status, detail)` (doctor, Jetson checks)."""

from __future__ import annotations

from dataclasses import dataclass

from scanner_io.choices import Choice

__all__ = ["CheckResult", "CheckStatus"]


class CheckStatus(Choice):
    """Outcome of one check: `fail` means `thzedge run` would not start (or not work)."""

    ok = "ok"
    warn = "warn"  # works, but look at it
    fail = "fail"
    skip = "skip"  # does not apply here (no GPU, no config, not a Jetson)


@dataclass(frozen=True)
class CheckResult:
    """One row of the doctor's table: what was checked, how it came out, and the detail."""

    name: str
    status: CheckStatus
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        """Return the JSON-ready form."""
        return {"name": self.name, "status": str(self.status), "detail": self.detail}
