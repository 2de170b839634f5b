"""Calibration workflows end to end on the simulator, scored against its true sensor maps.

The profile is built only from what `thzedge calibrate capture` recorded over a real socket from
`thzedge scanner serve` (never from the simulator's truth); the truth is read afterwards, to
score it: bad pixels per class, dark and gain against the read-noise limit, DSNU/PRNU before
and after correction.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration.build import BuildSettings, build_profile
from calibration.capture import capture_set_from_frames, read_capture
from calibration.check import Verdict, check_capture_against
from calibration.profile import BadPixelClass, CalibrationProfile
from edge.cli import main
from scanner_io.simulator import ScannerSimulator, full_defects_config
from scanner_io.sources import open_source

REPO = Path(__file__).resolve().parents[2]
FRAMES = 16  # per stack: small so the test stays fast; the benchmark uses more
SEED = 3


def _serve(uri: str, bind: str, frames: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edge", "scanner", "serve", "--source", uri, "--bind", bind, "--rate", "max"]
    cmd += ["--frames", str(frames)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _capture_over_socket(tmp: Path, uri: str, kind: str, level: float | None) -> int:
    bind = f"ipc://{tmp}/scanner-{kind}-{level}.sock"
    server = _serve(uri, bind, FRAMES)
    try:
        args = ["calibrate", "capture", "--source", bind, "--kind", kind, "--frames", str(FRAMES)]
        args += ["--out", str(tmp / "captures"), "--timeout", "60"]
        if level is not None:
            args += ["--level", str(level)]
        code = main(args)
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    return code


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[CalibrationProfile, Path]:
    """Capture dark + two flat levels over sockets from the emulator, build the profile with the CLI."""
    tmp = tmp_path_factory.mktemp("calib")
    for kind, level in [("dark", None), ("flat", 0.5), ("flat", 1.0)]:
        uri = f"sim?seed={SEED}&defects=full&scene={kind}" + (f"&level={level}" if level else "")
        assert _capture_over_socket(tmp, uri, kind, level) == 0, f"capture of {kind} {level} failed"
    prof_dir = tmp / "profile"
    assert main(["calibrate", "build", str(tmp / "captures"), "--out", str(prof_dir)]) == 0
    return CalibrationProfile.load(prof_dir), tmp


def _truth_sim() -> ScannerSimulator:
    return ScannerSimulator(seed=SEED, config=full_defects_config())


def test_bad_pixels_are_found_by_class_against_the_simulator_truth(built) -> None:
    profile, _ = built
    truth = _truth_sim().defect_maps()
    for cls in BadPixelClass:
        t, e = truth[cls.value], profile.class_mask(cls)
        assert t.sum() >= 10, f"the simulated sensor should have {cls} pixels"
        recall = (t & e).sum() / t.sum()
        precision = (t & e).sum() / max(e.sum(), 1)
        assert recall >= 0.98 and precision >= 0.98, (cls, recall, precision)
    # The simulator's 3×3 cluster and dead column segment are found as structures.
    qa = profile.qa
    assert any(c["size"] >= 9 for c in qa["clusters"]) and len(qa["columns"]) == 1


def test_dark_and_gain_are_within_the_read_noise_limit(built) -> None:
    profile, tmp = built
    sim = _truth_sim()
    dark_cap = read_capture(next((tmp / "captures").glob("dark-*.mcap")))
    maps = sim.sensor_maps(dark_cap.mean_temp_c)
    good = ~maps.bad_pixels
    read = sim.config.read_noise
    err = (profile.dark - maps.dark)[good]
    limit = read / np.sqrt(FRAMES)  # σ of a mean of FRAMES dark frames
    assert err.std() <= 1.15 * limit and np.abs(err).max() <= 6.0 * limit
    assert abs(err.mean()) <= 0.2 * limit
    # Gain is relative (median 1): compare shapes. Two levels, FRAMES frames each: the slope of a
    # two-point fit has σ = read·√(2/FRAMES) / Δsignal.
    ratio = profile.gain / maps.gain
    ratio = ratio / np.median(ratio[good])
    levels = profile.qa["flat_levels_dn"]
    gain_limit = read * np.sqrt(2.0 / FRAMES) / (levels[1] - levels[0])
    rel = (ratio - 1.0)[good]
    assert rel.std() <= 1.3 * gain_limit and np.abs(rel).max() <= 7.0 * gain_limit


def test_fixed_pattern_after_correction_is_at_most_a_tenth_of_before(built) -> None:
    qa = built[0].qa
    assert qa["after"]["dsnu_dn"]["total"] <= 0.1 * qa["before"]["dsnu_dn"]["total"]
    assert qa["after"]["prnu_pct"]["total"] <= 0.1 * qa["before"]["prnu_pct"]["total"]
    # The simulated sensor's own figures: DSNU ≈ √(120² + 40²) DN, a column pattern of 40 DN.
    assert 110 < qa["before"]["dsnu_dn"]["total"] < 145
    assert 30 < qa["before"]["dsnu_dn"]["column"] < 55
    assert 12 < qa["before"]["temporal_dark_noise_dn"] < 16


def test_profile_carries_envelope_and_stays_content_addressed(built, tmp_path: Path) -> None:
    profile, _ = built
    env = profile.envelope
    assert env is not None and env.scanner == "sim0" and env.shape == (128, 128)
    assert env.settings == {"frequency_ghz": 340.0, "looks": 2, "mode": "sim"}
    assert abs(env.sensor_temp_c - 35.0) < 0.1
    assert profile.format == 2
    again = CalibrationProfile.load(profile.save(tmp_path / "copy"))
    assert again.profile_id == profile.profile_id and again.class_counts() == profile.class_counts()
    doc = json.loads((tmp_path / "copy" / "profile.json").read_text())
    doc["envelope"]["max_delta_t_c"] = 9.0  # widening the envelope by hand must not pass
    (tmp_path / "copy" / "profile.json").write_text(json.dumps(doc))
    from scanner_io.errors import CalibrationError

    with pytest.raises(CalibrationError, match="does not match its id"):
        CalibrationProfile.load(tmp_path / "copy")


def test_a_format_1_profile_still_loads_with_its_id(tmp_path: Path) -> None:
    """A profile directory written by the format-1 code (no classes, no envelope) loads unchanged."""
    import hashlib

    shape = (8, 8)
    rng = np.random.default_rng(0)
    dark = rng.normal(100, 5, shape).astype(np.float32)
    gain = np.ones(shape, np.float32)
    bad = np.zeros(shape, np.uint8)
    bad[2, 3] = 1
    meta = {"source": "old"}
    from calibration.conditioning import ConditioningParams

    head = {"format": 1, "scanner": "s1", "shape": [8, 8], "conditioning": ConditioningParams().to_dict()}
    head["meta"] = meta
    h = hashlib.sha256(json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
    for arr in (dark, gain, bad):
        h.update(arr.tobytes())
    d = tmp_path / "old"
    d.mkdir()
    np.savez_compressed(d / "arrays.npz", dark=dark, gain=gain, bad_pixels=bad)
    (d / "profile.json").write_text(json.dumps(head | {"profile_id": h.hexdigest()[:16]}))
    p = CalibrationProfile.load(d)
    assert p.profile_id == h.hexdigest()[:16] and p.format == 1
    assert p.envelope is None and p.defects is None and p.class_counts() == {}


def test_a_capture_with_signal_or_saturation_is_refused_and_kept(tmp_path: Path, capsys) -> None:
    out = tmp_path / "caps"
    code = main(
        [
            "calibrate",
            "capture",
            "--source",
            "sim?frames=8",
            "--kind",
            "dark",
            "--frames",
            "8",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 65 and "there is signal in it" in err
    assert len(list(out.glob("*-refused.mcap"))) == 1
    code = main(
        [
            "calibrate",
            "capture",
            "--source",
            "sim?scene=flat&level=4&frames=8",
            "--kind",
            "flat",
            "--level",
            "4",
        ]
        + ["--frames", "8", "--out", str(out)]
    )
    assert code == 65 and "saturated" in capsys.readouterr().err
    # A build of the directory skips the refused captures and says there is nothing to build from.
    assert main(["calibrate", "build", str(out), "--out", str(tmp_path / "p")]) == 65


def _capture(uri: str, kind: str, level: float | None = None, n: int = FRAMES):
    src = open_source(uri)
    try:
        frames = [src.read(1.0) for _ in range(n)]
    finally:
        src.close()
    return capture_set_from_frames(kind, frames, level)


def test_check_flags_gain_and_temperature_drift_and_passes_an_undrifted_sensor(built) -> None:
    profile = built[0]
    base = f"sim?seed={SEED}&defects=full"
    verdicts = []
    for start in range(0, 300, 30):  # ten undrifted checks, minutes after calibration
        verdicts.append(
            check_capture_against(profile, _capture(f"{base}&scene=dark&start={start}", "dark")).verdict
        )
    assert verdicts.count(Verdict.PASS) == 10, verdicts
    flat = check_capture_against(profile, _capture(f"{base}&scene=flat&level=1&start=40", "flat", 1.0))
    assert flat.verdict is Verdict.PASS and abs(flat.figure("gain_drift")) < 0.01
    drifted = check_capture_against(
        profile, _capture(f"{base}&scene=flat&level=1&gain_drift=0.1", "flat", 1.0)
    )
    assert drifted.verdict is Verdict.FAIL and abs(drifted.figure("gain_drift") - 0.10) < 0.01
    warm = check_capture_against(profile, _capture(f"{base}&scene=dark&temp_offset_c=3", "dark"))
    assert warm.verdict is Verdict.FAIL
    assert 25 < warm.figure("dark_drift_dn") < 35 and abs(warm.figure("delta_t_c") - 3.0) < 0.1


def test_check_cli_exit_code_follows_the_verdict(built, capsys) -> None:
    prof_dir = built[1] / "profile"
    base = f"sim?seed={SEED}&defects=full&scene=dark"
    assert main(["calibrate", "check", "--source", base, "--profile", str(prof_dir), "--frames", "8"]) == 0
    assert "PASS" in capsys.readouterr().out
    code = main(
        [
            "calibrate",
            "check",
            "--source",
            base + "&temp_offset_c=3",
            "--profile",
            str(prof_dir),
            "--frames",
            "8",
        ]
    )
    assert code == Verdict.FAIL.exit_code and "FAIL" in capsys.readouterr().out


def test_check_takes_a_configured_source_name(built, capsys, tmp_path: Path) -> None:
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(f'[sources.darkroom]\nuri = "sim?seed={SEED}&defects=full&scene=dark"\n')
    args = ["--config", str(cfg), "calibrate", "check", "--source", "darkroom"]
    assert main([*args, "--profile", str(built[1] / "profile"), "--frames", "8"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_check_refuses_a_stream_of_another_scanner(built) -> None:
    from scanner_io.errors import CalibrationError

    with pytest.raises(CalibrationError, match="scanner 'other'"):
        check_capture_against(built[0], _capture("sim?scene=dark&scanner=other", "dark", n=4))


def test_activate_swaps_atomically_refuses_mismatch_and_limits_and_keeps_history(
    built, tmp_path: Path, capsys
) -> None:
    from calibration.active import resolve_active_profile

    profile, tmp = built
    prof_dir = str(tmp / "profile")
    state = tmp_path / "state"
    assert resolve_active_profile("scanner0", state) is None
    args = ["calibrate", "activate", prof_dir, "--scanner", "scanner0", "--state-dir", str(state)]
    assert main(args + ["--source", f"sim?seed={SEED}&scene=dark"]) == 0
    assert resolve_active_profile("scanner0", state).profile_id == profile.profile_id
    link = state / "scanner0" / "current"
    assert link.is_symlink() and os.readlink(link) == f"profiles/{profile.profile_id}"
    capsys.readouterr()
    assert main(args + ["--source", "sim?scanner=sim9"]) == 1
    assert "scanner 'sim9'" in capsys.readouterr().err
    assert main(args + ["--max-bad-fraction", "0.001"]) == 1
    assert "bad pixels" in capsys.readouterr().err
    # A second profile of the same scanner (another build, its own id) replaces the first.
    other = CalibrationProfile(
        profile.scanner,
        profile.shape,
        profile.dark,
        profile.gain,
        profile.bad_pixels,
        profile.conditioning,
        {"note": "second"},
        profile.defects,
        profile.envelope,
        profile.qa,
        profile.noise,
    )
    other.save(tmp_path / "second")
    second = ["calibrate", "activate", str(tmp_path / "second"), "--scanner", "scanner0"]
    second += ["--state-dir", str(state)]
    assert main(second) == 0
    assert resolve_active_profile("scanner0", state).profile_id == other.profile_id
    capsys.readouterr()
    assert main(["--json", "calibrate", "list", "--scanner", "scanner0", "--state-dir", str(state)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["active"] == other.profile_id
    assert [h["profile_id"] for h in listing["history"]] == [profile.profile_id, other.profile_id]
    assert listing["history"][1]["previous"] == profile.profile_id
    assert not list((state / "scanner0").glob(".current.*")), "no temporary link left behind"
    # Activating the active profile again changes nothing and adds no history line.
    assert main(second) == 0
    assert "already the active one for scanner0; nothing changed" in capsys.readouterr().out
    assert main(["--json", *second]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is False
    # Back to the first: it is in the history twice, and only its last activation is marked.
    assert main(args) == 0
    capsys.readouterr()
    assert main(["calibrate", "list", "--scanner", "scanner0", "--state-dir", str(state)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln[0] for ln in lines] == [" ", " ", "*"] and all(profile.profile_id in lines[i] for i in (0, 2))
    assert re.search(r"DSNU \d+\.\d\d DN  PRNU \d+\.\d\d %  T \d+\.\d °C$", lines[2]), lines[2]


def test_activate_refuses_a_profile_without_qa(tmp_path: Path, capsys) -> None:
    CalibrationProfile.identity("sim0", (16, 16)).save(tmp_path / "p")
    assert (
        main(
            [
                "calibrate",
                "activate",
                str(tmp_path / "p"),
                "--scanner",
                "s",
                "--state-dir",
                str(tmp_path / "st"),
            ]
        )
        == 1
    )
    assert "no QA figures" in capsys.readouterr().err


def test_state_dir_follows_the_service_state_directory(monkeypatch, tmp_path: Path) -> None:
    from calibration.active import calibration_state_dir

    monkeypatch.delenv("THZEDGE_CALIBRATION_DIR", raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/svc:{tmp_path}/other")
    assert calibration_state_dir() == tmp_path / "svc" / "calibration"
    monkeypatch.setenv("THZEDGE_CALIBRATION_DIR", str(tmp_path / "explicit"))
    assert calibration_state_dir() == tmp_path / "explicit"
    assert calibration_state_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("THZEDGE_CALIBRATION_DIR")
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert calibration_state_dir() == tmp_path / "xdg" / "thzedge" / "calibration"


def test_report_writes_pngs_and_a_self_contained_page(built, tmp_path: Path, capsys) -> None:
    _, tmp = built
    flat = next((tmp / "captures").glob("flat-L1-*.mcap"))
    out = tmp_path / "report"
    assert main(["calibrate", "report", str(tmp / "profile"), "--out", str(out), "--capture", str(flat)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "maps.png",
        "bad_pixels.png",
        "histograms.png",
        "profiles.png",
        "frame.png",
        "figures.png",
    } <= names
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and 'src="http' not in page
    assert "DSNU total" in page and built[0].profile_id in page
    # Each plot says what it shows; the dark model is named (this profile: no --dark-tc).
    assert "<figcaption>A raw frame before and after correction (frame.png)</figcaption>" in page
    assert "<td>dark</td><td>fixed (no temperature model)</td>" in page


def test_a_missing_extra_names_it_and_exits_69(monkeypatch, built, tmp_path: Path, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "astropy" else real(name, *a)
    )
    assert main(["calibrate", "build", str(built[1] / "captures"), "--out", str(tmp_path / "p")]) == 69
    assert "thzedge[calibrate]" in capsys.readouterr().err


def test_build_refuses_captures_of_different_scanners() -> None:
    from scanner_io.errors import CalibrationError

    with pytest.raises(CalibrationError, match="different scanners"):
        build_profile(
            [_capture("sim?scene=dark", "dark", n=4), _capture("sim?scene=dark&scanner=b", "dark", n=4)]
        )


def test_one_flat_level_gives_gain_without_non_linearity() -> None:
    dark = _capture(f"sim?seed={SEED}&scene=dark", "dark", n=8)
    flat = _capture(f"sim?seed={SEED}&scene=flat", "flat", 1.0, n=8)
    p = build_profile([dark, flat], settings=BuildSettings())
    assert p.qa["nonlinearity_pct"] is None and p.qa["flat_signal"][0]["level"] == 1.0
    assert p.qa["after"]["prnu_pct"]["total"] <= 0.1 * p.qa["before"]["prnu_pct"]["total"]
