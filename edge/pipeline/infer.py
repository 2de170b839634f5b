"""The inference stage: batches of prepared frames → the model (`infer_isolated`) → results.

Takes whatever is queued up to the runner's max batch, drops frames that waited longer than
`max_age_s` (`stale`), runs the batch with per-frame failure isolation and hands each result to
the publisher. A bug outside the per-task handling loses only the frames of that batch not yet
accounted for, counted as `task_error`.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from edge.pipeline.context import QueuedFrame
from edge.pipeline.postprocess import PostProcessor
from edge.pipeline.stage import Pipeline, Stage
from edge.results import FrameResult
from edge.runner import ModelRunner, infer_isolated

log = logging.getLogger("thzedge.daemon")


class InferenceStage(Stage):
    """Batches prepared frames through the model and the post-processing steps."""

    def __init__(self, pipe: Pipeline, runner: ModelRunner, post: PostProcessor) -> None:
        super().__init__("infer", pipe)
        self.runner = runner
        self.max_batch = max(1, int(runner.max_batch))
        self.post = post
        self._accounted = 0  # frames of the current batch already published or dropped

    def loop(self) -> None:
        """Take batches until acquisition is done and the queue is empty, or the drain deadline."""
        pipe = self.pipe
        while True:
            pipe.heartbeat.beat()
            deadline = pipe.clock.drain_deadline()
            if deadline is not None and time.monotonic() >= deadline:
                left = pipe.frames.drain()
                if left:
                    pipe.count_drop("shutdown", len(left))
                    log.warning("stop timeout: %d queued frame(s) dropped as shutdown", len(left))
                return
            batch = pipe.frames.get_batch(self.max_batch, pipe.settings.poll_s)
            pipe.metrics.queue_depth(len(pipe.frames))
            if not batch:
                if pipe.upstream_done.is_set() and len(pipe.frames) == 0:
                    return
                continue
            self._accounted = 0
            try:
                self.process(batch)
            except Exception as exc:
                # A bug outside the per-task handling: the frames not yet accounted are lost,
                # and counted as such; the next batch starts clean.
                lost = len(batch) - self._accounted
                log.error(
                    "inference stage error (%s): %d frame(s) dropped as task_error", type(exc).__name__, lost
                )
                if lost > 0:
                    pipe.count_drop("task_error", lost, batch[-1].frame.header.seq)

    def process(self, batch: list[QueuedFrame]) -> None:
        """Turn one batch of queued frames into results handed to the publisher."""
        pipe = self.pipe
        now = time.monotonic()
        fresh: list[QueuedFrame] = []
        for q in batch:
            if pipe.settings.max_age_s > 0 and now - q.t_received > pipe.settings.max_age_s:
                self._accounted += 1
                pipe.count_drop("stale", seq=q.frame.header.seq)
            else:
                fresh.append(q)
        if not fresh:
            return
        pipe.metrics.batch_size(len(fresh))
        with pipe.stats.lock:
            pipe.stats.batches += 1
            pipe.stats.batched_frames += len(fresh)
        results = [self.post.new_result(q, now) for q in fresh]
        ok = [i for i, q in enumerate(fresh) if q.error is None and q.x is not None and q.quality is None]
        if ok:
            x = np.stack([q.x for q in (fresh[i] for i in ok) if q.x is not None])[:, None]
            outcome = infer_isolated(self.runner, x, reconstruct=pipe.settings.reconstruction)
            self.post.complete([results[i] for i in ok], [fresh[i] for i in ok], outcome)
        self._emit(results)

    def _emit(self, results: list[FrameResult]) -> None:
        """Hand the batch's results to the publisher in one piece."""
        pipe = self.pipe
        ready = time.monotonic()
        for r in results:
            if r.status in ("error", "no_face"):
                r.posture = None
                r.embedding = None
            r.t_ready_mono = ready
            pipe.metrics.processed()
        with pipe.stats.lock:
            pipe.stats.processed += len(results)
            for r in results:
                if r.status == "partial":
                    pipe.stats.partial += 1
                elif r.status == "error":
                    pipe.stats.errors += 1
                elif r.status == "no_face":
                    pipe.stats.no_face += 1
                elif r.status == "uncalibrated":
                    pipe.stats.uncalibrated += 1
        self._accounted += len(results)
        item = tuple(results)
        if not pipe.outbox.put(item, pipe.clock.publish_deadline, pipe.settings.poll_s, pipe.heartbeat.beat):
            pipe.count_drop("shutdown", len(results))
