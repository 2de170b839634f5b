"""INT8 / FP16 variants: TensorRT-style Q/DQ settings, calibration data and coverage, routing,
and `quantize` keeping a variant only when the accuracy gate passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from edge.bundle import Bundle  # noqa: E402
from export.gate import GateTolerances  # noqa: E402
from export.quantize import (  # noqa: E402
    CalibrationFeeds,
    CalibrationSet,
    QuantizationError,
    QuantizeSettings,
    load_calibration_set,
    quantize_bundle,
    quantize_graphs,
    route_for_decoders,
)
from scanner_io.errors import DataError  # noqa: E402
from scanner_io.frame import POSTURES  # noqa: E402


def spread_network(images: np.ndarray, seed: int = 0):  # -> MTLNetwork
    """A random tiny network whose BatchNorm statistics are re-estimated on `images`.

    Random BN statistics leave every embedding nearly the same vector (distances ~1e-3), which
    makes any metric comparison meaningless; re-estimating them spreads the embeddings out.
    """
    import torch
    from model_factory import random_network

    model = random_network(width=0.125, embedding_dim=32, seed=seed, spread_postures=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    with torch.no_grad():
        x = torch.from_numpy(images)
        enc = model.encode(x)
        for k in range(len(POSTURES)):
            model.decode(enc, torch.full((len(x),), k))
    return model.eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from calibration.simulated import write_dataset

    out = tmp_path_factory.mktemp("ds") / "ds"
    write_dataset(out, identities=5, samples=2, seed=0, test_identities=2)
    return out


@pytest.fixture(scope="module")
def spread_bundle(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_factory import write_tiny_bundle

    from scanner_io.dataset import load_crop

    images = np.stack([load_crop(p) for p in sorted(dataset.rglob("*.png"))])[:, None].astype(np.float32)
    out = tmp_path_factory.mktemp("spread") / "bundle"
    return write_tiny_bundle(out, spread_network(images), max_batch=4)


@pytest.fixture
def bundle(spread_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(spread_bundle, dst)
    return dst


def _decoders(b: Bundle) -> dict[str, Path]:
    return {name: b.decoder_file(k) for k, name in enumerate(b.postures)}


def test_calibration_feeds_are_rewindable() -> None:
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    feeds = CalibrationFeeds({"a": x}, batch=4)
    first = [f["a"].copy() for f in feeds]
    assert [len(f) for f in first] == [4, 4, 2]
    assert feeds.get_next() is None  # exhausted, ORT's reader protocol
    feeds.rewind()
    again = [f["a"] for f in feeds]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(feeds.as_dict()["a"], x)


def test_dataset_calibration_is_stratified(dataset: Path) -> None:
    cal = load_calibration_set(dataset, samples=30, seed=0)
    assert cal.source == "dataset" and cal.inputs.shape == (30, 1, 64, 64)
    cov = cal.coverage()
    assert set(cov["per_posture"]) == set(POSTURES) and min(cov["per_posture"].values()) >= 5
    assert cov["concealed"] >= 10 and cov["unconcealed"] >= 10
    assert cal.sha256 == load_calibration_set(dataset, samples=30, seed=0).sha256
    assert cal.sha256 != load_calibration_set(dataset, samples=30, seed=1).sha256


def test_bad_calibration_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((4, 32, 32), np.float32))
    with pytest.raises(DataError, match=r"\[N,64,64\]"):
        load_calibration_set(tmp_path / "wrong.npy", 4)
    np.save(tmp_path / "range.npy", np.full((4, 64, 64), 2.0, np.float32))
    with pytest.raises(DataError, match=r"\[0,1\]"):
        load_calibration_set(tmp_path / "range.npy", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no research-format"):
        load_calibration_set(tmp_path / "empty", 4)


def test_int8_graphs_have_the_qdq_tensorrt_accepts(bundle: Path, dataset: Path, tmp_path: Path) -> None:
    b = Bundle.open(bundle)
    cal = load_calibration_set(dataset, samples=40)
    res = quantize_graphs(b.encoder_file(), _decoders(b), cal, QuantizeSettings(), tmp_path / "q")
    assert [g.graph for g in res.graphs] == ["encoder", *POSTURES]
    for g in res.graphs:
        m = onnx.load(str(g.path))
        consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert sum(n.op_type == "QuantizeLinear" for n in qdq) > 5
        for n in qdq:
            zp = consts[n.input[2]]
            assert zp.dtype == np.int8, (g.graph, n.name)  # signed int8, no int32 bias Q/DQ
            assert not np.any(zp), (g.graph, n.name)  # symmetric: every zero-point is 0
        # Per-channel weights: conv weight DQ scales are vectors, one per output channel.
        weights = [(consts[n.input[0]], consts[n.input[1]]) for n in qdq if n.op_type == "DequantizeLinear"
                   and n.input[0] in consts and consts[n.input[0]].ndim == 4]  # fmt: skip
        assert weights and all(s.shape == (w.shape[0],) for w, s in weights)
        # One QuantizeLinear per consumer (shared ones keep ORT from fusing strided convs).
        readers = [i for n in m.graph.node for i in n.input]
        assert all(readers.count(n.output[0]) == 1 for n in qdq if n.op_type == "QuantizeLinear")
        # I/O stays float32: the runtime contract does not change.
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in m.graph.input)
    # Kept in float: the embedding head (Gemm weights not quantized) and the final Sigmoid.
    enc = res.graphs[0]
    assert any("Gemm" in n or "MatMul" in n for n in enc.kept_float)
    # `latent` (default): the spatial reduction to the latent, but nothing the skip features need.
    assert any("spatial_reduction" in n for n in enc.kept_float)
    assert not any("stage" in n or "initial_conv" in n for n in enc.kept_float)
    m = onnx.load(str(enc.path))
    dq_out = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    for node in m.graph.node:
        if node.name in enc.kept_float and node.op_type in ("Gemm", "MatMul"):
            assert node.input[1] not in dq_out
    dec = onnx.load(str(res.graphs[1].path))
    sig = next(n for n in dec.graph.node if n.op_type == "Sigmoid")
    producers = {o: n.op_type for n in dec.graph.node for o in n.output}
    assert producers.get(sig.input[0]) != "DequantizeLinear"
    assert res.calibration["sha256"] == cal.sha256
    assert set(res.calibration["frames_per_decoder"]) == set(POSTURES)


def test_asymmetric_settings_are_refused(bundle: Path, dataset: Path, tmp_path: Path) -> None:
    """The TensorRT lint is live: ORT's default (asymmetric) activations would be caught."""
    b = Bundle.open(bundle)
    cal = load_calibration_set(dataset, samples=20)
    with pytest.raises(QuantizationError, match="zero-point"):
        quantize_graphs(b.encoder_file(), _decoders(b), cal, QuantizeSettings(symmetric_activations=False),
                        tmp_path / "q")  # fmt: skip


def test_calibration_must_cover_every_posture_and_both_kinds(
    bundle: Path, dataset: Path, tmp_path: Path
) -> None:
    b = Bundle.open(bundle)
    no_right = tmp_path / "no_right"
    shutil.copytree(dataset / "images", no_right)
    for p in list(no_right.glob("*_b3b_*.png")) + list(no_right.glob("*_n3n_*.png")):
        p.unlink()
    with pytest.raises(DataError, match="Right"):
        cal = load_calibration_set(no_right, 50)
        quantize_graphs(b.encoder_file(), _decoders(b), cal, QuantizeSettings(), tmp_path / "q")
    concealed_only = tmp_path / "concealed"
    shutil.copytree(dataset / "images", concealed_only)
    for p in concealed_only.glob("*_n?n_*.png"):
        p.unlink()
    with pytest.raises(DataError, match="unconcealed"):
        quantize_graphs(b.encoder_file(), _decoders(b), load_calibration_set(concealed_only, 50),
                        QuantizeSettings(), tmp_path / "q")  # fmt: skip


def test_decoders_get_the_frames_routed_to_them() -> None:
    predicted = np.array([0] * 20 + [1] * 20 + [2] * 3 + [3] * 17)
    truth = np.array([0] * 20 + [1] * 20 + [2] * 20)
    routes = route_for_decoders(predicted, truth, 5, min_frames=16)
    np.testing.assert_array_equal(routes[0], np.arange(20))
    np.testing.assert_array_equal(routes[1], np.arange(20, 40))
    # Too few predicted frames for decoder 2: topped up with its ground-truth posture.
    assert set(routes[2]) == set(range(40, 60))
    # Nothing routes to decoder 4 and no truth for it either: all frames.
    assert len(routes[4]) == len(predicted)


def test_fp16_variant_is_added_when_the_gate_passes(bundle: Path, dataset: Path) -> None:
    out = quantize_bundle(bundle, dataset, QuantizeSettings(precision="fp16", samples=32), dataset,
                          dataset / "test.csv", speed_seconds=0.2)  # fmt: skip
    assert out.added and out.report.passed, out.report.render()
    b = Bundle.open(bundle)  # checksums cover the new files
    assert b.precisions == ("fp32", "fp16")
    m = onnx.load(str(b.encoder_file("fp16")))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    assert b.threshold("fp16") == pytest.approx(out.report.threshold["threshold"])
    assert b.variant("fp16")["verification"]["method"] == "eer"
    assert b.manifest["accuracy_gates"]["fp16"]["passed"] is True
    doc = json.loads((bundle / "fp16" / "gate_report.json").read_text())
    assert doc["passed"] is True and any("embedding cosine" in line for line in doc["table"])
    q = b.variant("fp16")["quantization"]
    assert q["calibration"]["sha256"] and q["settings"]["precision"] == "fp16"
    # Calibration left out the gate's held-out images.
    assert q["calibration"]["coverage"]["frames"] == 32


def test_failing_variant_is_not_added(bundle: Path, dataset: Path) -> None:
    before = (bundle / "manifest.json").read_bytes()
    strict = GateTolerances(median_cosine=1.01)  # unreachable: forces a failure
    out = quantize_bundle(bundle, dataset, QuantizeSettings(samples=32), dataset, dataset / "test.csv",
                          tolerances=strict, speed_seconds=0)  # fmt: skip
    assert not out.added and not out.report.passed
    assert any("embedding cosine (median)" in f for f in out.report.failures)
    assert (bundle / "manifest.json").read_bytes() == before
    assert not (bundle / "int8").exists()
    assert Bundle.open(bundle).precisions == ("fp32",)


def test_quantize_cli_exit_codes(bundle: Path, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge.cli import main

    args = ["export", "quantize", "--bundle", str(bundle), "--calibration", str(dataset), "--samples", "24"]
    rc = main([*args, "--min-cosine", "1.01"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "FAIL" in cap.out and "not added" in cap.err and "Traceback" not in cap.err
    rc = main(["--json", *args, "--precision", "fp16"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert json.loads(cap.out)["added"] is True
    rc = main(["export", "check", "--bundle", str(bundle), "--precision", "fp16", "--data", str(dataset),
               "--triplets", str(dataset / "test.csv"), "--speed-seconds", "0"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0 and "PASS" in cap.out
    rc = main(["export", "quantize", "--bundle", str(bundle), "--calibration", str(dataset),
               "--keep-float", "everything"])  # fmt: skip
    assert rc == 1 and "--keep-float" in capsys.readouterr().err


def test_mcap_recordings_are_conditioned_like_the_daemon(tmp_path: Path) -> None:
    from calibration.conditioning import calibrate_and_condition
    from calibration.simulated import true_profile
    from scanner_io.recording import Recorder
    from scanner_io.simulator import ScannerSimulator

    sim = ScannerSimulator(seed=3, identities=3)
    frames = [sim.render(identity=i % 3, posture=i % 5, sample=0, concealed=bool(i % 2)) for i in range(10)]
    rec_dir = tmp_path / "recs"
    rec_dir.mkdir()
    with Recorder(rec_dir / "a.mcap", calibration=true_profile(sim), fsync=False) as rec:
        for f in frames:
            rec.write(f)
    cal = load_calibration_set(rec_dir, samples=100)
    assert cal.source == "mcap" and cal.inputs.shape == (10, 1, 64, 64)
    expected = np.stack([calibrate_and_condition(f.data, true_profile(sim)) for f in frames])[:, None]
    np.testing.assert_allclose(np.sort(cal.inputs.ravel()), np.sort(expected.ravel()), atol=1e-6)
    # Subsampled: each kept input is one of the daemon-conditioned frames, none twice.
    few = load_calibration_set(rec_dir, samples=4, seed=1)
    rows = [next(k for k, e in enumerate(expected) if np.array_equal(e, x)) for x in few.inputs]
    assert len(few.inputs) == 4 and len(set(rows)) == 4


def test_calibration_set_coverage_without_labels() -> None:
    from export.quantize import check_coverage

    cal = CalibrationSet(np.zeros((5, 1, 64, 64), np.float32), None, None, "npy", "x")
    assert check_coverage(cal, np.arange(5)) == []
    assert "predicted posture Down" in check_coverage(cal, np.array([0, 1, 2, 3, 3]))[0]


def test_calibration_leaves_out_the_gate_images(dataset: Path) -> None:
    from scanner_io.dataset import read_triplets

    rows = read_triplets(dataset / "test.csv")
    held_out = {dataset / p for t in rows for p in (t.anchor, t.positive, t.negative)}
    cal = load_calibration_set(dataset, samples=10_000, exclude=held_out)
    total = len(list(dataset.rglob("*.png")))
    assert len(held_out) > 0 and len(cal.inputs) == total - len(held_out)
