"""Galleries are bound to the encoder, so `export threshold` and `export quantize` keep them valid;
probing at another precision is allowed only where that variant's accuracy gate passed."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from edge.bundle import Bundle  # noqa: E402
from edge.gallery import Gallery  # noqa: E402
from edge.templates import TemplateKey  # noqa: E402
from export.bundle_writer import add_variant, set_accuracy_gate, set_threshold  # noqa: E402
from scanner_io.errors import ConfigError  # noqa: E402


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _gallery(bundle: Bundle, path: Path, key: TemplateKey | None = None) -> Path:
    g = Gallery.for_bundle(bundle, threshold=0.5, template_key=key)
    e = np.random.default_rng(0).standard_normal((3, bundle.embedding_dim)).astype(np.float32)
    g.enroll("alice", e / np.linalg.norm(e, axis=1, keepdims=True), postures=[0, 1, 2])
    return g.save(path)


def test_gallery_survives_threshold_and_a_new_variant(bundle_copy: Path, tmp_path: Path, caplog) -> None:
    before = Bundle.open(bundle_copy)
    key = TemplateKey("site", 1, b"\x05" * 32)
    path = _gallery(before, tmp_path / "g.npz", key)
    after = set_threshold(bundle_copy, "fp32", 0.77, "eer", {"pairs": 10})  # `export threshold`
    files = {g: before.graph_file(g) for g in before.graphs}
    after = add_variant(
        bundle_copy, "int8", files, info={"opset": 17, "quantizer": "test"}
    )  # `export quantize`
    assert after.sha256 != before.sha256 and after.encoder_sha256 == before.encoder_sha256
    g = Gallery.load(path, after, template_key=key)
    assert g.threshold == pytest.approx(0.77) and g.identities == ("alice",)
    # int8 probes against fp32 references: refused while the variant has no passed gate ...
    with pytest.raises(ConfigError, match="int8 variant has no accuracy gate"):
        Gallery.load(path, after, threshold=0.5, precision="int8", template_key=key)
    set_accuracy_gate(bundle_copy, "int8", {"passed": False, "lines": []})
    with pytest.raises(ConfigError, match="failed its accuracy gate"):
        Gallery.load(path, Bundle.open(bundle_copy), threshold=0.5, precision="int8", template_key=key)
    # ... and allowed, with the gate's measured embedding agreement logged, once it passed.
    lines = [
        {"name": "embedding cosine (median)", "candidate": 0.9991},
        {"name": "embedding cosine (min)", "candidate": 0.9902},
    ]
    b = set_accuracy_gate(bundle_copy, "int8", {"passed": True, "lines": lines})
    with caplog.at_level(logging.INFO):
        g8 = Gallery.load(path, b, threshold=0.5, precision="int8", template_key=key)
    assert g8.precision == "fp32" and "median 0.9991, min 0.9902" in caplog.text


def test_a_format_2_gallery_binds_to_its_manifest_until_rewritten(bundle_copy: Path, tmp_path: Path) -> None:
    import json

    b = Bundle.open(bundle_copy)
    path = _gallery(b, tmp_path / "g.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta.update(format=2, bundle_sha256=b.sha256)
    for k in ("encoder_sha256", "embedding", "template"):
        meta.pop(k)
    arrays["meta"] = np.array(json.dumps(meta))
    old = tmp_path / "v2.npz"
    np.savez(old, **arrays)
    g = Gallery.load(old, b, threshold=0.5)  # the manifest it was enrolled with: its encoder is this one
    assert g.encoder_sha256 == b.encoder_sha256
    g.save(old)
    moved = set_threshold(bundle_copy, "fp32", 0.6, "eer", {"pairs": 10})
    assert Gallery.load(old, moved).threshold == pytest.approx(0.6)  # rewritten as format 3: survives
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "v2b.npz", **arrays)
    with pytest.raises(ConfigError, match="format 2.*records no encoder sha256.*re-enrol"):
        Gallery.load(tmp_path / "v2b.npz", moved)
