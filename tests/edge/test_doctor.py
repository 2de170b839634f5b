"""`thzedge doctor` and `thzedge config validate`: the checks `run` would fail on, on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from daemon_helpers import REPO

from edge.cli import main
from edge.doctor import CheckResult, CheckStatus, DoctorReport, render_checks, run_doctor, static_checks
from scanner_io.errors import EXIT_CONFIG, EXIT_UNAVAILABLE

SHIPPED = REPO / "systemd" / "thzedge.toml"


def _by_name(checks: list[CheckResult]) -> dict[str, CheckResult]:
    return {c.name: c for c in checks}


def test_doctor_on_the_demo_model_is_ready_and_reports_versions_and_extras(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--json", "doctor"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ready"] is True and doc["counts"]["fail"] == 0
    rows = {c["name"]: c for c in doc["checks"]}
    assert rows["python"]["detail"].startswith(sys.version.split()[0])
    assert rows["model bundle"]["status"] == "ok" and "checksums verified" in rows["model bundle"]["detail"]
    assert "CPUExecutionProvider" in rows["onnxruntime providers"]["detail"]
    assert {"extra export", "extra calibrate", "extra tensorrt", "extra view"} <= set(rows)
    assert rows["extra tensorrt"]["status"] in ("ok", "skip")
    assert {"jetson.release", "engine_cache"} <= set(rows)  # edge/jetson.py's rows, here "not a Jetson"
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "model bundle" in text and text.rstrip().splitlines()[-1].startswith("ready:")


def test_doctor_on_the_shipped_example_config_is_not_ready(capsys: pytest.CaptureFixture[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edge", "--json", "--config", str(SHIPPED), "doctor"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1, r.stderr
    rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert (
        rows["model bundle"]["status"] == "fail"
        and "/var/lib/thzedge/models/thz-mtl" in rows["model bundle"]["detail"]
    )
    assert rows["calibration scanner0"]["status"] == "fail"
    assert rows["source scanner0 answers"]["status"] == "warn"  # nothing listens on the acquisition socket


def test_config_validate_runs_the_start_up_checks(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The shipped example names a bundle and a profile that do not exist here: `run` would exit 78.
    assert main(["--config", str(SHIPPED), "config", "validate"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "no model bundle at /var/lib/thzedge/models/thz-mtl" in err and "Traceback" not in err
    swapped = tmp_path / "swapped.toml"
    swapped.write_text('[sources.s]\nuri = "sim"\n[sources.s.conditioning]\ndb_min = 50.0\ndb_max = 10.0\n')
    assert main(["--config", str(swapped), "config", "validate"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "db_max (10.0) must be greater than db_min (50.0)" in err and len(err.strip().splitlines()) == 1
    precision = tmp_path / "precision.toml"
    precision.write_text(f'[model]\nbundle = "{tiny_bundle}"\nprecision = "fp16"\n')  # it has fp32 only
    assert main(["--json", "--config", str(precision), "config", "validate"]) == EXIT_CONFIG
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is False
    assert (
        _by_name([CheckResult(c["name"], CheckStatus(c["status"]), c["detail"]) for c in doc["checks"]])[
            "model precision"
        ].status
        is CheckStatus.fail
    )


def test_config_validate_accepts_a_real_profile_and_refuses_a_foreign_gallery(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "profile", "--out", str(tmp_path / "prof"), "--seed", "1"]) == 0
    good = tmp_path / "good.toml"
    good.write_text(
        f'[sources.s]\nuri = "sim?seed=1"\ncalibration = "{tmp_path / "prof"}"\n'
        f'[model]\nbundle = "{tiny_bundle}"\n'
    )
    assert main(["--config", str(good), "config", "validate"]) == 0
    checks = _by_name(static_checks(good))
    assert checks["calibration s"].status is CheckStatus.ok
    # A gallery enrolled with another bundle (the tiny one) against the demo model: run refuses it.
    crops = tmp_path / "crops.npy"
    np.save(crops, np.random.default_rng(0).random((2, 64, 64), dtype=np.float32))
    gallery = tmp_path / "g.npz"
    argv = ["enroll", str(crops), "--model", str(tiny_bundle), "--gallery", str(gallery), "--identity", "p1"]
    assert main(argv) == 0
    foreign = tmp_path / "foreign.toml"
    foreign.write_text(f'[verification]\ngallery = "{gallery}"\n')
    capsys.readouterr()
    assert main(["--config", str(foreign), "config", "validate"]) == EXIT_CONFIG
    assert "gallery" in capsys.readouterr().err
    bound = tmp_path / "bound.toml"
    bound.write_text(
        f'[model]\nbundle = "{tiny_bundle}"\n[verification]\ngallery = "{gallery}"\nthreshold = 0.8\n'
    )
    rows = _by_name(run_doctor(bound).checks)
    assert rows["gallery"].status is CheckStatus.ok and "1 identities" in rows["gallery"].detail
    assert rows["gallery file mode"].status is CheckStatus.ok  # written 0600


def test_config_validate_loads_a_protected_gallery_with_the_configured_template_key(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.templates import generate_template_key

    key = generate_template_key(tmp_path / "keys", "template", site="gate-1")
    crops = tmp_path / "crops.npy"
    np.save(crops, np.random.default_rng(0).random((2, 64, 64), dtype=np.float32))
    gallery = tmp_path / "g.npz"
    enroll = ["enroll", str(crops), "--model", str(tiny_bundle), "--gallery", str(gallery)]
    assert main([*enroll, "--identity", "p1", "--template-key", str(key)]) == 0
    assert main(["gallery", "info", str(gallery)]) == 0
    assert "template: orthogonal-projection/v1 (key id " in capsys.readouterr().out
    cfg = tmp_path / "t.toml"
    head = f'[model]\nbundle = "{tiny_bundle}"\n[verification]\ngallery = "{gallery}"\nthreshold = 0.8\n'
    cfg.write_text(head + f'template_key = "{key}"\n')
    capsys.readouterr()
    assert main(["--config", str(cfg), "config", "validate"]) == 0, capsys.readouterr().err
    # Another key (a rotation) revokes the templates: validate says so, as run would.
    other = generate_template_key(tmp_path / "keys2", "template", site="gate-1")
    cfg.write_text(head + f'template_key = "{other}"\n')
    assert main(["--config", str(cfg), "config", "validate"]) == EXIT_CONFIG
    assert "revoked" in capsys.readouterr().err
    cfg.write_text(head)  # no key at all
    assert main(["--config", str(cfg), "config", "validate"]) == EXIT_CONFIG
    assert "set [verification] template_key" in capsys.readouterr().err


def test_report_is_ready_unless_a_check_fails_and_renders_a_table() -> None:
    report = DoctorReport(
        [CheckResult("a", CheckStatus.ok, "fine"), CheckResult("jetson clocks", CheckStatus.warn)]
    )
    assert report.ready and report.summary() == "1 ok, 1 warn, 0 fail, 0 skip"
    report.checks.append(CheckResult("b", CheckStatus.fail, "broken"))
    assert not report.ready and [c.name for c in report.failures()] == ["b"]
    assert render_checks(report.checks).splitlines()[2] == "FAIL  b              broken"


def test_a_command_whose_extra_is_missing_names_the_extra_and_exits_69(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on a device without the export extra
    argv = ["export", "quantize", "--bundle", str(tmp_path), "--calibration", str(tmp_path)]
    assert main(argv) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err.strip()
    assert (
        err == "thzedge: error: onnx not installed; install the export extra: pip install 'thzedge[export]'"
    )
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    assert main(["view"]) == EXIT_UNAVAILABLE
    assert "pip install 'thzedge[view]'" in capsys.readouterr().err


def test_a_live_scanner_needs_a_profile_the_active_one_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("THZEDGE_CALIBRATION_DIR", str(tmp_path / "state"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[sources.scanner0]\nuri = "ipc://{tmp_path}/acq.sock"\n[sources.sim]\nuri = "sim"\n')
    # `run` refuses a live scanner link with no profile (exit 78): so do validate and doctor.
    assert main(["--config", str(cfg), "config", "validate"]) == EXIT_CONFIG
    assert "no calibration profile" in capsys.readouterr().err
    rows = _by_name(run_doctor(cfg).checks)
    assert rows["calibration scanner0"].status is CheckStatus.fail
    assert rows["calibration sim"].status is CheckStatus.skip  # the simulator carries its own maps
    assert rows["source scanner0 answers"].status is CheckStatus.warn
    # The layout `calibrate activate` leaves (calibration/active.py): profiles/<id> and a `current` link.
    assert main(["sim", "profile", "--out", str(tmp_path / "prof"), "--seed", "2"]) == 0
    state = tmp_path / "state"
    (state / "scanner0" / "profiles").mkdir(parents=True)
    (tmp_path / "prof").rename(state / "scanner0" / "profiles" / "p1")
    (state / "scanner0" / "current").symlink_to("profiles/p1")
    rows = _by_name(run_doctor(cfg).checks)
    assert rows["calibration scanner0"].status is CheckStatus.ok
    assert "active calibration profile" in rows["calibration scanner0"].detail
    assert rows["calibration scanner0 validity"].status is CheckStatus.warn  # a sim profile has no envelope
    assert main(["--config", str(cfg), "config", "validate"]) == 0


def test_doctor_checks_tensorrt_the_gpu_and_the_bundles_engines(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the fake TensorRT of the trt backend's wiring tests (the real one needs a GPU)."""
    pytest.importorskip("onnx")
    import shutil

    from fake_tensorrt import make_fake_tensorrt

    import edge.backends.trt as trt_backend
    from edge.backends.trt import Platform
    from export.engine import EngineSettings, build_bundle_engines

    platform = Platform("10.3.0", "Orin (nvgpu)", "8.7", "12.6")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    monkeypatch.setenv("THZEDGE_ENGINE_CACHE", str(tmp_path / "engines"))
    build_bundle_engines(bundle, EngineSettings("fp32", max_batch=4), make_fake_tensorrt("10.3.0"), platform)
    fake = make_fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda device=0: (platform.gpu_name, "8.7", "12.6"))
    monkeypatch.setattr(trt_backend, "_read_l4t", lambda: None)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nbundle = "{bundle}"\n')
    rows = _by_name(run_doctor(cfg).checks)
    assert rows["tensorrt"].status is CheckStatus.ok and rows["tensorrt"].detail == "10.3.0"
    assert rows["gpu"].detail.startswith("Orin (nvgpu), compute capability 8.7")
    assert rows["tensorrt engines"].status is CheckStatus.ok, rows["tensorrt engines"].detail
    # Another TensorRT than the engines were built with: ort would run (warn), trt would not (fail).
    fake.__version__ = "10.4.0"
    assert _by_name(run_doctor(cfg).checks)["tensorrt engines"].status is CheckStatus.warn
    cfg.write_text(f'[model]\nbundle = "{bundle}"\nbackend = "trt"\n')
    report = run_doctor(cfg)
    engines = _by_name(report.checks)["tensorrt engines"]
    assert engines.status is CheckStatus.fail and "thzedge export engine" in engines.detail
    assert not report.ready
