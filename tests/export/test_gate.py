"""The accuracy gate: per-head statistics and task metrics side by side, verdict per line,
threshold per precision; it must fail a candidate that is not the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from edge.bundle import Bundle  # noqa: E402
from export.gate import GateLine, GateReport, GateTolerances, run_gate  # noqa: E402
from export.quantize import add_variant  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from calibration.simulated import write_dataset

    out = tmp_path_factory.mktemp("gate_ds") / "ds"
    write_dataset(out, identities=4, samples=2, seed=1, test_identities=2)
    return out


@pytest.fixture
def two_model_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """The tiny bundle with an "int8" variant that is really another network (seed 1)."""
    from model_factory import random_network, write_tiny_bundle

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    other = write_tiny_bundle(tmp_path / "other", random_network(width=0.125, embedding_dim=32, seed=1),
                              max_batch=4)  # fmt: skip
    ob = Bundle.open(other)
    add_variant(dst, "int8", {g: ob.graph_file(g) for g in ob.graphs}, {"note": "impostor"})
    return dst


def test_gate_fails_a_different_model(two_model_bundle: Path, dataset: Path) -> None:
    report = run_gate(
        two_model_bundle, "int8", dataset, dataset / "test.csv", speed_seconds=0.1, speed_batch=4
    )
    assert not report.passed
    failed = {ln.name for ln in report.lines if not ln.passed}
    assert "embedding cosine (median)" in failed
    text = report.render()
    assert "FAIL" in text and "int8 not accepted" in text
    for name in ("triplet accuracy", "EER", "posture accuracy", "SSIM", "PSNR dB", "posture argmax agreement",
                 "recon PSNR vs fp32 dB (median)", "optimised vs checked: cosine (median)"):  # fmt: skip
        assert any(ln.name == name for ln in report.lines), name
    d = json.loads(json.dumps(report.to_dict()))  # JSON-ready
    assert d["passed"] is False and d["threshold"]["method"] == "eer"
    assert d["data"]["n_triplets"] > 0 and d["speed"]["batch"] == 4


def test_same_model_passes_and_threshold_at_far(tiny_bundle: Path, tmp_path: Path, dataset: Path) -> None:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    b = Bundle.open(dst)
    add_variant(dst, "int8", {g: b.graph_file(g) for g in b.graphs}, {"note": "fp32 copy"})
    report = run_gate(dst, "int8", dataset, dataset / "test.csv", target_far=0.25, speed_seconds=0)
    assert report.passed, report.render()
    med = next(ln for ln in report.lines if ln.name == "embedding cosine (median)")
    assert med.candidate == pytest.approx(1.0, abs=1e-6)
    t = report.threshold
    assert t["method"] == "far=0.25" and t["threshold"] == pytest.approx(t["reference"], abs=1e-6)
    assert report.speed == {}


def test_report_verdict_and_tolerances() -> None:
    lines = [
        GateLine("task", "triplet accuracy", 0.9, 0.88, -0.02, "Δ <= 1.0 pp", False),
        GateLine("per-head", "embedding cosine (median)", 1.0, 0.995, -0.005, ">= 0.99", True),
    ]
    r = GateReport("int8", "sha", {"triplets_csv": "t.csv"}, GateTolerances(), lines, {})
    # The failure names the change the limit is about, in the limit's unit (not the raw value).
    assert not r.passed and r.failures == ["triplet accuracy Δ -2.00 pp (limit Δ <= 1.0 pp)"]
    assert "FAIL: triplet accuracy" in r.render()
    lines[0].passed = True
    assert r.passed and r.render().endswith("PASS")
    psnr = GateLine("task", "PSNR dB", 27.9, 27.1, -0.8, "Δ <= 0.5 dB", False)
    cos = GateLine("per-head", "embedding cosine (median)", 1.0, 0.95, -0.05, ">= 0.99", False)
    assert psnr.limited_value() == "Δ -0.8000 dB" and cos.limited_value() == "0.9500"
    # The table's delta column is in the limit's unit too: -2.00 pp beside "Δ <= 1.0 pp".
    assert lines[0].row()[4:6] == ["-2.00 pp", "Δ <= 1.0 pp"] and psnr.row()[4] == "-0.8000 dB"
    assert cos.row()[4] == "-0.0500"


def test_gate_refuses_fp32_and_missing_variant(tiny_bundle: Path, dataset: Path) -> None:
    from scanner_io.errors import BundleError, ThzEdgeError

    with pytest.raises(ThzEdgeError, match="--precision int8 or fp16"):
        run_gate(tiny_bundle, "fp32", dataset, dataset / "test.csv")
    with pytest.raises(BundleError, match="export quantize"):
        run_gate(tiny_bundle, "int8", dataset, dataset / "test.csv")


def test_bench_table(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge.bench import bench_model, render_bench
    from edge.cli import main

    rows = bench_model(tiny_bundle, ["ort", "trt"], ["fp32", "int8"], [1, 4], seconds=0.2)
    ok = [r for r in rows if not r.skipped]
    assert {(r.backend, r.precision, r.batch) for r in ok} == {("ort", "fp32", 1), ("ort", "fp32", 4)}
    for r in ok:
        assert r.p50_ms > 0 and r.p99_ms >= r.p50_ms and r.fps > 0
        assert r.cosine_median == pytest.approx(1.0, abs=1e-5) and r.posture_agreement == 1.0
    skipped = {(r.backend, r.precision) for r in rows if r.skipped}
    assert ("ort", "int8") in skipped and ("trt", "fp32") in skipped
    table = render_bench(rows)
    assert "p99 ms" in table and "skipped" in table
    rc = main(["--json", "bench", "--model", str(tiny_bundle), "--batch", "1,2", "--seconds", "0.2"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["batch"] for r in out] == [1, 2]
    assert np.isfinite([r["fps"] for r in out]).all()
