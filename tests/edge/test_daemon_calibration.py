"""The daemon and calibration (issue 10): refuse an uncalibrated live scanner, flag a stale
profile, mark frames without a fitting profile `uncalibrated` and frames without a head `no_face`.

Everything runs as a user would: `thzedge run` in a subprocess, frames over real ipc/tcp sockets
from the `scanner serve` emulator, results and events read by a ZeroMQ subscriber.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from daemon_helpers import (
    Subscriber,
    finish,
    free_port,
    identity_profile,
    sim_profile,
    summary_of,
    thzedge,
    thzedge_run,
    write_config,
)

from calibration.profile import CalibrationProfile
from calibration.validity import ValidityEnvelope
from scanner_io.sources import open_source

pytestmark = pytest.mark.timeout(120)


def _serve(source: str, bind: str, rate: int = 40) -> object:
    return thzedge("scanner", "serve", "--source", source, "--bind", bind, "--rate", str(rate))


def _stop(*procs: object) -> None:
    for p in procs:
        if p is not None and p.poll() is None:  # type: ignore[attr-defined]
            p.kill()  # type: ignore[attr-defined]
            p.wait(10)  # type: ignore[attr-defined]


def _run_to_end(
    source: str, bundle: Path, tmp_path: Path, calibration: Path | None = None
) -> tuple[int, str, str, Subscriber]:
    """Run the daemon on a finite source to its end; return (rc, stdout, stderr, what it published)."""
    cfg = write_config(tmp_path / "thzedge.toml")
    pub = f"ipc://{tmp_path}/r.sock"
    sub = Subscriber(pub)
    daemon = thzedge_run(source, bundle, cfg, pub, calibration=calibration)
    try:
        sub.wait_state(proc=daemon)
        sub.pump(60, until=lambda s: daemon.poll() is not None)
        rc, out, err = finish(daemon)
        sub.pump(0.3)
    finally:
        _stop(daemon)
        sub.close()
    return rc, out, err, sub


def _scanner_to_end(
    bind: str,
    source: str,
    bundle: Path,
    cfg: Path,
    tmp_path: Path,
    frames: int,
    calibration: Path | None = None,
) -> tuple[int, str, str, Subscriber]:
    """Start the daemon on `source`, then the emulated scanner on `bind` once a subscriber is in
    (so nothing is missed); return (rc, stdout, stderr, what it published) after `frames`."""
    pub = f"ipc://{tmp_path}/r.sock"
    sub = Subscriber(pub)
    daemon = thzedge_run(source, bundle, cfg, pub, "--max-frames", str(frames), calibration=calibration)
    emu = None
    try:
        sub.wait_state(proc=daemon)
        emu = _serve("sim?seed=0", bind)
        sub.pump(60, until=lambda s: daemon.poll() is not None)
        rc, out, err = finish(daemon)
        sub.pump(0.3)
    finally:
        _stop(daemon, emu)
        sub.close()
    return rc, out, err, sub


def test_an_uncalibrated_ipc_scanner_is_refused_before_the_model_loads(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "thzedge.toml")
    scan = f"ipc://{tmp_path}/scanner.sock"
    emu = _serve("sim?seed=0", scan)
    try:
        rc, out, err = finish(thzedge_run(scan, tiny_bundle, cfg, f"ipc://{tmp_path}/r.sock"), timeout=60)
    finally:
        _stop(emu)
    assert rc == 78, err
    last = err.strip().splitlines()[-1]
    assert "live scanner link with no calibration profile" in last and "thzedge calibrate" in last
    assert "READY" not in out and out.strip() == ""


def test_a_profile_for_another_scanner_never_becomes_ready(tiny_bundle: Path, tmp_path: Path) -> None:
    """R-CAL-1: the first frame (read before READY) shows the profile is another serial's: exit 78."""
    cfg = write_config(tmp_path / "thzedge.toml", calibration="match_wait_s = 20\n")
    scan = f"ipc://{tmp_path}/scanner.sock"
    foreign = identity_profile(tmp_path / "cal", scanner="other-serial", shape=(128, 128))
    emu = _serve("sim?seed=0", scan)
    sub = Subscriber(f"ipc://{tmp_path}/r.sock")
    try:
        daemon = thzedge_run(scan, tiny_bundle, cfg, f"ipc://{tmp_path}/r.sock", calibration=foreign)
        rc, out, err = finish(daemon, timeout=60)
        sub.pump(0.3)
    finally:
        _stop(emu)
        sub.close()
    assert rc == 78, err
    assert "scanner 'sim0' (profile is for 'other-serial')" in err.strip().splitlines()[-1]
    assert sub.results == [] and not any(e.get("state") == "ready" for e in sub.events)


def test_allow_uncalibrated_publishes_results_marked_uncalibrated_never_ok(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "thzedge.toml", calibration="allow_uncalibrated = true\n")
    scan = f"tcp://127.0.0.1:{free_port()}"
    rc, out, err, sub = _scanner_to_end(scan, scan, tiny_bundle, cfg, tmp_path, 12)
    assert rc == 0, err
    assert len(sub.results) == 12
    assert {h["status"] for h in sub.results} == {"uncalibrated"}
    assert all(h["provenance"]["calibration"] == "identity" for h in sub.results)
    assert summary_of(out)["uncalibrated"] == 12
    assert "results are published `uncalibrated`" in err


def test_frames_that_stop_fitting_the_profile_go_uncalibrated_with_one_event(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """A lockstep scanner link (not checked before READY) sending another scanner's frames:
    conditioned without the profile, announced once."""
    foreign = identity_profile(tmp_path / "cal", scanner="other-serial", shape=(128, 128))
    cfg = write_config(tmp_path / "thzedge.toml")
    scan = f"ipc://{tmp_path}/scanner.sock"
    rc, out, err, sub = _scanner_to_end(
        scan, f"{scan}?mode=lockstep", tiny_bundle, cfg, tmp_path, 30, calibration=foreign
    )
    assert rc == 0, err
    assert len(sub.results) == 30
    assert sub.results and {h["status"] for h in sub.results} == {"uncalibrated"}
    mismatch = [e for e in sub.events if e["kind"] == "error" and e["reason"] == "calibration_mismatch"]
    assert len(mismatch) == 1 and "other-serial" in mismatch[0]["message"]


def _stale_profile(out: Path) -> Path:
    """The simulator's true profile with an envelope measured 40 days ago (valid for 30)."""
    with open_source("sim?seed=0&frames=1") as src:
        header = src.read(5).header  # type: ignore[union-attr]
    env = ValidityEnvelope.from_header(header)
    env = dataclasses.replace(env, captured_ns=header.t_capture_ns - 40 * 86400 * 10**9)
    true = CalibrationProfile.load(sim_profile(out / "true", seed=0))
    stale = dataclasses.replace(true, envelope=env, meta={**true.meta, "note": "stale"})
    stale.save(out / "stale")
    return out / "stale"


def test_a_stale_profile_sets_the_metric_emits_an_event_degrades_readyz_and_keeps_streaming(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "thzedge.toml", f'[metrics]\nenabled = true\nbind = "127.0.0.1:{port}"\n')
    cfg.write_text(cfg.read_text().replace("[metrics]\nenabled = false\n", "", 1))
    stale = _stale_profile(tmp_path)
    scan_port = free_port()
    scan = f"tcp://127.0.0.1:{scan_port}"
    pub = f"ipc://{tmp_path}/r.sock"
    sub = Subscriber(pub)
    daemon = thzedge_run(scan, tiny_bundle, cfg, pub, calibration=stale)
    emu = None
    try:
        sub.wait_state(proc=daemon)
        emu = _serve("sim?seed=0", scan)
        sub.pump(
            60, until=lambda s: any(e["kind"] == "calibration" for e in s.events) and len(s.results) > 20
        )
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        deadline = time.monotonic() + 10
        while True:  # the main loop applies the state within one turn
            ready = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read())
            if ready["state"] == "degraded" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        daemon.send_signal(signal.SIGTERM)
        rc, out, err = finish(daemon)
    finally:
        _stop(daemon, emu)
        sub.close()
    assert rc == 0, err
    assert "thzedge_calibration_stale 1.0" in metrics
    event = next(e for e in sub.events if e["kind"] == "calibration")
    assert event["check"] == "envelope" and event["state"] == "stale" and "days old" in event["reason"]
    assert ready["state"] == "degraded" and "calibration stale" in ready["detail"]
    # Streaming continued: results kept coming, calibrated (a stale profile still fits the frames).
    assert len(sub.results) > 20 and {h["status"] for h in sub.results} == {"ok"}
    assert summary_of(out)["unaccounted"] == 0


def test_frames_without_a_head_are_published_no_face_without_a_posture(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    rc, out, err, sub = _run_to_end("sim?scene=dark&frames=10&fps=20", tiny_bundle, tmp_path)
    assert rc == 0, err
    assert sub.results and all(h["status"] == "no_face" for h in sub.results)
    assert all(h["posture"] is None and h["verification"] is None for h in sub.results)
    assert {h["quality"]["reason"] for h in sub.results} == {"blank"}
    assert summary_of(out)["no_face"] == 10


def _vouched(out: Path, note: str) -> Path:
    """The simulator's true profile with the QA figures `calibrate activate` asks for (R-CAL-4)."""
    true = CalibrationProfile.load(sim_profile(out / "true", seed=0))
    qa = {"residual_dsnu_dn": 0.4, "residual_prnu_pct": 0.1}
    dataclasses.replace(true, qa=qa, meta={**true.meta, "note": note}).save(out / note)
    return out / note


def test_the_scanners_active_profile_is_used_and_a_sighup_picks_up_a_new_activation(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first, second = _vouched(tmp_path, "first"), _vouched(tmp_path, "second")

    def activate(profile: Path) -> str:
        rc, out, err = finish(
            thzedge("calibrate", "activate", str(profile), "--scanner", "scan0", "--state-dir", str(state))
        )
        assert rc == 0, err
        return CalibrationProfile.load(profile).profile_id

    first_id = activate(first)
    cfg = write_config(
        tmp_path / "thzedge.toml",
        '[sources.scan0]\nuri = "sim?seed=0&fps=20"\n',
        calibration=f'state_dir = "{state}"\n',
    )
    pub = f"ipc://{tmp_path}/r.sock"
    sub = Subscriber(pub)
    daemon = thzedge_run("scan0", tiny_bundle, cfg, pub)
    try:
        assert sub.wait_state(proc=daemon)["calibration"] == first_id
        second_id = activate(second)
        daemon.send_signal(signal.SIGHUP)
        sub.pump(30, until=lambda s: any(h["provenance"]["calibration"] == second_id for h in s.results))
        daemon.send_signal(signal.SIGTERM)
        rc, out, err = finish(daemon)
    finally:
        _stop(daemon)
        sub.close()
    assert rc == 0, err
    ids = [h["provenance"]["calibration"] for h in sub.results]
    switch = ids.index(second_id)
    assert switch > 0 and set(ids[:switch]) == {first_id} and set(ids[switch:]) == {second_id}
    assert {h["status"] for h in sub.results} == {"ok"}


def test_conditioning_to_another_size_than_the_model_takes_is_refused_at_start(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """R-NEW-10: the profile's output must be the model's input; exit 78 before READY."""
    cfg = write_config(
        tmp_path / "thzedge.toml",
        '[sources.s]\nuri = "sim?frames=5"\n[sources.s.conditioning]\nout_size = 48\n',
    )
    rc, out, err = finish(thzedge_run("s", tiny_bundle, cfg, f"ipc://{tmp_path}/r.sock"), timeout=60)
    assert rc == 78, err
    assert "conditions frames to 48x48, but the model bundle takes 64x64" in err.strip().splitlines()[-1]


def test_run_conditions_with_a_temperature_compensated_profile(tiny_bundle: Path, tmp_path: Path) -> None:
    """A format-3 profile (dark fitted over 35–38 °C) runs, says so in the log and stamps results."""
    from calibration.build import BuildSettings, build_profile
    from calibration.capture import capture_set_from_frames
    from scanner_io.simulator import ScannerSimulator

    def scene(kind: str, start: int = 0) -> object:
        sim = ScannerSimulator(seed=3, scene=kind)
        sim.seek(start)
        return capture_set_from_frames(
            kind, [sim.next_frame() for _ in range(16)], 1.0 if kind == "flat" else None
        )

    profile = build_profile(
        [scene("dark"), scene("dark", 9000), scene("flat")], settings=BuildSettings(dark_tc=True)
    )
    cal = profile.save(tmp_path / "cal")
    rc, out, err, sub = _run_to_end("sim?seed=3&identities=4&frames=12", tiny_bundle, tmp_path, cal)
    assert rc == 0, err
    assert f"calibration profile {profile.profile_id}" in err and "dark temperature-compensated" in err
    assert summary_of(out)["published"] == 12 and sub.results
    assert {h["provenance"]["calibration"] for h in sub.results} == {profile.profile_id}
