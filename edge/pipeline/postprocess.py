"""Post-processing: model outputs of one batch → results (posture, verification, reconstruction).

The model work and its per-frame failure isolation are the runner's (`edge.runner.infer_isolated`);
this module turns each frame's outcome into its `FrameResult`, matches the embedding against the
gallery with the predicted posture (and, for a frame of a visit, adds the visit's fused decision:
edge/visits.py), and records every failure on its own frame: a frame whose
conditioning or encoder failed is `error`, one whose verification or reconstruction failed is
`partial`; the other frames of the batch are unaffected. A frame with no head in it is `no_face`
(the model does not run on it); one conditioned without a fitting calibration profile is
`uncalibrated` (never `ok`).
"""

from __future__ import annotations

import logging
import time

from edge.gallery import VerificationMode, match_probe
from edge.observability import Stage
from edge.pipeline.context import ModelInfo, ProcessingContext, QueuedFrame
from edge.pipeline.queues import Event
from edge.pipeline.stage import Pipeline
from edge.results import FrameResult, Provenance
from edge.runner import FramePrediction, IsolatedBatch, Task
from edge.visits import VisitFusion

log = logging.getLogger("thzedge.daemon")


class PostProcessor:
    """Builds and completes the results of a batch; failures are reported per frame and task."""

    def __init__(self, pipe: Pipeline, postures: tuple[str, ...]) -> None:
        self.pipe = pipe
        self.postures = postures
        # The provenance is the same for every frame of one context (frozen: safe to share).
        self._provenance: tuple[ProcessingContext, ModelInfo, Provenance] | None = None
        s = pipe.settings
        self.visits = (
            VisitFusion(s.visit_frames, s.visit_threshold, s.visit_identify_threshold)
            if s.visit_frames > 0
            else None
        )

    def _provenance_for(self, ctx: ProcessingContext) -> Provenance:
        model = self.pipe.model
        cached = self._provenance
        if cached is None or cached[0] is not ctx or cached[1] is not model:
            prov = Provenance(model.bundle, model.precision, model.backend, ctx.calibration_id)
            cached = self._provenance = (ctx, model, prov)
        return cached[2]

    def new_result(self, q: QueuedFrame, now: float) -> FrameResult:
        """Start the result of one dequeued frame (provenance, queue and conditioning times)."""
        assert q.ctx is not None  # prepared by the acquisition stage
        h = q.frame.header
        r = FrameResult(
            scanner=h.scanner,
            seq=h.seq,
            t_capture_ns=h.t_capture_ns,
            status="ok" if q.calibrated else "uncalibrated",
            provenance=self._provenance_for(q.ctx),
            t_received_mono=q.t_received,
            input=q.x if self.pipe.settings.publish_input else None,
        )
        r.latency_ms[Stage.queue.value] = (now - q.t_received) * 1e3
        r.latency_ms[Stage.condition.value] = q.condition_ms
        if q.error is not None:
            self.fail(r, Task.condition, q.error, fatal=True)
        elif q.quality is not None:
            # No head in the frame: the model does not run, so no posture or decision is made up.
            r.status = "no_face"
            reason = q.quality.reason.value if q.quality.reason is not None else None
            r.quality = {"reason": reason, "head_fraction": round(q.quality.head_fraction, 4)}
            self.pipe.metrics.no_face(reason or "unknown")
        return r

    def complete(self, results: list[FrameResult], frames: list[QueuedFrame], batch: IsolatedBatch) -> None:
        """Fill in posture, embedding, verification and reconstruction from the batch's outcomes."""
        for r, outcome in zip(results, batch.frames, strict=True):
            r.latency_ms[Stage.encoder.value] = batch.encode_ms
            for f in outcome.failures:
                if f.task is Task.encoder:
                    self.fail(r, f.task, f.error, fatal=True)
        done = [
            (r, q, o.prediction)
            for r, q, o in zip(results, frames, batch.frames, strict=True)
            if o.prediction is not None
        ]
        for r, q, p in done:
            r.posture = self._posture(p)
            assert q.ctx is not None
            gallery = q.ctx.gallery
            # With a template key, what may be published is the protected template (R-NEW-3).
            r.embedding = p.embedding if gallery is None else gallery.protect(p.embedding)
            self._verify(r, q, q.ctx, p)
        self._complete_reconstruction(results, batch)
        scorer = self.pipe.scorer
        if scorer is not None:
            for r, q in zip(results, frames, strict=True):
                assert q.ctx is not None
                try:
                    scorer.expect(r, q.frame, q.ctx, reconstruct=batch.reconstruct_ms is not None)
                except Exception as exc:  # scoring is a test aid: it never fails a frame
                    log.warning("scoring seq %d failed: %s", r.seq, type(exc).__name__)

    def _complete_reconstruction(self, results: list[FrameResult], batch: IsolatedBatch) -> None:
        if batch.reconstruct_ms is None:
            return
        for r, outcome in zip(results, batch.frames, strict=True):
            if outcome.prediction is None:
                continue
            r.reconstruction = outcome.prediction.reconstruction
            for f in outcome.failures:
                if f.task is Task.reconstruct:
                    self.fail(r, f.task, f.error)
            r.latency_ms[Stage.reconstruct.value] = batch.reconstruct_ms

    def _posture(self, p: FramePrediction) -> dict[str, object]:
        names = self.postures
        return {
            "label": names[p.posture] if p.posture < len(names) else str(p.posture),
            "index": p.posture,
            "confidence": p.confidence,
        }

    def _verify(self, r: FrameResult, q: QueuedFrame, ctx: ProcessingContext, p: FramePrediction) -> None:
        mode = self.pipe.settings.verification_mode
        if ctx.gallery is None or mode is VerificationMode.off:
            return
        t0 = time.perf_counter()
        claimed = q.frame.header.claimed_identity
        # The gallery compares with the references of the predicted posture (edge.gallery).
        try:
            h = q.frame.header
            fusion = self.visits if h.visit is not None else None
            # One distance computation per frame serves the frame's decision and its visit's.
            scores = None if fusion is None else ctx.gallery.scores(p.embedding, p.posture)
            outcome = match_probe(ctx.gallery, p.embedding, claimed, p.posture, mode, scores)
            assert outcome is not None  # mode is not off
            r.verification = outcome.to_dict()  # its threshold is the gallery's
            if fusion is not None and scores is not None:
                r.verification["visit"] = fusion.add(h.scanner, h.visit, ctx.gallery, scores, claimed, mode)
        except Exception as exc:
            self.fail(r, Task.verify, exc)
        r.latency_ms[Stage.verify.value] = (time.perf_counter() - t0) * 1e3

    def fail(self, r: FrameResult, task: Task, exc: BaseException, fatal: bool = False) -> None:
        """Record a task failure on its frame: `error` when fatal, else `partial`; event + metric."""
        # The log names the task and the exception type only: messages may quote an identity.
        log.warning("task %s failed on seq %d: %s", task, r.seq, type(exc).__name__)
        r.errors.append({"task": task.value, "error": f"{type(exc).__name__}: {exc}"[:300]})
        # `uncalibrated` stays: a failed task never makes an uncalibrated result look calibrated.
        r.status = "error" if fatal else ("partial" if r.status == "ok" else r.status)
        self.pipe.metrics.task_error(task.value)
        body = {
            "stage": "infer",
            "task": task.value,
            "seq": r.seq,
            "reason": "task_failed",
            "message": type(exc).__name__,
        }
        self.pipe.outbox.put_nowait(Event("error", body))
