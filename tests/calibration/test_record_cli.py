"""`thzedge record` attaches the calibration profile the source carries, so replays condition alike."""

from __future__ import annotations

from pathlib import Path

from calibration.profile import profile_carried_by
from calibration.simulated import true_profile
from edge.cli import main
from scanner_io.recording import recording_info
from scanner_io.simulator import ScannerSimulator
from scanner_io.sources import open_source


def test_recording_the_simulator_attaches_its_true_profile_and_replay_uses_it(tmp_path: Path) -> None:
    out = tmp_path / "sim.mcap"
    assert main(["record", "--source", "sim?seed=4&frames=3", "--out", str(out)]) == 0
    info = recording_info(out)
    assert info.frames == 3 and len(info.attachments) == 1
    expected = true_profile(ScannerSimulator(seed=4)).profile_id
    src = open_source(f"replay:{out}?rate=max")
    try:
        carried = profile_carried_by(src)
    finally:
        src.close()
    assert carried is not None
    profile, origin = carried
    assert profile.profile_id == expected and "recording" in origin


def test_an_explicit_profile_wins_and_an_empty_source_warns(tmp_path: Path, capsys) -> None:
    prof_dir = true_profile(ScannerSimulator(seed=9)).save(tmp_path / "prof")
    out = tmp_path / "x.mcap"
    args = ["record", "--source", "sim?seed=4&frames=2", "--out", str(out), "--calibration", str(prof_dir)]
    assert main(args) == 0
    src = open_source(f"replay:{out}?rate=max")
    try:
        profile, _ = profile_carried_by(src)
    finally:
        src.close()
    assert profile.profile_id == true_profile(ScannerSimulator(seed=9)).profile_id
    capsys.readouterr()
    empty = tmp_path / "empty.mcap"
    assert main(["record", "--source", "tcp://127.0.0.1:9", "--out", str(empty), "--duration", "0.5"]) == 0
    assert "delivered no frame" in capsys.readouterr().err


def test_thzedge_record_resolves_a_configured_source_name(tmp_path: Path, capsys) -> None:
    profile_dir = true_profile(ScannerSimulator(seed=9)).save(tmp_path / "prof")
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(
        '[metrics]\nenabled = false\n[sources.scanner0]\nuri = "sim?seed=4&frames=3&scanner=scan0"\n'
        f'calibration = "{profile_dir}"\n'
    )
    out = tmp_path / "rec.mcap"
    assert main(["--config", str(cfg), "record", "--source", "scanner0", "--out", str(out)]) == 0
    info = recording_info(out)
    assert info.frames == 3 and set(info.scanners) == {"scan0"}
    assert info.metadata["thzedge.manifest"]["source"] == "sim?seed=4&frames=3&scanner=scan0"
    # The configured source's profile is attached (not the simulator's own true maps).
    (attachment,) = info.attachments
    assert true_profile(ScannerSimulator(seed=9)).profile_id in attachment.name
    capsys.readouterr()
    assert (
        main(["--config", str(cfg), "record", "--source", "scaner0", "--out", str(tmp_path / "x.mcap")]) == 78
    )
    err = capsys.readouterr().err.strip()
    assert (
        "unknown source 'scaner0'" in err and "did you mean 'scanner0'" in err and len(err.splitlines()) == 1
    )
