"""The trt backend's wiring against a fake TensorRT (engine check before deserialising, named I/O,
dynamic batch, device buffers, auto fallback). Real build-and-infer runs only where a GPU is."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_tensorrt import make_fake_tensorrt

pytest.importorskip("onnx")

import edge.backends.trt as trt_backend  # noqa: E402
from edge.backends import create_backend  # noqa: E402
from edge.backends.engine_cache import EngineKey, graph_sha256, resolve_engine_cache  # noqa: E402
from edge.backends.ort import OrtBackend  # noqa: E402
from edge.backends.trt import EngineMismatchError, Platform, TrtBackend  # noqa: E402
from edge.bundle import Bundle  # noqa: E402
from edge.runner import Runner  # noqa: E402
from export.engine import EngineSettings, build_bundle_engines  # noqa: E402
from scanner_io.errors import DataError, MissingDependencyError  # noqa: E402

PLATFORM = Platform("10.3.0", "Orin (nvgpu)", "8.7", "12.6")


def engine_paths(bundle: Path, precision: str, graph: str) -> tuple[Path, Path]:
    """(plan, manifest) of one graph's engine for PLATFORM in the test's engine cache."""
    b = Bundle.open(bundle)
    key = EngineKey.for_platform(PLATFORM, precision, graph_sha256(b, graph, "fp32"))
    return resolve_engine_cache().paths(graph, key)


@pytest.fixture
def engine_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    build_bundle_engines(dst, EngineSettings("fp32", max_batch=4), make_fake_tensorrt("10.3.0"), PLATFORM)
    return dst


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch):
    """Install a fake TensorRT 10.3 + a fake GPU as the running platform."""
    trt = make_fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda device=0: (PLATFORM.gpu_name, "8.7", "12.6"))
    monkeypatch.setattr(trt_backend, "_read_l4t", lambda: None)
    monkeypatch.setattr(trt_backend, "default_device_memory", lambda: trt.memory)
    return trt


def test_trt_backend_matches_ort_on_every_graph(engine_bundle: Path, fake_trt) -> None:
    bundle = Bundle.open(engine_bundle)
    rng = np.random.default_rng(0)
    with TrtBackend(bundle, "fp32") as trt_be, OrtBackend(bundle, "fp32") as ort_be:
        for batch in (1, 3, 4):  # dynamic batch inside the 1..4 profile
            x = rng.random((batch, 1, 64, 64), dtype=np.float32)
            a = trt_be.infer("encoder", {"thz": x})
            b = ort_be.infer("encoder", {"thz": x})
            assert set(a) == set(b)
            for name in b:
                assert a[name].shape == b[name].shape
                np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
            feeds = {k: b[k] for k in ("feat1", "feat2", "feat3", "feat4")}
            r1 = trt_be.infer("decoder_3", feeds)["reconstruction"]
            np.testing.assert_allclose(r1, ort_be.infer("decoder_3", feeds)["reconstruction"], atol=1e-6)
        with pytest.raises(DataError, match="outside 1..4"):
            trt_be.infer("encoder", {"thz": rng.random((5, 1, 64, 64), dtype=np.float32)})
        assert trt_be.describe()["tensorrt"] == "10.3.0"
    # Closing freed every device buffer and the stream.
    assert fake_trt.memory.buffers == {} and fake_trt.memory.closed


def test_runner_through_trt_backend(engine_bundle: Path, fake_trt) -> None:
    x = np.random.default_rng(1).random((6, 1, 64, 64), dtype=np.float32)
    trt_r = Runner.from_bundle(engine_bundle, backend="trt")
    ort_r = Runner.from_bundle(engine_bundle, backend="ort")
    try:
        a, b = trt_r.infer(x), ort_r.infer(x)
        assert trt_r.backend.name == "trt"
        np.testing.assert_array_equal(a.posture, b.posture)
        np.testing.assert_allclose(a.reconstruction, b.reconstruction, atol=1e-6)
    finally:
        trt_r.close()
        ort_r.close()


def test_runner_batches_within_an_engine_built_for_a_smaller_max_batch(
    tiny_bundle: Path, tmp_path: Path, fake_trt
) -> None:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    build_bundle_engines(dst, EngineSettings("fp32", max_batch=2), make_fake_tensorrt("10.3.0"), PLATFORM)
    x = np.random.default_rng(2).random((5, 1, 64, 64), dtype=np.float32)
    with Runner.from_bundle(dst, backend="trt") as trt_r, Runner.from_bundle(dst, backend="ort") as ort_r:
        assert Bundle.open(dst).max_batch > 2 and trt_r.max_batch == 2  # the engine's profile limits it
        a, b = trt_r.infer(x), ort_r.infer(x)
    np.testing.assert_array_equal(a.posture, b.posture)
    np.testing.assert_allclose(a.reconstruction, b.reconstruction, atol=1e-6)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("version", "built with TensorRT 10.3.0, running 10.4.0"),
        ("gpu", "compute capability 8.7, this GPU is 9.0"),
        ("plan", "sha256"),
        ("truncated", "(set below)"),
        ("onnx", "stale engine"),
        ("missing", "no fp32 TensorRT engine"),
    ],
)
def test_mismatched_engine_is_refused_before_deserialising(
    engine_bundle: Path, fake_trt, monkeypatch: pytest.MonkeyPatch, tamper: str, message: str
) -> None:
    plan, man = engine_paths(engine_bundle, "fp32", "decoder_1")
    plan_size = plan.stat().st_size
    if tamper == "version":
        fake_trt.__version__ = "10.4.0"
    elif tamper == "gpu":
        monkeypatch.setattr(trt_backend, "probe_gpu", lambda device=0: ("NVIDIA H200", "9.0", "12.6"))
    elif tamper == "plan":
        data = plan.read_bytes()
        plan.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif tamper == "truncated":  # a power cut mid-copy, or a full disk
        plan.write_bytes(plan.read_bytes()[: plan_size // 2])
    elif tamper == "onnx":
        text = man.read_text().replace('"onnx_sha256": "', '"onnx_sha256": "0')
        man.write_text(text)
    else:
        plan.unlink()
    bundle = Bundle.open(engine_bundle)
    if tamper == "truncated":
        message = f"engine file is {plan_size // 2} bytes, its manifest says {plan_size}"
    with pytest.raises(EngineMismatchError, match=message) as info:
        TrtBackend(bundle, "fp32")
    assert "thzedge export engine" in str(info.value)
    assert fake_trt.deserialized == 0
    if tamper in ("plan", "truncated", "onnx"):
        # A broken entry is deleted, so the next build replaces it instead of tripping on it.
        assert not plan.exists() and not man.exists()


def test_auto_falls_back_to_ort_with_a_warning(
    engine_bundle: Path, fake_trt, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = Bundle.open(engine_bundle)
    checks: list[str] = []
    verify = trt_backend.verified_engines
    monkeypatch.setattr(
        trt_backend, "verified_engines", lambda *a, **k: checks.append("x") or verify(*a, **k)
    )
    be = create_backend(bundle, "auto")
    assert be.name == "trt"  # a matching engine is taken
    assert be.fallback_reason is None
    assert len(checks) == 1  # every plan read and hashed once at start-up, not once per check
    be.close()
    fake_trt.__version__ = "10.4.0"  # e.g. after a JetPack upgrade
    with caplog.at_level(logging.WARNING):
        be = create_backend(bundle, "auto")
    assert be.name == "ort"
    assert any("10.4.0" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    # R-NEW-14: the reason travels with the backend, into the daemon's READY STATUS line.
    assert be.fallback_reason is not None and "10.4.0" in be.fallback_reason
    be.close()
    with pytest.raises(EngineMismatchError):
        create_backend(bundle, "trt")


def test_without_tensorrt(engine_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    bundle = Bundle.open(engine_bundle)
    with pytest.raises(MissingDependencyError, match="TensorRT is not available"):
        create_backend(bundle, "trt")
    be = create_backend(bundle, "auto")
    assert be.name == "ort"
    be.close()


def test_deserialise_failure_is_a_mismatch(engine_bundle: Path, fake_trt) -> None:
    """TensorRT returning None (a plan its manifest did not catch) is refused, not a crash."""
    plan, man = engine_paths(engine_bundle, "fp32", "encoder")
    data = b"NOTAPLAN" + plan.read_bytes()
    plan.write_bytes(data)
    manifest = json.loads(man.read_text())
    manifest.update(engine_sha256=hashlib.sha256(data).hexdigest(), engine_bytes=len(data))
    man.write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="refused to deserialise"):
        TrtBackend(Bundle.open(engine_bundle), "fp32")
    assert fake_trt.memory.buffers == {}


@pytest.mark.gpu
def test_real_tensorrt_build_and_infer(tiny_bundle: Path, tmp_path: Path) -> None:
    """On a GPU with TensorRT: build fp32 + fp16 engines and compare with ONNX Runtime."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    for precision, atol in (("fp32", 1e-3), ("fp16", 5e-2)):
        build_bundle_engines(dst, EngineSettings(precision, max_batch=4, workspace_mb=256))
        x = np.random.default_rng(2).random((4, 1, 64, 64), dtype=np.float32)
        trt_r = Runner.from_bundle(dst, backend="trt", precision=precision)
        ort_r = Runner.from_bundle(dst, backend="ort")
        try:
            a, b = trt_r.infer(x, postures=np.arange(4)), ort_r.infer(x, postures=np.arange(4))
            cos = np.sum(a.embedding * b.embedding, axis=1)
            assert cos.min() > 0.99
            np.testing.assert_allclose(a.reconstruction, b.reconstruction, atol=atol)
        finally:
            trt_r.close()
            ort_r.close()
