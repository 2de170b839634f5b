"""What the runtime benchmarks share: the research-size network, inputs, a timing loop, child runs.

`bench_onnx_vs_eager.py` and `bench_research.py` time each runtime in its own child process (so
no thread pool disturbs another, tensorrt-and-quantization.md §10b) by re-running their own
script with `--child KIND ARG`; this module holds that plumbing once.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def random_frames(n: int, seed: int) -> Any:
    """n random 64×64 single-channel inputs in [0, 1), float32."""
    import numpy as np

    return np.random.default_rng(seed).random((n, 1, 64, 64), dtype=np.float32)


def random_research_network() -> Any:
    """Research-width MTL network (128-d embedding), random weights and BatchNorm statistics, eval."""
    import torch

    from export.model import MTLNetwork

    torch.manual_seed(0)
    model = MTLNetwork(embedding_dim=128, num_postures=5, width=1.0)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def time_calls(
    fn: Callable[[], object], batch: int, seconds: float, *, warmup: int = 3, min_calls: int = 5
) -> dict[str, float]:
    """Call fn() for about `seconds` (at least `min_calls` times): per-frame median and p90 ms, frames/s."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_calls:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "batch": batch,
        "calls": len(times),
        "ms_per_frame": statistics.median(times) / batch,
        "ms_per_frame_p90": times[int(0.9 * (len(times) - 1))] / batch,
        "frames_per_s": batch * len(times) / (sum(times) / 1e3),
    }


def run_child(
    script: str, kind: str, arg: str, threads: int, seconds: float, *, passive_omp: bool = False
) -> dict[str, Any]:
    """Run `script --child KIND ARG` in a fresh interpreter; its last stdout line is the JSON result.

    `passive_omp`: OpenMP threads sleep instead of spinning while idle, as thzedge's ORT sessions
    do — on a shared host, spinning pools make eager PyTorch up to 10x slower and noisy.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if passive_omp:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, script, "--child", kind, arg, "--threads", str(threads), "--seconds", str(seconds)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{kind} measurement failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
