"""Which calibration profile is active for a scanner: activation, history, resolution.

State layout (one directory per scanner name, under `calibration_state_dir()`):

    <state>/<scanner>/profiles/<profile_id>/   a copy of every profile ever activated
    <state>/<scanner>/current                  symlink → profiles/<profile_id> (swapped by rename)
    <state>/<scanner>/history.jsonl            one line per activation: time, id, previous, figures

Activation is atomic: the profile is copied and verified first, then a new symlink is made
beside `current` and renamed over it, so a reader sees the old profile or the new one, never a
half. The state directory is `$THZEDGE_CALIBRATION_DIR`, else `$STATE_DIRECTORY/calibration`
(systemd's StateDirectory= of the service), else the per-user `$XDG_STATE_HOME/thzedge/calibration`
(`~/.local/state/thzedge/calibration`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.profile import CalibrationProfile
from calibration.validity import check_stream_match
from scanner_io.errors import CalibrationError
from scanner_io.frame import FrameHeader

__all__ = [
    "ActivationLimits",
    "ActivationRecord",
    "activate_profile",
    "activation_history",
    "active_profile_path",
    "calibration_state_dir",
    "resolve_active_profile",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CURRENT = "current"
_HISTORY = "history.jsonl"


def calibration_state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the calibration state directory (explicit, env, service StateDirectory, per user)."""
    if explicit is not None:
        return Path(explicit)
    if env := os.environ.get("THZEDGE_CALIBRATION_DIR"):
        return Path(env)
    if state := os.environ.get("STATE_DIRECTORY"):
        # systemd may pass several, colon-separated; the first is the service's own.
        return Path(state.split(":")[0]) / "calibration"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "thzedge" / "calibration"


def _scanner_dir(scanner: str, state_dir: str | os.PathLike[str] | None) -> Path:
    if not _NAME.match(scanner):
        raise CalibrationError(
            f"scanner name {scanner!r} is not usable as a directory name; use letters, digits, '.', '_', '-'"
        )
    return calibration_state_dir(state_dir) / scanner


@dataclass(frozen=True)
class ActivationLimits:
    """What `activate` refuses (R-CAL-4): too many bad pixels or too much residual non-uniformity."""

    max_bad_pixel_fraction: float = 0.02
    max_residual_dsnu_dn: float = 5.0
    max_residual_prnu_pct: float = 1.0


@dataclass(frozen=True)
class ActivationRecord:
    """One line of a scanner's activation history."""

    time_utc: str
    profile_id: str
    previous: str | None
    scanner_serial: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict written to history.jsonl."""
        return {
            "time_utc": self.time_utc,
            "profile_id": self.profile_id,
            "previous": self.previous,
            "scanner_serial": self.scanner_serial,
            "figures": self.figures,
        }


def _gate(profile: CalibrationProfile, limits: ActivationLimits) -> list[str]:
    problems = []
    frac = profile.bad_pixel_fraction
    if frac > limits.max_bad_pixel_fraction:
        problems.append(f"{100 * frac:.2f} % bad pixels (limit {100 * limits.max_bad_pixel_fraction:g} %)")
    qa = profile.qa or {}
    dsnu, prnu = qa.get("residual_dsnu_dn"), qa.get("residual_prnu_pct")
    if dsnu is not None and dsnu > limits.max_residual_dsnu_dn:
        problems.append(f"residual DSNU {dsnu:.2f} DN (limit {limits.max_residual_dsnu_dn:g})")
    if prnu is not None and prnu > limits.max_residual_prnu_pct:
        problems.append(f"residual PRNU {prnu:.2f} % (limit {limits.max_residual_prnu_pct:g} %)")
    if profile.qa is None:
        problems.append("the profile has no QA figures (not made by calibrate build); cannot vouch for it")
    return problems


def active_profile_path(scanner: str, state_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the directory of the scanner's active profile, or None when none is active."""
    link = _scanner_dir(scanner, state_dir) / _CURRENT
    if not link.is_symlink() and not link.exists():
        return None
    target = link.resolve()
    return target if target.is_dir() else None


def resolve_active_profile(
    scanner: str, state_dir: str | os.PathLike[str] | None = None
) -> CalibrationProfile | None:
    """Return the scanner's active profile (loaded and id-verified), or None when none is active.

    For the daemon: called at start and on SIGHUP; a profile that fails to load is a
    CalibrationError (a tampered or half-deleted state directory must not pass silently).
    """
    path = active_profile_path(scanner, state_dir)
    return None if path is None else CalibrationProfile.load(path)


def activation_history(
    scanner: str, state_dir: str | os.PathLike[str] | None = None
) -> list[ActivationRecord]:
    """Return the scanner's activations, oldest first (empty when it never had one)."""
    path = _scanner_dir(scanner, state_dir) / _HISTORY
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(
                ActivationRecord(
                    d["time_utc"],
                    d["profile_id"],
                    d.get("previous"),
                    d.get("scanner_serial", ""),
                    d.get("figures", {}),
                )
            )
        except (ValueError, KeyError) as exc:
            raise CalibrationError(f"{path} has a malformed line ({exc}); repair or remove it") from exc
    return out


def _record(profile: CalibrationProfile, previous: str | None) -> ActivationRecord:
    qa = profile.qa or {}
    return ActivationRecord(
        time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        profile_id=profile.profile_id,
        previous=previous,
        scanner_serial=profile.scanner,
        figures={
            "bad_pixel_fraction": profile.bad_pixel_fraction,
            "residual_dsnu_dn": qa.get("residual_dsnu_dn"),
            "residual_prnu_pct": qa.get("residual_prnu_pct"),
            "sensor_temp_c": profile.envelope.sensor_temp_c if profile.envelope else None,
        },
    )


def activate_profile(
    profile_dir: str | os.PathLike[str],
    scanner: str,
    state_dir: str | os.PathLike[str] | None = None,
    header: FrameHeader | None = None,
    limits: ActivationLimits | None = None,
) -> ActivationRecord:
    """Make a profile the scanner's active one, atomically; refuses what does not fit or fails QA.

    The profile must match the scanner: against `header` (a live frame's) when given, else
    against the currently active profile's envelope (same serial, resolution, settings). Its
    bad-pixel fraction and residual non-uniformity must be within `limits` (R-CAL-4).
    """
    limits = limits or ActivationLimits()
    profile = CalibrationProfile.load(Path(profile_dir))
    if header is not None:
        match = check_stream_match(profile, header)
        if not match.ok:
            raise CalibrationError(f"refusing to activate for {scanner}: {match.reason}")
    current_path = active_profile_path(scanner, state_dir)
    current = CalibrationProfile.load(current_path) if current_path is not None else None
    if header is None and current is not None and current.envelope is not None:
        env = current.envelope
        reference = FrameHeader(
            scanner=env.scanner,
            seq=0,
            t_capture_ns=0,
            shape=env.shape,
            dtype=env.dtype,
            settings=dict(env.settings),
        )
        match = check_stream_match(profile, reference)
        if not match.ok:
            raise CalibrationError(
                f"refusing to activate for {scanner}: it does not fit the scanner the active profile "
                f"{current.profile_id} was made for: {match.reason}"
            )
    problems = _gate(profile, limits)
    if problems:
        raise CalibrationError(
            f"refusing to activate profile {profile.profile_id} for {scanner}: "
            + "; ".join(problems)
            + "; recalibrate (clean the optics, check the reference) or repair the sensor"
        )
    if current is not None and current.profile_id == profile.profile_id:
        # Already active: nothing to swap and no history line (`previous` is the profile itself).
        return _record(profile, previous=profile.profile_id)
    root = _scanner_dir(scanner, state_dir)
    dest = root / "profiles" / profile.profile_id
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{profile.profile_id}."))
        try:
            for name in ("profile.json", "arrays.npz"):
                shutil.copy2(Path(profile_dir) / name, tmp / name)
            CalibrationProfile.load(tmp)  # verify the copy before anyone can point at it
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    link = root / _CURRENT
    tmp_link = root / f".{_CURRENT}.{os.getpid()}.{time.monotonic_ns()}"
    os.symlink(Path("profiles") / profile.profile_id, tmp_link)
    os.replace(tmp_link, link)
    record = _record(profile, previous=current.profile_id if current is not None else None)
    with open(root / _HISTORY, "a") as fh:
        fh.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return record
