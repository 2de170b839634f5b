"""Give the calling thread an OS-visible name (Linux), so `top -H` and /proc show each stage."""

from __future__ import annotations

import contextlib

# The kernel keeps at most 15 bytes of a thread's name.
MAX_NAME = 15


def name_native_thread(name: str) -> None:
    """Set the calling thread's kernel name (`/proc/<pid>/task/<tid>/comm`); a no-op off Linux."""
    with contextlib.suppress(OSError), open("/proc/thread-self/comm", "w") as f:
        f.write(name.encode("ascii", "replace").decode()[:MAX_NAME])
