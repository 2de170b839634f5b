"""Stage threads carry kernel names, so per-thread CPU is visible in /proc and `top -H`."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from scanner_io.osthread import MAX_NAME, name_native_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names are Linux")


def _comm_of(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def test_a_thread_gets_its_kernel_name_cut_to_15_bytes() -> None:
    seen: dict[str, str] = {}

    def body() -> None:
        name_native_thread("thz-a-very-long-stage-name")
        seen["comm"] = _comm_of(threading.get_native_id())

    t = threading.Thread(target=body)
    t.start()
    t.join(5)
    assert seen["comm"] == "thz-a-very-long-stage-name"[:MAX_NAME]
    assert _comm_of(threading.get_native_id()) != seen["comm"]  # only the calling thread changed
