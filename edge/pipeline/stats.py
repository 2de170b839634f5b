"""The run's own counters (`Stats`) and what a run did (`RunSummary`, the summary line)."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.observability import DROP_REASONS, Stage

LATENCY_WINDOW = 100_000  # latest frames kept for the summary's percentiles
STAGE_WINDOW = 10_000  # latest frames kept for the per-stage medians
TOTAL = "total"  # a result's latency key for arrival → send (the whole way, not one stage)
# Drop reasons counted before a frame enters the daemon (not part of `frames_in`).
UPSTREAM_REASONS = ("malformed", "upstream_gap")


class Ring:
    """A fixed-size window of the latest float samples (a numpy array: 8 bytes per sample)."""

    def __init__(self, size: int) -> None:
        self._a = np.empty(size, dtype=np.float64)
        self._n = 0

    def append(self, value: float) -> None:
        """Add one sample, overwriting the oldest once the window is full."""
        self._a[self._n % self._a.size] = value
        self._n += 1

    def __len__(self) -> int:
        return min(self._n, self._a.size)

    def values(self) -> np.ndarray:
        """Return the samples held (order not kept: only statistics are taken)."""
        return self._a[: len(self)].copy()


def _stage_rings() -> dict[str, Ring]:
    return {key: Ring(STAGE_WINDOW) for key in [*(s.value for s in Stage), TOTAL]}


@dataclass
class Stats:
    """The pipeline's own counters (the summary line and the accounting identity)."""

    frames_in: int = 0
    published: int = 0
    processed: int = 0
    errors: int = 0  # results published with status `error`
    partial: int = 0
    no_face: int = 0  # results published with status `no_face` (no head in the frame)
    uncalibrated: int = 0  # results conditioned without a fitting profile
    bad_chunks: int = 0  # replay: recording chunks skipped (corrupt, tampered, missing)
    batches: int = 0
    batched_frames: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    malformed: dict[str, int] = field(default_factory=dict)
    latency_ms: Ring = field(default_factory=lambda: Ring(LATENCY_WINDOW))
    stage_ms: dict[str, Ring] = field(default_factory=_stage_rings)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count `n` dropped frames under `reason`."""
        with self.lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def summary(
        self, duration_s: float, endpoint: str, exit_reason: str, precision: str = "", backend: str = ""
    ) -> RunSummary:
        """Return what the run did so far (and which model variant did it)."""
        with self.lock:
            lat = self.latency_ms.values()
            stage = {k: float(np.median(v.values())) for k, v in self.stage_ms.items() if len(v)}
            return RunSummary(
                frames_in=self.frames_in,
                published=self.published,
                dropped=dict(self.dropped),
                malformed=dict(self.malformed),
                errors=self.errors,
                partial=self.partial,
                no_face=self.no_face,
                uncalibrated=self.uncalibrated,
                bad_chunks=self.bad_chunks,
                latency_mean_ms=float(lat.mean()) if lat.size else None,
                latency_p50_ms=float(np.percentile(lat, 50)) if lat.size else None,
                latency_p99_ms=float(np.percentile(lat, 99)) if lat.size else None,
                stage_p50_ms=stage,
                mean_batch=self.batched_frames / self.batches if self.batches else None,
                duration_s=duration_s,
                endpoint=endpoint,
                exit_reason=exit_reason,
                precision=precision,
                backend=backend,
            )


@dataclass(frozen=True)
class RunSummary:
    """What a run did: the one-line summary `thzedge run` prints, and its JSON form."""

    frames_in: int
    published: int
    dropped: dict[str, int]
    malformed: dict[str, int]
    errors: int
    partial: int
    latency_mean_ms: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    stage_p50_ms: dict[str, float]
    mean_batch: float | None
    duration_s: float
    endpoint: str
    exit_reason: str
    # Why `--record` stopped early (disk full, ...), None when it did not.
    recording_error: str | None = None
    no_face: int = 0
    uncalibrated: int = 0
    bad_chunks: int = 0  # replay: recording chunks skipped, their frames never read
    score: dict[str, Any] | None = None  # `thzedge run --score`: results against simulator truth
    precision: str = ""  # the variant that ran (`auto` resolved)
    backend: str = ""

    @property
    def unaccounted(self) -> int:
        """Frames that entered but were neither published nor counted as dropped (0 when healthy)."""
        in_daemon = sum(v for k, v in self.dropped.items() if k not in UPSTREAM_REASONS)
        return self.frames_in - self.published - in_daemon

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready summary."""
        d = dataclasses.asdict(self)
        d["unaccounted"] = self.unaccounted
        return d

    def render(self) -> str:
        """Return the one-line summary."""
        drops = " ".join(f"{k}={v}" for k, v in self.dropped.items())
        mal = ",".join(f"{k}={v}" for k, v in sorted(self.malformed.items())) or "none"

        def ms(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f}"

        # Said only when there are some: most runs have neither, and the line stays short.
        flagged = "".join(
            f" {k}={v}"
            for k, v in (
                ("no_face", self.no_face),
                ("uncalibrated", self.uncalibrated),
                ("bad_chunks", self.bad_chunks),
            )
            if v
        )
        return (
            f"frames_in={self.frames_in} published={self.published} "
            f"dropped={sum(self.dropped.values())} ({drops}) malformed={sum(self.malformed.values())} "
            f"({mal}) errors={self.errors} partial={self.partial}{flagged} "
            f"latency_ms mean={ms(self.latency_mean_ms)} p99={ms(self.latency_p99_ms)} "
            f"precision={self.precision or 'n/a'} backend={self.backend or 'n/a'} "
            f"duration_s={self.duration_s:.1f}" + (" recording=FAILED" if self.recording_error else "")
        )
