"""The engine cache against the field failures of comparable Jetson stacks, with a fake TensorRT:
rebuilt at every start (cache not writable), version-tag breakage after an upgrade, a truncated
engine poisoning later starts, superseded engines never cleaned up, and a daemon that builds."""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
from fake_tensorrt import make_fake_tensorrt

pytest.importorskip("onnx")

import edge.backends.engine_cache as engine_cache  # noqa: E402
import edge.backends.trt as trt_backend  # noqa: E402
from edge.backends import create_backend  # noqa: E402
from edge.backends.engine_cache import (  # noqa: E402
    ENGINE_CACHE_ENV,
    EngineCache,
    EngineCacheError,
    EngineKey,
    EngineMismatchError,
    Platform,
    graph_sha256,
    resolve_engine_cache,
    write_atomic,
)
from edge.bundle import Bundle  # noqa: E402
from edge.config import config_from_dict  # noqa: E402
from edge.pipeline.assemble import _open_bundle  # noqa: E402
from export.build_progress import BuildProgress  # noqa: E402
from export.engine import EngineSettings, build_bundle_engines, prune_engine_cache  # noqa: E402
from scanner_io.errors import ConfigError  # noqa: E402

ORIN = Platform("10.3.0", "Orin (nvgpu)", "8.7", "12.6", "R36.4.3")
UPGRADED = Platform("10.7.0", "Orin (nvgpu)", "8.7", "12.6", "R36.5.0")


def quiet(n: int = 6, precision: str = "fp32") -> BuildProgress:
    return BuildProgress(n, precision, stream=io.StringIO(), tty=False)


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch):
    """A fake TensorRT 10.3 on a fake Orin as the running platform."""
    trt = make_fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda device=0: (ORIN.gpu_name, "8.7", "12.6"))
    monkeypatch.setattr(trt_backend, "_read_l4t", lambda: ORIN.l4t)
    monkeypatch.setattr(trt_backend, "default_device_memory", lambda: trt.memory)
    return trt


def build(bundle: Path, platform: Platform = ORIN, **settings: object) -> list[dict]:
    trt = make_fake_tensorrt(platform.tensorrt_version)
    s = EngineSettings(**{"precision": "fp32", "max_batch": 4, "workspace_mb": 64, **settings})  # type: ignore[arg-type]
    return build_bundle_engines(bundle, s, trt, platform, progress=quiet())


def test_where_the_cache_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        ENGINE_CACHE_ENV: "/env/engines",
        "STATE_DIRECTORY": "/var/lib/thzedge/scanner0:/var/lib/thzedge/engines",
    }
    assert resolve_engine_cache(tmp_path / "x", env).root == tmp_path / "x"  # explicit (flag, config)
    assert resolve_engine_cache(None, env).root == Path("/env/engines")
    del env[ENGINE_CACHE_ENV]
    # Under the unit: the shared `engines` state directory, whichever instance runs.
    assert resolve_engine_cache(None, env).root == Path("/var/lib/thzedge/engines")
    assert resolve_engine_cache(None, {"STATE_DIRECTORY": "/s/one"}).root == Path("/s/one/engines")
    monkeypatch.setattr(engine_cache, "SYSTEM_STATE_DIR", tmp_path / "var-lib-thzedge")
    user = resolve_engine_cache(None, {"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert user.root == tmp_path / "xdg" / "thzedge" / "engines" and user.source == "per-user default"
    (tmp_path / "var-lib-thzedge").mkdir()
    assert resolve_engine_cache(None, {}).root == tmp_path / "var-lib-thzedge" / "engines"


def test_an_unwritable_cache_fails_before_building(bundle: Path, tmp_path: Path) -> None:
    """jetson-inference 1031/1644: a cache that cannot be written meant a rebuild at every start."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    trt = make_fake_tensorrt("10.3.0")
    with pytest.raises(EngineCacheError, match="not writable.*sudo -u thzedge"):
        build_bundle_engines(bundle, EngineSettings("fp32", max_batch=4), trt, ORIN,
                             cache=blocker / "engines", progress=quiet())  # fmt: skip
    assert [w for w, _ in trt.calls if w in ("build", "parse_from_file")] == []  # nothing was built


def test_one_build_at_a_time(bundle: Path) -> None:
    cache = resolve_engine_cache()
    with cache.lock(), pytest.raises(EngineCacheError, match="another engine build"):
        build(bundle)


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.plan"
    write_atomic(target, b"old")
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new but never complete")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_bytes() == b"old"  # the old file stands, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.plan"]  # no temp file left behind


def test_interrupted_build_is_discarded_with_one_line(
    bundle: Path, fake_trt, caplog: pytest.LogCaptureFixture
) -> None:
    """A plan whose manifest was never written (killed mid-build) is not an engine."""
    build(bundle)
    b = Bundle.open(bundle)
    cache = resolve_engine_cache()
    key = EngineKey.for_platform(ORIN, "fp32", graph_sha256(b, "encoder", "fp32"))
    plan, man = cache.paths("encoder", key)
    man.unlink()
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(EngineMismatchError, match="no fp32 TensorRT engine"),
    ):
        trt_backend.TrtBackend(b, "fp32")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "interrupted build" in warnings[0] and "discarded" in warnings[0]
    assert not plan.exists()
    assert fake_trt.deserialized == 0


def test_truncated_engine_does_not_poison_later_starts(bundle: Path, fake_trt) -> None:
    """innate-os PR 447: a truncated engine failed every start; here it is refused, deleted and rebuilt."""
    build(bundle)
    b = Bundle.open(bundle)
    cache = resolve_engine_cache()
    plan, _ = cache.paths(
        "decoder_3", EngineKey.for_platform(ORIN, "fp32", graph_sha256(b, "decoder_3", "fp32"))
    )
    plan.write_bytes(plan.read_bytes()[:1000])
    with pytest.raises(EngineMismatchError, match="truncated"):
        trt_backend.TrtBackend(b, "fp32")
    be = create_backend(b, "auto")  # the next start: nothing left to trip on, ONNX Runtime meanwhile
    assert be.name == "ort"
    be.close()
    build(bundle)  # `thzedge export engine` replaces it
    with trt_backend.TrtBackend(b, "fp32") as be:
        assert be.name == "trt"


def test_upgrade_needs_a_rebuild_and_prune_drops_the_superseded(bundle: Path, fake_trt) -> None:
    """jetson-inference 680 / ultralytics 19423: after a JetPack upgrade the old plans are refused
    by name (never deserialised), `export engine` builds new ones, and prune removes the old."""
    build(bundle)
    fake_trt.__version__ = UPGRADED.tensorrt_version
    b = Bundle.open(bundle)
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.3.0, running 10.7.0") as info:
        trt_backend.TrtBackend(b, "fp32", platform=UPGRADED)
    assert "thzedge export engine" in str(info.value) and fake_trt.deserialized == 0
    cache = resolve_engine_cache()
    old = {e.name for e in cache.entries()}
    build(bundle, UPGRADED)
    assert len(cache.entries()) == 12
    (cache.root / ".encoder.plan.x1y2.part").write_bytes(b"left by a killed build")
    removed = prune_engine_cache(cache, UPGRADED, [bundle])
    assert {p.stem for p in removed if p.suffix == ".plan"} == old
    assert any(p.name.endswith(".part") for p in removed)
    assert [p.name for p in (cache.root / "timing").iterdir()] == [f"{UPGRADED.cache_key()}.cache"]
    assert len(cache.entries()) == 6
    with trt_backend.TrtBackend(b, "fp32", platform=UPGRADED) as be:
        assert be.describe()["tensorrt"] == "10.7.0"


def test_prune_keeps_what_current_bundles_need(bundle: Path, tmp_path: Path) -> None:
    from model_factory import random_network, write_tiny_bundle

    other = write_tiny_bundle(
        tmp_path / "other", random_network(width=0.125, embedding_dim=32, seed=1), max_batch=2
    )
    build(bundle)
    build(other)
    cache = resolve_engine_cache()
    assert prune_engine_cache(cache, ORIN, [bundle, other]) == []
    removed = prune_engine_cache(cache, ORIN, [bundle])  # `other` is no longer deployed
    assert len([p for p in removed if p.suffix == ".plan"]) == 6
    assert {e.manifest["bundle_sha256"] for e in cache.entries()} == {Bundle.open(bundle).sha256}


def test_dla_core_is_part_of_the_key(bundle: Path, fake_trt) -> None:
    build(bundle, precision="fp16", dla_core=0)
    b = Bundle.open(bundle)
    with pytest.raises(EngineMismatchError, match="built for DLA core 0, wanted None"):
        trt_backend.TrtBackend(b, "fp16")
    with trt_backend.TrtBackend(b, "fp16", dla_core=0) as be:
        assert be.dla_core == 0


def test_the_daemon_never_builds(bundle: Path, fake_trt) -> None:
    """R-NEW-14: with no engines the daemon runs ONNX Runtime (auto) or refuses (trt), never builds."""
    cfg = config_from_dict({"model": {"bundle": str(bundle), "backend": "auto"}})
    _, runner = _open_bundle(cfg)
    assert runner.backend.name == "ort"
    runner.close()
    cfg = config_from_dict({"model": {"bundle": str(bundle), "backend": "trt"}})
    with pytest.raises(ConfigError, match="never builds engines") as info:
        _open_bundle(cfg)
    assert info.value.exit_code == 78  # a restart cannot fix it: no crash loop of rebuilds
    assert [w for w, _ in fake_trt.calls if w in ("build", "parse_from_file")] == []


def test_configured_cache_reaches_the_daemon(bundle: Path, fake_trt, tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "configured")
    trt = make_fake_tensorrt("10.3.0")
    build_bundle_engines(
        bundle, EngineSettings("fp32", max_batch=4), trt, ORIN, cache=cache, progress=quiet()
    )
    cfg = config_from_dict(
        {"model": {"bundle": str(bundle), "backend": "auto", "engine_cache": str(cache.root)}}
    )
    _, runner = _open_bundle(cfg)
    try:
        assert runner.backend.name == "trt"
        assert runner.backend.describe()["engine_cache"] == str(cache.root)
    finally:
        runner.close()


def test_auto_keeps_warning_while_one_graph_is_missing(
    bundle: Path, fake_trt, caplog: pytest.LogCaptureFixture
) -> None:
    """After a discard the operator is told at every start, not only at the one that discarded."""
    build(bundle)
    b = Bundle.open(bundle)
    cache = resolve_engine_cache()
    plan, man = cache.paths(
        "decoder_1", EngineKey.for_platform(ORIN, "fp32", graph_sha256(b, "decoder_1", "fp32"))
    )
    plan.unlink()
    man.unlink()
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            be = create_backend(b, "auto")
        assert be.name == "ort"
        be.close()
        assert any("no fp32 TensorRT engine for decoder_1" in r.getMessage() for r in caplog.records)
