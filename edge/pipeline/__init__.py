"""The streaming daemon as a pipeline: acquire → FrameQueue → infer → Outbox → publish.

One module per concept on the frame's way; `daemon.Daemon.compose` wires them in one place:

- `context`: the settings, the per-frame `QueuedFrame`, the reloadable `ProcessingContext` and
  the one `Pipeline` object every stage receives (stats, metrics, queues, stop events, deadlines).
- `queues`: `FrameQueue` (the one bounded queue) and `Outbox` (the handoff to the publisher).
- `stats`: the run's counters (`Stats`, `Ring`) and the end-of-run `RunSummary`.
- `metrics`: the pipeline's guarded forwarding to `edge.observability.DaemonMetrics`.
- `stage`: the `Stage` thread base (setup, loop, teardown, drop counting).
- `acquire`, `infer`, `publish`: the three stages; `postprocess`: turning model outputs into
  results (posture, gallery verification, reconstruction, per-frame failures).
- `daemon`: compose + lifecycle (start-up, READY, reload, stall reports, clean stop).
- `assemble`: configuration and `thzedge run` flags → a running daemon (`run_daemon`).
"""
