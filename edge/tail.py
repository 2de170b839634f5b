"""`thzedge tail`: print a daemon's results and events as they arrive, one line each.

A text line per result (seq, posture and confidence, decision, status, total latency, and for
a frame of a visit `visit=N:decision`) and per event; with the root `--json` one JSON object per
line (the header as published, payload parts left out). `--filter status=ok,decision=accept`
keeps results whose fields match (events pass).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge.results import DecodedMessage
from edge.subscriber import ResultsSubscriber, SubscriberTarget
from scanner_io.errors import UsageError

FILTER_KEYS = ("status", "decision", "visit", "posture", "scanner")


@dataclass(frozen=True)
class ResultFilter:
    """Which results to show: for each key, the accepted values (empty: all)."""

    wanted: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> ResultFilter:
        """Parse `key=value[|value],key=value` (keys: status, decision, visit, posture, scanner).

        `visit` is the visit decision (`pending`, `accept`, …; `-` for a frame of no visit).
        """
        if not text:
            return cls()
        wanted: dict[str, set[str]] = {}
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not value.strip():
                raise UsageError(f"--filter {item!r}: expected KEY=VALUE, e.g. status=ok,decision=accept")
            if key not in FILTER_KEYS:
                raise UsageError(f"--filter key {key!r}: expected one of {', '.join(FILTER_KEYS)}")
            wanted.setdefault(key, set()).update(v.strip() for v in value.split("|"))
        return cls({k: frozenset(v) for k, v in wanted.items()})

    def keep(self, msg: DecodedMessage) -> bool:
        """True for every event and for a result whose fields are all among the wanted values."""
        if not msg.is_result:
            return True
        return all(field_of(msg.header, key) in values for key, values in self.wanted.items())


def field_of(header: Mapping[str, Any], key: str) -> str:
    """One filterable field of a result header as text (`-` when absent)."""
    if key in ("decision", "visit"):
        v = header.get("verification") or {}
        if key == "visit":
            v = v.get("visit") or {}
        return str(v.get("decision") or "-")
    if key == "posture":
        p = header.get("posture") or {}
        return str(p.get("label") or "-")
    return str(header.get(key, "-"))


def format_message(msg: DecodedMessage) -> str:
    """One text line for a result or an event (no identity names or scores: a terminal is a log)."""
    h = msg.header
    if msg.is_result:
        posture = h.get("posture") or {}
        pos = f"{posture['label']} {posture['confidence']:.2f}" if posture else "-"
        total = (h.get("latency_ms") or {}).get("total")
        lat = f"{total:.1f}ms" if total is not None else "-"
        errors = ",".join(e.get("task", "?") for e in h.get("errors") or [])
        tail = f" errors={errors}" if errors else ""
        dropped = h.get("dropped_since_last", 0)
        drops = f" dropped={dropped}" if dropped else ""
        visit = ((h.get("verification") or {}).get("visit") or {}).get("id")
        fused = f" visit={visit}:{field_of(h, 'visit')}" if visit is not None else ""
        return (
            f"{h.get('scanner')} seq={h.get('seq')} posture={pos} decision={field_of(h, 'decision')} "
            f"status={h.get('status')} latency={lat}{drops}{fused}{tail}"
        )
    kind = h.get("kind")
    if kind == "state":
        model = h.get("model") or {}
        return (
            f"{h.get('scanner')} event state={h.get('state')} source={h.get('source')} mode={h.get('mode')} "
            f"model={str(model.get('bundle', ''))[:12]} {model.get('precision')} {model.get('backend')} "
            f"calibration={h.get('calibration')}"
        )
    if kind == "drop":
        reason, count = h.get("reason"), h.get("count")
        return f"{h.get('scanner')} event drop reason={reason} count={count} seq={h.get('seq')}"
    if kind == "error":
        return (
            f"{h.get('scanner')} event error stage={h.get('stage')} reason={h.get('reason')} "
            f"seq={h.get('seq')} {h.get('message', '')}".rstrip()
        )
    extra = " ".join(f"{k}={v}" for k, v in h.items() if k not in ("v", "scanner", "kind", "t_ns"))
    return f"{h.get('scanner')} event {kind} {extra}".rstrip()


def to_json_line(msg: DecodedMessage) -> str:
    """One JSON object: `type` (result or event), `topic` and the header as published."""
    return json.dumps(
        {"type": "result" if msg.is_result else "event", "topic": msg.topic, **msg.header},
        separators=(",", ":"),
    )


@dataclass
class TailCounts:
    """How many results and events a tail printed, and how many it filtered out."""

    results: int = 0
    events: int = 0
    filtered: int = 0


def tail(
    target: SubscriberTarget,
    emit: Callable[[str], None],
    stop: threading.Event,
    as_json: bool = False,
    only: ResultFilter | None = None,
    max_results: int | None = None,
    events: bool = True,
) -> TailCounts:
    """Print messages until `stop` is set or `max_results` results were printed."""
    counts = TailCounts()
    keep = only or ResultFilter()
    with ResultsSubscriber(target, events=events) as sub:
        while not stop.is_set():
            msg = sub.receive(0.2)
            if msg is None:
                continue
            if not keep.keep(msg):
                counts.filtered += 1
                continue
            emit(to_json_line(msg) if as_json else format_message(msg))
            if msg.is_result:
                counts.results += 1
                if max_results is not None and counts.results >= max_results:
                    break
            else:
                counts.events += 1
    return counts
