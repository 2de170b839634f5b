"""Bundle reader: schema, checksums, and refusal of tampered, incomplete or unknown bundles."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from edge.bundle import MANIFEST_NAME, Bundle, sha256_file
from scanner_io.errors import BundleError
from scanner_io.frame import POSTURES


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(BundleError) as info:
        Bundle.open(path)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_open_exposes_the_contract(tiny_bundle: Path) -> None:
    b = Bundle.open(tiny_bundle)
    assert b.embedding_dim == 32
    assert b.postures == POSTURES
    assert b.max_batch == 4
    assert b.precisions == ("fp32",)
    assert b.threshold("fp32") is None  # not calibrated yet
    assert b.sha256 == hashlib.sha256((tiny_bundle / MANIFEST_NAME).read_bytes()).hexdigest()
    assert b.encoder_file().name == "encoder.onnx"
    assert b.decoder_file("Left") == b.decoder_file(1) == tiny_bundle.resolve() / "decoder_1.onnx"
    assert b.input_spec.name == "thz" and b.input_spec.shape == ("N", 1, 64, 64)
    assert [t.name for t in b.graphs["encoder"].outputs] == [
        "embedding",
        "posture_logits",
        "feat1",
        "feat2",
        "feat3",
        "feat4",
    ]
    assert [t.name for t in b.graphs["decoder_3"].inputs] == ["feat1", "feat2", "feat3", "feat4"]
    assert b.graphs["decoder_3"].outputs[0].shape == ("N", 1, 64, 64)


def test_manifest_records_versions_checksums_and_empty_reports(tiny_bundle: Path) -> None:
    m = _manifest(tiny_bundle)
    assert m["format"] == "thzedge-bundle" and m["format_version"] == 1
    assert m["model"]["family"] == "thz-mtl" and m["model"]["width"] == 0.125
    assert m["input"]["dtype"] == "float32" and m["input"]["range"] == [0.0, 1.0]
    assert m["versions"]["opset"] == 17 and m["variants"]["fp32"]["opset"] == 17
    assert {"thzedge", "torch", "onnx", "onnxruntime"} <= set(m["versions"])
    assert m["accuracy_gates"] == {} and m["engines"] == {}
    assert m["variants"]["fp32"]["verification"]["threshold"] is None
    parity = m["variants"]["fp32"]["parity_vs_pytorch"]
    assert parity["passed"] and parity["batches"] == [1, 4]
    assert len(m["files"]) == 6
    for name, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(tiny_bundle / name)


def test_tampered_graph_is_refused(bundle_copy: Path) -> None:
    f = bundle_copy / "decoder_2.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))
    _refused(bundle_copy, "decoder_2.onnx", "sha256", "re-export")


def test_truncated_graph_is_refused(bundle_copy: Path) -> None:
    f = bundle_copy / "encoder.onnx"
    f.write_bytes(f.read_bytes()[:100])
    _refused(bundle_copy, "encoder.onnx", "truncated")


def test_missing_graph_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "decoder_4.onnx").unlink()
    _refused(bundle_copy, "incomplete", "decoder_4.onnx")


def test_unknown_format_version_is_refused(bundle_copy: Path) -> None:
    m = _manifest(bundle_copy)
    m["format_version"] = 99
    _write_manifest(bundle_copy, m)
    _refused(bundle_copy, "format version 99", "not supported")


def test_missing_manifest_field_is_refused(bundle_copy: Path) -> None:
    m = _manifest(bundle_copy)
    del m["max_batch"]
    _write_manifest(bundle_copy, m)
    _refused(bundle_copy, "max_batch is missing")


def test_manifest_that_is_not_json_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / MANIFEST_NAME).write_text("{not json")
    _refused(bundle_copy, "not valid JSON")


def test_file_outside_the_bundle_is_refused(bundle_copy: Path) -> None:
    m = _manifest(bundle_copy)
    m["files"]["../escape.onnx"] = {"sha256": "0" * 64}
    _write_manifest(bundle_copy, m)
    _refused(bundle_copy, "../escape.onnx", "not a plain path")


def test_variant_naming_an_unlisted_file_is_refused(bundle_copy: Path) -> None:
    m = _manifest(bundle_copy)
    m["variants"]["fp32"]["graphs"]["decoder_0"] = "other.onnx"
    _write_manifest(bundle_copy, m)
    _refused(bundle_copy, "other.onnx", "not in files")


def test_not_a_bundle(tmp_path: Path) -> None:
    _refused(tmp_path / "nowhere", "not a directory")
    _refused(tmp_path, "manifest.json is missing", "thzedge export onnx")


def test_file_changed_after_open_is_caught_when_read(bundle_copy: Path) -> None:
    b = Bundle.open(bundle_copy)
    (bundle_copy / "encoder.onnx").write_bytes(b"swapped")
    with pytest.raises(BundleError, match="changed after it was opened"):
        b.graph_bytes("encoder")


def test_unknown_precision_and_posture_say_what_exists(tiny_bundle: Path) -> None:
    b = Bundle.open(tiny_bundle)
    with pytest.raises(BundleError, match="has no 'int8' variant.*fp32"):
        b.encoder_file("int8")
    with pytest.raises(BundleError, match="Front, Left, Right, Up, Down"):
        b.decoder_file("Sideways")


def test_variants_thresholds_and_gates_can_be_added(bundle_copy: Path) -> None:
    pytest.importorskip("torch")
    from export.bundle_writer import add_variant, set_accuracy_gate, set_threshold

    before = Bundle.open(bundle_copy)
    # Stand-in int8 graphs: the fp32 files (the point here is the bookkeeping, not quantization).
    files = {g: before.graph_file(g) for g in before.graphs}
    b = add_variant(bundle_copy, "int8", files, info={"opset": 17, "quantizer": "test"})
    assert b.precisions == ("fp32", "int8")
    assert b.encoder_file("int8") == bundle_copy.resolve() / "int8" / "encoder.onnx"
    b = set_threshold(bundle_copy, "int8", 0.93, "eer", {"pairs": 120})
    assert b.threshold("int8") == pytest.approx(0.93) and b.threshold("fp32") is None
    b = set_accuracy_gate(bundle_copy, "int8", {"passed": True})
    assert b.manifest["accuracy_gates"]["int8"] == {"passed": True}
    assert b.sha256 != before.sha256  # a changed manifest is a different bundle
    (bundle_copy / "int8" / "decoder_1.onnx").write_bytes(b"tampered")
    _refused(bundle_copy, "int8/decoder_1.onnx")
