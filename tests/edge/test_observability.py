"""Metrics and health endpoints over real HTTP; state transitions in metrics, log and STATUS."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request

import pytest

from edge.config import ConfigError
from edge.observability import (
    DROP_REASONS,
    DaemonMetrics,
    Health,
    StateTracker,
    health_from,
    message_id,
    serve_http,
)
from edge.sdnotify import Heartbeat, Notifier


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_counters_and_histograms_show_up_in_the_scrape():
    m = DaemonMetrics()
    for _ in range(5):
        m.frame_received()
    m.frames_processed.inc(4)
    m.published("ok")
    m.published("partial")
    m.dropped("queue_full", 2)
    m.malformed("size_mismatch")
    m.observe_stage("infer", 0.02)
    m.batch_size.observe(4)
    m.queue_depth.set(3)
    m.set_source_state("stalled")
    with serve_http("127.0.0.1:0", m) as srv:
        code, text = get(srv.url + "/metrics")
    assert code == 200
    assert "thzedge_frames_received_total 6.0" in text  # 5 frames + 1 malformed message
    assert "thzedge_frames_processed_total 4.0" in text
    assert 'thzedge_results_published_total{status="partial"} 1.0' in text
    assert 'thzedge_frames_dropped_total{reason="queue_full"} 2.0' in text
    assert 'thzedge_frames_dropped_total{reason="malformed"} 1.0' in text
    assert 'thzedge_frames_malformed_total{reason="size_mismatch"} 1.0' in text
    assert 'thzedge_stage_duration_seconds_count{stage="infer"} 1.0' in text
    assert "thzedge_batch_size_sum 4.0" in text
    assert "thzedge_queue_depth 3.0" in text
    assert 'thzedge_source_state{thzedge_source_state="stalled"} 1.0' in text
    assert "thzedge_source_up 0.0" in text
    # Every known drop reason exists before the first drop (alerts need the series).
    for reason in DROP_REASONS:
        assert f'thzedge_frames_dropped_total{{reason="{reason}"}}' in text


def test_pre_created_labels_are_the_ones_the_pipeline_can_emit():
    from edge.observability import STAGE_METRICS, Stage
    from scanner_io.codec import DECODE_REASONS

    text = DaemonMetrics().render().decode()
    malformed = {
        ln.split('reason="')[1].split('"')[0]
        for ln in text.splitlines()
        if ln.startswith("thzedge_frames_malformed_total{")
    }
    assert malformed == set(DECODE_REASONS)  # exactly the decoder's reasons, at 0 before the first
    stages = {
        ln.split('stage="')[1].split('"')[0]
        for ln in text.splitlines()
        if ln.startswith("thzedge_stage_duration_seconds_count{")
    }
    assert stages == set(STAGE_METRICS) == {s.metric for s in Stage}
    assert not stages & {"decode", "calibrate"}  # never observed: not announced


def test_two_daemons_in_one_process_do_not_share_series():
    a, b = DaemonMetrics(), DaemonMetrics()
    a.frame_received()
    assert a.value("thzedge_frames_received_total") == 1
    assert b.value("thzedge_frames_received_total") == 0


def test_binds_loopback_by_default():
    """R-SEC-4: the address is 127.0.0.1 unless configured; nothing listens on other interfaces."""
    from edge.config import MetricsConfig

    assert MetricsConfig().host == "127.0.0.1"
    m = DaemonMetrics()
    with serve_http(MetricsConfig().host + ":0", m) as srv:
        assert srv.host == "127.0.0.1"
        assert get(srv.url + "/metrics")[0] == 200


def test_healthz_and_readyz_follow_heartbeat_and_state():
    m = DaemonMetrics()
    now = [0.0]
    hb = Heartbeat(clock=lambda: now[0])
    tracker = StateTracker(m)
    with serve_http("127.0.0.1:0", m, health_from(tracker, hb, max_age_s=5.0)) as srv:
        code, body = get(srv.url + "/healthz")
        assert code == 200 and json.loads(body)["alive"] is True
        code, body = get(srv.url + "/readyz")
        assert code == 503 and json.loads(body)["state"] == "starting"
        tracker.set("warming_up", "first inference")
        assert get(srv.url + "/readyz")[0] == 503
        tracker.set("ready", "streaming")
        code, body = get(srv.url + "/readyz")
        assert code == 200 and json.loads(body) == {
            "ok": True,
            "alive": True,
            "ready": True,
            "state": "ready",
            "detail": "streaming",
            "heartbeat_age_s": 0.0,
        }
        tracker.set("stalled", "source silent 12 s")  # a stalled source is still ready, still alive
        assert get(srv.url + "/readyz")[0] == 200
        now[0] = 6.0  # the loop stopped beating: hung
        code, body = get(srv.url + "/healthz")
        assert code == 503 and json.loads(body)["heartbeat_age_s"] == 6.0
        assert get(srv.url + "/readyz")[0] == 503
        assert get(srv.url + "/nope")[0] == 404


def test_failing_health_function_reports_unhealthy():
    def broken() -> Health:
        raise RuntimeError("boom")

    with serve_http("127.0.0.1:0", DaemonMetrics(), broken) as srv:
        code, body = get(srv.url + "/healthz")
    assert code == 503 and json.loads(body)["state"] == "failed"


def test_port_in_use_is_retryable_and_a_foreign_address_a_config_error():
    from scanner_io.errors import ResourceBusyError

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        with pytest.raises(ResourceBusyError, match="in use"):  # exit 69: another process holds it
            serve_http(f"127.0.0.1:{s.getsockname()[1]}", DaemonMetrics())
    finally:
        s.close()
    with pytest.raises(ConfigError, match="cannot bind"):  # exit 78: not an address of this host
        serve_http("192.0.2.1:9464", DaemonMetrics())


def test_state_transition_reaches_metrics_log_and_status(tmp_path, caplog):
    """R-OBS-1: one transition is visible in the gauge, a MESSAGE_ID log line and STATUS."""
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "n.sock"))
    rx.settimeout(2)
    m = DaemonMetrics()
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
    t = StateTracker(m, n)
    try:
        with caplog.at_level(logging.INFO, logger="thzedge.daemon"):
            assert t.set("ready", "streaming 30.0 fps")
            assert not t.set("ready", "streaming 29.0 fps")  # same state: no STATUS, no new log line
            t.status("streaming 28.0 fps")  # the daemon's periodic refresh
        assert rx.recv(4096) == b"STATUS=ready: streaming 30.0 fps"
        assert rx.recv(4096) == b"STATUS=ready: streaming 28.0 fps"
        lines = [r for r in caplog.records if r.name == "thzedge.daemon"]
        assert len(lines) == 1
        assert f"MESSAGE_ID={message_id('state.ready')}" in lines[0].getMessage()
        assert message_id("state.ready") == lines[0].MESSAGE_ID
        assert m.value("thzedge_state", {"thzedge_state": "ready"}) == 1
        assert m.value("thzedge_ready") == 1
        t.set("stopping")
        assert m.value("thzedge_ready") == 0
    finally:
        n.close()
        rx.close()
    assert message_id("state.ready") != message_id("state.stopping")
    assert len(message_id("state.ready")) == 32
    with pytest.raises(ValueError):
        t.set("sleeping")
