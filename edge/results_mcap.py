"""`thzedge run --record-results FILE`: the published results as an MCAP file viewers can plot.

One JSON-schema channel per kind of value, per scanner, so Foxglove / Lichtblick plot them
over time (log time = publish time):

- `/<scanner>/posture` (`thzedge.Posture`): label, index, confidence
- `/<scanner>/decision` (`thzedge.Decision`): mode, decision, accepted (0/1), score, threshold;
  for frames of a visit also visit, visit_decision, visit_score (edge/visits.py)
- `/<scanner>/latency` (`thzedge.Latency`): queue, condition, encode, verify, reconstruct,
  publish, total (ms)
- `/<scanner>/status` (`thzedge.ResultStatus`): status, ok (0/1), dropped_since_last, errors

Every message also has a Foxglove `timestamp` (the frame's capture time) and the frame's `seq`.

Biometric parts go in only with `[privacy] record_results = true`: the identity named by a
decision, and the reconstruction (`/<scanner>/reconstruction`, `foxglove.RawImage` 32FC1).
Written by the publisher thread, after each result is sent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from edge.results import FrameResult
from scanner_io.foxglove import ChannelSpec, JsonChannelWriter, image_channel, raw_image, time_of

_TIME = {
    "type": "object",
    "title": "time",
    "properties": {"sec": {"type": "integer"}, "nsec": {"type": "integer"}},
}


def _schema(title: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "title": title,
        "type": "object",
        "properties": {"timestamp": _TIME, "seq": {"type": "integer"}, **fields},
    }


_NUM = {"type": ["number", "null"]}
POSTURE_SCHEMA = _schema(
    "thzedge.Posture",
    {"label": {"type": "string"}, "index": {"type": "integer"}, "confidence": {"type": "number"}},
)
DECISION_SCHEMA = _schema(
    "thzedge.Decision",
    {
        "mode": {"type": "string"},
        "decision": {"type": "string"},
        "accepted": {"type": "integer", "description": "1 for accept, else 0 (plottable)"},
        "score": _NUM,
        "threshold": _NUM,
        "identity": {"type": ["string", "null"], "description": "only with [privacy] record_results"},
        "visit": {"type": "integer", "description": "the frame's visit (frames tagged with one)"},
        "visit_decision": {"type": "string", "description": "the visit's fused decision, or pending"},
        "visit_score": _NUM,
        "visit_identity": {"type": ["string", "null"], "description": "only with [privacy] record_results"},
    },
)
LATENCY_STAGES = ("queue", "condition", "encode", "verify", "reconstruct", "publish", "total")
LATENCY_SCHEMA = _schema("thzedge.Latency", {k: _NUM for k in LATENCY_STAGES})
STATUS_SCHEMA = _schema(
    "thzedge.ResultStatus",
    {
        "status": {"type": "string"},
        "ok": {"type": "integer"},
        "dropped_since_last": {"type": "integer"},
        "errors": {"type": "array", "items": {"type": "string"}},
    },
)


class ResultsRecorder:
    """Writes each published result to its JSON channels; use from the publisher thread only."""

    def __init__(self, path: str | os.PathLike[str], biometric: bool = False) -> None:
        self.path = Path(path)
        self.biometric = biometric
        self._writer = JsonChannelWriter(self.path, profile="thzedge-results")
        self._writer.add_metadata(
            "thzedge.results", {"biometric": "true" if biometric else "false", "protocol": "1"}
        )
        self._specs: dict[tuple[str, str], ChannelSpec] = {}
        self.results = 0

    def _spec(self, scanner: str, kind: str) -> ChannelSpec:
        key = (scanner, kind)
        spec = self._specs.get(key)
        if spec is None:
            topic = f"/{scanner}/{kind}"
            schemas = {
                "posture": POSTURE_SCHEMA,
                "decision": DECISION_SCHEMA,
                "latency": LATENCY_SCHEMA,
                "status": STATUS_SCHEMA,
            }
            if kind == "reconstruction":
                spec = image_channel(topic)
            else:
                spec = ChannelSpec(topic, str(schemas[kind]["title"]), schemas[kind])
            self._specs[key] = spec
        return spec

    def write(self, r: FrameResult, t_publish_ns: int | None = None) -> None:
        """Append one result: its publish time as log time, its frame's capture time as `timestamp`.

        The capture time is what `recording export --foxglove` stamps the raw images with, so a
        Plot panel of the results and an Image panel of the frames share one time axis.
        """
        t = time.time_ns() if t_publish_ns is None else t_publish_ns
        base = {"timestamp": time_of(r.t_capture_ns), "seq": r.seq}

        def put(kind: str, body: dict[str, Any]) -> None:
            self._writer.write(self._spec(r.scanner, kind), {**base, **body}, t, r.t_capture_ns, r.seq)

        put(
            "status",
            {
                "status": r.status,
                "ok": int(r.status == "ok"),
                "dropped_since_last": r.dropped_since_last,
                "errors": [e.get("task", "?") for e in r.errors],
            },
        )
        put("latency", {k: r.latency_ms.get(k) for k in LATENCY_STAGES})
        if r.posture is not None:
            put("posture", {k: r.posture[k] for k in ("label", "index", "confidence")})
        if r.verification is not None:
            v = r.verification
            body = {
                "mode": v.get("mode"),
                "decision": v.get("decision"),
                "accepted": int(v.get("decision") == "accept"),
                "score": v.get("score"),
                "threshold": v.get("threshold"),
            }
            visit = v.get("visit")
            if visit is not None:  # the visit's fused decision (edge/visits.py), plottable beside
                body["visit"] = visit.get("id")
                body["visit_decision"] = visit.get("decision")
                body["visit_score"] = visit.get("score")
            if self.biometric:
                body["identity"] = v.get("identity")
                if visit is not None:
                    body["visit_identity"] = visit.get("identity")
            put("decision", body)
        if self.biometric and r.reconstruction is not None:
            spec = self._spec(r.scanner, "reconstruction")
            image = raw_image(r.reconstruction, r.t_capture_ns, r.scanner)
            self._writer.write(spec, image, t, r.t_capture_ns, r.seq)
        self.results += 1

    def close(self) -> Path:
        """Finish the file (rename from .part)."""
        return self._writer.close()
