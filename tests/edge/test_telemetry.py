"""tegrastats parsing on recorded lines of several JetPack releases, the bounded reader against a
fake tegrastats process, the Prometheus gauges, their absence off a Jetson, and the daemon wiring.

The recorded lines are public tegrastats output. Device and release as the source states them
or, where it does not, as the line's format shows (R32: rails `cur/avg` without units; R35:
`mW`, upper-case sensor names, `GR3D_FREQ n%@[f,f]`; R36: lower-case sensor names):
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from edge.telemetry import (
    MAX_LINE,
    TegrastatsReader,
    find_tegrastats,
    install_jetson_telemetry,
    parse_tegrastats,
    read_one_sample,
)

# JetPack 4.x (L4T R32), Jetson Nano: docstring of a public tegrastats parser.
JP4_NANO = (
    "RAM 1766/3964MB (lfb 197x4MB) SWAP 0/2048MB (cached 0MB) CPU [24%@1224,15%@1224,13%@1224,10%@1224] "
    "EMC_FREQ 0% GR3D_FREQ 0% PLL@21C CPU@25C PMIC@100C GPU@23.5C AO@33.5C thermal@24.5C "
    "POM_5V_IN 2545/2547 POM_5V_GPU 0/0 POM_5V_CPU 549/529"
)
# JetPack 4.x, Jetson TX2 (Denver + A57 cores): henrygd/beszel PR 1631 ("pre jetpack5").
JP4_TX2 = (
    "RAM 3276/7859MB (lfb 5x4MB) SWAP 1626/12122MB (cached 181MB) "
    "CPU [44%@1421,49%@2031,67%@2034,17%@1420,25%@1419,8%@1420] EMC_FREQ 1%@1866 GR3D_FREQ 0%@114 "
    "APE 150 MTS fg 1% bg 1% PLL@42.5C MCPU@42.5C PMIC@50C Tboard@38C GPU@39.5C BCPU@42.5C "
    "thermal@41.3C Tdiode@39.25C VDD_SYS_GPU 182/182 VDD_SYS_SOC 730/730 VDD_4V0_WIFI 0/0 "
    "VDD_IN 5297/5297 VDD_SYS_CPU 1917/1917 VDD_SYS_DDR 1241/1241"
)
# JetPack 5.x format (R35), AGX Orin 64 GB: GDWR/jetson_exporter issue 14. -256C: sensor off.
JP5_AGX_ORIN = (
    "04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 CV0@-256C CPU@44.562C Tboard@32C "
    "SOC2@40.093C Tdiode@33C SOC0@41.093C CV1@-256C GPU@-256C tj@44.343C SOC1@41.25C CV2@-256C "
    "VDD_GPU_SOC 2340mW/2340mW VDD_CPU_CV 390mW/390mW VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW "
    "VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW"
)
# JetPack 6.x format (R36), Orin Nano 8 GB idle and under GPU load: a public summariser's test.
JP6_ORIN_NANO_IDLE = (
    "10-08-2026 04:38:21 RAM 1343/7620MB (lfb 157x4MB) SWAP 165/3810MB (cached 3MB) "
    "CPU [0%@1497,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 15%@204 GR3D_FREQ 0%@[305] "
    "NVDEC off NVJPG off VIC off OFA off APE 200 cpu@48.562C soc2@46.593C soc0@48.625C gpu@49.625C "
    "tj@49.312C soc1@47.937C VDD_IN 5251mW/8535mW VDD_CPU_GPU_CV 512mW/1944mW VDD_SOC 2720mW/3659mW"
)
JP6_ORIN_NANO_BUSY = (
    "10-08-2026 04:35:02 RAM 6712/7620MB (lfb 12x4MB) SWAP 369/3810MB (cached 8MB) "
    "CPU [38%@1497,2%@729,1%@729,0%@729,1%@729,0%@729] EMC_FREQ 61%@2133 GR3D_FREQ 99%@[612] "
    "NVDEC off NVJPG off VIC off OFA off APE 200 cpu@57.125C soc2@55.093C soc0@56.625C gpu@58.625C "
    "tj@58.312C soc1@55.937C VDD_IN 16321mW/11204mW VDD_CPU_GPU_CV 7104mW/4944mW VDD_SOC 3120mW/3659mW"
)
# JetPack 6.x, Orin Nano with a core offline and tegrastats run without root (no EMC field).
JP6_ORIN_NANO_OFFLINE_CORE = (
    "08-23-2026 13:57:46 RAM 3595/7607MB (lfb 1x1MB) SWAP 11/3804MB (cached 0MB) "
    "CPU [1%@729,off,3%@729,4%@729,5%@729,6%@729] GR3D_FREQ 7%@[306] cpu@51C soc2@50.562C "
    "soc0@51.031C gpu@50.5C tj@51C soc1@50C VDD_IN 5832mW/5852mW VDD_CPU_GPU_CV 1307mW/1327mW "
    "VDD_SOC 1468mW/1468mW"
)


def test_jetpack4_nano() -> None:
    s = parse_tegrastats(JP4_NANO)
    assert s is not None
    assert (s.ram_used_mb, s.ram_total_mb) == (1766, 3964)
    assert s.cpu_load_pct == (24.0, 15.0, 13.0, 10.0)
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.emc_load_pct) == (0.0, None, 0.0)
    assert s.temperatures_c == {
        "pll": 21.0,
        "cpu": 25.0,
        "pmic": 100.0,
        "gpu": 23.5,
        "ao": 33.5,
        "thermal": 24.5,
    }
    assert s.power_mw == {"POM_5V_IN": 2545.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 549.0}
    assert s.power_avg_mw["POM_5V_IN"] == 2547.0
    assert s.summary() == "GPU 0 %, EMC 0 %, hottest pmic 100 C, POM_5V_IN 2.54 W"


def test_jetpack4_tx2() -> None:
    s = parse_tegrastats(JP4_TX2)
    assert s is not None
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.emc_load_pct) == (0.0, 114.0, 1.0)
    assert (
        len(s.cpu_load_pct) == 6 and s.temperatures_c["gpu"] == 39.5 and s.temperatures_c["tdiode"] == 39.25
    )
    assert s.power_mw["VDD_IN"] == 5297.0 and s.power_mw["VDD_SYS_GPU"] == 182.0 and len(s.power_mw) == 6


def test_jetpack5_agx_orin_drops_switched_off_sensors_and_nc_rails() -> None:
    s = parse_tegrastats(JP5_AGX_ORIN)
    assert s is not None
    assert (s.ram_used_mb, s.ram_total_mb) == (4321, 62801)
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.emc_load_pct) == (0.0, 0.0, 0.0)
    assert len(s.cpu_load_pct) == 12
    assert s.temperatures_c == {"cpu": 44.562, "tboard": 32.0, "soc2": 40.093, "tdiode": 33.0, "soc0": 41.093,
                                "tj": 44.343, "soc1": 41.25}  # fmt: skip
    assert s.power_mw == {"VDD_GPU_SOC": 2340.0, "VDD_CPU_CV": 390.0, "VIN_SYS_5V0": 4025.0,
                          "VDDQ_VDD2_1V8AO": 301.0}  # fmt: skip
    assert s.summary().endswith("VIN_SYS_5V0 4.03 W")


def test_jetpack6_orin_nano_idle_and_busy() -> None:
    idle, busy = parse_tegrastats(JP6_ORIN_NANO_IDLE), parse_tegrastats(JP6_ORIN_NANO_BUSY)
    assert idle is not None and busy is not None
    assert (idle.gpu_load_pct, idle.gpu_freq_mhz, idle.emc_load_pct) == (0.0, 305.0, 15.0)
    assert (busy.gpu_load_pct, busy.gpu_freq_mhz, busy.emc_load_pct) == (99.0, 612.0, 61.0)
    assert busy.temperatures_c["gpu"] == 58.625 and busy.temperatures_c["tj"] == 58.312
    assert set(busy.temperatures_c) == {"cpu", "soc2", "soc0", "gpu", "tj", "soc1"}
    assert busy.power_mw == {"VDD_IN": 16321.0, "VDD_CPU_GPU_CV": 7104.0, "VDD_SOC": 3120.0}
    assert busy.power_avg_mw["VDD_IN"] == 11204.0
    assert busy.ram_used_mb == 6712


def test_jetpack6_offline_core_and_missing_fields() -> None:
    s = parse_tegrastats(JP6_ORIN_NANO_OFFLINE_CORE)
    assert s is not None
    assert s.cpu_load_pct == (1.0, None, 3.0, 4.0, 5.0, 6.0)
    assert s.emc_load_pct is None and s.gpu_load_pct == 7.0


@pytest.mark.parametrize("line", ["", "garbage", "tegrastats: permission denied", "NVDEC off VIC off"])
def test_not_a_tegrastats_line(line: str) -> None:
    assert parse_tegrastats(line) is None


# --- the reader against a fake tegrastats ---------------------------------------------------------


def fake_tegrastats(
    path: Path, lines: list[str], interval_s: float = 0.05, then_exit: int | None = None
) -> Path:
    """An executable that prints `lines` in a loop like tegrastats (or once, then exits)."""
    body = f"""\
        import sys, time
        lines = {lines!r}
        while True:
            for line in lines:
                sys.stdout.write(line + "\\n")
                sys.stdout.flush()
                time.sleep({interval_s})
            if {then_exit!r} is not None:
                sys.exit({then_exit!r})
    """
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def wait_until(predicate, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_gauges_from_a_running_tegrastats(tmp_path: Path) -> None:
    script = fake_tegrastats(tmp_path / "tegrastats", [JP6_ORIN_NANO_BUSY])
    registry = CollectorRegistry(auto_describe=True)
    tele = install_jetson_telemetry(registry, command=[str(script)])
    assert tele is not None
    try:
        wait_until(lambda: registry.get_sample_value("thzedge_jetson_telemetry_up") == 1.0)
        text = generate_latest(registry).decode()
        assert registry.get_sample_value("thzedge_jetson_gpu_load_ratio") == pytest.approx(0.99)
        assert registry.get_sample_value("thzedge_jetson_emc_load_ratio") == pytest.approx(0.61)
        assert registry.get_sample_value("thzedge_jetson_temperature_celsius", {"sensor": "gpu"}) == 58.625
        assert registry.get_sample_value("thzedge_jetson_power_watts", {"rail": "VDD_IN"}) == 16.321
        assert registry.get_sample_value("thzedge_jetson_ram_used_bytes") == 6712 * 1024 * 1024
        assert "# HELP thzedge_jetson_power_watts" in text
    finally:
        tele.close()
    assert tele.reader.exited is not None  # tegrastats was stopped with the daemon
    assert registry.get_sample_value("thzedge_jetson_telemetry_up") is None  # and the gauges removed


def test_a_dying_tegrastats_is_one_warning_and_up_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = fake_tegrastats(tmp_path / "tegrastats", [JP5_AGX_ORIN], then_exit=3)
    registry = CollectorRegistry(auto_describe=True)
    tele = install_jetson_telemetry(registry, command=[str(script)])
    assert tele is not None
    try:
        wait_until(lambda: tele.reader.exited is not None)
        assert registry.get_sample_value("thzedge_jetson_telemetry_up") == 0.0
        assert registry.get_sample_value("thzedge_jetson_gpu_load_ratio") is None  # no stale values exported
    finally:
        tele.close()
    warnings = [r.getMessage() for r in caplog.records if "tegrastats exited" in r.getMessage()]
    assert warnings == [
        "tegrastats exited with status 3; Jetson telemetry stops (thzedge_jetson_telemetry_up 0)"
    ]


def test_reader_is_bounded(tmp_path: Path) -> None:
    """A runaway line is skipped in bounded pieces; only the latest sample is kept."""
    script = fake_tegrastats(tmp_path / "tegrastats", ["x" * (10 * MAX_LINE), JP4_NANO, JP4_TX2])
    reader = TegrastatsReader([str(script)]).start()
    try:
        wait_until(lambda: reader.lines >= 4)
        latest = reader.latest()
        assert latest is not None and latest[0].ram_total_mb in (3964, 7859)
        assert reader.unparsed == 0  # the over-long line was dropped before parsing, not parsed
    finally:
        reader.close()


def test_absent_cleanly_off_a_jetson(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no tegrastats anywhere on PATH
    monkeypatch.setattr("edge.telemetry.TEGRASTATS_PATHS", (tmp_path / "usr/bin/tegrastats",))
    registry = CollectorRegistry(auto_describe=True)
    assert install_jetson_telemetry(registry) is None
    assert "thzedge_jetson" not in generate_latest(registry).decode()
    assert install_jetson_telemetry(registry, command=[str(tmp_path / "missing")]) is None


def test_find_and_read_one_sample_in_a_fake_root(tmp_path: Path) -> None:
    binary = tmp_path / "usr" / "bin" / "tegrastats"
    binary.parent.mkdir(parents=True)
    fake_tegrastats(binary, ["starting", JP6_ORIN_NANO_IDLE])
    assert find_tegrastats(tmp_path) == binary
    sample = read_one_sample([str(binary)])
    assert sample is not None and sample.gpu_freq_mhz == 305.0
    assert find_tegrastats(tmp_path / "elsewhere") is None


def test_daemon_exports_jetson_gauges(tmp_path: Path) -> None:
    """The daemon adds the gauges to its /metrics when tegrastats is there, and stops it on exit."""
    import json
    import urllib.request

    pytest.importorskip("onnxruntime")
    from daemon_helpers import finish, free_port, thzedge_run

    from edge.bundle import demo_bundle_path

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tegrastats(bin_dir / "tegrastats", [JP6_ORIN_NANO_BUSY], interval_s=0.2)
    port = free_port()
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(f'[metrics]\nbind = "127.0.0.1:{port}"\n[daemon]\nstop_timeout_s = 3.0\n')
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    daemon = thzedge_run("sim?fps=10", demo_bundle_path(), cfg, f"ipc://{tmp_path}/r.sock", env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        metrics = ""

        def scraped() -> bool:
            nonlocal metrics
            try:
                ready = json.loads(urllib.request.urlopen(f"{base}/readyz", timeout=2).read())
                metrics = urllib.request.urlopen(f"{base}/metrics", timeout=2).read().decode()
            except OSError:
                return False
            return ready.get("ready") is True and "thzedge_jetson_telemetry_up 1.0" in metrics

        wait_until(scraped, timeout=60)
        daemon.send_signal(signal.SIGTERM)
        rc, _, err = finish(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert rc == 0, err[-2000:]
    assert 'thzedge_jetson_power_watts{rail="VDD_IN"} 16.321' in metrics
    assert 'thzedge_jetson_temperature_celsius{sensor="gpu"} 58.625' in metrics
