"""`thzedge export onnx`: research checkpoint -> bundle -> Runner, matching PyTorch to 1e-4."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from model_factory import probe_frames, random_network, save_research_checkpoint  # noqa: E402

from edge.bundle import Bundle  # noqa: E402
from edge.cli import main  # noqa: E402
from edge.runner import Runner  # noqa: E402
from export.bundle_writer import write_bundle  # noqa: E402
from export.onnx_export import ExportError  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """The root CLI binds its log handler to the stderr of the first call; capsys swaps stderr per test."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_thzedge", False)]:
        root.removeHandler(handler)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(("layout", "decoder_ids"), [("thz-only", "1..5"), ("distilled", "0..4")])
def test_checkpoint_to_bundle_to_runner_matches_pytorch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str, decoder_ids: str
) -> None:
    model = random_network(width=0.125, embedding_dim=64 if layout == "distilled" else 128, seed=11)
    ckpt = save_research_checkpoint(tmp_path / "best.pth", model, layout, decoder_ids)
    out_dir = tmp_path / "bundle"
    rc, out, err = _run(
        capsys, "export", "onnx", "--checkpoint", str(ckpt), "--out", str(out_dir), "--max-batch", "4"
    )
    assert rc == 0, err
    assert "reconstruction" in out and "wrote bundle" in out  # the parity table, then the result
    assert "FAIL" not in out

    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["model"]["variant"] == ("distilled-student" if layout == "distilled" else "thz-only")
    first = int(decoder_ids[0])
    assert manifest["model"]["source"]["decoder_keys"] == [str(first + k) for k in range(5)]
    assert manifest["versions"]["opset"] == 17

    x = probe_frames(9, seed=42)  # more than max batch: the runner splits
    with Runner.from_bundle(out_dir, backend="ort") as runner:
        got = runner.infer(x)
        gt = np.array([0, 1, 2, 3, 4, 4, 3, 2, 1])
        got_gt = runner.infer(x, postures=gt)
    with torch.no_grad():
        want = model(torch.from_numpy(x))
        want_gt = model(torch.from_numpy(x), torch.from_numpy(gt))
    assert np.abs(got.embedding - want.embedding.numpy()).max() < TOL
    assert np.abs(got.posture_logits - want.posture_logits.numpy()).max() < TOL
    np.testing.assert_array_equal(got.posture, want.posture_logits.argmax(1).numpy())
    assert np.abs(got.reconstruction - want.reconstruction.numpy()).max() < TOL
    assert np.abs(got_gt.reconstruction - want_gt.reconstruction.numpy()).max() < TOL


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def small():
    return random_network(width=0.125, seed=2)


def _one_line_error(rc: int, out: str, err: str, *fragments: str) -> None:
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("thzedge: error: "), err
    assert "Traceback" not in err and out == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_refusals_are_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], small) -> None:
    out_dir = tmp_path / "bundle"
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(save_research_checkpoint(tmp_path / "full.pth", small).read_bytes()[:5000])
    _one_line_error(
        *_run(capsys, "export", "onnx", "--checkpoint", str(truncated), "--out", str(out_dir)), "truncated"
    )

    sd = {k.replace("encoder.", "backbone_net."): v for k, v in small.state_dict().items()}
    odd = save_research_checkpoint(tmp_path / "odd.pth", small, state_dict=sd)
    _one_line_error(
        *_run(capsys, "export", "onnx", "--checkpoint", str(odd), "--out", str(out_dir)),
        "unknown checkpoint layout",
    )
    _one_line_error(
        *_run(
            capsys,
            "export",
            "onnx",
            "--checkpoint",
            str(tmp_path / "full.pth"),
            "--out",
            str(out_dir),
            "--opset",
            "9",
        ),
        "opset 9",
    )
    assert not out_dir.exists()  # nothing half-written


def test_code_running_pickle_needs_trust_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], small
) -> None:
    marker = tmp_path / "code-ran"
    ckpt = save_research_checkpoint(tmp_path / "c.pth", small, extra={"config": _RunsCode(marker)})
    out_dir = tmp_path / "bundle"
    argv = ("export", "onnx", "--checkpoint", str(ckpt), "--out", str(out_dir), "--max-batch", "2")
    _one_line_error(*_run(capsys, *argv), "would run code", "--trust-checkpoint")
    assert not marker.exists() and not out_dir.exists()
    rc, out, err = _run(capsys, *argv, "--trust-checkpoint")
    assert rc == 0, err
    assert marker.exists()
    assert Bundle.open(out_dir).max_batch == 2


def test_non_empty_destination_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str], small) -> None:
    ckpt = save_research_checkpoint(tmp_path / "c.pth", small)
    out_dir = tmp_path / "bundle"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    argv = ("export", "onnx", "--checkpoint", str(ckpt), "--out", str(out_dir), "--max-batch", "2")
    _one_line_error(*_run(capsys, *argv), "not empty", "--force")
    assert (out_dir / "keep.txt").exists()
    rc, _, err = _run(capsys, *argv, "--force")
    assert rc == 0, err
    assert not (out_dir / "keep.txt").exists()
    Bundle.open(out_dir)


def test_parity_failure_writes_nothing(tmp_path: Path, small) -> None:
    # A zero tolerance cannot be met by float32 kernels that differ from PyTorch's: the check bites.
    with pytest.raises(ExportError, match="differs from PyTorch"):
        write_bundle(small, tmp_path / "bundle", max_batch=2, tolerance=0.0)
    assert not (tmp_path / "bundle").exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory was removed too


def test_parity_limit_is_absolute_within_unit_range_and_relative_beyond() -> None:
    from export.onnx_export import ParityReport

    r = ParityReport(tolerance=1e-4, batches=(1, 8))
    r.record("encoder", "embedding", 9e-5, 0.4)
    r.record("encoder", "feat4", 3e-3, 40.0)  # 40 x 1e-4 allowed
    assert r.passed
    r.record("encoder", "feat4", 5e-3, 40.0)
    r.record("decoder_0", "reconstruction", 2e-4, 0.9)
    assert r.failures() == ["encoder/feat4", "decoder_0/reconstruction"]
    assert "FAIL" in r.render() and r.to_dict()["passed"] is False
