"""Golden replays (R-NEW-5) and the canary before READY (R-NEW-12).

Golden files are made from a real simulated recording with the real demo bundle. Faults are
real too where they can be: another precision variant, a calibration override, a bundle with
noisy weights, conditioning that flips the image. A "degraded INT8 engine" and a "wrong engine"
(one whose outputs do not belong to the bundle it claims) are the real runner with its
encoder outputs disturbed, as a badly calibrated or mismatched engine file would give.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.bundle import Bundle, demo_bundle_path
from edge.cli import main
from edge.fleet import demo
from edge.fleet.golden import (
    GoldenDriftError,
    GoldenPinError,
    make_golden,
    read_golden,
    require_canary,
    run_canary,
    verify_golden,
)
from edge.pipeline.context import DaemonSettings, ModelInfo, ProcessingContext
from edge.runner import EncoderOutput, Runner
from scanner_io.errors import EXIT_CANARY, EXIT_CONFIG, CanaryError, DataError

pytestmark = pytest.mark.timeout(180)

DEMO = demo_bundle_path()


@pytest.fixture(scope="module")
def demo_sha() -> str:
    return Bundle.open(DEMO).sha256


@pytest.fixture(scope="module")
def fp32() -> Any:
    r = Runner.from_bundle(DEMO, backend="ort", precision="fp32", threads=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def int8() -> Any:
    r = Runner.from_bundle(DEMO, backend="ort", precision="int8", threads=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory, fp32: Any, demo_sha: str) -> Path:
    root = tmp_path_factory.mktemp("golden")
    (rec,) = demo.write_sim_recordings(root, recordings=1, frames=8)
    make_golden(rec, fp32, ModelInfo(demo_sha, "fp32", "ort"), root / "golden.mcap")
    return root / "golden.mcap"


class Disturbed:
    """The real runner with noise added to its encoder outputs (embedding and skip features)."""

    def __init__(self, inner: Runner, scale: float) -> None:
        self.inner, self.scale = inner, scale
        self.max_batch = inner.max_batch
        self._rng = np.random.default_rng(0)

    @property
    def postures(self) -> tuple[str, ...]:
        return self.inner.postures

    def encode(self, x: np.ndarray) -> EncoderOutput:
        enc = self.inner.encode(x)

        def noisy(a: np.ndarray) -> np.ndarray:
            return (a + self._rng.normal(0, self.scale * float(a.std() or 1), a.shape)).astype(np.float32)

        emb = noisy(enc.embedding)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return dataclasses.replace(
            enc, embedding=emb, features={k: noisy(v) for k, v in enc.features.items()}
        )

    def reconstruct(self, enc: EncoderOutput, postures: np.ndarray) -> np.ndarray:
        return self.inner.reconstruct(enc, postures)


def test_a_golden_file_is_a_recording_with_pins_and_digests(golden: Path, demo_sha: str) -> None:
    from scanner_io.recording import recording_info

    g = read_golden(golden)
    assert (g.pins.bundle, g.pins.precision, g.pins.backend) == (demo_sha, "fp32", "ort")
    assert len(g.frames) == 8 and all(
        set(d.sha256) == {"posture", "confidence", "embedding", "reconstruction"} for d in g.frames
    )
    info = recording_info(golden)
    assert info.frames == 8 and info.complete
    assert {a.name for a in info.attachments} >= {"thzedge/golden.json"}
    assert info.metadata["thzedge.golden"]["calibration"] == g.pins.calibration != "identity"
    assert golden.stat().st_mode & 0o777 == 0o600  # raw frames and embeddings: biometric


def test_verify_passes_on_the_same_pins_exactly(golden: Path, demo_sha: str) -> None:
    # Another ORT session with another thread count still reproduces every output bit for bit.
    with Runner.from_bundle(DEMO, backend="ort", precision="fp32", threads=2) as other:
        report = verify_golden(golden, other, ModelInfo(demo_sha, "fp32", "ort"))
    assert report.ok and report.mode == "exact" and report.frames == 8


def test_verify_fails_on_a_perturbed_model_naming_frame_and_output(
    golden: Path, fp32: Any, demo_sha: str
) -> None:
    first = read_golden(golden).frames[0].seq
    with pytest.raises(GoldenDriftError, match=rf"frame seq {first}, output (confidence|embedding)"):
        verify_golden(golden, Disturbed(fp32, 1e-3), ModelInfo(demo_sha, "fp32", "ort"))


def test_a_pin_mismatch_is_its_own_error(
    golden: Path, int8: Any, fp32: Any, demo_sha: str, tmp_path: Path
) -> None:
    with pytest.raises(GoldenPinError, match="precision 'int8'") as e:
        verify_golden(golden, int8, ModelInfo(demo_sha, "int8", "ort"))
    assert e.value.exit_code == EXIT_CONFIG
    with pytest.raises(GoldenPinError, match="bundle"):
        verify_golden(golden, fp32, ModelInfo("0" * 64, "fp32", "ort"))
    profile = _other_profile(golden, tmp_path)
    with pytest.raises(GoldenPinError, match="calibration"):
        verify_golden(golden, fp32, ModelInfo(demo_sha, "fp32", "ort"), calibration=profile)


def _other_profile(golden: Path, tmp_path: Path) -> Path:
    from edge.fleet.replay import open_replay

    profile = open_replay(golden).context.profile
    assert profile is not None
    return Path(dataclasses.replace(profile, dark=np.zeros_like(profile.dark)).save(tmp_path / "p"))


def test_another_backend_is_compared_within_the_precisions_tolerance(
    golden: Path, fp32: Any, demo_sha: str
) -> None:
    # As a TensorRT engine would be checked against an ONNX Runtime golden: by value, not by hash.
    as_trt = ModelInfo(demo_sha, "fp32", "trt")
    assert verify_golden(golden, fp32, as_trt).mode == "tolerance:fp32"
    with pytest.raises(GoldenDriftError, match="embedding"):
        verify_golden(golden, Disturbed(fp32, 0.05), as_trt)


def test_cli_make_and_verify(golden: Path, tmp_path: Path, capsys: Any) -> None:
    import json

    out = tmp_path / "g2.mcap"
    assert (
        main(["replay", str(golden), "--make-golden", str(out), "--backend", "ort", "--max-frames", "3"]) == 0
    )
    assert "3 frames pinned" in capsys.readouterr().out
    assert main(["--json", "replay", "--verify", str(out), "--backend", "ort"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    # A perturbed bundle is another bundle: the pins say so before anything is compared.
    worse = demo.perturbed_bundle(DEMO, tmp_path / "worse", scale=0.05)
    assert main(["replay", "--verify", str(out), "--model", str(worse), "--backend", "ort"]) == EXIT_CONFIG
    assert "does not match the golden pins: bundle" in capsys.readouterr().err
    assert main(["replay", "--verify", str(out), "--precision", "int8", "--backend", "ort"]) == EXIT_CONFIG
    capsys.readouterr()
    assert main(["replay", "--verify", str(out), str(golden)]) == 2
    assert main(["replay", "--make-golden", str(tmp_path / "x.mcap")]) == 2
    plain = demo.write_sim_recordings(tmp_path / "plain", 1, 2)[0]
    assert main(["replay", "--verify", str(plain), "--backend", "ort"]) == DataError.exit_code
    assert "without golden results" in capsys.readouterr().err


# -- the canary ---------------------------------------------------------------------------------


def test_canary_passes_exactly_and_for_the_int8_variant_within_tolerance(
    golden: Path, fp32: Any, int8: Any, demo_sha: str
) -> None:
    assert run_canary(fp32, golden, ModelInfo(demo_sha, "fp32", "ort")).mode == "exact"
    report = require_canary(int8, golden, ModelInfo(demo_sha, "int8", "ort"))
    assert report.ok and report.mode == "tolerance:int8"


def test_canary_for_another_bundle_is_refused(golden: Path, fp32: Any) -> None:
    with pytest.raises(CanaryError, match="made for bundle") as e:
        run_canary(fp32, golden, ModelInfo("f" * 64, "fp32", "ort"))
    assert e.value.exit_code == EXIT_CANARY


def _identity(generation: int, carried: Any = None) -> ProcessingContext:
    return ProcessingContext(profile=None, params=None, calibration_id="identity", generation=generation)


def _daemon(runner: Any, model: ModelInfo, canary: Path, tmp_path: Path, notifier: Any = None) -> Any:
    from edge.pipeline.daemon import Daemon
    from scanner_io.sources import open_source

    frames = demo.write_sim_recordings(tmp_path / "src", 1, 4)[0]
    settings = DaemonSettings(endpoint=f"ipc://{tmp_path}/r.sock", poll_s=0.02, canary=canary)
    return Daemon(
        settings,
        runner,
        lambda: open_source(f"replay:{frames}?rate=max"),
        _identity,
        model=model,
        notifier=notifier,
    )


def test_daemon_becomes_ready_after_a_passing_canary(
    golden: Path, int8: Any, demo_sha: str, tmp_path: Path
) -> None:
    d = _daemon(int8, ModelInfo(demo_sha, "int8", "ort"), golden, tmp_path)
    summary = d.run()
    assert d.ready.is_set() and summary.published == 4


@pytest.mark.parametrize("fault", ["wrong engine", "broken preprocessing", "degraded int8"])
def test_each_fault_blocks_readiness(
    fault: str, golden: Path, fp32: Any, int8: Any, demo_sha: str, tmp_path: Path, monkeypatch: Any
) -> None:
    from edge.sdnotify import Notifier

    if fault == "wrong engine":  # an engine built from another model, loaded for this bundle
        worse = demo.perturbed_bundle(DEMO, tmp_path / "worse", scale=0.3)
        runner, model = (
            Runner.from_bundle(worse, backend="ort", threads=1),
            ModelInfo(demo_sha, "fp32", "ort"),
        )
    elif fault == "broken preprocessing":  # conditioning that mirrors the crop
        import edge.pipeline.context as context

        real = context.condition
        monkeypatch.setattr(context, "condition", lambda *a: np.fliplr(real(*a)).copy())
        runner, model = fp32, ModelInfo(demo_sha, "fp32", "ort")
    else:
        runner, model = Disturbed(int8, 0.3), ModelInfo(demo_sha, "int8", "ort")
    path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(0.2)
    try:
        d = _daemon(runner, model, golden, tmp_path, notifier=Notifier(env={"NOTIFY_SOCKET": path}))
        with pytest.raises(CanaryError, match="canary failed: frame seq") as e:
            d.run()
        assert e.value.exit_code == EXIT_CANARY
        assert not d.ready.is_set() and d.state_name == "failed"
        assert not d.tracker.ready  # what /readyz reports
        msgs = []
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                msgs += ns.recv(4096).decode().splitlines()
            except TimeoutError:
                break
    finally:
        ns.close()
        if fault == "wrong engine":
            runner.close()
    assert "READY=1" not in msgs
    assert any(m.startswith("STATUS=failed: canary failed: frame seq") for m in msgs), msgs


def test_thzedge_run_exits_79_on_a_failing_canary(
    golden: Path, fp32: Any, demo_sha: str, tmp_path: Path
) -> None:
    from tests.edge.daemon_helpers import finish, thzedge_run

    def write_config(path: Path, canary: Path | None) -> Path:
        line = f'canary = "{canary}"\n' if canary is not None else ""
        path.write_text(
            f'[metrics]\nenabled = false\n[daemon]\nstop_timeout_s = 3.0\n{line}[model]\nbackend = "ort"\n'
        )
        return path

    # A canary whose expected outputs this bundle does not give (made by another engine).
    bad = tmp_path / "bad-canary.mcap"
    make_golden(golden, Disturbed(fp32, 0.2), ModelInfo(demo_sha, "fp32", "ort"), bad)
    cfg = write_config(tmp_path / "c.toml", bad)
    rec = demo.write_sim_recordings(tmp_path / "src", 1, 3)[0]
    proc = thzedge_run(f"replay:{rec}?rate=max", DEMO, cfg, f"ipc://{tmp_path}/r.sock")
    code, _out, err = finish(proc)
    assert code == EXIT_CANARY, err
    assert err.strip().splitlines()[-1].startswith("thzedge: error: canary failed: frame seq")
    # A bundle may carry its canary (canary.mcap beside the manifest, not in it): with no
    # [daemon] canary configured that one runs, and a canary it reproduces lets it stream.
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle)
    shutil.copy(golden, bundle / "canary.mcap")
    assert Bundle.open(bundle).sha256 == demo_sha  # the canary is not part of what it pins
    cfg = write_config(tmp_path / "ok.toml", None)
    code, out, err = finish(thzedge_run(f"replay:{rec}?rate=max", bundle, cfg, f"ipc://{tmp_path}/r2.sock"))
    assert code == 0, err
    assert "canary passed: 8 frames (exact)" in err
    # The carried canary is checked too: one this bundle does not reproduce blocks it.
    shutil.copy(bad, bundle / "canary.mcap")
    code, _out, err = finish(thzedge_run(f"replay:{rec}?rate=max", bundle, cfg, f"ipc://{tmp_path}/r3.sock"))
    assert code == EXIT_CANARY, err


def test_encrypted_recordings_and_golden_files(tmp_path: Path, fp32: Any, demo_sha: str, capsys: Any) -> None:
    pytest.importorskip("cryptography")
    from calibration.simulated import true_profile
    from edge.fleet.rescore import ModelSpec, RescoreJob, score_recording
    from scanner_io.atrest import generate_storage_key
    from scanner_io.errors import ConfigError
    from scanner_io.recording import Recorder

    key = generate_storage_key(tmp_path / "storage.key")
    sim = demo.demo_simulator()
    rec = tmp_path / "enc.mcap"
    with Recorder(rec, calibration=true_profile(sim), fsync=False, key=key) as r:
        for _ in range(4):
            r.write(sim.next_frame())
    job = RescoreJob(model=ModelSpec(str(DEMO), "int8"), baseline=ModelSpec(str(DEMO), "fp32"))
    with pytest.raises(ConfigError, match="encrypted"):
        score_recording(rec, job)
    rows = score_recording(rec, dataclasses.replace(job, storage_key=str(tmp_path / "storage.key")))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    # A golden file made from it is encrypted too: frames per chunk, the results sealed.
    g = make_golden(rec, fp32, ModelInfo(demo_sha, "fp32", "ort"), tmp_path / "g.mcap", key=key)
    assert b'"embedding"' not in (tmp_path / "g.mcap").read_bytes()
    with pytest.raises(ConfigError, match="encrypted"):
        read_golden(g.path)
    assert verify_golden(g.path, fp32, ModelInfo(demo_sha, "fp32", "ort"), key=key).ok
    key_args = ["--storage-key", str(tmp_path / "storage.key"), "--backend", "ort"]
    assert main(["replay", "--verify", str(g.path), *key_args]) == 0
    assert "no drift" in capsys.readouterr().out
