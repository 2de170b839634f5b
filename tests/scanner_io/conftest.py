"""Fixtures for scanner_io tests over real sockets: free endpoints and frames."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from scanner_io.frame import Frame, FrameHeader


def free_tcp_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


@pytest.fixture
def ipc_endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/scanner.sock"


def synthetic_frames(
    n: int,
    shape: tuple[int, ...] = (128, 128),
    dtype: str = "uint16",
    scanner: str = "scanner0",
    seed: int = 0,
    start_seq: int = 0,
) -> list[Frame]:
    """Random raw frames with full headers (seq increasing), for tests without the simulator."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        if dtype == "float32":
            data = rng.normal(size=shape).astype(np.float32)
        else:
            data = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)
        header = FrameHeader(
            scanner=scanner,
            seq=start_seq + i,
            t_capture_ns=1_700_000_000_000_000_000 + i * 33_000_000,
            shape=shape,
            dtype=dtype,
            settings={"freq_ghz": 340.0, "mode": "fpa"},
            sensor_temp_c=30.0 + i / 100,
            claimed_identity=None if i % 2 else f"id{i}",
        )
        frames.append(Frame(header=header, data=data))
    return frames


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until true or timeout; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
