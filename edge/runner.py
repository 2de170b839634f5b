"""Run a bundle on a batch of conditioned 64x64 frames: encoder once, then per-posture decoders.

Each frame's reconstruction comes from the decoder of its **predicted** posture (argmax of the
posture logits), as a live device must do; callers that have ground-truth labels (to reproduce
the research scripts) pass `postures`. Frames are grouped by decoder so each decoder runs once
per group, and batches larger than the bundle's max batch are split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.backends import Backend, create_backend
from edge.bundle import DECODER_INPUTS, ENCODER_GRAPH, ENCODER_OUTPUTS, INPUT_NAME, INPUT_SIZE, Bundle
from edge.bundle import decoder_graph_name as _decoder
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

    def encode(self, x: np.ndarray) -> EncoderOutput:
        """Run the encoder on x [N,1,64,64] float32 in [0,1], in chunks of at most max_batch."""
        x = as_model_input(x)
        parts = [
            self.backend.infer(ENCODER_GRAPH, {INPUT_NAME: x[i : i + self.max_batch]})
            for i in range(0, x.shape[0], self.max_batch)
        ]
        out = {name: np.concatenate([p[name] for p in parts]) for name in ENCODER_OUTPUTS}
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
            for i in range(0, idx.size, self.max_batch):
                sel = idx[i : i + self.max_batch]
                feeds = {name: enc.features[name][sel] for name in DECODER_INPUTS}
                recon[sel] = self.backend.infer(graph, feeds)["reconstruction"]
        return recon

    def infer(
        self, x: np.ndarray, reconstruct: bool = True, postures: np.ndarray | None = None
    ) -> InferenceResult:
        """Embedding, posture (+ confidence) and, if asked, the reconstruction of each frame."""
        enc = self.encode(x)
        predicted = enc.posture_logits.argmax(axis=1).astype(np.int64)
        confidence = softmax(enc.posture_logits)[np.arange(len(enc)), predicted].astype(np.float32)
        recon = None
        if reconstruct:
            recon = self.reconstruct(enc, predicted if postures is None else postures)
        return InferenceResult(
            embedding=enc.embedding,
            posture_logits=enc.posture_logits,
            posture=predicted,
            confidence=confidence,
            reconstruction=recon,
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
