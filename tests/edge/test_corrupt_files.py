"""Corrupt galleries, calibration profiles and configs are one line and a clean exit code, never
exit 70 with a traceback; a profile for other frames is refused (issue 14, failure 8).

Real files, corrupted the way disks and people corrupt them, read by the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration.profile import CalibrationProfile
from edge.gallery import Gallery
from tests.edge.daemon_helpers import REPO

pytestmark = pytest.mark.timeout(300)


def thzedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def one_line(out: subprocess.CompletedProcess[str]) -> bool:
    lines = out.stderr.strip().splitlines()
    return "Traceback" not in out.stderr and sum(ln.startswith("thzedge: error") for ln in lines) == 1


def _gallery(path: Path) -> Path:
    g = Gallery("a" * 64, 8, threshold=0.5)
    rng = np.random.default_rng(0)
    for name in ("alice", "bob", "carol"):
        g.enroll(name, rng.normal(size=(4, 8)).astype(np.float32))
    return g.save(path)


def _rewrite(src: Path, dst: Path, **change: object) -> Path:
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(change)  # type: ignore[arg-type]
    np.savez(dst, **arrays)  # type: ignore[arg-type]
    return dst


def _corrupt_galleries(tmp_path: Path) -> dict[str, Path]:
    good = _gallery(tmp_path / "good.npz")
    data = good.read_bytes()
    out = {}
    out["truncated"] = tmp_path / "truncated.npz"
    out["truncated"].write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[data.index("thzedge-gallery".encode("utf-32-le"))] ^= 0xFF  # inside a member: CRC fails
    out["flipped"] = tmp_path / "flipped.npz"
    out["flipped"].write_bytes(bytes(flipped))
    with np.load(good) as z:
        meta = json.loads(str(z["meta"]))
    out["meta not json"] = _rewrite(good, tmp_path / "m1.npz", meta=np.array("{nope"))
    out["meta a list"] = _rewrite(good, tmp_path / "m2.npz", meta=np.array("[1, 2]"))
    out["identities a number"] = _rewrite(
        good, tmp_path / "m3.npz", meta=np.array(json.dumps({**meta, "identities": 5}))
    )
    out["dim a word"] = _rewrite(
        good, tmp_path / "m4.npz", meta=np.array(json.dumps({**meta, "embedding_dim": "x"}))
    )
    no_dim = {k: v for k, v in meta.items() if k != "embedding_dim"}
    out["dim missing"] = _rewrite(good, tmp_path / "m5.npz", meta=np.array(json.dumps(no_dim)))
    with np.load(good) as z:
        labels = z["labels"]
    out["float labels"] = _rewrite(good, tmp_path / "m6.npz", labels=labels.astype(np.float64) + 0.5)
    return out


def test_corrupt_galleries_are_one_line_data_errors(tmp_path: Path) -> None:
    for what, path in _corrupt_galleries(tmp_path).items():
        out = thzedge("gallery", "info", str(path))
        assert out.returncode == 65, (what, out.returncode, out.stderr[-1500:])
        assert one_line(out), (what, out.stderr[-1500:])


def _config(tmp_path: Path, extra: str) -> Path:
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text("[metrics]\nenabled = false\n" + extra)
    return cfg


def test_the_daemon_refuses_a_corrupt_gallery_with_exit_78(tmp_path: Path, tiny_bundle: Path) -> None:
    bad = _corrupt_galleries(tmp_path)["flipped"]
    cfg = _config(tmp_path, f'[verification]\ngallery = "{bad}"\n')
    out = thzedge("--config", str(cfg), "run", "--source", "sim?frames=3", "--model", str(tiny_bundle))
    assert out.returncode == 78 and one_line(out), (out.returncode, out.stderr[-1500:])


def _profile(tmp_path: Path, shape: tuple[int, int] = (128, 128)) -> Path:
    return CalibrationProfile.identity("sim0", shape).save(tmp_path / f"profile-{shape[0]}")


def _corrupt_profiles(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for what in ("arrays truncated", "arrays flipped", "json garbage", "json a list", "shape a word"):
        p = _profile(tmp_path / what.replace(" ", "-"))
        arrays, doc = p / "profile_arrays.npz", p / "profile.json"
        if not arrays.exists():  # the names the profile writer uses
            arrays = next(p.glob("*.npz"))
            doc = next(p.glob("*.json"))
        data = arrays.read_bytes()
        if what == "arrays truncated":
            arrays.write_bytes(data[: len(data) // 2])
        elif what == "arrays flipped":
            flipped = bytearray(data)
            flipped[len(data) // 2] ^= 0xFF
            arrays.write_bytes(bytes(flipped))
        elif what == "json garbage":
            doc.write_bytes(b"\xff\xfe{{{")
        elif what == "json a list":
            doc.write_text("[]")
        else:
            d = json.loads(doc.read_text())
            d["shape"] = 7
            doc.write_text(json.dumps(d))
        out[what] = p
    return out


def test_corrupt_calibration_profiles_are_exit_78_one_line(tmp_path: Path, tiny_bundle: Path) -> None:
    for what, prof in _corrupt_profiles(tmp_path).items():
        cfg = _config(tmp_path, f'[sources.s]\nuri = "sim?frames=3"\ncalibration = "{prof}"\n')
        out = thzedge("--config", str(cfg), "run", "--source", "s", "--model", str(tiny_bundle))
        assert out.returncode == 78 and one_line(out), (what, out.returncode, out.stderr[-1500:])


def test_a_profile_for_other_frames_is_refused_at_start_up(tmp_path: Path, tiny_bundle: Path) -> None:
    prof = _profile(tmp_path, (64, 64))  # the simulator sends 128×128
    cfg = _config(tmp_path, f'[sources.s]\nuri = "sim?frames=20"\ncalibration = "{prof}"\n')
    out = thzedge("--config", str(cfg), "--json", "run", "--source", "s", "--model", str(tiny_bundle))
    assert out.returncode == 78 and one_line(out), (out.returncode, out.stderr[-1500:])
    assert "64×64" in out.stderr and "128×128" in out.stderr


def test_a_toml_file_nested_500_deep_is_a_config_error(tmp_path: Path) -> None:
    for text in ("a = " + "[" * 500 + "]" * 500, "a = " + "{b = " * 500 + "1" + "}" * 500):
        cfg = tmp_path / "deep.toml"
        cfg.write_text(text + "\n")
        out = thzedge("--config", str(cfg), "config", "validate")
        assert out.returncode == 78 and one_line(out), (out.returncode, out.stderr[-1500:])
