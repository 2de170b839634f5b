"""The shipped demo bundle: it loads, its checksums hold, it carries a calibrated threshold, and
on a fixed simulated test set of unseen people it scores what docs/demo-model.md says.

The test set is made here by the simulator with a seed the demo model was not trained on, so
its identities (and even the sensor's fixed pattern) are new to the model. ONNX Runtime only:
this runs without torch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration.simulated import write_dataset
from edge.bundle import Bundle, demo_bundle_path
from edge.evaluation import evaluate
from edge.runner import Runner

# docs/demo-model.md, "Check set" table: measured with
#   write_dataset(DIR, identities=12, samples=2, seed=1, test_identities=12)
#   thzedge eval --model edge/demo_bundle --data DIR --triplets DIR/test.csv
CHECK_SET = {"identities": 12, "samples": 2, "seed": 1}
EXPECTED = {
    "posture_accuracy": 1.000,
    "triplet_accuracy": 0.9917,
    "eer": 0.0250,
    "ssim_mean": 0.9025,
}
# Inference is deterministic; the slack covers float differences across CPUs and ORT builds
# (one flipped triplet of 120 moves accuracy by 0.008).
TOLERANCE = {"posture_accuracy": 0.02, "triplet_accuracy": 0.02, "eer": 0.02, "ssim_mean": 0.005}


@pytest.fixture(scope="module")
def demo() -> Bundle:
    return Bundle.open(demo_bundle_path())


def test_demo_bundle_opens_with_checksums_and_a_threshold(demo: Bundle) -> None:
    assert demo.path == demo_bundle_path().resolve()
    assert demo.postures == ("Front", "Left", "Right", "Up", "Down")
    t = demo.threshold("fp32")
    assert t is not None and 0.0 < t < 2.0
    verification = demo.manifest["variants"]["fp32"]["verification"]
    # Chosen at FAR 1 % on a gallery of the validation people (other captures), as the field pairs.
    assert verification["method"] == "far" and "validation" in verification["chosen_on"]["split"]
    assert verification["chosen_on"]["pairs_kind"].startswith("gallery")
    assert verification["chosen_on"]["target_far"] == 0.01
    # "A few MB at most" ships inside the wheel.
    size = sum(f.stat().st_size for f in demo.path.rglob("*") if f.is_file())
    assert size < 4 * 1024 * 1024


def test_demo_bundle_refuses_a_tampered_copy(demo: Bundle, tmp_path: Path) -> None:
    import shutil

    from scanner_io.errors import BundleError

    copy = tmp_path / "b"
    shutil.copytree(demo.path, copy)
    onnx_file = next(copy.glob("*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        Bundle.open(copy)


def test_demo_bundle_scores_the_documented_figures(demo: Bundle, tmp_path: Path) -> None:
    write_dataset(
        tmp_path,
        identities=CHECK_SET["identities"],
        samples=CHECK_SET["samples"],
        seed=CHECK_SET["seed"],
        test_identities=CHECK_SET["identities"],
    )
    with Runner.from_bundle(demo, backend="ort") as runner:
        report = evaluate(runner, tmp_path, tmp_path / "test.csv", routing="predicted")
    overall = report.overall
    got = {
        "posture_accuracy": overall["posture"]["accuracy"],
        "triplet_accuracy": overall["verification"]["triplet_accuracy"],
        "eer": overall["verification"]["eer"],
        "ssim_mean": overall["reconstruction"]["ssim_mean"],
    }
    for key, want in EXPECTED.items():
        assert got[key] == pytest.approx(want, abs=TOLERANCE[key]), (key, got)
