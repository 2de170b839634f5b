"""Engine builder wiring against a fake `tensorrt` (8.6 / 10.x / 11.x API branches), no GPU needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fake_tensorrt import MAGIC, make_fake_tensorrt

pytest.importorskip("onnx")

from edge.backends.engine_cache import (  # noqa: E402
    EngineKey,
    Platform,
    check_engine_manifest,
    graph_sha256,
    resolve_engine_cache,
)
from edge.bundle import Bundle, sha256_file  # noqa: E402
from export.engine import EngineBuildError, EngineSettings, build_bundle_engines  # noqa: E402
from scanner_io.errors import ThzEdgeError  # noqa: E402

PLATFORM = Platform("10.3.0", "Orin (nvgpu)", "8.7", "12.6", "R36.4.3")


def engine_files(
    bundle: Path, precision: str, graph: str, platform: Platform = PLATFORM
) -> tuple[Path, Path]:
    """(plan, manifest) of one graph's engine in the test's engine cache."""
    b = Bundle.open(bundle)
    variant = precision if precision in b.precisions else "fp32"
    key = EngineKey.for_platform(platform, precision, graph_sha256(b, graph, variant))
    return resolve_engine_cache().paths(graph, key)


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _platform(version: str) -> Platform:
    return Platform(version, PLATFORM.gpu_name, PLATFORM.compute_capability, "12.6", None)


def _builds(trt) -> list[dict]:
    return [args for what, args in trt.calls if what == "build"]


def test_trt86_uses_explicit_batch_and_fp16_flag(bundle: Path) -> None:
    trt = make_fake_tensorrt("8.6.2")
    mans = build_bundle_engines(
        bundle, EngineSettings("fp16", max_batch=4, workspace_mb=64), trt, _platform("8.6.2")
    )
    explicit = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    assert [a for w, a in trt.calls if w == "create_network"] == [(explicit,)] * 6
    builds = _builds(trt)
    assert len(builds) == 6 and all(b["flags"] == ["FP16"] for b in builds)
    assert builds[0]["pools"] == {"WORKSPACE": 64 << 20}
    # No fp16 variant in the bundle: 8.6 builds fp16 from the fp32 graph with the flag.
    assert {m["onnx_variant"] for m in mans} == {"fp32"}
    assert not any(m["strongly_typed"] for m in mans)


def test_trt10_network_flags_profile_and_manifest(bundle: Path) -> None:
    trt = make_fake_tensorrt("10.3.0")
    mans = build_bundle_engines(bundle, EngineSettings("fp32", max_batch=4, opt_batch=2), trt, PLATFORM)
    assert [a for w, a in trt.calls if w == "create_network"][0] == (0,)
    assert _builds(trt)[0]["flags"] == []
    b = Bundle.open(bundle)
    enc = next(m for m in mans if m["graph"] == "encoder")
    assert enc["profile"]["thz"] == {"min": [1, 1, 64, 64], "opt": [2, 1, 64, 64], "max": [4, 1, 64, 64]}
    dec = next(m for m in mans if m["graph"] == "decoder_2")
    c1 = b.graphs["decoder_2"].inputs[0].shape[1]
    assert dec["profile"]["feat1"]["max"] == [4, c1, 32, 32]
    for m in mans:
        plan, man = engine_files(bundle, "fp32", m["graph"])
        assert plan.read_bytes().startswith(MAGIC)
        on_disk = json.loads(man.read_text())
        assert on_disk["engine_sha256"] == sha256_file(plan)
        assert on_disk["engine_bytes"] == plan.stat().st_size
        assert on_disk["onnx_sha256"] == sha256_file(b.graph_file(m["graph"], "fp32"))
        assert on_disk["tensorrt_version"] == "10.3.0" and on_disk["l4t"] == "R36.4.3"
        assert on_disk["gpu_name"] == "Orin (nvgpu)" and on_disk["compute_capability"] == "8.7"
        assert on_disk["bundle_sha256"] == b.sha256 and on_disk["dla_core"] is None
        key = EngineKey.for_platform(PLATFORM, "fp32", on_disk["onnx_sha256"])
        assert check_engine_manifest(on_disk, key, plan.read_bytes()) == []
    # Engines live in the cache, not in the bundle, which is untouched.
    assert not (bundle / "engines").exists()
    Bundle.open(bundle)


def test_trt10_int8_needs_the_int8_variant(bundle: Path) -> None:
    trt = make_fake_tensorrt("10.3.0")
    with pytest.raises(EngineBuildError, match="export quantize"):
        build_bundle_engines(bundle, EngineSettings("int8", max_batch=4), trt, PLATFORM)


def test_trt11_has_no_precision_flags(bundle: Path) -> None:
    trt = make_fake_tensorrt("11.4.1")
    assert not hasattr(trt.BuilderFlag, "FP16")
    build_bundle_engines(bundle, EngineSettings("fp32", max_batch=4), trt, _platform("11.4.1"))
    assert [a for w, a in trt.calls if w == "create_network"][0] == ()
    assert all(b["flags"] == [] for b in _builds(trt))
    # FP16 on 11.x comes only from an fp16 graph: without the variant it says what to run.
    with pytest.raises(EngineBuildError, match="export quantize"):
        build_bundle_engines(bundle, EngineSettings("fp16", max_batch=4), trt, _platform("11.4.1"))


def test_timing_cache_is_kept_per_device_and_version(bundle: Path) -> None:
    trt = make_fake_tensorrt("10.3.0")
    build_bundle_engines(bundle, EngineSettings("fp32", max_batch=4), trt, PLATFORM)
    timing = resolve_engine_cache().root / "timing"
    caches = list(timing.iterdir())
    assert [c.name for c in caches] == [f"{PLATFORM.cache_key()}.cache"]
    assert "sm87" in caches[0].name and "trt10.3.0" in caches[0].name
    first = [a for w, a in trt.calls if w == "create_timing_cache"]
    assert first[0] == b""  # nothing cached yet
    assert first[1] == b"+"  # the next graph starts from the cache the previous one left
    saved = caches[0].read_bytes()
    assert saved.startswith(b"+")
    trt2 = make_fake_tensorrt("10.3.0")
    build_bundle_engines(bundle, EngineSettings("fp32", max_batch=4), trt2, PLATFORM)
    assert [a for w, a in trt2.calls if w == "create_timing_cache"][0] == saved  # reused, not rebuilt
    # A different TensorRT version gets its own cache file.
    build_bundle_engines(
        bundle, EngineSettings("fp32", max_batch=4), make_fake_tensorrt("10.4.0"), _platform("10.4.0")
    )
    assert len(list(timing.iterdir())) == 2


def test_dla_settings(bundle: Path) -> None:
    trt = make_fake_tensorrt("10.3.0")
    build_bundle_engines(bundle, EngineSettings("fp16", max_batch=4, dla_core=1), trt, PLATFORM)
    b = _builds(trt)[0]
    assert b["dla"] == ("DLA", 1) and "GPU_FALLBACK" in b["flags"] and "FP16" in b["flags"]
    with pytest.raises(ThzEdgeError, match="DLA runs fp16 or int8"):
        EngineSettings("fp32", dla_core=0)


def test_manifest_check_names_each_mismatch(bundle: Path) -> None:
    trt = make_fake_tensorrt("10.3.0")
    (m,) = [x for x in build_bundle_engines(bundle, EngineSettings("fp32", max_batch=4), trt, PLATFORM)
            if x["graph"] == "encoder"]  # fmt: skip
    plan = engine_files(bundle, "fp32", "encoder")[0].read_bytes()
    other = EngineKey.for_platform(Platform("10.4.0", "NVIDIA H200", "9.0"), "fp32", "0" * 64, dla_core=0)
    reasons = check_engine_manifest(m, other, plan + b"x")
    assert any("TensorRT 10.3.0, running 10.4.0" in r for r in reasons)
    assert any("compute capability 8.7" in r for r in reasons)
    assert any("GPU" in r for r in reasons)
    assert any("L4T R36.4.3" in r for r in reasons)
    assert any("DLA core None, wanted 0" in r for r in reasons)
    assert any("truncated" in r for r in reasons)
    assert any("stale" in r for r in reasons)
    same = EngineKey.for_platform(PLATFORM, "fp32", m["onnx_sha256"])
    flipped = plan[:-1] + bytes([plan[-1] ^ 1])
    assert check_engine_manifest(m, same, flipped) == ["engine file fails its sha256 (corrupted or replaced)"]
    assert check_engine_manifest({"format": "x"}, same) != []


def test_engine_command_without_tensorrt_is_one_line(bundle: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import sys

    from edge.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    rc = main(["export", "engine", "--bundle", str(bundle), "--precision", "fp16"])
    err = capsys.readouterr().err
    assert rc == 69
    assert "TensorRT is not available" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (bundle / "engines").exists()
    assert not resolve_engine_cache().root.exists()


def test_unsupported_tensorrt_version(bundle: Path) -> None:
    with pytest.raises(ThzEdgeError, match="not supported"):
        build_bundle_engines(bundle, EngineSettings("fp32"), make_fake_tensorrt("8.5.3"), PLATFORM)


def test_engine_command_builds_into_the_cache_with_progress_and_prunes(
    bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    import edge.backends.trt as trt_backend
    from edge.cli import main

    # Engines an older JetPack left behind: superseded, so pruned after the new build.
    build_bundle_engines(bundle, EngineSettings("fp32", max_batch=4), make_fake_tensorrt("8.6.2"),
                         _platform("8.6.2"))  # fmt: skip
    cache = resolve_engine_cache()
    assert len(cache.entries()) == 6
    capsys.readouterr()
    trt = make_fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda device=0: (PLATFORM.gpu_name, "8.7", "12.6"))
    monkeypatch.setattr(trt_backend, "_read_l4t", lambda: "R36.4.3")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 7801480 kB\nMemAvailable: 4194304 kB\n")
    monkeypatch.setattr("export.build_progress.MEMINFO", meminfo)
    rc = main(["export", "engine", "--bundle", str(bundle), "--precision", "fp32"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 6 and "TensorRT 10.3.0" in out
    assert f"engine cache {cache.root} (${'THZEDGE_ENGINE_CACHE'}); workspace 1024 MB" in err  # 4 GB free / 4
    assert "[1/6] building encoder fp32 engine ..." in err and "[6/6] built decoder_4 fp32 engine in" in err
    assert "pruned 13 file(s)" in err  # 6 plans + 6 manifests + the 8.6 timing cache
    assert {e.manifest["tensorrt_version"] for e in cache.entries()} == {"10.3.0"}
    assert _builds(trt)[0]["pools"] == {"WORKSPACE": 1024 << 20}


def test_engine_command_reads_only_the_model_section(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A production config names paths only systemd provides; the builder still finds its cache."""
    import sys

    import edge.backends.trt as trt_backend
    from edge.cli import main

    cfg = tmp_path / "thzedge.toml"
    cache_dir = tmp_path / "configured-cache"
    cfg.write_text(
        f'[model]\nbundle = "{bundle}"\nengine_cache = "{cache_dir}"\n'
        '[publisher]\nendpoint = "tcp://0.0.0.0:5560"\n[publisher.curve]\nenabled = true\n'
        'secret_key_file = "${CREDENTIALS_DIRECTORY}/curve-server.key_secret"\n'
        'allowed_clients_dir = "/etc/c"\n'
    )
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    from edge.config import load_config
    from scanner_io.errors import ConfigError

    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        load_config(cfg)  # what the daemon's full loader says outside systemd
    trt = make_fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda device=0: (PLATFORM.gpu_name, "8.7", "12.6"))
    rc = main(["--config", str(cfg), "export", "engine", "--bundle", str(bundle), "--precision", "fp32"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"engine cache {cache_dir} (configured)" in err
    assert len(list(cache_dir.glob("*.plan"))) == 6
