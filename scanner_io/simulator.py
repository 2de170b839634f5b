"""Active-THz face scanner simulator with ground truth (docs/simulator.md has the model).

Real THz face data is not public, so this simulator makes every later stage testable with
known truth. One frame is made in four steps, all vectorised numpy/cv2:

1. **Geometry** (cached per identity and posture): a parametric head (ellipsoid plus brow,
   eye sockets, nose, cheeks, lips, chin, jaw, ears, hair, beard) sampled on a (θ, φ) grid,
   rotated to the posture and z-buffered into per-pixel normals and material maps.
2. **Scene**: active THz at 340 GHz is strongly specular — the return is ρ·cos(n,beam)^m with
   a large m plus a weak diffuse term — so only surfaces facing the beam light up. A cloth layer
   (concealment) attenuates the face two-way with its own folds and weave and adds its own
   faint return. Per-capture pose jitter rotates the normals and shifts/scales/rolls the head.
3. **Capture**: optical blur, coherent speckle (L looks) and source-power fluctuation.
4. **Sensor**: per-pixel dark offset and gain (with column pattern), temperature drift, read
   noise, dead/hot/flickering pixels, 16-bit saturation → raw uint16 counts.

Everything is deterministic for (seed, identity, posture, sample): each capture draws from its
own seeded generator, so the order of calls never changes a frame.

Everything here is raw: frames in counts, truth as powers and the sensor's own maps
(`SensorMaps`). Turning those into calibration profiles, conditioned crops and datasets is the
calibration package's job (calibration/simulated.py); scanner_io never imports calibration.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from scanner_io.choices import Choice
from scanner_io.errors import ConfigError
from scanner_io.frame import POSTURES, Frame, FrameHeader

__all__ = [
    "DEFECT_CLASSES",
    "Capture",
    "HeadParams",
    "Scene",
    "SceneTruth",
    "SensorMaps",
    "SimConfig",
    "SimTruth",
    "ScannerSimulator",
    "full_defects_config",
    "identity_name",
    "POSTURE_ANGLES",
]

_DEG = math.pi / 180.0
# Nominal (yaw, pitch) in degrees per posture class, in POSTURES order. Positive yaw turns the
# face towards the image's right edge (the subject's own left, facing the scanner); positive
# pitch lifts the chin.
POSTURE_ANGLES: tuple[tuple[float, float], ...] = (
    (0.0, 0.0),
    (35.0, 0.0),
    (-35.0, 0.0),
    (0.0, 25.0),
    (0.0, -25.0),
)
# Seed-sequence tags, so each random stream is independent of the others.
_TAG_IDENTITY, _TAG_SENSOR, _TAG_POSE, _TAG_CLOTH, _TAG_NOISE, _TAG_STREAM = 11, 12, 13, 14, 15, 16
_TAG_DEFECTS, _TAG_SCENE, _TAG_NOISY, _TAG_SESSION = 17, 18, 19, 20
# Bad-pixel classes of the sensor model, in the order calibration reports them.
DEFECT_CLASSES: tuple[str, ...] = ("dead", "hot", "flickering", "noisy", "stuck")
_STREAM_SAMPLE_OFFSET = 1 << 20  # stream frames never reuse a dataset sample number
# Each capture session's stream samples live in their own block, so two sessions never share a
# pose, a cloth or a speckle pattern (session 0's block is the historical one).
_SESSION_SAMPLE_STRIDE = 1 << 24
# A session's sensor starts this far from the calibration temperature (uniform, °C): another
# day, another room temperature. Session 0 starts at the calibration temperature.
SESSION_TEMP_RANGE_C: tuple[float, float] = (-2.0, 3.0)
_BOX = 104  # geometry is rendered in a _BOX×_BOX head box (raw pixels at scale 1)
_HEAD_Y = 0.42  # head centre sits at this fraction of the box height; the neck fills below


class Scene(Choice):
    """What the scanner looks at: a person, the closed shutter, or a uniform reference reflector."""

    FACE = "face"
    DARK = "dark"  # shutter closed / absorber: dark signal only
    FLAT = "flat"  # uniform reference reflector at a power level


def identity_name(index: int) -> str:
    """Return the dataset / claimed-identity name of identity `index` (0-based): id001, id002…"""
    return f"id{index + 1:03d}"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimConfig:
    """Physics and sensor parameters of the simulator (defaults: a 340 GHz active FPA scanner)."""

    # Imaging
    peak_power: float = 20000.0  # calibrated power of a skin facet facing the beam (counts)
    specular_exponent: float = 40.0  # cos^m lobe: ~10° half width at half maximum
    diffuse: float = 0.003  # diffuse skin return relative to the specular peak
    psf_sigma_px: float = 0.7  # optical blur (diffraction-limited spot)
    looks: int = 2  # speckle looks of one capture (1 = fully developed speckle)
    reference_looks: int = 32  # frames averaged for the unconcealed reference (target) capture
    source_jitter_db: float = 0.5  # capture-to-capture source power fluctuation (σ, dB)
    # Pose jitter (σ, degrees / pixels / relative scale)
    jitter_angle_deg: float = 2.5
    jitter_roll_deg: float = 2.0
    jitter_shift_px: float = 4.0
    jitter_scale: float = 0.02
    # Concealment (cloth)
    cloth_attenuation_db: tuple[float, float] = (3.0, 7.0)  # two-way, range over materials
    cloth_return: float = 0.02  # cloth's own return relative to the skin peak
    # Sensor
    dark_counts: float = 1500.0
    dark_sigma: float = 120.0
    column_sigma: float = 40.0  # fixed column pattern (line-scan readout)
    gain_sigma: float = 0.08  # pixel response non-uniformity (relative)
    read_noise: float = 14.0  # counts, per capture
    dead_fraction: float = 0.003
    hot_fraction: float = 0.002
    flicker_fraction: float = 0.002
    flicker_probability: float = 0.2  # chance a flickering pixel spikes to 60000 in one frame
    # Temperature drift (stream only; `render` captures at the calibration temperature)
    reference_temp_c: float = 35.0
    drift_c: float = 3.0  # warm-up amplitude over the stream
    drift_frames: float = 3000.0  # warm-up time constant, frames
    dark_tc: float = 10.0  # mean dark change per °C (counts), per-pixel spread 30 %
    gain_tc: float = -0.002  # relative responsivity change per °C
    # Further defect classes, off by default so the default sensor's frames stay as they were
    # (`full_defects_config()` turns them on). Drawn from their own seeded stream.
    noisy_fraction: float = 0.0  # pixels whose temporal noise is several times the read noise
    noisy_factor: tuple[float, float] = (5.0, 10.0)  # their noise σ, in read-noise units
    stuck_fraction: float = 0.0  # pixels stuck at full scale (65535) whatever the scene
    defect_clusters: bool = False  # one 3×3 dead cluster and one dead column segment
    # Calibration scenes: the reference reflector returns flat_power × level, uniformly; its
    # source is power-stabilised (a calibration target, not a moving person).
    flat_power: float = 20000.0
    flat_source_jitter_db: float = 0.05


def full_defects_config(**changes: Any) -> SimConfig:
    """Return a SimConfig with every defect class on (noisy, stuck, a cluster and a column too)."""
    return replace(SimConfig(noisy_fraction=0.002, stuck_fraction=0.001, defect_clusters=True), **changes)


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadParams:
    """One identity's parametric head; angles in degrees, radii in raw pixels, bumps relative."""

    radii: tuple[float, float, float]  # half width, half height, half depth
    jaw: float  # width of the lower face relative to the skull
    brow_theta: float
    brow_amp: float
    eye_theta: float
    eye_phi: float
    eye_depth: float
    eye_size: float
    nose_tip_theta: float
    nose_amp: float
    nose_width: float
    cheek_amp: float
    cheek_phi: float
    mouth_theta: float
    mouth_width: float
    lip_amp: float
    chin_theta: float
    chin_amp: float
    chin_width: float
    ear_theta: float
    ear_amp: float
    ear_size: float
    hairline_theta: float
    hair_side_phi: float
    hair_spec: float
    beard: float  # specular factor under a beard (1 = none)
    skin_db: float  # skin reflectivity offset (moisture), dB
    texture: tuple[tuple[float, float, float, float], ...]  # (amp dB, kθ, kφ, phase) skin patches

    @classmethod
    def sample(cls, rng: np.random.Generator) -> HeadParams:
        """Draw one identity from the population distribution."""
        u = rng.uniform
        has_beard = rng.random() < 0.35
        return cls(
            radii=(u(22.0, 30.0), u(28.0, 37.0), u(25.0, 33.0)),
            jaw=u(0.72, 0.98),
            brow_theta=u(68.0, 76.0),
            brow_amp=u(0.02, 0.09),
            eye_theta=u(80.0, 88.0),
            eye_phi=u(16.0, 25.0),
            eye_depth=u(0.04, 0.12),
            eye_size=u(6.0, 10.0),
            nose_tip_theta=u(100.0, 110.0),
            nose_amp=u(0.12, 0.30),
            nose_width=u(5.0, 10.0),
            cheek_amp=u(0.0, 0.08),
            cheek_phi=u(28.0, 42.0),
            mouth_theta=u(116.0, 124.0),
            mouth_width=u(10.0, 20.0),
            lip_amp=u(0.02, 0.08),
            chin_theta=u(134.0, 145.0),
            chin_amp=u(0.0, 0.12),
            chin_width=u(10.0, 22.0),
            ear_theta=u(88.0, 100.0),
            ear_amp=u(0.10, 0.30),
            ear_size=u(7.0, 12.0),
            hairline_theta=u(30.0, 68.0),
            hair_side_phi=u(55.0, 100.0),
            hair_spec=u(0.03, 0.4),
            beard=u(0.15, 0.5) if has_beard else 1.0,
            skin_db=u(-1.5, 1.5),
            texture=tuple((u(1.0, 2.5), u(-4.0, 4.0), u(-4.0, 4.0), u(0.0, 2 * math.pi)) for _ in range(3)),
        )


def _gauss(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mu) / sigma) ** 2)


def _smoothstep(x: np.ndarray, a: float, b: float) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class _Geometry:
    """One identity in one posture, rendered into the head box (all maps _BOX×_BOX float32)."""

    nx: np.ndarray
    ny: np.ndarray
    nz: np.ndarray
    spec: np.ndarray  # specular reflectivity (0 outside the head)
    diff: np.ndarray  # diffuse reflectivity
    theta: np.ndarray  # head-surface coordinates (radians), for cloth and hair
    phi: np.ndarray
    head: np.ndarray  # 1 on the head, 0 on the neck and background
    mask: np.ndarray  # 1 on head or neck


def _head_surface(p: HeadParams, n_theta: int = 150, n_phi: int = 300) -> dict[str, np.ndarray]:
    """Sample the head surface: points, outward normals and materials on a (θ, φ) grid."""
    th = np.linspace(0.5, 179.5, n_theta) * _DEG
    ph = np.linspace(-180.0, 180.0, n_phi, endpoint=False) * _DEG
    T, F = np.meshgrid(th, ph, indexing="ij")
    td, fd = T / _DEG, F / _DEG
    afd = np.abs(fd)
    front = np.exp(-((fd / 60.0) ** 4))  # facial features live on the front half
    bump = np.zeros_like(T)
    bump += p.brow_amp * _gauss(td, p.brow_theta, 5.0) * np.exp(-((fd / 38.0) ** 4))
    bump -= p.eye_depth * _gauss(td, p.eye_theta, p.eye_size * 0.8) * _gauss(afd, p.eye_phi, p.eye_size)
    ramp = np.clip((td - p.eye_theta) / (p.nose_tip_theta - p.eye_theta), 0.0, 1.0) ** 1.5
    below = np.exp(-0.5 * (np.maximum(td - p.nose_tip_theta, 0.0) / 3.5) ** 2)
    bump += p.nose_amp * ramp * below * _gauss(fd, 0.0, p.nose_width)
    bump += p.cheek_amp * _gauss(td, 100.0, 10.0) * _gauss(afd, p.cheek_phi, 12.0)
    bump += p.lip_amp * _gauss(td, p.mouth_theta, 3.5) * _gauss(fd, 0.0, p.mouth_width)
    bump -= 0.02 * _gauss(td, p.mouth_theta + 2.0, 1.2) * _gauss(fd, 0.0, p.mouth_width)
    bump += p.chin_amp * _gauss(td, p.chin_theta, 6.0) * _gauss(fd, 0.0, p.chin_width)
    bump += p.ear_amp * _gauss(td, p.ear_theta, p.ear_size) * _gauss(afd, 90.0, p.ear_size * 0.6)
    hair = (1.0 - _smoothstep(td, p.hairline_theta - 4.0, p.hairline_theta + 4.0)) * front + (1.0 - front) * (
        1.0 - _smoothstep(td, 80.0, 95.0)
    ) * _smoothstep(afd, p.hair_side_phi - 10.0, p.hair_side_phi + 10.0)
    hair = np.maximum(hair, 1.0 - front * (1.0 - _smoothstep(afd, 110.0, 130.0)))  # back of the head
    bump += 0.04 * hair
    # The lower face narrows towards the jaw; the chin region sits below the skull ellipsoid.
    sx = 1.0 - (1.0 - p.jaw) * _smoothstep(td, 100.0, 165.0)
    ax, ay, az = p.radii
    r = 1.0 + bump
    st = np.sin(T)
    pts = np.stack([ax * sx * st * np.sin(F) * r, ay * np.cos(T) * r, az * st * np.cos(F) * r], axis=-1)
    d_th = np.gradient(pts, axis=0)
    d_ph = np.roll(pts, -1, axis=1) - np.roll(pts, 1, axis=1)
    nrm = np.cross(d_ph, d_th)
    flip = (nrm * pts).sum(-1) < 0
    nrm[flip] *= -1.0
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True) + 1e-9
    tex_db = p.skin_db + sum(a * np.sin(kt * T + kp * F + c) for a, kt, kp, c in p.texture)
    beard = np.where(
        (p.beard < 1.0), 1.0 - (1.0 - p.beard) * _smoothstep(td, 112.0, 122.0) * (afd < 70.0), 1.0
    )
    spec = 10.0 ** (tex_db / 10.0) * (1.0 - hair * (1.0 - p.hair_spec)) * beard
    diff = np.ones_like(spec) * (1.0 + 1.5 * hair)
    return {"pts": pts, "nrm": nrm, "spec": spec, "diff": diff, "theta": T, "phi": F}


def _rotation(yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix: yaw about y, then pitch about x, then roll about z (camera frame)."""
    y, p, r = yaw_deg * _DEG, pitch_deg * _DEG, roll_deg * _DEG
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    # Positive pitch lifts the chin: the face normal tilts up (towards image top, +y).
    rx = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _render_geometry(
    p: HeadParams, yaw: float, pitch: float, surf: dict[str, np.ndarray] | None = None
) -> _Geometry:
    """Rotate the head to (yaw, pitch) about the neck pivot and z-buffer it into the head box."""
    if surf is None:
        surf = _head_surface(p)
    ax, ay, az = p.radii
    rot = _rotation(yaw, pitch)
    pivot = np.array([0.0, -0.6 * ay, -0.1 * az])
    pts = (surf["pts"].reshape(-1, 3) - pivot) @ rot.T + pivot
    nrm = surf["nrm"].reshape(-1, 3) @ rot.T
    attrs = [surf[k].reshape(-1) for k in ("spec", "diff", "theta", "phi")]
    head_flag = np.ones(len(pts))
    # Neck: a fixed cylinder under the head (it does not turn with the head).
    rn = 0.62 * ax
    ys = np.linspace(-0.45 * ay, -1.7 * ay, 50)
    fs = np.linspace(-180.0, 180.0, 240, endpoint=False) * _DEG
    Y, Fn = np.meshgrid(ys, fs, indexing="ij")
    neck_pts = np.stack([rn * np.sin(Fn), Y, 0.9 * rn * np.cos(Fn) - 0.15 * az], axis=-1).reshape(-1, 3)
    neck_nrm = np.stack([np.sin(Fn), np.zeros_like(Fn), np.cos(Fn)], axis=-1).reshape(-1, 3)
    n_neck = len(neck_pts)
    pts = np.concatenate([pts, neck_pts])
    nrm = np.concatenate([nrm, neck_nrm])
    neck_attr = [np.full(n_neck, 0.12), np.ones(n_neck), np.full(n_neck, math.pi * 0.95), Fn.reshape(-1)]
    attrs = [np.concatenate([a, b]) for a, b in zip(attrs, neck_attr, strict=True)]
    head_flag = np.concatenate([head_flag, np.zeros(n_neck)])
    # Back-facing points can never win the z-buffer: drop them before the sort.
    keep = nrm[:, 2] > -0.3
    pts, nrm, head_flag = pts[keep], nrm[keep], head_flag[keep]
    attrs = [a[keep] for a in attrs]
    cx, cy = _BOX / 2.0, _BOX * _HEAD_Y
    ix = np.rint(cx + pts[:, 0]).astype(np.int64)
    iy = np.rint(cy - pts[:, 1]).astype(np.int64)
    inside = (ix >= 0) & (ix < _BOX) & (iy >= 0) & (iy < _BOX)
    pix = (iy * _BOX + ix)[inside]
    depth = pts[inside, 2]
    order = np.lexsort((depth, pix))
    pix_sorted = pix[order]
    last = np.r_[pix_sorted[1:] != pix_sorted[:-1], True]
    win = np.nonzero(inside)[0][order[last]]
    win_pix = pix_sorted[last]
    maps = []
    values = [nrm[:, 0], nrm[:, 1], nrm[:, 2], *attrs, head_flag]
    hit = np.zeros(_BOX * _BOX, np.float32)
    hit[win_pix] = 1.0
    for v in values:
        m = np.zeros(_BOX * _BOX, np.float32)
        m[win_pix] = v[win]
        maps.append(m.reshape(_BOX, _BOX))
    hit2 = hit.reshape(_BOX, _BOX)
    # Fill pinholes inside the silhouette with the mean of their hit neighbours.
    closed = cv2.morphologyEx(hit2, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    holes = (closed > 0) & (hit2 == 0)
    if holes.any():
        k = np.ones((3, 3), np.float32)
        wsum = cv2.filter2D(hit2, -1, k, borderType=cv2.BORDER_CONSTANT)
        for plane in maps:
            s = cv2.filter2D(plane * hit2, -1, k, borderType=cv2.BORDER_CONSTANT)
            plane[holes] = (s[holes] / np.maximum(wsum[holes], 1.0)).astype(np.float32)
        hit2 = np.maximum(hit2, holes.astype(np.float32))
    nx, ny, nz, spec, diff, theta, phi, head = maps
    norm = np.sqrt(nx * nx + ny * ny + nz * nz) + 1e-6
    nx, ny, nz = nx / norm * hit2, ny / norm * hit2, nz / norm * hit2
    return _Geometry(
        nx=nx,
        ny=ny,
        nz=nz,
        spec=spec * hit2,
        diff=diff * hit2,
        theta=theta,
        phi=phi,
        head=head * hit2,
        mask=hit2,
    )


# ---------------------------------------------------------------------------------------------
# Truth and the simulator
# ---------------------------------------------------------------------------------------------
@dataclass
class SimTruth:
    """Ground truth of one simulated frame (never sent on the wire).

    `dark`/`gain`/`bad_pixels` are the sensor's actual correction maps for this frame (at its
    temperature), in profile terms: calibrating the raw frame with them recovers `power` up to
    read noise. `reference` is the raw unconcealed, frame-averaged capture of the same pose at
    the calibration temperature, made on first access (calibration.simulated conditions it into
    the reconstruction target at this frame's ROI).
    """

    identity: int
    identity_name: str
    posture: int
    sample: int
    concealed: bool
    pose: tuple[float, float, float]  # yaw, pitch, roll in degrees (nominal + jitter)
    head_center: tuple[float, float]  # x, y in raw pixels
    sensor_temp_c: float
    power: np.ndarray  # float32 incident power incl. speckle (what calibration should recover)
    clean: np.ndarray  # float32 noise-free scene power (no speckle, no sensor)
    dark: np.ndarray
    gain: np.ndarray
    bad_pixels: np.ndarray
    claimed_identity: str | None = None
    _reference_fn: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    _reference: np.ndarray | None = field(default=None, repr=False)

    @property
    def posture_name(self) -> str:
        return POSTURES[self.posture]

    @property
    def reference(self) -> np.ndarray:
        """Raw uint16 unconcealed reference capture of this pose (frame-averaged, calibration temperature)."""
        if self._reference is None:
            if self._reference_fn is None:
                raise ValueError("this truth has no reference capture")
            self._reference = self._reference_fn()
        return self._reference


@dataclass(frozen=True)
class SceneTruth:
    """Ground truth of one calibration-scene frame (dark or flat; never sent on the wire).

    `power` is the incident power (zero for dark), `dark`/`gain`/`bad_pixels` the sensor's actual
    maps at this frame's temperature, as in `SimTruth`.
    """

    scene: Scene
    level: float
    sensor_temp_c: float
    power: np.ndarray
    dark: np.ndarray
    gain: np.ndarray
    bad_pixels: np.ndarray


@dataclass(frozen=True, eq=False)
class SensorMaps:
    """A simulated sensor's true correction maps, as plain arrays (no conditioning, no profile).

    `dark` is the offset in counts, `gain` the correction gain (power per count above dark),
    `bad_pixels` the dead/hot/flickering mask; `meta` says where the maps come from (JSON-ready).
    calibration.simulated.profile_from_sensor_maps turns them into a CalibrationProfile.
    """

    scanner: str
    shape: tuple[int, int]
    dark: np.ndarray  # float32 counts
    gain: np.ndarray  # float32 power per count above dark
    bad_pixels: np.ndarray  # bool
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Sensor:
    dark: np.ndarray  # counts at the reference temperature
    resp: np.ndarray  # counts per unit power at the reference temperature
    dark_tc: np.ndarray  # counts per °C
    dead: np.ndarray
    hot: np.ndarray
    flicker: np.ndarray
    hot_level: np.ndarray
    noisy: np.ndarray | None = None  # the optional classes (SimConfig.noisy_fraction, …)
    noisy_sigma: np.ndarray | None = None  # extra temporal noise σ of each noisy pixel (counts)
    stuck: np.ndarray | None = None
    bad: np.ndarray = field(init=False)
    dead_idx: np.ndarray = field(init=False)
    hot_idx: np.ndarray = field(init=False)
    flicker_idx: np.ndarray = field(init=False)
    noisy_idx: np.ndarray = field(init=False)
    stuck_idx: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        none = np.zeros_like(self.dead)
        if self.noisy is None:
            object.__setattr__(self, "noisy", none)
        if self.stuck is None:
            object.__setattr__(self, "stuck", none)
        bad = self.dead | self.hot | self.flicker | self.noisy | self.stuck
        bad.setflags(write=False)
        object.__setattr__(self, "bad", bad)
        for name in ("dead", "hot", "flicker", "noisy", "stuck"):
            object.__setattr__(self, f"{name}_idx", np.flatnonzero(getattr(self, name)))


@dataclass(frozen=True)
class Capture:
    """One raw capture and its truth, before it is wrapped into a Frame."""

    raw: np.ndarray  # uint16 counts
    power: np.ndarray  # float32 incident power incl. speckle and source fluctuation
    clean: np.ndarray  # float32 noise-free scene power
    pose: tuple[float, float, float]  # yaw, pitch, roll in degrees
    center: tuple[float, float]  # head centre, raw pixels
    temp: float  # sensor temperature, °C
    dark: np.ndarray  # the sensor's dark offset at `temp`
    gain: np.ndarray  # the sensor's correction gain at `temp`


class ScannerSimulator:
    """A simulated active-THz face scanner; deterministic for a seed.

    `next_frame()` streams concealed captures of random identities and postures with sensor
    temperature drift; `render()` makes one specific capture at the calibration temperature
    (what datasets are written from). Both carry a `SimTruth` in `frame.truth`.
    """

    def __init__(
        self,
        seed: int = 0,
        identities: int = 20,
        scanner: str = "sim0",
        shape: tuple[int, int] = (128, 128),
        *,
        config: SimConfig | None = None,
        concealed_fraction: float = 1.0,
        drift: bool = True,
        claim_identity: bool = False,
        impostor_rate: float = 0.0,
        start_time_ns: int | None = None,
        nominal_fps: float = 30.0,
        cache_size: int = 400,
        scene: Scene | str = Scene.FACE,
        level: float = 1.0,
        temp_offset_c: float = 0.0,
        gain_drift: float = 0.0,
        session: int = 0,
        people: tuple[int, ...] | None = None,
    ) -> None:
        if identities < 1:
            raise ConfigError(f"simulator identities must be >= 1, got {identities}")
        if session < 0:
            raise ConfigError(f"simulator session must be >= 0, got {session}")
        if people is not None:
            people = tuple(dict.fromkeys(int(k) for k in people))  # ordered, no repeats
            if not people or min(people) < 0:
                raise ConfigError(f"simulator people must be a non-empty set of indices >= 0, got {people}")
            identities = max(identities, max(people) + 1)
        shape = (int(shape[0]), int(shape[1]))
        if min(shape) < 16:
            raise ConfigError(f"simulator frame shape must be at least 16×16, got {shape}")
        if not 0.0 <= concealed_fraction <= 1.0 or not 0.0 <= impostor_rate <= 1.0:
            raise ConfigError(
                f"concealed_fraction ({concealed_fraction}) and impostor_rate ({impostor_rate}) "
                "must be in [0, 1]"
            )
        try:
            self.scene = Scene(scene)
        except ValueError:
            raise ConfigError(
                f"simulator scene must be one of {', '.join(Scene.values())}, got {scene!r}"
            ) from None
        if not (math.isfinite(level) and level >= 0.0):
            raise ConfigError(f"simulator flat level must be a finite number >= 0, got {level}")
        if not (math.isfinite(temp_offset_c) and math.isfinite(gain_drift) and gain_drift > -1.0):
            raise ConfigError(
                f"temp_offset_c ({temp_offset_c}) must be finite and gain_drift ({gain_drift}) > -1"
            )
        self.level = float(level)
        # Forced sensor changes, so drift checks can be tested: a temperature offset moves the
        # dark level (and the header's sensor_temp_c); gain_drift scales the responsivity.
        self.temp_offset_c = float(temp_offset_c)
        self.gain_drift = float(gain_drift)
        self.seed = int(seed)
        self.identities = int(identities)
        # Who walks past: identity indices the stream draws from (default: all `identities`).
        self.people: tuple[int, ...] = people if people is not None else tuple(range(self.identities))
        self.session = int(session)
        # Another session is another day: its sensor starts at another temperature.
        self.session_temp_c = (
            0.0
            if self.session == 0
            else float(
                np.random.default_rng([self.seed, _TAG_SESSION, self.session]).uniform(*SESSION_TEMP_RANGE_C)
            )
        )
        self.scanner = scanner
        self.shape = shape
        self.config = config or SimConfig()
        self._scale = min(shape) / 128.0  # the head keeps its share of the frame
        self.concealed_fraction = float(concealed_fraction)
        self.drift = drift
        self.claim_identity = claim_identity
        self.impostor_rate = float(impostor_rate)
        self.start_time_ns = start_time_ns
        self.nominal_fps = float(nominal_fps)
        self._seq = 0  # header seq: every frame made, stream or render
        self._stream_index = 0  # stream position: drives temperature and stream samples
        self._stream_rng = np.random.default_rng(
            [self.seed, _TAG_STREAM] if self.session == 0 else [self.seed, _TAG_STREAM, self.session]
        )
        # The visit under way: its number (-1 before the first), position in `people`, frames
        # left, and the identity claimed for the whole visit (claims are made per passage).
        self._visit: tuple[int, int, int, str | None] = (-1, 0, 0, None)
        self._heads: dict[int, HeadParams] = {}
        self._lock = threading.RLock()
        self._geo: OrderedDict[tuple[int, int], _Geometry] = OrderedDict()
        self._surface: tuple[int, dict[str, np.ndarray]] = (-1, {})  # the last identity's surface
        self._cache_size = max(5, int(cache_size))
        self._sensor = self._make_sensor()
        self._speckle_kernel_norm = self._speckle_norm()
        self._true_maps = self._maps(self._sensor.dark, 1.0 / self._sensor.resp, self.config.reference_temp_c)

    # -- identities and geometry --------------------------------------------------------------
    def identity_params(self, identity: int) -> HeadParams:
        """Return the parametric head of identity `identity` (independent of `identities`)."""
        with self._lock:
            if identity not in self._heads:
                rng = np.random.default_rng([self.seed, _TAG_IDENTITY, int(identity)])
                self._heads[identity] = HeadParams.sample(rng)
            return self._heads[identity]

    def _geometry(self, identity: int, posture: int) -> _Geometry:
        # A lock, because a frame's lazy `truth.reference` may be read on another thread than
        # the one streaming; everything else in a capture is a pure function of its seeds.
        with self._lock:
            return self._geometry_locked(identity, posture)

    def _geometry_locked(self, identity: int, posture: int) -> _Geometry:
        key = (identity, posture)
        geo = self._geo.get(key)
        if geo is None:
            yaw, pitch = POSTURE_ANGLES[posture]
            if self._surface[0] != identity:
                self._surface = (identity, _head_surface(self.identity_params(identity)))
            geo = _render_geometry(self.identity_params(identity), yaw, pitch, self._surface[1])
            self._geo[key] = geo
            if len(self._geo) > self._cache_size:
                self._geo.popitem(last=False)
        else:
            self._geo.move_to_end(key)
        return geo

    # -- sensor -------------------------------------------------------------------------------
    def _make_sensor(self) -> _Sensor:
        c = self.config
        rng = np.random.default_rng([self.seed, _TAG_SENSOR])
        h, w = self.shape
        col = rng.normal(0.0, c.column_sigma, (1, w))
        dark = c.dark_counts + rng.normal(0.0, c.dark_sigma, (h, w)) + col
        # Responsivity: smooth vignetting times per-pixel non-uniformity.
        yy, xx = np.mgrid[0:h, 0:w]
        r2 = ((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2
        resp = (1.0 - 0.25 * r2) * (1.0 + rng.normal(0.0, c.gain_sigma, (h, w)))
        resp = np.clip(resp, 0.5, 1.5)
        dark_tc = c.dark_tc * (1.0 + 0.3 * rng.standard_normal((h, w)))
        u = rng.random((h, w))
        dead = u < c.dead_fraction
        hot = (u >= c.dead_fraction) & (u < c.dead_fraction + c.hot_fraction)
        flicker = (u >= c.dead_fraction + c.hot_fraction) & (
            u < c.dead_fraction + c.hot_fraction + c.flicker_fraction
        )
        hot_level = rng.uniform(15000.0, 50000.0, (h, w))
        f32 = np.float32
        extra = self._extra_defects(dead | hot | flicker)
        return _Sensor(
            dark=np.clip(dark, 0, 60000).astype(f32),
            resp=resp.astype(f32),
            dark_tc=dark_tc.astype(f32),
            dead=dead | extra["dead"],
            hot=hot,
            flicker=flicker,
            hot_level=hot_level.astype(f32),
            noisy=extra["noisy"],
            noisy_sigma=extra["noisy_sigma"],
            stuck=extra["stuck"],
        )

    def _extra_defects(self, taken: np.ndarray) -> dict[str, np.ndarray]:
        """Draw the optional defect classes from their own stream, on pixels not already bad."""
        c = self.config
        h, w = self.shape
        rng = np.random.default_rng([self.seed, _TAG_DEFECTS])
        u = rng.random((h, w))
        free = ~taken
        noisy = free & (u < c.noisy_fraction)
        stuck = free & (u >= c.noisy_fraction) & (u < c.noisy_fraction + c.stuck_fraction)
        lo, hi = c.noisy_factor
        noisy_sigma = (rng.uniform(lo, hi, (h, w)) * c.read_noise).astype(np.float32)
        dead = np.zeros((h, w), bool)
        if c.defect_clusters:
            # A 3×3 dead cluster and a dead column segment, away from the frame edges.
            cy, cx = int(rng.integers(8, h - 8)), int(rng.integers(8, w // 2))
            dead[cy - 1 : cy + 2, cx - 1 : cx + 2] = True
            col = int(rng.integers(w // 2 + 4, w - 8))
            y0 = int(rng.integers(0, h // 4))
            dead[y0 : y0 + h // 2, col] = True
            dead &= free
            noisy &= ~dead
            stuck &= ~dead
        return {"dead": dead, "noisy": noisy, "noisy_sigma": noisy_sigma, "stuck": stuck}

    def defect_maps(self) -> dict[str, np.ndarray]:
        """Return the sensor's true bad-pixel mask per class (`DEFECT_CLASSES`), read-only bool."""
        s = self._sensor
        out = {}
        for name, arr in zip(DEFECT_CLASSES, (s.dead, s.hot, s.flicker, s.noisy, s.stuck), strict=True):
            arr = np.array(arr, dtype=bool)
            arr.setflags(write=False)
            out[name] = arr
        return out

    def _speckle_norm(self) -> float:
        # E|h * (a + ib)|² = 2·Σh² for unit-variance white a, b: normalise speckle to mean 1.
        k = cv2.getGaussianKernel(9, 0.7)
        kernel_2d = k @ k.T
        return float(1.0 / (2.0 * np.square(kernel_2d).sum()))

    def temperature_at(self, index: int) -> float:
        """Sensor temperature (°C) at stream frame `index`: a warm-up plus a slow wobble."""
        c = self.config
        base = c.reference_temp_c + self.temp_offset_c + self.session_temp_c
        if not self.drift:
            return base
        warm = c.drift_c * (1.0 - math.exp(-index / c.drift_frames))
        return base + warm + 0.2 * math.sin(2 * math.pi * index / 900.0)

    def session_start_temp_c(self) -> float:
        """Sensor temperature at the start of this session's stream (where a day's calibration is made)."""
        return self.temperature_at(0)

    def seek(self, index: int) -> None:
        """Move the stream to frame `index` (e.g. past the warm-up); header seq keeps increasing."""
        self._stream_index = max(0, int(index))

    def sensor_maps(self, temp_c: float | None = None) -> SensorMaps:
        """Return the maps the sensor actually has at `temp_c` (default: the calibration temperature).

        At the calibration temperature these are the sensor's true calibration: what a perfect
        dark/reference calibration would measure (calibration.simulated makes the profile).
        """
        c = self.config
        if (temp_c is None or temp_c == c.reference_temp_c) and self.gain_drift == 0.0:
            return self._true_maps
        if temp_c is None:
            temp_c = c.reference_temp_c
        dt = np.float32(temp_c - c.reference_temp_c)
        dark = self._sensor.dark + dt * self._sensor.dark_tc
        resp = self._sensor.resp * np.float32((1.0 + c.gain_tc * float(dt)) * (1.0 + self.gain_drift))
        return self._maps(dark.astype(np.float32), (1.0 / resp).astype(np.float32), temp_c)

    def _maps(self, dark: np.ndarray, gain: np.ndarray, temp_c: float) -> SensorMaps:
        arrays = []
        for arr in (dark, gain):
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            arr.setflags(write=False)  # shared by every frame's truth
            arrays.append(arr)
        return SensorMaps(
            scanner=self.scanner,
            shape=self.shape,
            dark=arrays[0],
            gain=arrays[1],
            bad_pixels=self._sensor.bad,
            meta={"source": "simulator", "seed": self.seed, "sensor_temp_c": temp_c},
        )

    # -- one capture --------------------------------------------------------------------------
    def _pose(
        self, identity: int, posture: int, sample: int
    ) -> tuple[float, float, float, float, float, float]:
        c = self.config
        rng = np.random.default_rng([self.seed, _TAG_POSE, identity, posture, sample])
        dyaw, dpitch = rng.normal(0.0, c.jitter_angle_deg, 2)
        roll = rng.normal(0.0, c.jitter_roll_deg)
        dx, dy = rng.normal(0.0, c.jitter_shift_px, 2)
        scale = 1.0 + rng.normal(0.0, c.jitter_scale)
        return float(dyaw), float(dpitch), float(roll), float(dx), float(dy), float(scale)

    def _scene(
        self,
        geo: _Geometry,
        dyaw: float,
        dpitch: float,
        concealed: bool,
        cloth_rng: np.random.Generator | None,
    ) -> np.ndarray:
        """Reflected power in the head box for one capture (no speckle, no sensor)."""
        c = self.config
        f32 = np.float32
        rot = _rotation(dyaw, dpitch)
        nz = f32(rot[2, 0]) * geo.nx + f32(rot[2, 1]) * geo.ny + f32(rot[2, 2]) * geo.nz
        np.clip(nz, f32(0.0), f32(1.0), out=nz)
        lobe = nz ** f32(c.specular_exponent)
        skin = f32(c.peak_power) * (geo.spec * lobe + f32(c.diffuse) * geo.diff * nz)
        if not concealed:
            return skin
        assert cloth_rng is not None
        r = cloth_rng
        th, ph = geo.theta, geo.phi
        # Python floats keep the maths in float32 (a numpy float64 scalar would promote it).
        # Coverage: a hood/scarf from a random upper edge down over the neck, wrapping the sides.
        top = float(r.uniform(40.0, 75.0)) * _DEG
        cover = _smoothstep(th, top - 0.06, top + 0.06) * geo.mask
        # Folds: a few random sinusoids on the head surface; thickness varies ±40 %.
        k = r.normal(0.0, 6.0, (4, 2)).tolist()
        amp = r.uniform(0.15, 0.5, 4).tolist()
        phase = r.uniform(0.0, 2 * math.pi, 4).tolist()
        folds = np.zeros_like(th)
        for (kt, kp), a, c0 in zip(k, amp, phase, strict=True):
            folds += f32(a) * np.sin(f32(kt) * th + f32(kp) * ph + f32(c0))
        atten_db = float(r.uniform(*c.cloth_attenuation_db))
        weave = r.standard_normal(th.shape, dtype=f32) * f32(0.6)  # dB, per pixel
        t_db = f32(atten_db) * (f32(1.0) + f32(0.4) * folds) + weave
        ln10_10 = f32(math.log(10.0) / 10.0)
        trans = np.exp(-ln10_10 * t_db * cover)
        crest = np.maximum(folds, f32(0.0))
        crest *= crest
        nz2 = nz * nz
        cloth = (
            f32(c.peak_power * c.cloth_return)
            * cover
            * (nz2 * nz2)
            * (f32(0.5) + f32(2.5) * crest)
            * np.exp(f32(2.0) * ln10_10 * weave)
        )
        skin *= trans
        skin += cloth
        return skin

    def _place(
        self, box: np.ndarray, roll: float, dx: float, dy: float, scale: float
    ) -> tuple[np.ndarray, tuple[float, float]]:
        h, w = self.shape
        s = scale * self._scale
        center = (w / 2.0 + dx * self._scale, h * 0.47 + dy * self._scale)
        src_c = (_BOX / 2.0, _BOX * _HEAD_Y)
        m = cv2.getRotationMatrix2D(src_c, roll, s)
        m[0, 2] += center[0] - src_c[0]
        m[1, 2] += center[1] - src_c[1]
        out = cv2.warpAffine(
            box, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        return out, center

    def capture(
        self,
        identity: int,
        posture: int,
        sample: int,
        concealed: bool = True,
        reference: bool = False,
        temp_c: float | None = None,
        seq: int = 0,
    ) -> Capture:
        """Make one raw capture (no Frame, no header seq used): the building block of every frame.

        `reference=True` is the frame-averaged capture (`SimConfig.reference_looks`) used as the
        reconstruction target; `temp_c` defaults to the calibration temperature; `seq` keys the
        noise (0 for `render`, the stream index for `next_frame`).
        """
        c = self.config
        if temp_c is None:
            temp_c = c.reference_temp_c
        if not 0 <= posture < len(POSTURES):
            raise ValueError(f"posture must be 0..{len(POSTURES) - 1}, got {posture}")
        geo = self._geometry(identity, posture)
        dyaw, dpitch, roll, dx, dy, scale = self._pose(identity, posture, sample)
        cloth_rng = (
            np.random.default_rng([self.seed, _TAG_CLOTH, identity, posture, sample]) if concealed else None
        )
        box = self._scene(geo, dyaw, dpitch, concealed, cloth_rng)
        clean, center = self._place(box, roll, dx, dy, scale)
        if c.psf_sigma_px > 0:
            clean = cv2.GaussianBlur(clean, (0, 0), c.psf_sigma_px)
        noise = np.random.default_rng(
            [self.seed, _TAG_NOISE, identity, posture, sample, int(concealed), int(reference), seq]
        )
        h, w = self.shape
        f32 = np.float32
        looks = c.reference_looks if reference else c.looks
        if looks <= 4:
            # Coherent speckle: |field|² of blurred complex white noise, averaged over looks.
            field_ = noise.standard_normal((2 * looks, h, w), dtype=f32)
            sp = np.zeros((h, w), f32)
            for i in range(2 * looks):
                cv2.accumulateSquare(cv2.GaussianBlur(field_[i], (9, 9), 0.7), sp)
            sp *= f32(self._speckle_kernel_norm / looks)
        else:
            # Many looks: Gamma(L, 1/L) is close to normal with σ = 1/√L, and far cheaper to draw.
            sp = noise.standard_normal((h, w), dtype=f32)
            sp *= f32(1.0 / math.sqrt(looks))
            sp += f32(1.0)
            np.maximum(sp, f32(0.05), out=sp)
        src = 10.0 ** (float(noise.normal(0.0, c.source_jitter_db)) / 10.0)
        power = clean * sp
        power *= f32(src)
        maps = self.sensor_maps(temp_c)
        dark, gain = maps.dark, maps.gain
        read = c.read_noise / math.sqrt(c.reference_looks) if reference else c.read_noise
        counts = noise.standard_normal((h, w), dtype=f32)
        counts *= f32(read)
        counts += dark
        counts += power / gain
        raw = self._sensor_defects(counts, dark, noise, seq)
        return Capture(
            raw=raw,
            power=power,
            clean=clean,
            pose=(POSTURE_ANGLES[posture][0] + dyaw, POSTURE_ANGLES[posture][1] + dpitch, roll),
            center=center,
            temp=temp_c,
            dark=dark,
            gain=gain,
        )

    def _sensor_defects(
        self, counts: np.ndarray, dark: np.ndarray, noise: np.random.Generator, seq: int
    ) -> np.ndarray:
        """Apply the bad pixels to float counts (in place) and return the rounded uint16 frame."""
        c = self.config
        f32 = np.float32
        s = self._sensor
        flat, dflat = counts.reshape(-1), dark.reshape(-1)
        if len(s.noisy_idx):
            # Own stream, so turning the class on never changes the other pixels' noise.
            extra = np.random.default_rng([self.seed, _TAG_NOISY, seq]).standard_normal(len(s.noisy_idx))
            assert s.noisy_sigma is not None
            flat[s.noisy_idx] += (extra * s.noisy_sigma.reshape(-1)[s.noisy_idx]).astype(f32)
        flat[s.dead_idx] = dflat[s.dead_idx] * f32(0.1)  # stuck near zero response
        flat[s.hot_idx] = s.hot_level.reshape(-1)[s.hot_idx] + dflat[s.hot_idx]
        off = s.flicker_idx[noise.random(len(s.flicker_idx)) < c.flicker_probability]
        flat[off] = f32(60000.0)
        flat[s.stuck_idx] = f32(65535.0)
        return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)

    def capture_scene(
        self, scene: Scene | str, level: float = 1.0, temp_c: float | None = None, seq: int = 0
    ) -> tuple[np.ndarray, SceneTruth]:
        """Make one raw frame of a calibration scene (dark or flat) and its truth.

        Dark: the shutter is closed, so the frame is the dark signal, read noise and the bad
        pixels. Flat: a uniform reference reflector returns `flat_power × level` on every pixel
        (a power-stabilised source: `flat_source_jitter_db`). Same sensor as the face frames.
        """
        c = self.config
        scene = Scene(scene)
        if scene is Scene.FACE:
            raise ValueError("capture_scene makes dark or flat frames; faces come from capture()")
        if temp_c is None:
            temp_c = c.reference_temp_c
        h, w = self.shape
        f32 = np.float32
        code = 1 if scene is Scene.DARK else 2
        noise = np.random.default_rng([self.seed, _TAG_SCENE, code, int(round(level * 1000)), seq])
        maps = self.sensor_maps(temp_c)
        counts = noise.standard_normal((h, w), dtype=f32)
        counts *= f32(c.read_noise)
        counts += maps.dark
        if scene is Scene.FLAT:
            src = 10.0 ** (float(noise.normal(0.0, c.flat_source_jitter_db)) / 10.0)
            power = np.full((h, w), f32(c.flat_power * level * src), f32)
            counts += power / maps.gain
        else:
            power = np.zeros((h, w), f32)
        raw = self._sensor_defects(counts, maps.dark, noise, seq)
        truth = SceneTruth(
            scene=scene,
            level=float(level),
            sensor_temp_c=float(temp_c),
            power=power,
            dark=maps.dark,
            gain=maps.gain,
            bad_pixels=self._sensor.bad,
        )
        return raw, truth

    # -- public API ---------------------------------------------------------------------------
    def render(self, identity: int, posture: int, sample: int, concealed: bool = True) -> Frame:
        """Capture one specific (identity, posture, sample) at the calibration temperature."""
        return self._frame(identity, posture, sample, concealed, self.config.reference_temp_c, 0)

    def next_frame(self) -> Frame:
        """Return the next stream frame: visits of random identities turning their heads, with drift.

        With `scene="dark"` or `"flat"` the stream is that calibration scene instead (same
        sensor, same temperature drift, same header).
        """
        if self.scene is not Scene.FACE:
            k = self._stream_index
            self._stream_index += 1
            temp = self.temperature_at(k)
            raw, truth = self.capture_scene(self.scene, self.level, temp, k)
            return Frame(header=self._header(temp), data=raw, truth=truth)
        r = self._stream_rng
        people = self.people
        n = len(people)
        visit, pos, left, claimed = self._visit
        if left <= 0:
            visit, pos, left = visit + 1, int(r.integers(n)), int(r.integers(8, 40))
            claimed = None
            if self.claim_identity:
                claimed_idx = people[pos]
                # An impostor claims another of the people walking past (the gate's other badges).
                if n > 1 and r.random() < self.impostor_rate:
                    claimed_idx = people[(pos + 1 + int(r.integers(n - 1))) % n]
                claimed = identity_name(claimed_idx)
        self._visit = (visit, pos, left - 1, claimed)
        ident = people[pos]
        posture = int(r.integers(len(POSTURES)))
        concealed = bool(r.random() < self.concealed_fraction)
        k = self._stream_index
        self._stream_index += 1
        sample = _STREAM_SAMPLE_OFFSET + self.session * _SESSION_SAMPLE_STRIDE + k
        return self._frame(ident, posture, sample, concealed, self.temperature_at(k), k, claimed, visit)

    def _frame(
        self,
        identity: int,
        posture: int,
        sample: int,
        concealed: bool,
        temp_c: float,
        noise_key: int,
        claimed: str | None = None,
        visit: int | None = None,
    ) -> Frame:
        if not 0 <= identity < self.identities:
            raise ValueError(f"identity must be 0..{self.identities - 1}, got {identity}")
        cap = self.capture(identity, posture, sample, concealed, False, temp_c, noise_key)
        header = self._header(cap.temp, claimed, visit)
        dark, gain = cap.dark, cap.gain
        raw = cap.raw

        # The reference is captured at the session's calibration temperature (the calibration
        # temperature itself for session 0), so the session's profile calibrates it exactly.
        ref_temp = self.config.reference_temp_c + self.session_temp_c

        def reference() -> np.ndarray:
            return self.capture(identity, posture, sample, False, True, ref_temp).raw

        truth = SimTruth(
            identity=identity,
            identity_name=identity_name(identity),
            posture=posture,
            sample=sample,
            concealed=concealed,
            pose=cap.pose,
            head_center=cap.center,
            sensor_temp_c=cap.temp,
            power=cap.power,
            clean=cap.clean,
            dark=dark,
            gain=gain,
            bad_pixels=self._sensor.bad,
            claimed_identity=claimed,
            _reference_fn=reference,
        )
        return Frame(header=header, data=raw, truth=truth)

    def _header(self, temp_c: float, claimed: str | None = None, visit: int | None = None) -> FrameHeader:
        """Return the next frame header (seq counts every frame made, stream or render)."""
        seq = self._seq
        self._seq += 1
        if self.start_time_ns is None:
            t_ns = time.time_ns()
        else:
            t_ns = self.start_time_ns + int(round(seq * 1e9 / self.nominal_fps))
        # The scene is not an acquisition setting: closing the shutter changes no setting, so
        # dark, flat and face frames of one scanner carry the same settings.
        return FrameHeader(
            scanner=self.scanner,
            seq=seq,
            t_capture_ns=t_ns,
            shape=self.shape,
            dtype="uint16",
            settings={"frequency_ghz": 340.0, "looks": self.config.looks, "mode": "sim"},
            sensor_temp_c=round(temp_c, 3),
            claimed_identity=claimed,
            visit=visit,
        )
