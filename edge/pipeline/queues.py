"""The two queues of the pipeline: `FrameQueue` (acquire → infer) and `Outbox` (→ publish)."""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge.pipeline.context import QueuedFrame
from edge.results import FrameResult


class FrameQueue:
    """The one bounded frame queue: drop-oldest (live) or blocking (lockstep) when full."""

    def __init__(self, maxsize: int, block_when_full: bool) -> None:
        self.maxsize = maxsize
        self.block_when_full = block_when_full
        self._items: collections.deque[QueuedFrame] = collections.deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: QueuedFrame, stop: threading.Event, poll_s: float = 0.05) -> QueuedFrame | None:
        """Add `item`; return the evicted oldest frame (live) or None. Lockstep waits for room.

        In lockstep, a `stop` while waiting returns `item` itself: the caller counts it.
        """
        with self._cond:
            if self.block_when_full:
                while len(self._items) >= self.maxsize:
                    if stop.is_set():
                        return item
                    self._cond.wait(poll_s)
                evicted = None
            else:
                evicted = self._items.popleft() if len(self._items) >= self.maxsize else None
            self._items.append(item)
            self._cond.notify_all()
            return evicted

    def get_batch(self, max_n: int, timeout_s: float) -> list[QueuedFrame]:
        """Return up to `max_n` queued frames, oldest first; waits at most `timeout_s` for the first."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            out: list[QueuedFrame] = []
            while self._items and len(out) < max_n:
                out.append(self._items.popleft())
            if out:
                self._cond.notify_all()
            return out

    def drain(self) -> list[QueuedFrame]:
        """Remove and return everything queued."""
        with self._cond:
            out = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return out


@dataclass(frozen=True)
class Event:
    """An event for subscribers (`error`, `source`, …): its kind and JSON body."""

    kind: str
    body: dict[str, Any]


# Results go over as one batch's tuple: one handoff per batch, not per frame.
ResultBatch = tuple[FrameResult, ...]
OutboxItem = ResultBatch | Event


@dataclass
class _PendingDrops:
    count: int
    seq: int


class Outbox:
    """The handoff from acquisition/inference to the publisher (a queue; the socket stays put)."""

    def __init__(self, maxsize: int = 64, drop_event_interval_s: float = 0.25) -> None:
        self._q: queue.Queue[OutboxItem] = queue.Queue(maxsize=maxsize)
        # Drop events are rate-limited (R-INT-1): counts accumulate per reason and go out as one
        # `drop` event per reason at most every `drop_event_interval_s`; the counters stay exact.
        self._drops: dict[str, _PendingDrops] = {}
        self._drops_lock = threading.Lock()
        self._drop_interval = drop_event_interval_s
        self._drops_sent_at: dict[str, float] = {}

    def report_drop(self, reason: str, seq: int, count: int = 1) -> None:
        """Note `count` dropped frames (the latest `seq`) for the next rate-limited `drop` event."""
        with self._drops_lock:
            entry = self._drops.setdefault(reason, _PendingDrops(0, seq))
            entry.count += count
            entry.seq = seq

    def take_drop_events(self, now: float, force: bool = False) -> list[dict[str, Any]]:
        """Return the `drop` event bodies due now (one per reason), clearing what they report."""
        out = []
        with self._drops_lock:
            for reason in list(self._drops):
                if force or now - self._drops_sent_at.get(reason, -1e9) >= self._drop_interval:
                    pending = self._drops.pop(reason)
                    self._drops_sent_at[reason] = now
                    out.append({"reason": reason, "count": pending.count, "seq": pending.seq})
        return out

    def put(
        self,
        item: OutboxItem,
        stop_deadline: Callable[[], float | None],
        poll_s: float,
        on_wait: Callable[[], None] | None = None,
    ) -> bool:
        """Queue one item, waiting while the publisher is behind; False if the stop deadline passed."""
        while True:
            try:
                self._q.put(item, timeout=poll_s)
                return True
            except queue.Full:
                if on_wait is not None:
                    on_wait()  # waiting on a slow consumer is `blocked`, not hung: keep the heartbeat
                deadline = stop_deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    return False

    def put_nowait(self, item: OutboxItem) -> bool:
        """Queue one item if there is room (events that may be skipped, e.g. rate-limited drops)."""
        try:
            self._q.put_nowait(item)
            return True
        except queue.Full:
            return False

    def get(self, timeout_s: float) -> OutboxItem | None:
        """Return the next item or None after `timeout_s`."""
        try:
            return self._q.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def qsize(self) -> int:
        """Return the number of items waiting for the publisher."""
        return self._q.qsize()
