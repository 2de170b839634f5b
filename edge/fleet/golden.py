"""Golden replays (R-NEW-5) and the canary before READY (R-NEW-12).

A golden file is an MCAP recording (frames + the calibration profile they were taken with, as
`thzedge record` writes) that also holds what a pinned configuration produced from them: the
pins (bundle sha256, precision, backend, calibration id) as metadata `thzedge.golden`, and per
frame the outputs of all three tasks (posture and its confidence, the verification embedding,
the reconstruction) as an attachment `thzedge/golden.json`: an exact sha256 per output plus
small values for tolerance checks (the embedding, an 8×8 mean-pooled reconstruction), and the
frame's status as the daemon would publish it (`ok`, `uncalibrated`, `no_face`).

`verify_golden` replays the frames one at a time (batch 1, so a frame's outputs do not depend
on its neighbours), conditioned as the daemon conditions them (`edge.fleet.replay`):

- bundle, precision and calibration must equal the pins, else `GoldenPinError` (exit 78), not
  a comparison;
- on the pinned backend every output's sha256 must match exactly; on another backend (ORT vs
  TensorRT) each output must stay within the tolerance of the precision;
- any drift raises `GoldenDriftError` naming the first frame and output.

The canary (`run_canary` / `require_canary`) is the same replay for the daemon before READY:
the bundle must be the pinned one, while precision and backend may differ from the golden's
(a golden made once in fp32 on ONNX Runtime checks the device's INT8 TensorRT engine) and are
then compared with the running precision's tolerances. Golden files hold raw frames and
embeddings: biometric data, kept 0600 like every recording.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.fleet.replay import CalibrationArg, ReplayedFrame, open_replay
from edge.pipeline.context import ModelInfo
from edge.runner import ModelRunner, infer_isolated
from scanner_io.atrest import StorageKey, find_storage_key, is_sealed, seal, unseal
from scanner_io.errors import CanaryError, ConfigError, DataError, ThzEdgeError
from scanner_io.recording import Recorder, RecordingReader, default_manifest

GOLDEN_ATTACHMENT = "thzedge/golden.json"
GOLDEN_MEDIA_TYPE = "application/x-thzedge-golden+json"
GOLDEN_METADATA = "thzedge.golden"
GOLDEN_FORMAT = 1
GOLDEN_KIND = "golden"  # the sealed-envelope kind of encrypted golden results
# A bundle may carry its canary here. It is not in the manifest's `files` (its digests pin the
# manifest's sha256, which would then depend on them); replaying it checks it anyway.
BUNDLE_CANARY = "canary.mcap"
OUTPUTS = ("posture", "confidence", "embedding", "reconstruction")  # besides the frame's status
_THUMB = 8  # reconstruction thumbnail side: 64/8 = 8-pixel blocks


class GoldenPinError(ConfigError):
    """The running configuration does not match the golden file's pins (exit 78): nothing was compared."""


class GoldenDriftError(ThzEdgeError):
    """A replayed output differs from the golden one (exit 1); the message names frame and output."""


@dataclass(frozen=True)
class Tolerance:
    """How far an output may move when compared by value (other backend, or other precision)."""

    embedding: float  # L2 distance between unit embeddings
    confidence: float  # absolute difference of the posture probability
    reconstruction: float  # mean absolute difference of the 8×8 pooled reconstruction


# Per running precision. INT8 figures: the demo bundle's int8 variant vs fp32 on simulated
# frames moves embeddings by up to ~0.06 and pooled reconstructions by ~0.01 (docs/fleet.md);
# a degraded variant moves them several times more.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(embedding=1e-3, confidence=1e-3, reconstruction=1e-3),
    "fp16": Tolerance(embedding=2e-2, confidence=2e-2, reconstruction=1e-2),
    "int8": Tolerance(embedding=0.15, confidence=0.1, reconstruction=0.03),
}


@dataclass(frozen=True)
class Pins:
    """What produced a golden file's results."""

    bundle: str
    precision: str
    backend: str
    calibration: str

    @classmethod
    def of(cls, model: ModelInfo, calibration: str) -> Pins:
        """The pins of a running model on a stream conditioned with profile `calibration`."""
        return cls(model.bundle, model.precision, model.backend, calibration)


@dataclass(frozen=True)
class FrameDigest:
    """One frame's outputs: an exact sha256 per output plus the values tolerance checks use."""

    seq: int
    posture: int  # -1 when the model did not run (no head in the frame)
    confidence: float
    embedding: list[float]
    thumbnail: list[float] | None  # 8×8 mean-pooled reconstruction, row-major; None without one
    sha256: dict[str, str] = field(default_factory=dict)
    status: str = "ok"  # the daemon's: ok, uncalibrated or no_face (preparation is checked too)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Golden:
    """A golden file read back: its pins and per-frame digests."""

    path: Path
    pins: Pins
    frames: list[FrameDigest]


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def _thumbnail(recon: np.ndarray) -> np.ndarray:
    r = np.asarray(recon, dtype=np.float64).reshape(64, 64)
    return r.reshape(_THUMB, 64 // _THUMB, _THUMB, 64 // _THUMB).mean(axis=(1, 3))


class OutputError(ThzEdgeError):
    """A task failed on a replayed frame (no output to compare)."""


def replay_digests(
    runner: ModelRunner, frames: Sequence[ReplayedFrame], reconstruct: bool = True
) -> list[FrameDigest]:
    """Run each frame alone through the daemon's `infer_isolated` and digest its outputs.

    A frame whose conditioning or a task fails raises OutputError naming the frame and task.
    """
    out = []
    for f in frames:
        if f.x is None or f.error is not None:
            raise OutputError(f"frame seq {f.seq}: conditioning failed ({type(f.error).__name__}: {f.error})")
        if f.quality is not None:  # the daemon publishes `no_face` without running the model
            out.append(FrameDigest(f.seq, -1, 0.0, [], None, {}, f.status))
            continue
        batch = infer_isolated(runner, f.x[None, None].astype(np.float32), reconstruct=reconstruct)
        outcome = batch.frames[0]
        if outcome.failures:
            fail = outcome.failures[0]
            raise OutputError(
                f"frame seq {f.seq}: task {fail.task.value} failed ({type(fail.error).__name__})"
            )
        p = outcome.prediction
        assert p is not None  # no failure: the encoder ran
        conf = np.float32(p.confidence)
        hashes = {
            "posture": hashlib.sha256(str(p.posture).encode()).hexdigest(),
            "confidence": _sha(np.array([conf])),
            "embedding": _sha(p.embedding),
        }
        thumb = None
        if p.reconstruction is not None:
            hashes["reconstruction"] = _sha(p.reconstruction)
            thumb = [float(v) for v in _thumbnail(p.reconstruction).ravel()]
        out.append(
            FrameDigest(
                seq=f.seq,
                posture=p.posture,
                confidence=float(conf),
                embedding=[float(v) for v in np.asarray(p.embedding, np.float32)],
                thumbnail=thumb,
                sha256=hashes,
                status=f.status,
            )
        )
    return out


def make_golden(
    recording: str | os.PathLike[str],
    runner: ModelRunner,
    model: ModelInfo,
    out: str | os.PathLike[str],
    calibration: CalibrationArg = None,
    max_frames: int | None = None,
    key: StorageKey | None = None,
) -> Golden:
    """Replay a recording with a pinned configuration and write it, with the results, as a golden file.

    With a storage `key` (needed to read an encrypted recording too) the golden file is encrypted
    like a recording: frames per chunk, the results (embeddings) as one sealed attachment.
    """
    replay = open_replay(recording, calibration, key=key)
    frames: list[ReplayedFrame] = []
    for f in replay:
        if max_frames is not None and len(frames) >= max_frames:
            break
        frames.append(f)
    if not frames:
        raise DataError(f"{recording} holds no well-formed frame to make a golden file from")
    digests = replay_digests(runner, frames)
    pins = Pins.of(model, replay.calibration_id)
    doc = {"format": GOLDEN_FORMAT, "pins": asdict(pins), "frames": [d.to_dict() for d in digests]}
    manifest = default_manifest(source=str(recording))
    results = json.dumps(doc).encode()
    if key is not None:
        results = seal(results, key, kind=GOLDEN_KIND)
    with Recorder(out, manifest=manifest, calibration=replay.context.profile, fsync=False, key=key) as rec:
        rec.add_metadata(GOLDEN_METADATA, asdict(pins))
        rec.add_attachment(GOLDEN_ATTACHMENT, GOLDEN_MEDIA_TYPE, results)
        for f in frames:
            rec.write(f.frame)
    return Golden(Path(out), pins, digests)


def read_golden(path: str | os.PathLike[str], key: StorageKey | None = None) -> Golden:
    """Read a golden file's pins and digests (an encrypted one with its `key`); DataError if not one."""
    reader = RecordingReader(path, key)
    reader.read_preamble()
    data = reader.attachment(GOLDEN_ATTACHMENT)
    if data is not None and is_sealed(data):
        data = unseal(data, key, f"golden results of {path}", GOLDEN_KIND)
    if data is None:
        raise DataError(
            f"{path} is a recording without golden results; make one with `thzedge replay --make-golden`"
        )
    try:
        doc = json.loads(data)
        if doc.get("format") != GOLDEN_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {GOLDEN_FORMAT}")
        pins = Pins(**doc["pins"])
        frames = [FrameDigest(**d) for d in doc["frames"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: golden results are malformed ({exc})") from None
    return Golden(reader.path, pins, frames)


@dataclass(frozen=True)
class Drift:
    """One output that moved: frame seq, output name and by how much (or that its hash differs)."""

    seq: int
    output: str
    detail: str


@dataclass(frozen=True)
class GoldenReport:
    """What a golden replay found."""

    path: str
    mode: str  # "exact" or "tolerance:<precision>"
    frames: int
    drifts: list[Drift]
    pins: Pins
    running: Pins

    @property
    def ok(self) -> bool:
        return not self.drifts

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        return {
            "path": self.path,
            "ok": self.ok,
            "mode": self.mode,
            "frames": self.frames,
            "drifts": [asdict(d) for d in self.drifts],
            "pins": asdict(self.pins),
            "running": asdict(self.running),
        }

    def render(self) -> str:
        """Return the one-line verdict plus the first drifts."""
        head = f"{self.path}: {self.frames} frames, {self.mode}: " + (
            "no drift" if self.ok else f"{len(self.drifts)} drifted output(s)"
        )
        lines = [head] + [f"  seq {d.seq} {d.output}: {d.detail}" for d in self.drifts[:10]]
        return "\n".join(lines)


def compare(
    golden: Sequence[FrameDigest], got: Sequence[FrameDigest], tolerance: Tolerance | None
) -> list[Drift]:
    """Compare frame by frame: exact hashes when `tolerance` is None, else values within it."""
    drifts: list[Drift] = []
    if [g.seq for g in golden] != [r.seq for r in got]:
        return [Drift(got[0].seq if got else -1, "frames", "the replay's frames differ from the golden's")]
    for g, r in zip(golden, got, strict=True):
        if g.status != r.status:
            drifts.append(Drift(g.seq, "status", f"{r.status}, golden {g.status}"))
            continue
        if g.status == "no_face":  # no model outputs on either side
            continue
        if tolerance is None:
            for name in OUTPUTS:
                if name in g.sha256 and g.sha256[name] != r.sha256.get(name):
                    drifts.append(Drift(g.seq, name, "sha256 differs"))
            continue
        if g.posture != r.posture:
            drifts.append(Drift(g.seq, "posture", f"class {r.posture}, golden {g.posture}"))
        dc = abs(g.confidence - r.confidence)
        if dc > tolerance.confidence:
            drifts.append(Drift(g.seq, "confidence", f"moved {dc:.4g} > {tolerance.confidence:g}"))
        de = (
            float(np.linalg.norm(np.subtract(g.embedding, r.embedding)))
            if len(g.embedding) == len(r.embedding)
            else np.inf
        )
        if de > tolerance.embedding:
            drifts.append(Drift(g.seq, "embedding", f"L2 {de:.4g} > {tolerance.embedding:g}"))
        if g.thumbnail is not None:
            if r.thumbnail is None:
                drifts.append(Drift(g.seq, "reconstruction", "missing"))
            else:
                dr = float(np.mean(np.abs(np.subtract(g.thumbnail, r.thumbnail))))
                if dr > tolerance.reconstruction:
                    drifts.append(
                        Drift(g.seq, "reconstruction", f"mean |Δ| {dr:.4g} > {tolerance.reconstruction:g}")
                    )
    return drifts


def _tolerance(precision: str) -> Tolerance:
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise ConfigError(
            f"no golden tolerance for precision {precision!r}; known: {', '.join(TOLERANCES)}"
        ) from None


def _replay(
    golden: Golden,
    runner: ModelRunner,
    running: Pins,
    mode: str,
    tolerance: Tolerance | None,
    key: StorageKey | None,
) -> GoldenReport:
    frames = list(open_replay(golden.path, key=key))
    try:
        got = replay_digests(runner, frames, reconstruct=any(g.thumbnail is not None for g in golden.frames))
    except OutputError as exc:
        drifts = [Drift(-1, "task", str(exc))]
    else:
        drifts = compare(golden.frames, got, tolerance)
    return GoldenReport(str(golden.path), mode, len(frames), drifts, golden.pins, running)


def verify_golden(
    path: str | os.PathLike[str],
    runner: ModelRunner,
    model: ModelInfo,
    calibration: CalibrationArg = None,
    key: StorageKey | None = None,
) -> GoldenReport:
    """Replay a golden file with the running configuration; raise on a pin mismatch or any drift."""
    golden = read_golden(path, key)
    replay = open_replay(golden.path, calibration, key=key)
    running = Pins.of(model, replay.calibration_id)
    pinned = golden.pins
    wrong = [
        f"{name} {getattr(running, name)!r} (golden: {getattr(pinned, name)!r})"
        for name in ("bundle", "precision", "calibration")
        if getattr(running, name) != getattr(pinned, name)
    ]
    if wrong:
        raise GoldenPinError(
            f"{path}: the running configuration does not match the golden pins: {'; '.join(wrong)}; "
            "verify with the pinned bundle, precision and calibration, or make a new golden file"
        )
    exact = running.backend == pinned.backend
    tolerance = None if exact else _tolerance(running.precision)
    report = _replay(
        golden, runner, running, "exact" if exact else f"tolerance:{running.precision}", tolerance, key
    )
    if not report.ok:
        d = report.drifts[0]
        raise GoldenDriftError(
            f"{path}: drift at frame seq {d.seq}, output {d.output}: {d.detail} "
            f"({len(report.drifts)} drifted output(s) over {report.frames} frames, {report.mode})"
        )
    return report


def run_canary(runner: ModelRunner, golden_path: str | os.PathLike[str], model: ModelInfo) -> GoldenReport:
    """Replay the canary with the daemon's runner; the report says whether every output held.

    The bundle must be the pinned one; another precision or backend is compared with the running
    precision's tolerances, the pinned precision and backend exactly. Raises CanaryError when the
    canary cannot be read or belongs to another bundle. An encrypted canary is read with the
    configured storage key.
    """
    try:
        key = find_storage_key()
        golden = read_golden(golden_path, key)
    except ThzEdgeError as exc:
        raise CanaryError(f"canary {golden_path}: {exc}") from None
    running = Pins.of(model, golden.pins.calibration)  # the canary is conditioned with its own profile
    if model.bundle != golden.pins.bundle:
        raise CanaryError(
            f"canary {golden_path} was made for bundle {golden.pins.bundle[:12]}, the daemon runs "
            f"{model.bundle[:12]}: make the canary with this bundle (thzedge replay --make-golden)"
        )
    exact = (running.precision, running.backend) == (golden.pins.precision, golden.pins.backend)
    tolerance = None if exact else _tolerance(running.precision)
    mode = "exact" if exact else f"tolerance:{running.precision}"
    return _replay(golden, runner, running, mode, tolerance, key)


def bundle_canary(bundle_dir: str | os.PathLike[str]) -> Path | None:
    """Return the canary a bundle directory carries (`canary.mcap`), or None."""
    path = Path(bundle_dir) / BUNDLE_CANARY
    return path if path.is_file() else None


def require_canary(
    runner: ModelRunner, golden_path: str | os.PathLike[str], model: ModelInfo
) -> GoldenReport:
    """Run the canary and raise CanaryError (exit 79) naming the first drift when it fails."""
    report = run_canary(runner, golden_path, model)
    if not report.ok:
        d = report.drifts[0]
        raise CanaryError(
            f"canary failed: frame seq {d.seq} {d.output}: {d.detail} "
            f"({len(report.drifts)} drifted output(s) over {report.frames} frames, {report.mode}); "
            "the engine, preprocessing or precision variant does not reproduce the bundle's results"
        )
    return report
