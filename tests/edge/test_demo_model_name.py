"""`--model demo` names the shipped demo model in every command that reads a bundle, from any directory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.bundle import demo_bundle_path, model_path, writable_model_path
from scanner_io.errors import BundleError

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def thzedge(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m edge ARGS` in `cwd`, a directory with no `edge/demo_bundle` beside it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("THZEDGE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=150
    )


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory outside the source checkout, with a small simulated dataset in it."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    out = thzedge(cwd, "sim", "dataset", "--out", "ds", "--identities", "4", "--samples", "1")
    assert out.returncode == 0, out.stderr
    return cwd


def test_model_path_resolves_only_the_exact_name(tmp_path: Path) -> None:
    assert model_path("demo") == demo_bundle_path()
    assert model_path("./demo") == Path("demo")  # a directory really called demo
    assert model_path(str(tmp_path)) == tmp_path
    with pytest.raises(BundleError, match="copy it first"):
        writable_model_path("demo", "thzedge export quantize")


def test_infer_eval_bench_enroll_run_take_demo(elsewhere: Path) -> None:
    crops = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    np.save(elsewhere / "x.npy", crops)
    out = thzedge(elsewhere, "infer", "x.npy", "--model", "demo", "--out", "r.npz")
    assert out.returncode == 0, out.stderr
    assert np.load(elsewhere / "r.npz")["embedding"].shape[0] == 3

    out = thzedge(
        elsewhere, "--json", "eval", "--model", "demo", "--data", "ds/images", "--triplets", "ds/test.csv"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model"]["bundle"] == str(demo_bundle_path())

    out = thzedge(elsewhere, "--json", "bench", "--model", "demo", "--seconds", "0.1", "--batch", "1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["batch"] == 1

    out = thzedge(
        elsewhere, "enroll", "x.npy", "--model", "demo", "--gallery", "g.npz", "--identity", "person-1"
    )
    assert out.returncode == 0, out.stderr
    assert "enrolled 3 embedding(s)" in out.stdout

    out = thzedge(
        elsewhere, "--json", "run", "--source", "sim?frames=3", "--model", "demo",
        "--publish", f"ipc://{elsewhere}/r.sock", "--metrics-bind", "off",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["published"] == 3
    assert "using the bundled demo model" not in out.stderr  # named, not defaulted


def test_export_check_reads_demo_and_writers_refuse_it(elsewhere: Path) -> None:
    pytest.importorskip("onnx")
    out = thzedge(
        elsewhere, "--json", "export", "check", "--bundle", "demo", "--precision", "int8",
        "--data", "ds/images", "--triplets", "ds/test.csv", "--speed-seconds", "0",
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr  # the gate may pass or fail on 4 identities
    assert json.loads(out.stdout)["precision"] == "int8"
    before = sorted(p.name for p in demo_bundle_path().iterdir())
    out = thzedge(
        elsewhere, "export", "quantize", "--bundle", "demo", "--calibration", "ds", "--precision", "fp16"
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "is the shipped demo model" in out.stderr and "cp -r" in out.stderr
    assert sorted(p.name for p in demo_bundle_path().iterdir()) == before
    # Engines go to the device's engine cache, not into the bundle: `demo` is read, and the
    # command gets as far as needing TensorRT.
    out = thzedge(elsewhere, "export", "engine", "--bundle", "demo")
    if importlib.util.find_spec("tensorrt") is None:
        assert out.returncode == 69 and "TensorRT is not available" in out.stderr, out.stderr
