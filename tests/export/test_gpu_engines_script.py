"""benchmarks/gpu_engines.py wired end to end against a fake TensorRT: check, build into the cache,
verify per output against FP32 ONNX Runtime, time, one table per step and a JSON document."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from fake_tensorrt import make_fake_tensorrt

pytest.importorskip("onnx")

import edge.backends.trt as trt_backend  # noqa: E402
from edge.backends.engine_cache import ENGINE_CACHE_ENV, resolve_engine_cache  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_engines.py"


def load_script():  # noqa: ANN201 - the module object
    spec = importlib.util.spec_from_file_location("gpu_engines", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_run_on_a_fake_device(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    trt = make_fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda device=0: ("Orin (nvgpu)", "8.7", "12.6"))
    monkeypatch.setattr(trt_backend, "default_device_memory", lambda: trt.memory)
    cache = resolve_engine_cache().root
    monkeypatch.setenv(ENGINE_CACHE_ENV, str(cache))  # the script sets it; restored after the test
    out_json = tmp_path / "report.json"
    args = ["--bundle", str(bundle), "--precision", "fp32,fp16,int8", "--batch", "1,2", "--seconds", "0.05",
            "--workspace", "64", "--json-out", str(out_json)]  # fmt: skip
    rc = load_script().main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(out_json.read_text())
    assert json.loads(out.strip().splitlines()[-1]) == report  # the JSON is also the last line printed
    assert report["device"]["tensorrt"] == "10.3.0" and report["engine_cache"] == str(cache)
    assert report["builds"]["fp32"]["built"] and report["builds"]["fp16"]["onnx_variant"] == "fp32"
    assert report["builds"]["int8"] == {"built": False, "reason": report["builds"]["int8"]["reason"]}
    assert "export quantize" in report["builds"]["int8"]["reason"]
    outputs = {(r["precision"], r["output"], r["metric"]) for r in report["verify"]}
    for p in ("fp32", "fp16"):
        assert {(p, "embedding", "cosine min"), (p, "posture_logits", "argmax agreement"),
                (p, "reconstruction", "PSNR median (dB)")} <= outputs  # fmt: skip
    assert all(r["ok"] for r in report["verify"])  # the fake runs the same ONNX: identical outputs
    timed = {(r["backend"], r["precision"], r["batch"]) for r in report["timing"] if r["p50_ms"] is not None}
    assert timed == {("ort", "fp32", 1), ("ort", "fp32", 2), ("trt", "fp32", 1), ("trt", "fp32", 2),
                     ("trt", "fp16", 1), ("trt", "fp16", 2)}  # fmt: skip
    assert report["passed"] is True
    assert "precision  output" in out and "p50 ms" in out


def test_without_tensorrt_one_line_exit_69(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert load_script().main([]) == 69
    err = capsys.readouterr().err
    assert err.startswith("gpu_engines: TensorRT is not available") and len(err.strip().splitlines()) == 1
