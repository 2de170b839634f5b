"""`thzedge rescore`: replay with the daemon's conditioning, flips vs a baseline, Parquet + report, Ray.

Real MCAP recordings from the simulator (each carrying its true profile), the real demo bundle
and its INT8 variant, and a copy of the demo bundle with noisy encoder weights as a model that
got worse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.bundle import demo_bundle_path
from edge.cli import main
from edge.fleet import demo
from edge.fleet.engines import actor_cpus, expand_recordings, read_parquet, run_local
from edge.fleet.rescore import ROW_FIELDS, ModelSpec, RescoreJob, rows_digest, score_recording, summarize

pytestmark = pytest.mark.timeout(300)

DEMO = str(demo_bundle_path())


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four recordings of 10 frames, the demo gallery, and a worse bundle with its own gallery."""
    pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("fleet")
    recs = demo.write_sim_recordings(root / "recs", recordings=4, frames=10)
    gallery = demo.enroll_sim_gallery(demo_bundle_path(), root / "demo.npz")
    worse = demo.perturbed_bundle(demo_bundle_path(), root / "worse", scale=0.8)
    worse_gallery = demo.enroll_sim_gallery(worse, root / "worse.npz")
    return {"root": root, "recs": recs, "gallery": gallery, "worse": worse, "worse_gallery": worse_gallery}


def _job(m: dict[str, Any], model: ModelSpec, **kw: Any) -> RescoreJob:
    return RescoreJob(model=model, baseline=ModelSpec(DEMO, "fp32", gallery=str(m["gallery"])), **kw)


def test_replay_conditions_each_frame_as_the_daemon_does(material: dict[str, Any]) -> None:
    from calibration.conditioning import calibrate_and_condition
    from calibration.simulated import true_profile
    from edge.fleet.replay import open_replay

    replay = open_replay(material["recs"][0])
    frames = list(replay)
    profile = true_profile(demo.demo_simulator())
    assert replay.calibration_id == profile.profile_id and replay.frames == 10 == len(frames)
    for f in frames:
        np.testing.assert_array_equal(f.x, calibrate_and_condition(f.frame.data, profile))
    # An explicit profile wins over the carried one (the daemon's rule), and changes the tensors.
    other = open_replay(material["recs"][0], calibration=_identity_like(profile, material["root"]))
    assert other.calibration_id != profile.profile_id
    assert not np.array_equal(next(iter(other)).x, frames[0].x)


def _identity_like(profile: Any, root: Path) -> Path:
    """A valid profile for the same scanner with a zero dark map (another id, other tensors)."""
    import dataclasses

    changed = dataclasses.replace(profile, dark=np.zeros_like(profile.dark))
    return Path(changed.save(root / "other-profile"))


def test_int8_flips_little_and_a_worse_bundle_flips_a_lot(material: dict[str, Any]) -> None:
    recs = material["recs"]
    int8 = run_local(recs, _job(material, ModelSpec(DEMO, "int8", gallery=str(material["gallery"]))))
    worse_spec = ModelSpec(str(material["worse"]), "fp32", gallery=str(material["worse_gallery"]))
    worse = run_local(recs, _job(material, worse_spec))
    s8 = summarize(int8, _job(material, ModelSpec(DEMO, "int8")), "local").overall
    sw = summarize(worse, _job(material, worse_spec), "local").overall
    assert s8.frames == sw.frames == 40 and s8.decisions == sw.decisions == 40
    # The INT8 variant passed its accuracy gate: it keeps (nearly) every posture and decision.
    assert s8.posture_flips <= 1 and s8.decision_flips <= 2 and s8.mean_recon_ssim > 0.95
    # Noisy encoder weights: many frames change posture or decision, reconstructions diverge.
    assert sw.posture_flips >= 5 and sw.decision_flips >= 10 and sw.mean_recon_ssim < 0.8
    assert sw.decision_flips > 4 * max(1, s8.decision_flips)


def test_rows_hold_no_identity_and_scores_only_on_request(material: dict[str, Any]) -> None:
    spec = ModelSpec(DEMO, "int8", gallery=str(material["gallery"]))
    rows = score_recording(material["recs"][1], _job(material, spec))
    assert [list(r) for r in rows] == [list(ROW_FIELDS)] * len(rows)
    assert all(r["score"] is None and r["score_baseline"] is None for r in rows)
    assert {r["decision"] for r in rows} <= {"accept", "reject", "unknown"}
    assert all(r["status"] == "ok" and 0.0 < r["confidence"] <= 1.0 for r in rows)
    names = {f"id{i:03d}" for i in range(10)}
    assert not any(isinstance(v, str) and v in names for r in rows for v in r.values())
    scored = score_recording(material["recs"][1], _job(material, spec, scores=True))
    assert all(isinstance(r["score"], float) and isinstance(r["score_baseline"], float) for r in scored)
    # Without galleries there are no decisions, and nothing counts as a decision flip.
    bare = RescoreJob(model=ModelSpec(DEMO, "int8"), baseline=ModelSpec(DEMO, "fp32"))
    plain = score_recording(material["recs"][1], bare)
    assert all(r["decision"] is None for r in plain)
    assert summarize(plain, bare, "local").overall.decisions == 0


def test_summary_counts_flips_per_recording_and_ranks_the_worst() -> None:
    def row(rec: str, seq: int, p: str, pb: str, d: str | None, db: str | None) -> dict[str, Any]:
        base = dict.fromkeys(ROW_FIELDS)
        base.update(recording=rec, scanner="s", seq=seq, posture=p, posture_baseline=pb, decision=d)
        base.update(decision_baseline=db, status="ok", confidence=0.9, confidence_baseline=0.8)
        return base

    rows = [
        row("a", 0, "Front", "Front", "accept", "accept"),
        row("a", 1, "Left", "Front", "reject", "accept"),
        row("b", 0, "Up", "Up", None, "accept"),  # not decided by both: not compared
        row("b", 1, "Up", "Down", "reject", "reject"),
    ]
    job = RescoreJob(model=ModelSpec("new"), baseline=ModelSpec("old"))
    s = summarize(rows, job, "local")
    a, b = s.recordings
    assert (a.posture_flips, a.decision_flips, a.decisions) == (1, 1, 2)
    assert (b.posture_flips, b.decision_flips, b.decisions) == (1, 0, 1)
    assert (s.overall.frames, s.overall.posture_flips, s.overall.decision_flips) == (4, 2, 1)
    assert [w.recording for w in s.worst(2)] == ["a", "b"]
    assert "overall" in s.render() and s.to_dict()["worst"] == ["a", "b"]
    assert rows_digest(rows) == rows_digest(list(reversed(rows)))  # order-free
    assert rows_digest(rows) != rows_digest([*rows[:3], {**rows[3], "posture": "Front"}])
    # Without a gallery nothing is decided: the decision flip rate is n/a, not 0 %.
    undecided = summarize([row("c", 0, "Up", "Down", None, None)], job, "local")
    assert undecided.overall.to_dict()["decision_flip_rate"] is None
    assert re.search(r"0/0 +n/a ", undecided.render()) and s.overall.decision_rate_text() == "33.33%"


def test_a_job_comparing_a_model_with_itself_is_refused() -> None:
    from edge.fleet.rescore import check_job
    from scanner_io.errors import ThzEdgeError

    with pytest.raises(ThzEdgeError, match="same"):
        check_job(RescoreJob(model=ModelSpec(DEMO), baseline=ModelSpec(DEMO)))


def test_recordings_from_files_directories_and_globs(material: dict[str, Any], tmp_path: Path) -> None:
    from scanner_io.errors import SourceUnavailableError

    d = material["recs"][0].parent
    assert expand_recordings([d]) == material["recs"]
    assert expand_recordings([str(d / "rec00[01].mcap"), material["recs"][0]]) == material["recs"][:2]
    with pytest.raises(SourceUnavailableError):
        expand_recordings([tmp_path / "missing.mcap"])
    with pytest.raises(SourceUnavailableError):
        expand_recordings([tmp_path])  # a directory without recordings


def test_actors_never_take_every_cpu() -> None:
    # ray-project/ray#44687: concurrency=2, num_cpus=1 on 2 CPUs hangs; the cap leaves one free.
    assert actor_cpus(2, 2, threads=1) == 0.5
    assert actor_cpus(2, 1, threads=1) == 1.0
    assert actor_cpus(16, 4, threads=2) == 2.0
    for total, actors in ((1, 1), (2, 2), (2, 3), (4, 8), (8, 2)):
        assert actors * actor_cpus(total, actors, threads=4) <= max(total - 1, total / 2)


def test_cli_writes_parquet_summary_and_html(material: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("pyarrow")
    out = tmp_path / "out"
    args = [str(material["recs"][0].parent), "--model", DEMO, "--precision", "int8"]
    args += ["--gallery", str(material["gallery"]), "--out", str(out), "--scores"]
    assert main(["--json", "rescore", *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overall"]["frames"] == 40 and report["engine"] == "local"
    rows = read_parquet(out / "rows.parquet")
    assert len(rows) == 40 and list(rows[0]) == list(ROW_FIELDS)
    assert rows_digest(rows) == report["rows_sha256"]
    assert json.loads((out / "summary.json").read_text())["rows_sha256"] == report["rows_sha256"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "decision flips" in page
    for png in ("flip_rates.png", "score_shift.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Text mode: the table, then where the files went.
    assert main(["rescore", *args[:-1]]) == 0
    text = capsys.readouterr().out
    assert "overall" in text and "worst 4 of 4 recordings" in text and "rows.parquet" in text


def test_cli_refuses_the_same_model_twice(material: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    args = ["rescore", str(material["recs"][0]), "--model", DEMO, "--out", str(tmp_path / "o")]
    assert main(args) == 1
    assert "same" in capsys.readouterr().err


def test_local_and_ray_rows_are_identical(material: dict[str, Any]) -> None:
    ray = pytest.importorskip("ray", reason="the fleet extra (ray[data]) is not installed; CI installs it")
    pytest.importorskip("ray.data", reason="ray without its Data library (install ray[data])")
    from edge.fleet.engines import run_ray

    job = _job(material, ModelSpec(DEMO, "int8", gallery=str(material["gallery"])), scores=True)
    local = run_local(material["recs"], job)
    # A 2-CPU Ray, as on the build machines: 2 actors at 0.5 CPU each must not hang (ray#44687).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        progress: list[int] = []
        rows = run_ray(
            material["recs"], job, actors=2, progress=lambda done, total=None: progress.append(done)
        )
    finally:
        ray.shutdown()
    assert rows_digest(rows) == rows_digest(local)
    assert rows == local  # same order too: by recording, then file order
    assert progress[-1] == len(material["recs"])


def test_without_the_fleet_extra_the_commands_say_what_to_install(
    material: dict[str, Any], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from scanner_io.errors import EXIT_UNAVAILABLE

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = ["rescore", str(material["recs"][0]), "--model", DEMO, "--precision", "int8"]
    assert main([*args, "--out", str(tmp_path / "o"), "--engine", "ray"]) == EXIT_UNAVAILABLE
    assert "pip install 'thzedge[fleet]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert main([*args, "--out", str(tmp_path / "o2")]) == EXIT_UNAVAILABLE
    assert "needs pyarrow" in capsys.readouterr().err
    assert main(["rescore", "--help"]) == 0  # still listed and documented


def test_a_frame_without_a_head_is_no_face_and_not_scored(tmp_path: Path) -> None:
    from calibration.simulated import true_profile
    from scanner_io.recording import Recorder
    from scanner_io.simulator import ScannerSimulator

    faces = demo.demo_simulator()
    dark = ScannerSimulator(
        seed=7, identities=6, scene="dark", start_time_ns=0
    )  # the same sensor, shutter shut
    path = tmp_path / "mixed.mcap"
    with Recorder(path, calibration=true_profile(faces), fsync=False) as rec:
        for frame in (faces.next_frame(), dark.next_frame(), faces.next_frame()):
            rec.write(frame)
    rows = score_recording(path, RescoreJob(model=ModelSpec(DEMO, "int8"), baseline=ModelSpec(DEMO, "fp32")))
    assert [r["status"] for r in rows] == ["ok", "no_face", "ok"]  # as the daemon would publish them
    assert rows[1]["posture"] is None and rows[1]["recon_ssim"] is None
    assert rows[0]["posture"] is not None and rows[2]["recon_ssim"] is not None
