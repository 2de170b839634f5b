"""The acquisition codec: bit-exact round trips, every rejection with its reason, fuzzing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner_io.codec import (
    DECODE_REASONS,
    MAX_HEADER_BYTES,
    ZERO_COPY_THRESHOLD,
    EndOfStream,
    FrameRejected,
    decode_frame,
    decode_message,
    encode_end_of_stream,
    encode_frame,
    send_frame,
)
from scanner_io.errors import FrameDecodeError
from scanner_io.frame import FrameHeader


def _header(shape=(4, 5), dtype="uint16", **kw) -> FrameHeader:
    base = dict(scanner="scanner0", seq=7, t_capture_ns=1_700_000_000_000_000_000, shape=shape, dtype=dtype)
    base.update(kw)
    return FrameHeader(**base)


def _parts(header: FrameHeader, array: np.ndarray) -> list[bytes]:
    return [bytes(p) for p in encode_frame(header, array)]


def _reason(parts) -> str:
    with pytest.raises(FrameDecodeError) as info:
        decode_frame(parts)
    assert info.value.reason in DECODE_REASONS
    return info.value.reason


def test_round_trip_is_bit_exact_with_optional_fields() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65535, size=(128, 128), dtype=np.uint16)
    h = _header(
        shape=(128, 128),
        settings={"freq_ghz": 340.0, "mode": "raster", "avg": 4, "ok": True, "x": None},
        sensor_temp_c=31.25,
        claimed_identity="badge-17",
        visit=41,
    )
    frame = decode_frame(_parts(h, arr))
    assert frame.header == h
    assert frame.data.dtype == np.uint16 and frame.data.shape == (128, 128)
    assert frame.data.tobytes() == arr.tobytes()
    assert not frame.data.flags.writeable


@pytest.mark.parametrize("dtype,shape", [("uint8", (3,)), ("uint16", (2, 3, 4)), ("float32", (8, 8))])
def test_round_trip_each_dtype_and_rank(dtype: str, shape: tuple[int, ...]) -> None:
    arr = (np.arange(np.prod(shape)) % 200).astype(dtype).reshape(shape)
    frame = decode_frame(_parts(_header(shape=shape, dtype=dtype), arr))
    assert frame.data.tobytes() == arr.tobytes() and frame.data.dtype == np.dtype(dtype)


def test_non_contiguous_and_big_endian_inputs_are_encoded_without_touching_the_caller() -> None:
    base = np.arange(64, dtype=np.uint16).reshape(8, 8)
    view = base[:, ::2]  # non-contiguous
    big = base.astype(">u2")
    for arr in (view, big):
        h = _header(shape=arr.shape)
        frame = decode_frame(_parts(h, arr))
        assert np.array_equal(frame.data, arr)
    assert np.array_equal(base, np.arange(64, dtype=np.uint16).reshape(8, 8))


def test_encode_refuses_a_header_that_lies_about_the_array() -> None:
    with pytest.raises(ValueError):
        encode_frame(_header(shape=(2, 2)), np.zeros((3, 3), np.uint16))
    with pytest.raises(ValueError):
        encode_frame(_header(dtype="uint8", shape=(2, 2)), np.zeros((2, 2), np.uint16))
    with pytest.raises(ValueError):
        encode_frame(_header(dtype="float64", shape=(2, 2)), np.zeros((2, 2), np.float64))


def _mutated(**changes) -> list[bytes]:
    arr = np.zeros((4, 5), np.uint16)
    topic, header, payload = _parts(_header(), arr)
    obj = json.loads(header)
    for key, value in changes.items():
        if value is _DROP:
            obj.pop(key)
        else:
            obj[key] = value
    return [topic, json.dumps(obj).encode(), payload]


_DROP = object()


@pytest.mark.parametrize(
    "parts_fn,reason",
    [
        (lambda: [b"frame/scanner0", b"{}"], "bad_parts"),
        (lambda: [b"x"] * 4, "bad_parts"),
        (lambda: [b"frame/scanner0", b"{" * 10, b""], "bad_json"),
        (lambda: [b"frame/scanner0", b"\xff\xfe", b""], "bad_json"),
        (lambda: [b"frame/scanner0", b"[1, 2]", b""], "bad_json"),
        (lambda: [b"frame/scanner0", b"[" * 10000, b""], "bad_json"),
        (lambda: [b"frame/scanner0", b" " * (MAX_HEADER_BYTES + 1), b""], "too_large"),
        (lambda: [b"scanner0", b"{}", b""], "bad_topic"),
        (lambda: _mutated(seq=_DROP), "missing_field"),
        (lambda: _mutated(v=2), "bad_version"),
        (lambda: _mutated(v="1"), "bad_field"),
        (lambda: _mutated(seq=-1), "bad_field"),
        (lambda: _mutated(seq=True), "bad_field"),
        (lambda: _mutated(seq=2**63), "bad_field"),
        (lambda: _mutated(t_capture_ns=1.5), "bad_field"),
        (lambda: _mutated(scanner="has space"), "bad_field"),
        (lambda: _mutated(settings=[1]), "bad_field"),
        (lambda: _mutated(settings={"nested": {"a": 1}}), "bad_field"),
        (lambda: _mutated(sensor_temp_c="hot"), "bad_field"),
        (lambda: _mutated(claimed_identity=5), "bad_field"),
        (lambda: _mutated(visit=-1), "bad_field"),
        (lambda: _mutated(visit=True), "bad_field"),
        (lambda: _mutated(visit=2.0), "bad_field"),
        (lambda: _mutated(visit="v1"), "bad_field"),
        (lambda: _mutated(visit=2**63), "bad_field"),
        (lambda: _mutated(dtype="float64"), "bad_dtype"),
        (lambda: _mutated(dtype="int16"), "bad_dtype"),
        (lambda: _mutated(shape=[]), "bad_shape"),
        (lambda: _mutated(shape=[1, 1, 1, 1]), "bad_shape"),
        (lambda: _mutated(shape=[0, 5]), "bad_shape"),
        (lambda: _mutated(shape=[4, 100000]), "bad_shape"),
        (lambda: _mutated(shape=[4, 6]), "size_mismatch"),
        (lambda: _mutated(scanner="other"), "topic_mismatch"),
    ],
)
def test_each_rejection_has_its_reason(parts_fn, reason: str) -> None:
    assert _reason(parts_fn()) == reason


def test_rejection_carries_seq_when_readable() -> None:
    with pytest.raises(FrameRejected) as info:
        decode_frame(_mutated(shape=[4, 6]))
    assert info.value.seq == 7 and info.value.scanner == "scanner0"


def test_nan_and_json_constants_are_rejected() -> None:
    arr = np.array([1.0, np.nan], np.float32)
    topic, header, _ = _parts(_header(shape=(2,), dtype="float32"), np.zeros(2, np.float32))
    assert _reason([topic, header, arr.tobytes()]) == "non_finite"
    assert _reason([topic, header.replace(b'"seq":7', b'"seq":NaN'), arr.tobytes()]) == "bad_json"


def test_oversized_payload_is_refused_before_parsing(monkeypatch) -> None:
    import scanner_io.codec as codec

    monkeypatch.setattr(codec, "MAX_PAYLOAD_BYTES", 100)
    assert _reason([b"frame/scanner0", b"not json", b"\0" * 101]) == "too_large"


def test_zmq_frames_decode_without_copy() -> None:
    arr = np.arange(20, dtype=np.uint16).reshape(4, 5)
    parts = [zmq.Frame(bytes(p)) for p in encode_frame(_header(), arr)]
    assert np.array_equal(decode_frame(parts).data, arr)


# --- property-based fuzzing -------------------------------------------------------------------

_part = st.binary(max_size=256)


@settings(max_examples=300, deadline=None)
@given(st.lists(_part, max_size=5))
def test_arbitrary_bytes_only_raise_frame_decode_error(parts: list[bytes]) -> None:
    try:
        decode_frame(parts)
    except FrameDecodeError as exc:
        assert exc.reason in DECODE_REASONS


_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
_json = st.recursive(
    _json_scalar,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(
        [
            "v",
            "scanner",
            "seq",
            "t_capture_ns",
            "shape",
            "dtype",
            "settings",
            "sensor_temp_c",
            "claimed_identity",
            "visit",
            "extra",
        ]
    ),
    value=_json,
    drop=st.booleans(),
    payload_cut=st.integers(min_value=-3, max_value=3),
    flip=st.tuples(
        st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=10_000), st.integers(1, 255)
    ),
    do_flip=st.booleans(),
)
def test_mutated_valid_messages_decode_or_raise_frame_decode_error(
    field, value, drop, payload_cut, flip, do_flip
) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    topic, header, payload = _parts(_header(shape=(3, 4), dtype="float32"), arr)
    obj = json.loads(header)
    if drop:
        obj.pop(field, None)
    else:
        obj[field] = value
    parts = [
        topic,
        json.dumps(obj).encode(),
        payload[: len(payload) + payload_cut] if payload_cut < 0 else payload + b"\0" * payload_cut,
    ]
    if do_flip:
        which, pos, xor = flip
        buf = bytearray(parts[which])
        if buf:
            buf[pos % len(buf)] ^= xor
            parts[which] = bytes(buf)
    try:
        frame = decode_frame(parts)
    except FrameDecodeError as exc:
        assert exc.reason in DECODE_REASONS
    else:
        # Whatever got through is self-consistent.
        assert frame.data.nbytes == len(parts[2])
        assert list(frame.data.shape) == list(frame.header.shape)


@settings(max_examples=100, deadline=None)
@given(
    dtype=st.sampled_from(["uint8", "uint16", "float32"]),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**63 - 1),
)
def test_round_trip_property(dtype: str, shape: list[int], seed: int, seq: int) -> None:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    arr = raw.view(dtype).reshape(shape)
    if dtype == "float32":
        arr = np.where(np.isfinite(arr), arr, 0).astype(np.float32)
    h = _header(shape=tuple(shape), dtype=dtype, seq=seq)
    frame = decode_frame(_parts(h, arr))
    assert frame.header == h and frame.data.tobytes() == arr.tobytes()


# --- zero-copy send (R-ZMQ-6) --------------------------------------------------------------------


def test_zero_copy_send_tracker_guards_the_buffer_until_done() -> None:
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        for s in (push, pull):
            s.setsockopt(zmq.LINGER, 0)
        pull.bind("inproc://zc")
        push.connect("inproc://zc")
        shape = (256, 256)  # 128 KiB >= the zero-copy threshold
        arr = np.full(shape, 1234, np.uint16)
        assert arr.nbytes >= ZERO_COPY_THRESHOLD
        tracker = send_frame(push, _header(shape=shape), arr)
        assert tracker is not None
        received = pull.recv_multipart()
        tracker.wait(5)
        assert tracker.done
        arr[:] = 0xDEAD  # poison the buffer only once its own tracker is done
        assert np.all(decode_frame(received).data == 1234)
        # Small payloads are copied: no tracker, and the buffer is free at once.
        assert send_frame(push, _header(), np.zeros((4, 5), np.uint16)) is None
        pull.recv_multipart()
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


# --- end of stream ------------------------------------------------------------------------------


def _end_reason(parts) -> str:
    with pytest.raises(FrameDecodeError) as info:
        decode_message(parts)
    assert info.value.reason in DECODE_REASONS
    return info.value.reason


def test_end_of_stream_round_trip_and_frames_through_decode_message() -> None:
    end = EndOfStream(scanner="scanner0", last_seq=41, frames=40)
    parts = encode_end_of_stream(end)
    assert parts[0] == b"end/scanner0" and parts[2] == b""
    assert json.loads(parts[1]) == {
        "v": 1, "kind": "end_of_stream", "scanner": "scanner0", "last_seq": 41, "frames": 40,
    }  # fmt: skip
    assert decode_message(parts) == end
    assert decode_message(encode_end_of_stream(EndOfStream("s", None, 0))) == EndOfStream("s", None, 0)
    arr = np.arange(20, dtype=np.uint16).reshape(4, 5)
    frame = decode_message(_parts(_header(), arr))
    assert not isinstance(frame, EndOfStream) and np.array_equal(frame.data, arr)


def test_an_older_decoder_counts_end_of_stream_as_malformed_and_unknown_kinds_are_bad_topic() -> None:
    # decode_frame is what a v1 receiver without end-of-stream runs: one counted rejection.
    assert _reason(encode_end_of_stream(EndOfStream("scanner0", 3, 4))) == "bad_topic"
    assert _end_reason([b"pause/scanner0", b"{}", b""]) == "bad_topic"  # a kind this receiver lacks


def _end_parts(**changes) -> list[bytes]:
    obj = EndOfStream("scanner0", 9, 10).to_dict()
    for key, value in changes.items():
        if value is _DROP:
            obj.pop(key)
        else:
            obj[key] = value
    return [b"end/scanner0", json.dumps(obj).encode(), b""]


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"v": 2}, "bad_version"),
        ({"v": "1"}, "bad_field"),
        ({"kind": "pause"}, "bad_field"),
        ({"frames": _DROP}, "missing_field"),
        ({"last_seq": -1}, "bad_field"),
        ({"last_seq": True}, "bad_field"),
        ({"frames": 2**63}, "bad_field"),
        ({"scanner": "other"}, "topic_mismatch"),
        ({"scanner": "bad name"}, "bad_field"),
    ],
)
def test_end_of_stream_rejections(changes, reason) -> None:
    assert _end_reason(_end_parts(**changes)) == reason


def test_end_of_stream_size_and_shape_rejections() -> None:
    good = encode_end_of_stream(EndOfStream("scanner0", 1, 2))
    assert _end_reason([*good[:2], b"x"]) == "size_mismatch"
    assert _end_reason(good[:2]) == "bad_parts"
    assert _end_reason([good[0], b" " * (MAX_HEADER_BYTES + 1), b""]) == "too_large"
    assert _end_reason([good[0], b"[1]", b""]) == "bad_json"


@settings(max_examples=300, deadline=None)
@given(st.lists(_part, max_size=5), st.sampled_from([b"end/", b"frame/", b""]))
def test_arbitrary_bytes_only_raise_frame_decode_error_from_decode_message(parts, prefix) -> None:
    if parts:
        parts[0] = prefix + parts[0]
    try:
        decode_message(parts)
    except FrameDecodeError as exc:
        assert exc.reason in DECODE_REASONS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(["v", "kind", "scanner", "last_seq", "frames", "extra"]),
    value=_json,
    drop=st.booleans(),
    payload=st.binary(max_size=4),
)
def test_mutated_end_of_stream_decodes_or_raises_frame_decode_error(field, value, drop, payload) -> None:
    parts = _end_parts(**{field: _DROP if drop and field != "extra" else value})
    parts[2] = payload
    try:
        end = decode_message(parts)
    except FrameDecodeError as exc:
        assert exc.reason in DECODE_REASONS
    else:
        assert isinstance(end, EndOfStream) and parts[2] == b""
        assert end.last_seq is None or end.last_seq >= 0
