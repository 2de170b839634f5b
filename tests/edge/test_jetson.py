"""Jetson checks on fake root filesystems: release, TensorRT/CUDA and their combination, the engine
cache, the unit's DeviceAllow and groups for the GPU nodes, a tegrastats sample."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from edge.backends.engine_cache import EngineCache, EngineKey, Platform
from edge.jetson import (
    CheckResult,
    CheckStatus,
    DeviceNode,
    device_access,
    jetson_checks,
    read_l4t,
    read_unit,
    support_problems,
)

GID = os.getgid()  # the fake nodes belong to the test user's group; /etc/group names it
NV_TEGRA_R36_4_3 = (
    "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8\n"
)
NV_TEGRA_R32_7_1 = (
    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19\n"
)


def dpkg(**packages: str) -> str:
    return "\n\n".join(
        f"Package: {name.replace('_', '-')}\nStatus: install ok installed\nArchitecture: arm64\nVersion: {v}"
        for name, v in packages.items()
    ) + "\n"  # fmt: skip


def unit_text(extra: str = "") -> str:
    return (
        textwrap.dedent(
            """\
        [Unit]
        Description=thzedge (%i)
        [Service]
        ExecStart=/opt/thzedge/venv/bin/thzedge run --source %i
        User=thzedge
        Group=thzedge
        SupplementaryGroups=video
        DevicePolicy=closed
        #DeviceAllow=/dev/nvmap rw
        """
        )
        + extra
    )


def make_root(
    root: Path,
    *,
    nv_tegra: str | None = NV_TEGRA_R36_4_3,
    packages: str | None = None,
    cuda_json: str | None = "12.6.68",
    unit: str | None = None,
    dropin: str | None = None,
    nodes: dict[str, str] | None = None,
    group: str = "video",
    members: str = "thzedge",
    tegrastats: str | None = None,
) -> Path:
    """A fake / with the files the checks read."""
    (root / "etc").mkdir(parents=True)
    if nv_tegra is not None:
        (root / "etc/nv_tegra_release").write_text(nv_tegra)
    if packages is not None:
        (root / "var/lib/dpkg").mkdir(parents=True)
        (root / "var/lib/dpkg/status").write_text(packages)
    if cuda_json is not None:
        (root / "usr/local/cuda").mkdir(parents=True)
        (root / "usr/local/cuda/version.json").write_text(
            json.dumps({"cuda": {"name": "CUDA SDK", "version": cuda_json}})
        )
    (root / "etc/group").write_text(f"root:x:0:\n{group}:x:{GID}:{members}\nthzedge:x:{GID + 1}:\n")
    if unit is not None:
        (root / "etc/systemd/system").mkdir(parents=True)
        (root / "etc/systemd/system/thzedge@.service").write_text(unit)
    if dropin is not None:
        d = root / "etc/systemd/system/thzedge@.service.d"
        d.mkdir(parents=True)
        (d / "gpu.conf").write_text(dropin)
    for path, mode in (nodes or {}).items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
        p.chmod(int(mode, 8))
    if tegrastats is not None:
        t = root / "usr/bin/tegrastats"
        t.parent.mkdir(parents=True, exist_ok=True)
        loop = f"import time\nwhile True:\n    print({tegrastats!r}, flush=True)\n    time.sleep(0.05)\n"
        t.write_text(f"#!{sys.executable}\n{loop}")
        t.chmod(t.stat().st_mode | stat.S_IXUSR)
    return root


ORIN_NODES = {"/dev/nvmap": "660", "/dev/nvgpu/igpu0/ctrl": "660", "/dev/nvgpu/igpu0/as": "660",
              "/dev/dri/renderD128": "660"}  # fmt: skip
ORIN_LINE = (
    "RAM 6712/7620MB (lfb 12x4MB) CPU [38%@1497,2%@729] EMC_FREQ 61%@2133 GR3D_FREQ 99%@[612] cpu@57.125C "
    "gpu@58.625C tj@58.312C VDD_IN 16321mW/11204mW VDD_CPU_GPU_CV 7104mW/4944mW VDD_SOC 3120mW/3659mW"
)
ALLOW = "DeviceAllow=/dev/nvmap rw\nDeviceAllow=/dev/nvgpu/igpu0/* rw\nDeviceAllow=/dev/dri/renderD128 rw\n"


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def test_a_healthy_orin_on_jetpack_6_2(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", packages=dpkg(nvidia_l4t_core="36.4.3-20250107174145",
                     tensorrt="10.3.0.30-1+cuda12.5", libnvinfer10="10.3.0.30-1+cuda12.5"),  # fmt: skip
                     unit=unit_text(), dropin="[Service]\n" + ALLOW + "SupplementaryGroups=render\n",
                     nodes=ORIN_NODES, tegrastats=ORIN_LINE)  # fmt: skip
    cache = EngineCache(tmp_path / "engines")
    key = EngineKey.for_platform(Platform("10.3.0", "Orin (nvgpu)", "8.7", None, "R36.4.3"), "fp16", "a" * 64)
    cache.root.mkdir()
    cache.store("encoder", key, b"plan" * 100, {})
    results = by_name(jetson_checks(root, engine_cache=cache, python_tensorrt=lambda: "10.3.0"))
    assert all(isinstance(r.status, CheckStatus) for r in results.values())
    assert {n: r.status for n, r in results.items()} == {
        "jetson.release": "ok", "jetson.tensorrt": "ok", "jetson.cuda": "ok", "jetson.support": "ok",
        "engine_cache": "ok", "jetson.devices": "ok", "jetson.telemetry": "ok",
    }  # fmt: skip
    assert results["jetson.release"].detail == "L4T R36.4.3 (/etc/nv_tegra_release): JetPack 6.1/6.2"
    assert results["jetson.support"].detail == "TensorRT 10.3.0 + CUDA 12.6.68 as JetPack 6.1/6.2 ships them"
    assert results["engine_cache"].detail.endswith(": 1 engines, 0.0 MB")
    assert results["jetson.devices"].detail == "4 GPU device nodes allowed by thzedge@.service, groups video"
    assert results["jetson.telemetry"].detail == "GPU 99 %, EMC 61 %, hottest gpu 58.625 C, VDD_IN 16.32 W"


def test_release_from_dpkg_when_nv_tegra_release_is_gone(tmp_path: Path) -> None:
    root = make_root(tmp_path, nv_tegra=None, packages=dpkg(nvidia_l4t_core="35.4.1-20230801124926"))
    l4t = read_l4t(root)
    assert l4t is not None and str(l4t) == "R35.4.1" and l4t.source == "dpkg nvidia-l4t-core"
    assert l4t.jetpack is not None and l4t.jetpack.tensorrt == ("8.5",)


def test_not_a_jetson(tmp_path: Path) -> None:
    root = make_root(tmp_path, nv_tegra=None, packages=dpkg(python3="3.10.6-1"))
    results = jetson_checks(root, engine_cache=tmp_path / "engines", python_tensorrt=lambda: None)
    assert [r.name for r in results] == ["jetson.release", "engine_cache"]
    assert results[0].status is CheckStatus.ok and "not a Jetson" in results[0].detail


def test_jetpack_tensorrt_invisible_from_a_plain_venv(tmp_path: Path) -> None:
    """JetPack's tensorrt comes from apt; a venv without --system-site-packages cannot import it."""
    root = make_root(tmp_path, packages=dpkg(python3_libnvinfer="8.6.2.3-1+cuda12.2"), cuda_json="12.2.140",
                     nv_tegra="# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic\n")  # fmt: skip
    results = by_name(jetson_checks(root, engine_cache=tmp_path / "e", python_tensorrt=lambda: None))
    trt = results["jetson.tensorrt"]
    assert trt.status is CheckStatus.fail and "--system-site-packages" in trt.detail and "8.6.2" in trt.detail
    assert results["jetson.support"].status is CheckStatus.ok  # what is installed is a good combination


@pytest.mark.parametrize(
    ("trt", "cuda", "nv_tegra", "status", "words"),
    [
        ("8.2.1", "10.2.300", NV_TEGRA_R32_7_1, "fail", "not supported; thzedge needs 8.6"),  # JetPack 4.6
        (
            "8.5.2",
            "11.4.315",
            "# R35 (release), REVISION: 4.1\n",
            "fail",
            "JetPack 6.0 or later",
        ),  # JetPack 5.1.2
        ("11.4.1", "12.6.68", NV_TEGRA_R36_4_3, "fail", "needs JetPack 7.2.2+"),
        ("10.3.0", "11.4.315", NV_TEGRA_R36_4_3, "fail", "another CUDA will not load"),
        ("10.7.0", "12.6.68", NV_TEGRA_R36_4_3, "warn", "not the 10.3 JetPack 6.1/6.2 ships"),
        ("10.16.2", "13.2.0", "# R39 (release), REVISION: 2.0\n", "ok", "JetPack 7.2"),
        ("10.3.0", "12.6.68", "# R37 (release), REVISION: 1.0\n", "warn", "not in thzedge's JetPack table"),
    ],
)
def test_which_combinations_are_supported(
    tmp_path: Path, trt: str, cuda: str, nv_tegra: str, status: str, words: str
) -> None:
    l4t = read_l4t(make_root(tmp_path, nv_tegra=nv_tegra))
    got, detail = support_problems(trt, cuda, l4t)
    assert got == status and words in detail, detail


def test_devices_blocked_by_device_policy_name_the_lines_to_add(tmp_path: Path) -> None:
    root = make_root(tmp_path, unit=unit_text("DeviceAllow=/dev/nvmap rw\n"), nodes=ORIN_NODES)
    r = device_access(root, read_unit(root))
    assert r.status is CheckStatus.fail
    assert (
        "DevicePolicy=closed blocks /dev/nvgpu/igpu0/as, /dev/nvgpu/igpu0/ctrl, /dev/dri/renderD128"
        in r.detail
    )
    assert "DeviceAllow=/dev/nvgpu/igpu0/ctrl rw" in r.detail and "/dev/nvmap," not in r.detail


def test_devices_readable_only_by_a_group_the_service_lacks(tmp_path: Path) -> None:
    """JetPack 6: the render node belongs to `render`; without the group cuInit fails in the sandbox."""
    root = make_root(tmp_path, unit=unit_text(ALLOW), nodes=ORIN_NODES, group="render", members="")
    r = device_access(root, read_unit(root))
    assert r.status is CheckStatus.fail
    assert r.detail.endswith("add SupplementaryGroups=render")


def test_an_empty_device_allow_in_a_dropin_resets_the_list(tmp_path: Path) -> None:
    root = make_root(tmp_path, unit=unit_text(ALLOW), dropin="[Service]\nDeviceAllow=\n", nodes=ORIN_NODES)
    unit = read_unit(root)
    assert unit is not None and unit.device_allow == []
    assert device_access(root, unit).status is CheckStatus.fail


def test_char_group_rules_match_through_proc_devices(tmp_path: Path) -> None:
    """`DeviceAllow=char-nvhost* rw` (JetPack 5 nodes): matched by the driver name of the node's major."""
    root = make_root(tmp_path, unit=unit_text("DeviceAllow=char-nvhost* rw\nDeviceAllow=char-nvmap rw\n"))
    (root / "proc").mkdir()
    (root / "proc/devices").write_text("Character devices:\n  1 mem\n 10 misc\n492 nvhost-gpu\n493 nvmap\n\n"
                                       "Block devices:\n  7 loop\n")  # fmt: skip
    nodes = [DeviceNode("/dev/nvhost-gpu", GID, 0o660, 492), DeviceNode("/dev/nvmap", GID, 0o660, 493)]
    assert device_access(root, read_unit(root), nodes).status is CheckStatus.ok
    other = [*nodes, DeviceNode("/dev/nvgpu/igpu0/ctrl", GID, 0o660, 501)]
    r = device_access(root, read_unit(root), other)
    assert r.status is CheckStatus.fail and "blocks /dev/nvgpu/igpu0/ctrl" in r.detail


def test_unit_not_installed_lists_what_it_will_need(tmp_path: Path) -> None:
    root = make_root(tmp_path, nodes={"/dev/nvmap": "660"})
    r = device_access(root, read_unit(root))
    assert r.status is CheckStatus.warn and "DeviceAllow=/dev/nvmap rw SupplementaryGroups=video" in r.detail


def test_engine_cache_states(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    cache = EngineCache(tmp_path / "engines")

    def check() -> CheckResult:
        return by_name(jetson_checks(root, engine_cache=cache, python_tensorrt=lambda: "10.3.0"))[
            "engine_cache"
        ]

    r = check()
    assert r.status is CheckStatus.warn and "does not exist yet" in r.detail and "never builds" in r.detail
    cache.root.mkdir()
    old = EngineKey.for_platform(Platform("8.6.2", "Orin (nvgpu)", "8.7", None, "R36.3.0"), "fp16", "b" * 64)
    plan, _ = cache.paths("encoder", old)
    cache.store("encoder", old, b"x" * 2048, {})
    plan.write_bytes(b"x" * 100)  # truncated by a power cut
    (cache.root / "decoder_0.fp16.0123456789abcdef.plan").write_bytes(b"y")  # its manifest never came
    r = check()
    assert r.status is CheckStatus.warn
    assert "truncated: encoder.fp16." in r.detail
    assert "an interrupted build): decoder_0.fp16.0123456789abcdef" in r.detail
    assert "engines for TensorRT 8.6.2 can no longer load" in r.detail


def test_a_release_known_only_by_its_major_versions(tmp_path: Path) -> None:
    l4t = read_l4t(make_root(tmp_path, nv_tegra="# R38 (release), REVISION: 2.0\n"))
    assert support_problems("10.13.3", "13.0.48", l4t)[0] == "ok"
    status, detail = support_problems("8.6.2", "13.0.48", l4t)
    assert status == "warn" and "not the 10 JetPack 7.0/7.1 ships" in detail
