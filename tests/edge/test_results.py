"""The results codec and publisher: header fields, opt-in payload parts, socket ownership."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq

from edge.results import (
    FrameResult,
    OwnedSocket,
    Provenance,
    ResultPublisher,
    decode_message,
    encode_event,
    encode_result,
)

PROV = Provenance(bundle="ab" * 32, precision="fp32", backend="ort", calibration="identity")


def result(**kw) -> FrameResult:
    r = FrameResult(
        scanner="s0",
        seq=7,
        t_capture_ns=100,
        status="ok",
        provenance=PROV,
        posture={"label": "Up", "index": 3, "confidence": 0.5},
    )
    r.embedding = np.arange(4, dtype=np.float32)
    r.reconstruction = np.full((64, 64), 0.25, dtype=np.float32)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_flags_off_send_no_biometric_parts() -> None:
    parts = encode_result(result(), t_publish_ns=200)
    assert len(parts) == 2 and parts[0] == b"result/s0"
    h = json.loads(parts[1])
    assert h["parts"] == [] and h["v"] == 1 and h["seq"] == 7 and h["t_publish_ns"] == 200
    assert h["provenance"] == PROV.to_dict() and h["verification"] is None
    assert b"embedding" not in parts[1]


def test_flags_on_parts_are_described_and_decode_back() -> None:
    parts = encode_result(result(), 200, publish_embedding=True, publish_reconstruction=True)
    assert len(parts) == 4
    msg = decode_message(parts)
    assert msg.is_result
    np.testing.assert_array_equal(msg.arrays["embedding"], np.arange(4, dtype=np.float32))
    assert msg.arrays["reconstruction"].shape == (64, 64)
    # Only the reconstruction: it moves to part 2 and says so.
    only = encode_result(result(), 200, publish_reconstruction=True)
    assert json.loads(only[1])["parts"] == [
        {"index": 2, "kind": "reconstruction", "dtype": "float32", "shape": [64, 64]}
    ]


def test_decoder_rejects_a_short_part_and_an_unknown_version() -> None:
    parts = encode_result(result(), 200, publish_embedding=True)
    with pytest.raises(ValueError, match="bytes"):
        decode_message([parts[0], parts[1], parts[2][:-1]])
    h = json.loads(parts[1])
    h["v"] = 2
    with pytest.raises(ValueError, match="version"):
        decode_message([parts[0], json.dumps(h).encode()])
    ev = encode_event("s0", "state", {"state": "ready"})
    assert ev[0] == b"event/s0" and decode_message(ev).header["kind"] == "state"
    with pytest.raises(ValueError):
        encode_event("s0", "gossip", {})


def test_a_socket_is_refused_from_a_thread_that_does_not_own_it() -> None:
    ctx = zmq.Context()
    owned = OwnedSocket(ctx, zmq.PUB)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            owned.check()
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors and "does not own" in str(errors[0])
    owned.close()
    ctx.term()


def test_publisher_welcomes_a_subscriber_and_sets_private_ipc_mode(tmp_path: Path) -> None:
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/sub/r.sock"
    pub = ResultPublisher(endpoint, "s0", hwm=10, ctx=ctx)
    assert (Path(f"{tmp_path}/sub/r.sock").stat().st_mode & 0o777) == 0o600
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"event/")
    sub.connect(endpoint)
    joins = 0
    for _ in range(100):
        joins += pub.poll_subscriptions()
        if joins:
            break
        sub.poll(20)
    assert joins == 1
    pub.publish_event("state", {"state": "ready"})
    assert sub.poll(2000)
    assert json.loads(sub.recv_multipart()[1])["state"] == "ready"
    sub.close(0)
    pub.close()
    ctx.term()


def test_publisher_refuses_an_ipc_endpoint_another_publisher_holds(tmp_path: Path) -> None:
    from scanner_io.errors import SourceUnavailableError

    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/r.sock"
    first = ResultPublisher(endpoint, "s0", ctx=ctx)
    try:
        with pytest.raises(SourceUnavailableError, match="in use by another running process"):
            ResultPublisher(endpoint, "s1", ctx=ctx)
    finally:
        first.close()
    ResultPublisher(endpoint, "s2", ctx=ctx).close()  # free again once the first one is gone
    ctx.term()
