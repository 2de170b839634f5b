"""What the live page shows, kept up to date by one subscriber thread (no aiohttp here).

`ViewState.update(msg)` folds each decoded result or event into the latest picture: the last
result (posture, decision, status, latency, the conditioned input when the daemon publishes
it, the reconstruction only when the viewer was started with it allowed), a frame rate over
the last seconds, latency p50/p99 over the last results, drops by reason and the daemon's
state, source, calibration and model from its `state` events. `snapshot()` returns it as one
JSON-ready dict (built once per change and shared by every page); nothing is written to disk.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import deque
from typing import Any

import cv2
import numpy as np

from edge.results import DecodedMessage
from edge.subscriber import ResultsSubscriber, SubscriberTarget

FPS_WINDOW_S = 2.0
LATENCY_WINDOW = 200
# No message for this long (the daemon's state heartbeat is 0.5 s): the page says "no daemon".
SILENT_AFTER_S = 2.0


def png_data_url(image: np.ndarray) -> str:
    """A 2-D float image in [0, 1] as a PNG data URL (grayscale, 8 bit)."""
    a = np.clip(np.nan_to_num(np.asarray(image, np.float32)), 0.0, 1.0)
    ok, buf = cv2.imencode(".png", (a * 255.0 + 0.5).astype(np.uint8))
    if not ok:  # pragma: no cover - cv2 encodes any 2-D uint8 array
        raise ValueError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


class ViewState:
    """The latest picture of one daemon's stream; `update` from one thread, `snapshot` from any."""

    def __init__(self, endpoint: str, show_reconstruction: bool = False) -> None:
        self.endpoint = endpoint
        self.show_reconstruction = show_reconstruction
        self._lock = threading.Lock()
        self.version = 0
        self._result: dict[str, Any] | None = None
        self._input: np.ndarray | None = None
        self._recon: np.ndarray | None = None
        self._daemon: dict[str, Any] = {}
        self._drops: dict[str, int] = {}
        # check (envelope, input) → {state, reason}, from the daemon's `calibration` events.
        self._calibration: dict[str, dict[str, Any]] = {}
        self._errors = 0
        self._arrivals: deque[float] = deque()
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._results_seen = 0
        self._last_message = 0.0
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_version = -1

    def update(self, msg: DecodedMessage, now: float | None = None) -> None:
        """Fold one message into the picture."""
        now = time.monotonic() if now is None else now
        h = msg.header
        with self._lock:
            self._last_message = now
            if msg.is_result:
                self._result = h
                self._results_seen += 1
                self._input = msg.arrays.get("input")
                # Only with the viewer's explicit flag; otherwise the array is dropped here.
                self._recon = msg.arrays.get("reconstruction") if self.show_reconstruction else None
                self._arrivals.append(now)
                total = (h.get("latency_ms") or {}).get("total")
                if total is not None:
                    self._latency.append(float(total))
            elif h.get("kind") == "state":
                self._daemon = {
                    k: h.get(k)
                    for k in ("state", "source", "mode", "calibration", "model", "payloads", "verification")
                }
            elif h.get("kind") == "drop":
                reason = str(h.get("reason"))
                self._drops[reason] = self._drops.get(reason, 0) + int(h.get("count") or 0)
            elif h.get("kind") == "error":
                self._errors += 1
            elif h.get("kind") == "calibration":
                self._calibration[str(h.get("check"))] = {
                    "state": h.get("state"),
                    "reason": h.get("reason") or "",
                }
            self.version += 1

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The page's data: one JSON-ready dict, rebuilt only after a change."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._arrivals and now - self._arrivals[0] > FPS_WINDOW_S:
                self._arrivals.popleft()
            connected = self._last_message > 0 and now - self._last_message < SILENT_AFTER_S
            if self._snapshot is not None and self._snapshot_version == self.version:
                snap = self._snapshot
                return {**snap, "connected": connected, "fps": round(len(self._arrivals) / FPS_WINDOW_S, 1)}
            r = self._result or {}
            lat = np.asarray(self._latency, dtype=np.float64)
            v = r.get("verification") or None
            snap = {
                "endpoint": self.endpoint,
                "results_seen": self._results_seen,
                "seq": r.get("seq"),
                "scanner": r.get("scanner"),
                "status": r.get("status"),
                "posture": r.get("posture"),
                "decision": None
                if v is None
                else {k: v.get(k) for k in ("mode", "decision", "identity", "score", "threshold")},
                "latency_ms": (r.get("latency_ms") or {}).get("total"),
                "latency_p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
                "latency_p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
                "drops": dict(self._drops),
                "errors": self._errors,
                "daemon": dict(self._daemon),
                "calibration_checks": {k: dict(v) for k, v in self._calibration.items()},
                "input": png_data_url(self._input) if self._input is not None else None,
                "reconstruction_enabled": self.show_reconstruction,
            }
            if self.show_reconstruction:
                snap["reconstruction"] = png_data_url(self._recon) if self._recon is not None else None
            self._snapshot, self._snapshot_version = snap, self.version
            return {**snap, "connected": connected, "fps": round(len(self._arrivals) / FPS_WINDOW_S, 1)}


def follow(target: SubscriberTarget, state: ViewState, stop: threading.Event) -> None:
    """Subscribe and fold every message into `state` until `stop` is set (runs in its own thread)."""
    with ResultsSubscriber(target) as sub:
        while not stop.is_set():
            msg = sub.receive(0.1)
            if msg is not None:
                state.update(msg)
                for more in sub.drain():  # catch up at once: only the latest matters
                    state.update(more)
