"""One scanner's calibration profile: dark offset, gain, bad pixels and conditioning.

A profile is immutable and content-addressed: `profile_id` is a short sha256 of everything in
it, so a result stamped with the id says exactly which correction produced it. On disk a
profile is a directory holding `profile.json` (metadata, conditioning, id) and `arrays.npz`
(dark, gain, bad-pixel mask); loading recomputes the id and refuses a mismatch.

Format 2 (written by `thzedge calibrate build`) adds the bad-pixel class map (`defects` in
arrays.npz), the validity envelope and the QA figures; a profile without them is written, and
content-addressed, exactly as format 1 was, so old profiles keep loading with their ids.
Format 3 (`calibrate build --dark-tc`) adds a per-pixel dark temperature coefficient
(`dark_tc`, DN/°C) and its reference temperature: the dark is then `dark + dark_tc·(T − T0)` at
the frame header's sensor temperature T. Profiles without it are formats 1 and 2, unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from calibration.conditioning import ConditioningParams
from calibration.validity import ValidityEnvelope
from scanner_io.choices import Choice
from scanner_io.errors import CalibrationError, DataError
from scanner_io.npz import read_npz
from scanner_io.recording import extract_calibration

if TYPE_CHECKING:
    from scanner_io.simulator import SensorMaps

__all__ = [
    "BadPixelClass",
    "CalibrationProfile",
    "PROFILE_FORMAT",
    "ProfileChoice",
    "profile_carried_by",
    "profile_from_attachment",
    "resolve_profile",
]

PROFILE_FORMAT = 3
_FORMATS_READ = (1, 2, 3)
_JSON_NAME = "profile.json"
_ARRAYS_NAME = "arrays.npz"
# Bad pixels take the median of valid pixels within this radius (5×5 window).
_REPAIR_RADIUS = 2
# A temperature-compensated dark is recomputed when the sensor moves by this much (°C): at
# about 10 DN/°C that is 0.1 DN, far below the read noise, and it saves a map per frame.
DARK_TEMP_STEP_C = 0.01


class BadPixelClass(Choice):
    """Why a pixel is bad; its code in the profile's `defects` map is its position + 1 (0 = good)."""

    DEAD = "dead"  # no response to light
    HOT = "hot"  # dark level far above its neighbours
    FLICKERING = "flickering"  # intermittent spikes across a stack
    NOISY = "noisy"  # temporal noise far above the population
    STUCK = "stuck"  # stuck at full scale (saturated) whatever the scene

    @property
    def code(self) -> int:
        """The value this class has in a profile's `defects` map."""
        return list(BadPixelClass).index(self) + 1


# (bad flat index [B], neighbour flat index [B, K], neighbour valid [B, K], valid count [B], any empty)
RepairTable = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]


def _build_repair_table(bad: np.ndarray) -> RepairTable | None:
    """Precompute, for every bad pixel, its in-frame valid neighbours in the 5×5 window."""
    ys, xs = np.nonzero(bad)
    if len(ys) == 0:
        return None
    h, w = bad.shape
    r = _REPAIR_RADIUS
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = (dy != 0) | (dx != 0)
    dy, dx = dy[keep], dx[keep]
    ny = ys[:, None] + dy[None, :]
    nx = xs[:, None] + dx[None, :]
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    nyc, nxc = np.clip(ny, 0, h - 1), np.clip(nx, 0, w - 1)
    valid = inside & ~bad[nyc, nxc]
    idx = (nyc * w + nxc).astype(np.intp)
    counts = valid.sum(axis=1).astype(np.intp)
    return ((ys * w + xs).astype(np.intp), idx, valid, counts, bool((counts == 0).any()))


@dataclass(frozen=True, eq=False)
class CalibrationProfile:
    """One scanner's calibration; `calibrate` computes (raw − dark) · gain and repairs bad pixels."""

    scanner: str
    shape: tuple[int, int]
    dark: np.ndarray  # float32 offset (counts)
    gain: np.ndarray  # float32 per-pixel gain: corrected power per count above dark
    bad_pixels: np.ndarray  # bool mask, True = dead, hot or flickering
    conditioning: ConditioningParams = field(default_factory=ConditioningParams)
    # Free-form JSON metadata (sensor temperature at calibration, settings, …); part of the id.
    meta: Mapping[str, Any] = field(default_factory=dict)
    # Format 2: bad-pixel class per pixel (uint8, BadPixelClass.code, 0 = good), validity
    # envelope and QA figures (DSNU/PRNU, noise, counts). None in profiles made without them.
    defects: np.ndarray | None = None
    envelope: ValidityEnvelope | None = None
    qa: Mapping[str, Any] | None = None
    noise: np.ndarray | None = None  # float32 per-pixel temporal dark noise σ (counts), format 2
    # Format 3: per-pixel dark temperature coefficient (DN/°C) and the temperature `dark` is at.
    dark_tc: np.ndarray | None = None
    dark_ref_temp_c: float | None = None
    _repair: RepairTable | None = field(init=False, repr=False, compare=False, default=None)
    _id: str = field(init=False, repr=False, compare=False, default="")
    # (temperature key, dark at that temperature): the last one `dark_at` made.
    _dark_cache: tuple[float, np.ndarray] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        shape = tuple(int(v) for v in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise CalibrationError(f"profile shape must be (height, width), got {self.shape}")
        object.__setattr__(self, "shape", shape)
        arrays = {}
        for name, dtype in (("dark", np.float32), ("gain", np.float32), ("bad_pixels", np.bool_)):
            arr = np.asarray(getattr(self, name))
            if arr.shape != shape:
                raise CalibrationError(f"profile {name} has shape {arr.shape}, expected {shape}")
            arr = np.ascontiguousarray(arr, dtype=dtype)
            if dtype is np.float32 and not np.isfinite(arr).all():
                raise CalibrationError(f"profile {name} contains NaN or infinite values")
            arr.setflags(write=False)  # shared by every frame: nobody may change it in place
            arrays[name] = arr
            object.__setattr__(self, name, arr)
        if self.defects is not None:
            codes = np.ascontiguousarray(self.defects, dtype=np.uint8)
            if codes.shape != shape:
                raise CalibrationError(f"profile defects map has shape {codes.shape}, expected {shape}")
            if int(codes.max(initial=0)) > len(BadPixelClass):
                raise CalibrationError(f"profile defects map has unknown class code {int(codes.max())}")
            if not np.array_equal(codes > 0, arrays["bad_pixels"] & (codes > 0)):
                raise CalibrationError("profile defects map flags pixels the bad-pixel mask does not")
            codes.setflags(write=False)
            object.__setattr__(self, "defects", codes)
        if self.noise is not None:
            noise = np.ascontiguousarray(self.noise, dtype=np.float32)
            if noise.shape != shape or not np.isfinite(noise).all():
                raise CalibrationError(f"profile noise map must be finite with shape {shape}")
            noise.setflags(write=False)
            object.__setattr__(self, "noise", noise)
        if (self.dark_tc is None) != (self.dark_ref_temp_c is None):
            raise CalibrationError("profile dark_tc and dark_ref_temp_c come together (format 3)")
        if self.dark_tc is not None:
            tc = np.ascontiguousarray(self.dark_tc, dtype=np.float32)
            ref = float(self.dark_ref_temp_c)  # type: ignore[arg-type]
            if tc.shape != shape or not np.isfinite(tc).all() or not np.isfinite(ref):
                raise CalibrationError(
                    f"profile dark temperature coefficients must be finite with shape {shape}"
                )
            tc.setflags(write=False)
            object.__setattr__(self, "dark_tc", tc)
            object.__setattr__(self, "dark_ref_temp_c", ref)
        if self.envelope is not None and tuple(self.envelope.shape) != shape:
            raise CalibrationError(f"profile envelope is for {self.envelope.shape}, the maps are {shape}")
        try:
            json.dumps(dict(self.meta))
            json.dumps(dict(self.qa or {}))
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"profile meta and qa must be JSON-serialisable: {exc}") from exc
        object.__setattr__(self, "meta", dict(self.meta))
        if self.qa is not None:
            object.__setattr__(self, "qa", dict(self.qa))
        object.__setattr__(self, "_repair", _build_repair_table(arrays["bad_pixels"]))
        object.__setattr__(self, "_id", self._compute_id())

    # -- identity ---------------------------------------------------------------------------
    @property
    def format(self) -> int:
        """1: maps only; 2: classes, an envelope or QA figures; 3: a temperature-compensated dark."""
        if self.dark_tc is not None:
            return 3
        extended = any(v is not None for v in (self.defects, self.envelope, self.qa, self.noise))
        return 2 if extended else 1

    def _metadata(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": self.format,
            "scanner": self.scanner,
            "shape": list(self.shape),
            "conditioning": self.conditioning.to_dict(),
            "meta": self.meta,
        }
        if self.envelope is not None:
            doc["envelope"] = self.envelope.to_dict()
        if self.qa is not None:
            doc["qa"] = self.qa
        if self.dark_ref_temp_c is not None:
            doc["dark_ref_temp_c"] = self.dark_ref_temp_c
        return doc

    def _compute_id(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self._metadata(), sort_keys=True, separators=(",", ":")).encode())
        for arr in (self.dark, self.gain, self.bad_pixels.astype(np.uint8)):
            h.update(arr.tobytes())
        if self.defects is not None:
            h.update(self.defects.tobytes())
        if self.noise is not None:
            h.update(self.noise.tobytes())
        if self.dark_tc is not None:
            h.update(self.dark_tc.tobytes())
        return h.hexdigest()[:16]

    @property
    def temperature_compensated(self) -> bool:
        """True when the dark follows the sensor temperature (format 3)."""
        return self.dark_tc is not None

    def dark_model(self) -> str:
        """How the dark is applied, in words (start-up log, `calibrate` summaries)."""
        if self.dark_tc is None:
            return "fixed dark"
        fit = (self.qa or {}).get("dark_tc") or {}
        span = f", fitted over {fit['min_c']:.2f}–{fit['max_c']:.2f} °C" if "min_c" in fit else ""
        return (
            f"dark temperature-compensated ({float(np.median(self.dark_tc)):.2f} DN/°C median "
            f"from {float(self.dark_ref_temp_c or 0.0):.2f} °C{span})"
        )

    def dark_at(self, temp_c: float | None) -> np.ndarray:
        """The dark offset at sensor temperature `temp_c` (°C); `dark` itself without a model.

        A frame without a temperature (or a profile without `dark_tc`) gets `dark`, the dark at
        the profile's reference temperature. The map is rounded to DARK_TEMP_STEP_C and the last
        one kept, so a slowly warming sensor costs one multiply-add per step, not per frame.
        """
        if self.dark_tc is None or temp_c is None or not np.isfinite(temp_c):
            return self.dark
        key = round(float(temp_c) / DARK_TEMP_STEP_C) * DARK_TEMP_STEP_C
        cached = self._dark_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        dt = np.float32(key - float(self.dark_ref_temp_c))  # type: ignore[arg-type]
        dark = self.dark_tc * dt
        dark += self.dark
        dark.setflags(write=False)
        # One tuple assignment: a reader on another thread sees the old pair or the new one.
        object.__setattr__(self, "_dark_cache", (key, dark))
        return dark

    def class_mask(self, cls: BadPixelClass | str) -> np.ndarray:
        """Return the bool mask of one bad-pixel class (all False in a profile without classes)."""
        if self.defects is None:
            return np.zeros(self.shape, bool)
        return self.defects == BadPixelClass(cls).code

    def class_counts(self) -> dict[str, int]:
        """Return the number of pixels per bad-pixel class (empty without a class map)."""
        if self.defects is None:
            return {}
        return {c.value: int((self.defects == c.code).sum()) for c in BadPixelClass}

    @property
    def profile_id(self) -> str:
        """Short sha256 of the profile's content (metadata, conditioning and arrays)."""
        return self._id

    @property
    def repair_table(self) -> RepairTable | None:
        """Precomputed bad-pixel neighbour tables used by `calibrate` (None: no bad pixels)."""
        return self._repair

    @property
    def bad_pixel_fraction(self) -> float:
        """Fraction of pixels flagged bad."""
        return float(self.bad_pixels.mean())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CalibrationProfile) and other.profile_id == self.profile_id

    def __hash__(self) -> int:
        return hash(self._id)

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def identity(
        cls, scanner: str, shape: tuple[int, int], conditioning: ConditioningParams | None = None
    ) -> CalibrationProfile:
        """Return a profile that corrects nothing: zero dark, unit gain, no bad pixels."""
        shape = (int(shape[0]), int(shape[1]))
        return cls(
            scanner=scanner,
            shape=shape,
            dark=np.zeros(shape, np.float32),
            gain=np.ones(shape, np.float32),
            bad_pixels=np.zeros(shape, bool),
            conditioning=conditioning or ConditioningParams(),
        )

    def with_conditioning(self, conditioning: ConditioningParams) -> CalibrationProfile:
        """Return a copy with other conditioning parameters (and so another id)."""
        return CalibrationProfile(
            self.scanner,
            self.shape,
            self.dark,
            self.gain,
            self.bad_pixels,
            conditioning,
            self.meta,
            self.defects,
            self.envelope,
            self.qa,
            self.noise,
            self.dark_tc,
            self.dark_ref_temp_c,
        )

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the profile into directory `path` (created) and return it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        doc = self._metadata() | {"profile_id": self.profile_id}
        arrays = {"dark": self.dark, "gain": self.gain, "bad_pixels": self.bad_pixels.astype(np.uint8)}
        if self.defects is not None:
            arrays["defects"] = self.defects
        if self.noise is not None:
            arrays["noise"] = self.noise
        if self.dark_tc is not None:
            arrays["dark_tc"] = self.dark_tc
        _atomic_write(path / _ARRAYS_NAME, lambda f: np.savez_compressed(f, allow_pickle=False, **arrays))
        _atomic_write(path / _JSON_NAME, lambda f: f.write(json.dumps(doc, indent=2).encode() + b"\n"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationProfile:
        """Read a profile directory (or its profile.json); refuses a changed or foreign file."""
        path = Path(path)
        if path.is_file() and path.name == _JSON_NAME:
            path = path.parent
        json_path, arrays_path = path / _JSON_NAME, path / _ARRAYS_NAME
        if not json_path.is_file() or not arrays_path.is_file():
            raise CalibrationError(
                f"{path} is not a calibration profile (expected {_JSON_NAME} and {_ARRAYS_NAME} in it)"
            )
        try:
            doc = json.loads(json_path.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise CalibrationError(
                f"cannot read calibration profile {path}: {json_path.name}: {exc}"
            ) from None
        if not isinstance(doc, dict):
            raise CalibrationError(f"calibration profile {path}: {json_path.name} is not a JSON object")
        try:
            z = read_npz(arrays_path, ("dark", "gain", "bad_pixels"), ("defects", "noise", "dark_tc"))
        except DataError as exc:
            raise CalibrationError(f"cannot read calibration profile {path}: {exc}") from None
        dark, gain, bad = z["dark"], z["gain"], z["bad_pixels"].astype(bool)
        defects, noise = z.get("defects"), z.get("noise")
        if doc.get("format") not in _FORMATS_READ:
            raise CalibrationError(
                f"calibration profile {path} has format {doc.get('format')!r}; this thzedge reads "
                f"formats {', '.join(map(str, _FORMATS_READ))}"
            )
        try:
            profile = cls(
                scanner=str(doc["scanner"]),
                shape=tuple(doc["shape"]),
                dark=dark,
                gain=gain,
                bad_pixels=bad,
                conditioning=ConditioningParams.from_dict(doc.get("conditioning", {})),
                meta=doc.get("meta", {}),
                defects=defects,
                envelope=ValidityEnvelope.from_dict(doc["envelope"]) if doc.get("envelope") else None,
                qa=doc.get("qa"),
                noise=noise,
                dark_tc=z.get("dark_tc"),
                dark_ref_temp_c=doc.get("dark_ref_temp_c"),
            )
        except KeyError as exc:
            raise CalibrationError(f"calibration profile {path} lacks field {exc}") from exc
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            # Fields of the wrong JSON type, or arrays that do not fit them: the files are wrong.
            raise CalibrationError(
                f"calibration profile {path} is malformed ({type(exc).__name__}: {exc})"[:300]
            ) from None
        if doc.get("profile_id") != profile.profile_id:
            raise CalibrationError(
                f"calibration profile {path} does not match its id (stored {doc.get('profile_id')}, "
                f"content {profile.profile_id}): the files were changed; recalibrate or restore them"
            )
        return profile


def profile_from_attachment(name: str, data: bytes) -> CalibrationProfile:
    """Load the calibration profile a recording carries (`ReplaySource.calibration()`'s (name, bytes)).

    The recorder attaches a profile directory as a tar (scanner_io/recording.py); it is unpacked
    into a temporary directory and loaded with the usual checks (format, id). Anything that is not
    a valid profile is a CalibrationError naming the attachment.
    """
    with tempfile.TemporaryDirectory(prefix="thzedge-calibration-") as tmp:
        try:
            path = extract_calibration(name, data, tmp)
        except (tarfile.TarError, DataError, OSError, ValueError) as exc:
            raise CalibrationError(
                f"the recording's calibration attachment {name!r} cannot be unpacked ({exc}); "
                "configure the source's calibration profile instead"
            ) from exc
        try:
            return CalibrationProfile.load(path)
        except CalibrationError as exc:
            raise CalibrationError(f"the recording's calibration attachment {name!r}: {exc}") from exc


class ProfileCarrier(Protocol):
    """Anything that may carry its own calibration: a frame source, a recording being read."""

    def calibration(self) -> tuple[str, bytes] | None:
        """Return the embedded profile attachment (name, bytes), if there is one."""
        ...

    def sensor_maps(self) -> SensorMaps | None:
        """Return the sensor's true maps (only the simulator knows them), else None."""
        ...


class ProfileChoice(NamedTuple):
    """The calibration that conditions a stream, and where it came from (for the log)."""

    profile: CalibrationProfile | None  # None: identity calibration (uncorrected frames)
    origin: str

    @property
    def calibration_id(self) -> str:
        """The id stamped on results: the profile's id, or `identity`."""
        return self.profile.profile_id if self.profile is not None else "identity"


CONFIGURED = "the configured calibration profile"
ACTIVE = "the scanner's active calibration profile, set by thzedge calibrate activate"
NO_PROFILE = "no calibration profile (identity calibration)"


def profile_carried_by(source: ProfileCarrier) -> tuple[CalibrationProfile, str] | None:
    """Return (profile, origin) when a frame source carries its own calibration, else None.

    A replayed recording may embed the profile it was taken with (R-REC-2); the simulator knows
    its sensor's true maps. A recording whose attachment is not a valid profile raises
    CalibrationError.
    """
    attached = source.calibration()
    if attached is not None:
        return profile_from_attachment(*attached), "the recording's embedded calibration profile"
    maps = source.sensor_maps()
    if maps is not None:
        # calibration.simulated builds on this module (and imports OpenCV): import it on use.
        from calibration.simulated import profile_from_sensor_maps

        return profile_from_sensor_maps(maps), "the simulator's true sensor maps"
    return None


def resolve_profile(
    configured: CalibrationProfile | str | os.PathLike[str] | None,
    source: ProfileCarrier | None = None,
    carried: ProfileChoice | None = None,
    active: str | os.PathLike[str] | None = None,
) -> ProfileChoice:
    """Decide which profile conditions a stream: configured, else the scanner's active one, else
    carried by the source, else none.

    The one rule of the daemon, enrolment, `thzedge record` and INT8 calibration from
    recordings, so all of them condition a scanner's frames alike. `active` is the directory
    `thzedge calibrate activate` made current for the scanner (`calibration.active`). `carried`
    is what was read off the source already (the daemon reads it once, in the thread that owns
    the source). A bad configured or active profile or a bad attachment raises CalibrationError.
    """
    if configured is not None:
        profile = (
            configured
            if isinstance(configured, CalibrationProfile)
            else CalibrationProfile.load(Path(configured))
        )
        return ProfileChoice(profile, CONFIGURED)
    if active is not None:
        return ProfileChoice(CalibrationProfile.load(Path(active)), ACTIVE)
    if carried is not None:
        return carried
    found = profile_carried_by(source) if source is not None else None
    if found is not None:
        return ProfileChoice(*found)
    return ProfileChoice(None, NO_PROFILE)


def _atomic_write(target: Path, write: Any) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a profile."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
