"""Jetson device telemetry from `tegrastats`: GPU/EMC load, temperatures, power rails as Prometheus gauges.

A Jetson has no NVML, so the GPU metrics servers usually export are missing there (Triton
server 714, client 567); `tegrastats` is the documented source. `install_jetson_telemetry`
starts one bounded background reader of `tegrastats --interval MS` and adds a collector to a
Prometheus registry; on a machine without `tegrastats` it returns None and registers nothing,
so the series are absent rather than zero.

The reader keeps only the latest parsed sample (lines are capped at `MAX_LINE` bytes), reads
continuously so `tegrastats` never blocks on a full pipe, and ends with the process: when
`tegrastats` exits, one warning is logged and `thzedge_jetson_telemetry_up` drops to 0. Samples
older than `stale_after_s` are not exported.

`parse_tegrastats` understands the line formats of JetPack 4.x (L4T R32: rails as `cur/avg`
without units, `GR3D_FREQ 0%@114`), 5.x (R35: `mW` units, upper-case sensors, `GR3D_FREQ
0%@[0,0]`) and 6.x (R36: lower-case sensors, `off` CPU cores), with or without the leading
timestamp; tests/edge/test_telemetry.py holds recorded lines of each. Sensors reading -256 C or
below -40 C are switched off (AGX Orin prints `GPU@-256C`) and are left out.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("thzedge.telemetry")

MAX_LINE = 4096
DEFAULT_INTERVAL_MS = 1000
TEGRASTATS_PATHS = (Path("/usr/bin/tegrastats"),)

_TIMESTAMP = re.compile(r"^\d\d-\d\d-\d{4} \d\d:\d\d:\d\d\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC(?:_FREQ)? (\d+)%(?:@(\d+))?")
_GPU = re.compile(r"\bGR3D(?:_FREQ)? (\d+)%(?:@\[?(\d+))?")
_TEMP = re.compile(r"(?<![\w%@])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL_MW = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW")
_RAIL_OLD = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)/(\d+)(?=\s|$)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM", "NC"}  # NC: "not connected" rails on AGX Orin
_SENSOR_OFF_C = -40.0


@dataclass(frozen=True)
class TegrastatsSample:
    """One parsed tegrastats line (None / empty where the line does not carry a field)."""

    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    cpu_load_pct: tuple[float | None, ...] = ()  # None: core offline
    gpu_load_pct: float | None = None
    gpu_freq_mhz: float | None = None
    emc_load_pct: float | None = None
    temperatures_c: Mapping[str, float] = field(default_factory=dict)  # sensor (lower case) -> C
    power_mw: Mapping[str, float] = field(default_factory=dict)  # rail -> instantaneous mW
    power_avg_mw: Mapping[str, float] = field(default_factory=dict)  # rail -> running average mW

    def summary(self) -> str:
        """One short line for doctor: GPU, EMC, the hottest sensor, the input rail."""
        parts = []
        if self.gpu_load_pct is not None:
            parts.append(f"GPU {self.gpu_load_pct:g} %")
        if self.emc_load_pct is not None:
            parts.append(f"EMC {self.emc_load_pct:g} %")
        if self.temperatures_c:
            name, value = max(self.temperatures_c.items(), key=lambda kv: kv[1])
            parts.append(f"hottest {name} {value:g} C")
        rail = input_rail(self.power_mw)
        if rail is not None:
            parts.append(f"{rail} {self.power_mw[rail] / 1000:.2f} W")
        return ", ".join(parts) or "no readings"


def input_rail(power_mw: Mapping[str, float]) -> str | None:
    """The rail that measures the whole module's input, where the board has one."""
    for name in ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0", "VIN"):
        if name in power_mw:
            return name
    return None


def parse_tegrastats(line: str) -> TegrastatsSample | None:
    """Parse one tegrastats line; None when it is not one (no RAM and no GPU field)."""
    line = _TIMESTAMP.sub("", line.strip())
    ram, gpu = _RAM.search(line), _GPU.search(line)
    if ram is None and gpu is None:
        return None
    cpu: list[float | None] = []
    m = _CPU.search(line)
    if m:
        for core in m.group(1).split(","):
            load = re.match(r"\s*(\d+)%", core)
            cpu.append(float(load.group(1)) if load else None)
    emc = _EMC.search(line)
    temps = {
        name.lower(): float(value) for name, value in _TEMP.findall(line) if float(value) > _SENSOR_OFF_C
    }
    rails = _RAIL_MW.findall(line) or _RAIL_OLD.findall(line)
    rails = [r for r in rails if r[0] not in _NOT_RAILS]
    return TegrastatsSample(
        ram_used_mb=int(ram.group(1)) if ram else None,
        ram_total_mb=int(ram.group(2)) if ram else None,
        cpu_load_pct=tuple(cpu),
        gpu_load_pct=float(gpu.group(1)) if gpu else None,
        gpu_freq_mhz=float(gpu.group(2)) if gpu and gpu.group(2) else None,
        emc_load_pct=float(emc.group(1)) if emc else None,
        temperatures_c=temps,
        power_mw={name: float(cur) for name, cur, _ in rails},
        power_avg_mw={name: float(avg) for name, _, avg in rails},
    )


def find_tegrastats(root: Path = Path("/")) -> Path | None:
    """The tegrastats binary: on $PATH, else JetPack's /usr/bin/tegrastats under `root`; None elsewhere."""
    found = shutil.which("tegrastats") if root == Path("/") else None
    if found:
        return Path(found)
    for p in TEGRASTATS_PATHS:
        candidate = root / p.relative_to("/")
        if candidate.is_file():
            return candidate
    return None


class TegrastatsReader:
    """Runs tegrastats and keeps its latest parsed sample; see the module docstring."""

    def __init__(self, command: Sequence[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.command = list(command)
        self.clock = clock
        self.lines = 0
        self.unparsed = 0
        self.exited: int | None = None
        self._latest: tuple[TegrastatsSample, float] | None = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> TegrastatsReader:
        """Start tegrastats and the reader thread; OSError when the command cannot run."""
        self._proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        self._thread = threading.Thread(target=self._run, name="thzedge-tegrastats", daemon=True)
        self._thread.start()
        return self

    def latest(self) -> tuple[TegrastatsSample, float] | None:
        """(latest sample, its age in seconds), or None before the first one."""
        with self._lock:
            if self._latest is None:
                return None
            sample, t = self._latest
        return sample, self.clock() - t

    def _run(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in _bounded_lines(self._proc.stdout):
            self.lines += 1
            sample = parse_tegrastats(line)
            if sample is None:
                self.unparsed += 1
                continue
            with self._lock:
                self._latest = (sample, self.clock())
        self.exited = self._proc.wait()
        if not self._stopping.is_set():
            log.warning(
                "tegrastats exited with status %s; Jetson telemetry stops (thzedge_jetson_telemetry_up 0)",
                self.exited,
            )

    def close(self) -> None:
        """Stop tegrastats and wait for the reader thread."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()


def _bounded_lines(stream: IO[bytes]) -> Iterator[str]:
    """Lines of at most MAX_LINE bytes; the rest of an over-long line is skipped, never buffered."""
    while True:
        raw = stream.readline(MAX_LINE + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # drain the rest of this line in bounded pieces
                raw = stream.readline(MAX_LINE)
            continue
        yield raw.decode("utf-8", "replace")


class TegrastatsCollector(Collector):
    """Prometheus gauges from the reader's latest sample (names in docs/operations.md)."""

    def __init__(self, reader: TegrastatsReader, stale_after_s: float) -> None:
        self.reader = reader
        self.stale_after_s = stale_after_s

    def describe(self) -> Iterator[Metric]:
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        latest = self.reader.latest()
        fresh = latest is not None and latest[1] <= self.stale_after_s and self.reader.exited is None
        yield from self._families(latest[0] if latest is not None and fresh else None)

    def _families(self, s: TegrastatsSample | None) -> Iterator[Metric]:
        up = GaugeMetricFamily("thzedge_jetson_telemetry_up", "1 while tegrastats delivers fresh samples.")
        gpu = GaugeMetricFamily("thzedge_jetson_gpu_load_ratio", "GPU (GR3D) load, 0..1.")
        emc = GaugeMetricFamily("thzedge_jetson_emc_load_ratio", "External memory controller load, 0..1.")
        ram = GaugeMetricFamily("thzedge_jetson_ram_used_bytes", "RAM in use (shared by CPU and GPU).")
        temp = GaugeMetricFamily(
            "thzedge_jetson_temperature_celsius", "Thermal sensor readings (gpu, cpu, tj, tboard, ...).",
            labels=["sensor"],
        )  # fmt: skip
        power = GaugeMetricFamily(
            "thzedge_jetson_power_watts", "Power rail readings (VDD_IN: the whole module).", labels=["rail"]
        )
        up.add_metric([], 1.0 if s is not None else 0.0)
        if s is not None:
            if s.gpu_load_pct is not None:
                gpu.add_metric([], s.gpu_load_pct / 100.0)
            if s.emc_load_pct is not None:
                emc.add_metric([], s.emc_load_pct / 100.0)
            if s.ram_used_mb is not None:
                ram.add_metric([], s.ram_used_mb * 1024.0 * 1024.0)
            for name, c in sorted(s.temperatures_c.items()):
                temp.add_metric([name], c)
            for rail, mw in sorted(s.power_mw.items()):
                power.add_metric([rail], mw / 1000.0)
        yield from (up, gpu, emc, ram, temp, power)


class JetsonTelemetry:
    """A running tegrastats reader whose gauges are registered on one registry; `close()` undoes both."""

    def __init__(self, reader: TegrastatsReader, registry: CollectorRegistry, collector: Collector) -> None:
        self.reader = reader
        self.registry = registry
        self.collector = collector

    def close(self) -> None:
        """Unregister the gauges and stop tegrastats."""
        with contextlib.suppress(KeyError):  # closed twice
            self.registry.unregister(self.collector)
        self.reader.close()


def install_jetson_telemetry(
    registry: CollectorRegistry,
    *,
    command: Sequence[str] | None = None,
    interval_ms: int = DEFAULT_INTERVAL_MS,
    stale_after_s: float | None = None,
) -> JetsonTelemetry | None:
    """Start reading tegrastats and add its gauges to `registry`; None (nothing added) off a Jetson."""
    if command is None:
        binary = find_tegrastats()
        if binary is None:
            log.debug("no tegrastats: not a Jetson, no device telemetry")
            return None
        command = [str(binary), "--interval", str(interval_ms)]
    reader = TegrastatsReader(command)
    try:
        reader.start()
    except OSError as exc:
        log.warning("cannot run %s (%s); no Jetson telemetry", command[0], exc)
        return None
    collector = TegrastatsCollector(reader, stale_after_s or max(5.0, 5 * interval_ms / 1000))
    registry.register(collector)
    return JetsonTelemetry(reader, registry, collector)


def read_one_sample(command: Sequence[str], timeout_s: float = 5.0) -> TegrastatsSample | None:
    """Run tegrastats until its first parsable line (for doctor); None on timeout or no such line."""
    reader = TegrastatsReader(command)
    try:
        reader.start()
    except OSError:
        return None
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and reader.exited is None:
            latest = reader.latest()
            if latest is not None:
                return latest[0]
            time.sleep(0.05)
        latest = reader.latest()
        return latest[0] if latest is not None else None
    finally:
        reader.close()
