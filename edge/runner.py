"""Run a bundle on a batch of conditioned 64x64 frames: encoder once, then per-posture decoders.

Each frame's reconstruction comes from the decoder of its **predicted** posture (argmax of the
posture logits), as a live device must do; callers that have ground-truth labels (to reproduce
the research scripts) pass `postures`. Frames are grouped by decoder so each decoder runs once
per group, and batches larger than the backend's max batch are split (`Runner.chunks`, the one
batching loop).

Two ways to run a batch: `Runner.infer` (arrays for the whole batch; a failure raises) for files
and evaluation, and `infer_isolated` for the daemon, where a failure costs only its frame: a
batch the encoder rejects is retried frame by frame, a decoder group that fails is retried per
frame, and each failure is reported with its frame and task.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edge.backends import Backend, create_backend
from edge.bundle import DECODER_INPUTS, ENCODER_GRAPH, ENCODER_OUTPUTS, INPUT_NAME, INPUT_SIZE, Bundle
from edge.bundle import decoder_graph_name as _decoder
from scanner_io.choices import Choice
from scanner_io.errors import DataError

# Inputs a hair outside [0,1] come from float rounding in conditioning; further out is a bug
# upstream (e.g. raw uint8 counts passed without /255) and would give confident garbage.
_RANGE_SLACK = 1e-3


@dataclass
class EncoderOutput:
    """Encoder results for N frames: embedding [N,D] (unit norm), posture_logits [N,K], feat1..feat4."""

    embedding: np.ndarray
    posture_logits: np.ndarray
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.embedding.shape[0])

    def take(self, rows: np.ndarray | list[int]) -> EncoderOutput:
        """Return the output restricted to `rows` (embedding, logits and every skip feature)."""
        idx = np.asarray(rows, dtype=np.int64)
        return dataclasses.replace(
            self,
            embedding=self.embedding[idx],
            posture_logits=self.posture_logits[idx],
            features={k: v[idx] for k, v in self.features.items()},
        )


@dataclass
class InferenceResult:
    """Per-frame results; reconstruction is None when it was switched off."""

    embedding: np.ndarray  # [N,D] float32, unit norm
    posture_logits: np.ndarray  # [N,K] float32
    posture: np.ndarray  # [N] int64, argmax of the logits
    confidence: np.ndarray  # [N] float32, softmax probability of `posture`
    reconstruction: np.ndarray | None  # [N,1,64,64] float32 in [0,1]
    routed_by: str = "predicted"  # "predicted" or "given": which postures chose the decoders

    def __len__(self) -> int:
        return int(self.embedding.shape[0])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_postures(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return each row's posture (argmax, int64) and its softmax probability (float64)."""
    p = softmax(np.asarray(logits, dtype=np.float64))
    idx = p.argmax(axis=1).astype(np.int64)
    return idx, p[np.arange(p.shape[0]), idx]


class Task(Choice):
    """A per-frame task on the frame's way: the name in a result's `errors` and in metrics."""

    condition = "condition"
    encoder = "encode"  # not `encode`: that name is str.encode
    verify = "verify"
    reconstruct = "reconstruct"


@runtime_checkable
class ModelRunner(Protocol):
    """What running a batch needs of a runner (`Runner`, or a test's wrapper around one)."""

    max_batch: int

    @property
    def postures(self) -> tuple[str, ...]:
        """Posture class names in index order."""
        ...

    def encode(self, x: np.ndarray) -> EncoderOutput:
        """Run the encoder on x [N,1,64,64] float32 in [0,1]."""
        ...

    def reconstruct(self, enc: EncoderOutput, postures: np.ndarray) -> np.ndarray:
        """Reconstruct each frame [N,1,64,64] with the decoder of its posture."""
        ...


def as_model_input(x: np.ndarray) -> np.ndarray:
    """Check a batch against the input contract ([N,1,64,64] float in [0,1]) and return float32."""
    if not isinstance(x, np.ndarray):
        raise DataError(f"model input must be a numpy array, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1:] != (1, INPUT_SIZE, INPUT_SIZE) or x.shape[0] < 1:
        raise DataError(
            f"model input must have shape [N,1,{INPUT_SIZE},{INPUT_SIZE}] with N >= 1, got {list(x.shape)}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"model input must be float in [0,1], got {x.dtype} (scale 8-bit images by 1/255)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError("model input contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise DataError(f"model input must lie in [0,1], got values in [{lo:.3g}, {hi:.3g}]")
    return x


class Runner:
    """Executes a bundle through one backend; see the module docstring for routing."""

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        self.bundle = bundle
        self.backend = backend
        # The backend's limit: a TensorRT engine may be built for a smaller batch than the bundle's.
        self.max_batch = backend.max_batch

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | Path | str, backend: str = "auto", precision: str = "fp32", **options: Any
    ) -> Runner:
        """Open (and verify) a bundle if given a path, and build its backend."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.open(bundle)
        return cls(bundle, create_backend(bundle, backend, precision, **options))

    @property
    def postures(self) -> tuple[str, ...]:
        return self.bundle.postures

    @property
    def embedding_dim(self) -> int:
        return self.bundle.embedding_dim

    def chunks(self, n: int) -> Iterator[slice]:
        """Yield the slices that split `n` frames into batches the backend accepts (max_batch)."""
        step = max(1, int(self.max_batch))
        for start in range(0, n, step):
            yield slice(start, min(n, start + step))

    def encode(self, x: np.ndarray) -> EncoderOutput:
        """Run the encoder on x [N,1,64,64] float32 in [0,1], in chunks of at most max_batch."""
        x = as_model_input(x)
        parts = [self.backend.infer(ENCODER_GRAPH, {INPUT_NAME: x[c]}) for c in self.chunks(x.shape[0])]
        # One chunk (the daemon's case): its outputs are the result, no concatenation copy.
        out = (
            parts[0]
            if len(parts) == 1
            else {n: np.concatenate([p[n] for p in parts]) for n in ENCODER_OUTPUTS}
        )
        return EncoderOutput(
            embedding=out["embedding"],
            posture_logits=out["posture_logits"],
            features={name: out[name] for name in DECODER_INPUTS},
        )

    def reconstruct(self, enc: EncoderOutput, postures: np.ndarray) -> np.ndarray:
        """Reconstruct each frame with the decoder of its posture; frames are grouped by decoder."""
        n = len(enc)
        postures = self._check_postures(postures, n)
        recon = np.empty((n, 1, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
        for k in np.unique(postures):
            idx = np.flatnonzero(postures == k)
            graph = _decoder(int(k))
            if idx.size == n and n <= self.max_batch:
                # Every frame goes to this decoder in one call: the skip features as they are.
                feeds = {name: enc.features[name] for name in DECODER_INPUTS}
                return np.asarray(self.backend.infer(graph, feeds)["reconstruction"], dtype=np.float32)
            for c in self.chunks(idx.size):
                sel = idx[c]
                feeds = {name: enc.features[name][sel] for name in DECODER_INPUTS}
                recon[sel] = self.backend.infer(graph, feeds)["reconstruction"]
        return recon

    def infer(
        self, x: np.ndarray, reconstruct: bool = True, postures: np.ndarray | None = None
    ) -> InferenceResult:
        """Embedding, posture (+ confidence) and, if asked, the reconstruction of each frame.

        Runs chunk by chunk (max_batch frames: encoder, then that chunk's decoders), so the skip
        features of a large input set are never all held at once.
        """
        x = as_model_input(x)
        n = x.shape[0]
        given = None if postures is None else self._check_postures(postures, n)
        parts: list[InferenceResult] = []
        for c in self.chunks(n):
            enc = self.encode(x[c])
            predicted, confidence = predict_postures(enc.posture_logits)
            recon = None
            if reconstruct:
                recon = self.reconstruct(enc, predicted if given is None else given[c])
            parts.append(
                InferenceResult(
                    embedding=enc.embedding,
                    posture_logits=enc.posture_logits,
                    posture=predicted,
                    confidence=confidence.astype(np.float32),
                    reconstruction=recon,
                )
            )
        recons = [p.reconstruction for p in parts if p.reconstruction is not None]
        return InferenceResult(
            embedding=np.concatenate([p.embedding for p in parts]),
            posture_logits=np.concatenate([p.posture_logits for p in parts]),
            posture=np.concatenate([p.posture for p in parts]),
            confidence=np.concatenate([p.confidence for p in parts]),
            reconstruction=np.concatenate(recons) if reconstruct else None,
            routed_by="predicted" if postures is None else "given",
        )

    def _check_postures(self, postures: np.ndarray, n: int) -> np.ndarray:
        p = np.asarray(postures)
        if p.shape != (n,):
            raise DataError(f"postures must have shape [{n}] (one per frame), got {list(p.shape)}")
        if p.size and not np.issubdtype(p.dtype, np.integer):
            raise DataError(f"postures must be integer class indices, got {p.dtype}")
        p = p.astype(np.int64)
        bad = p[(p < 0) | (p >= self.bundle.num_postures)]
        if bad.size:
            raise DataError(f"posture index {int(bad[0])} out of range 0..{self.bundle.num_postures - 1}")
        return p

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# One batch with per-frame failure isolation (the daemon's way)


@dataclass(frozen=True)
class FramePrediction:
    """One frame's model outputs: embedding [D], posture index and confidence, reconstruction."""

    embedding: np.ndarray  # [D] float32, unit norm
    posture: int
    confidence: float
    reconstruction: np.ndarray | None = None  # [64, 64] float32, None when not run or failed


@dataclass(frozen=True)
class TaskFailure:
    """A task that failed on one frame (the exception is kept: its message may name an identity)."""

    task: Task
    error: BaseException


@dataclass
class FrameOutcome:
    """What running one frame gave: a prediction (None when the encoder failed) and any failures."""

    prediction: FramePrediction | None = None
    failures: list[TaskFailure] = field(default_factory=list)


@dataclass(frozen=True)
class IsolatedBatch:
    """Per-frame outcomes of one batch, in input order, and the time each model part took."""

    frames: list[FrameOutcome]
    encode_ms: float
    reconstruct_ms: float | None  # None when reconstruction was not run


@dataclass(frozen=True)
class _Group:
    """Frames sharing one encoder call: their outcome indices and rows in that output."""

    enc: EncoderOutput
    frames: list[int]
    rows: list[int]


def infer_isolated(runner: ModelRunner, x: np.ndarray, reconstruct: bool = True) -> IsolatedBatch:
    """Run one batch (at most `runner.max_batch` frames) so a failure costs only its own frame.

    The encoder runs once for the batch; if it raises, each frame is retried alone and a frame
    that still fails gets an `encode` failure (no prediction). Reconstruction runs once per
    encoder output, routed by the predicted posture; a group that fails is retried per frame and
    a frame that still fails gets a `reconstruct` failure (its prediction stays).
    """
    n = int(x.shape[0])
    outcomes = [FrameOutcome() for _ in range(n)]
    t0 = time.perf_counter()
    groups: list[_Group] = []
    try:
        groups.append(_Group(runner.encode(x), list(range(n)), list(range(n))))
    except Exception:
        for i in range(n):
            try:
                groups.append(_Group(runner.encode(x[i : i + 1]), [i], [0]))
            except Exception as exc:
                outcomes[i].failures.append(TaskFailure(Task.encoder, exc))
    encode_ms = (time.perf_counter() - t0) * 1e3
    for g in groups:
        # One softmax per encoder call (the whole batch), not one per frame.
        posture, confidence = predict_postures(g.enc.posture_logits)
        for i, row in zip(g.frames, g.rows, strict=True):
            outcomes[i].prediction = FramePrediction(
                embedding=np.asarray(g.enc.embedding[row], dtype=np.float32).copy(),
                posture=int(posture[row]),
                confidence=float(confidence[row]),
            )
    reconstruct_ms = None
    if reconstruct and groups:
        t0 = time.perf_counter()
        for g in groups:
            _reconstruct_group(runner, g, outcomes)
        reconstruct_ms = (time.perf_counter() - t0) * 1e3
    return IsolatedBatch(outcomes, encode_ms, reconstruct_ms)


def _reconstruct_group(runner: ModelRunner, g: _Group, outcomes: list[FrameOutcome]) -> None:
    """Fill in the group's reconstructions, retrying frame by frame when the group fails."""

    def predicted(i: int) -> FramePrediction:
        p = outcomes[i].prediction
        assert p is not None  # every frame of a group has its encoder output
        return p

    def with_image(i: int, img: np.ndarray) -> None:
        image = np.asarray(img, dtype=np.float32).reshape(INPUT_SIZE, INPUT_SIZE)
        p = predicted(i)
        outcomes[i].prediction = FramePrediction(p.embedding, p.posture, p.confidence, image)

    postures = np.array([predicted(i).posture for i in g.frames], dtype=np.int64)
    # The whole encoder output (the usual case) is passed as it is: no copy of the skip features.
    enc = g.enc if g.rows == list(range(len(g.enc))) else g.enc.take(g.rows)
    try:
        images = runner.reconstruct(enc, postures)
        for i, img in zip(g.frames, images, strict=True):
            with_image(i, img)
    except Exception:
        for i, row, k in zip(g.frames, g.rows, postures, strict=True):
            try:
                with_image(i, runner.reconstruct(g.enc.take([row]), np.array([k], dtype=np.int64))[0])
            except Exception as exc:
                outcomes[i].failures.append(TaskFailure(Task.reconstruct, exc))
