"""What a Jetson needs for thzedge's TensorRT path, checked from its filesystem (for `thzedge doctor`).

`jetson_checks(root)` reads everything below `root` (a fake root filesystem in tests, `/` on a
device) and returns one `CheckResult` per concern, each with a one-line detail that says what
to do when it is not `ok`:

- `jetson.release`: the L4T release from `/etc/nv_tegra_release`, else the `nvidia-l4t-core`
  package in dpkg's status file, and the JetPack it belongs to;
- `jetson.tensorrt` / `jetson.cuda`: the installed versions (dpkg, `/usr/local/cuda/version.*`)
  and whether this Python can import the TensorRT that JetPack installed (a venv made without
  `--system-site-packages` cannot);
- `jetson.support`: whether TensorRT, CUDA and L4T form a combination TensorRT supports and
  thzedge drives (TensorRT 8.6, 10.x or 11.x as JetPack ships it);
- `engine_cache`: where the engine cache is, whether it is writable, what it holds (engines for
  other TensorRT versions, truncated or orphaned files);
- `jetson.devices`: the GPU device nodes present, whether the unit's `DeviceAllow=` (with its
  drop-ins) lets the service open them, and whether the service's groups can;
- `jetson.telemetry`: one tegrastats sample (GPU, EMC, hottest sensor, input rail).

`CheckResult` is deliberately minimal (name, status, detail) so `thzedge doctor` can show these
beside its own checks.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge.backends.engine_cache import EngineCache, resolve_engine_cache
from edge.checks import CheckResult, CheckStatus
from edge.telemetry import find_tegrastats, read_one_sample

# --------------------------------------------------------------------------------------------
# Release and versions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JetPackRelease:
    """What one L4T release line ships (NVIDIA's JetPack archive; tensorrt-and-quantization.md §1)."""

    jetpack: str
    cuda: str  # major.minor, or major where the reference gives no minor
    tensorrt: tuple[str, ...]  # major.minor (or major: any minor) of each TensorRT offered there


# (L4T major, minor) -> release. Minor None: every minor of that major.
JETPACK: dict[tuple[int, int | None], JetPackRelease] = {
    (32, 7): JetPackRelease("4.6", "10.2", ("8.2",)),
    (35, 1): JetPackRelease("5.0.2", "11.4", ("8.4",)),
    (35, None): JetPackRelease("5.1", "11.4", ("8.5",)),
    (36, 2): JetPackRelease("6.0 DP", "12.2", ("8.6",)),
    (36, 3): JetPackRelease("6.0", "12.2", ("8.6",)),
    (36, 4): JetPackRelease("6.1/6.2", "12.6", ("10.3",)),
    (38, None): JetPackRelease("7.0/7.1", "13", ("10",)),  # Thor only; the reference says "10.x"
    (39, None): JetPackRelease("7.2", "13.2", ("10.16", "11.4")),
}


@dataclass(frozen=True)
class L4TRelease:
    """A Jetson Linux (L4T) release such as R36.4.3, and where it was read."""

    major: int
    minor: int
    patch: int | None
    source: str

    def __str__(self) -> str:
        return f"R{self.major}.{self.minor}" + (f".{self.patch}" if self.patch is not None else "")

    @property
    def jetpack(self) -> JetPackRelease | None:
        """The JetPack this release belongs to, if thzedge knows it."""
        return JETPACK.get((self.major, self.minor)) or JETPACK.get((self.major, None))


def read_l4t(root: Path = Path("/")) -> L4TRelease | None:
    """The L4T release: /etc/nv_tegra_release, else dpkg's nvidia-l4t-core; None when not a Jetson."""
    try:
        text = (root / "etc/nv_tegra_release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    # "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: ..."
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if m:
        patch = int(m.group(3)) if m.group(3) else None
        return L4TRelease(int(m.group(1)), int(m.group(2)), patch, "/etc/nv_tegra_release")
    version = dpkg_versions(root).get("nvidia-l4t-core")
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    if m:
        patch = int(m.group(3)) if m.group(3) else None
        return L4TRelease(int(m.group(1)), int(m.group(2)), patch, "dpkg nvidia-l4t-core")
    return None


def dpkg_versions(root: Path = Path("/")) -> dict[str, str]:
    """Installed packages and their versions from dpkg's status file ({} when there is none)."""
    try:
        text = (root / "var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
        if "Package" in fields and "Version" in fields and fields.get("Status", "").endswith(" installed"):
            out[fields["Package"]] = fields["Version"]
    return out


def _version(text: str | None) -> str | None:
    """`10.3.0` from a package version such as `10.3.0.30-1+cuda12.5` (at most three parts)."""
    m = re.match(r"\d+(?:\.\d+){0,2}", text or "")
    return m.group(0) if m else None


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def installed_tensorrt(packages: Mapping[str, str]) -> str | None:
    """TensorRT version from JetPack's packages (tensorrt, libnvinfer10/8, python3-libnvinfer)."""
    names = [
        "tensorrt",
        "tensorrt-libs",
        *sorted((p for p in packages if re.fullmatch(r"libnvinfer\d+", p)), reverse=True),
        "python3-libnvinfer",
    ]
    for name in names:
        v = _version(packages.get(name))
        if v:
            return v
    return None


def installed_cuda(root: Path, packages: Mapping[str, str]) -> str | None:
    """CUDA toolkit version: /usr/local/cuda/version.json (CUDA 11+), version.txt (10.x), else dpkg."""
    cuda = root / "usr/local/cuda"
    try:
        data = json.loads((cuda / "version.json").read_text(encoding="utf-8"))
        v = _version(str(data.get("cuda", {}).get("version", "")))
        if v:
            return v
    except (OSError, ValueError, AttributeError):
        pass
    try:
        m = re.search(r"CUDA Version\s+([\d.]+)", (cuda / "version.txt").read_text(encoding="utf-8"))
        if m:
            return _version(m.group(1))
    except OSError:
        pass
    for name in sorted(packages, reverse=True):
        m = re.fullmatch(r"cuda-cudart-(\d+)-(\d+)", name)
        if m:
            return _version(packages[name]) or f"{m.group(1)}.{m.group(2)}"
    return None


def importable_tensorrt_version() -> str | None:
    """The version of `tensorrt` this Python imports, or None (not installed or not visible from the venv)."""
    try:
        import tensorrt
    except Exception:  # ImportError, or OSError from a missing libnvinfer
        return None
    return str(getattr(tensorrt, "__version__", "")) or None


def support_problems(trt: str, cuda: str | None, l4t: L4TRelease | None) -> tuple[CheckStatus, str]:
    """Whether TensorRT `trt` + CUDA `cuda` on `l4t` is a combination TensorRT supports and thzedge drives."""
    from edge.backends.trt import trt_generation  # the one rule for what thzedge drives
    from scanner_io.errors import MissingDependencyError

    try:
        trt_generation(trt)
    except MissingDependencyError as exc:
        return CheckStatus.fail, str(exc)
    release = l4t.jetpack if l4t is not None else None
    if l4t is not None and int(trt.split(".")[0]) >= 11 and l4t.major < 39:
        return CheckStatus.fail, (
            f"TensorRT {trt} does not support {l4t} (JetPack 6 and older): Jetson needs JetPack 7.2.2+ "
            "for TensorRT 11; use JetPack's own TensorRT"
        )
    if release is None:
        where = f"L4T {l4t}" if l4t is not None else "this machine"
        return (
            CheckStatus.warn,
            f"{where} is not in thzedge's JetPack table; check TensorRT {trt} / CUDA {cuda} by hand",
        )
    if cuda is not None and cuda.split(".")[0] != release.cuda.split(".")[0]:
        return CheckStatus.fail, (
            f"CUDA {cuda} with TensorRT {trt} on {l4t}: JetPack {release.jetpack} pairs TensorRT "
            f"{'/'.join(release.tensorrt)} with CUDA {release.cuda}; "
            "a TensorRT for another CUDA will not load"
        )
    if _major_minor(trt) not in release.tensorrt and trt.split(".")[0] not in release.tensorrt:
        return CheckStatus.warn, (
            f"TensorRT {trt} is not the {'/'.join(release.tensorrt)} JetPack {release.jetpack} ships (a pip "
            "wheel?); engines must be built and run with the same TensorRT"
        )
    return CheckStatus.ok, f"TensorRT {trt} + CUDA {cuda or '?'} as JetPack {release.jetpack} ships them"


# --------------------------------------------------------------------------------------------
# Device nodes and the unit's DeviceAllow
# --------------------------------------------------------------------------------------------

# The GPU nodes of the Jetson releases (nvhost-* up to R35, nvgpu/igpu0/* from R36) plus the DRM
# render node CUDA opens on JetPack 6 (operations.md §5.4). Found on the device, never assumed.
GPU_NODE_GLOBS = ("dev/nvmap", "dev/nvhost-*", "dev/nvgpu/igpu0/*", "dev/dri/renderD*")


@dataclass(frozen=True)
class DeviceNode:
    """One device node: its path as the service sees it, group id, mode and (char devices) major number."""

    path: str
    gid: int
    mode: int
    major: int | None = None


@dataclass
class UnitSettings:
    """The [Service] settings of the unit (and its drop-ins) that decide device access."""

    path: Path | None = None
    device_allow: list[tuple[str, str]] = field(default_factory=list)
    device_policy: str = "auto"
    user: str | None = None
    groups: list[str] = field(default_factory=list)  # Group= and SupplementaryGroups=


def gpu_device_nodes(root: Path) -> list[DeviceNode]:
    """The GPU device nodes under `root`/dev (regular files stand in for them in a fake root)."""
    out: dict[str, DeviceNode] = {}
    for pattern in GPU_NODE_GLOBS:
        for p in sorted(root.glob(pattern)):
            try:
                st = p.stat()
            except OSError:
                continue
            major = os.major(st.st_rdev) if stat.S_ISCHR(st.st_mode) else None
            path = "/" + p.relative_to(root).as_posix()
            out[path] = DeviceNode(path, st.st_gid, stat.S_IMODE(st.st_mode), major)
    return list(out.values())


def read_unit(root: Path, unit: Path | None = None) -> UnitSettings | None:
    """Parse the installed thzedge@.service and its drop-ins; None when it is not installed."""
    candidates = (
        [unit]
        if unit is not None
        else [
            root / "etc/systemd/system/thzedge@.service",
            root / "lib/systemd/system/thzedge@.service",
            root / "usr/lib/systemd/system/thzedge@.service",
        ]
    )
    main = next((p for p in candidates if p is not None and p.is_file()), None)
    if main is None:
        return None
    files = [main, *sorted((root / "etc/systemd/system" / f"{main.name}.d").glob("*.conf"))]
    settings = UnitSettings(path=main)
    for f in files:
        section = ""
        for raw in f.read_text(encoding="utf-8", errors="replace").splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section != "[Service]" or "=" not in line:
                continue
            key, value = (s.strip() for s in line.split("=", 1))
            if key == "DeviceAllow":
                if not value:
                    settings.device_allow.clear()  # an empty assignment resets the list (systemd)
                else:
                    spec, _, access = value.partition(" ")
                    settings.device_allow.append((spec, access.strip() or "rwm"))
            elif key == "DevicePolicy":
                settings.device_policy = value
            elif key == "User":
                settings.user = value
            elif key == "Group":
                settings.groups.append(value)
            elif key == "SupplementaryGroups":
                if not value:
                    settings.groups = [g for g in settings.groups if g]  # reset supplementary only
                settings.groups += value.split()
    return settings


def _char_names(root: Path) -> dict[int, str]:
    """Major number -> driver name from /proc/devices ("Character devices:" section)."""
    try:
        text = (root / "proc/devices").read_text(encoding="ascii", errors="replace")
    except OSError:
        return {}
    chars = text.split("Block devices:")[0]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s*(\d+)\s+(\S+)$", chars, re.M)}


def _groups(root: Path) -> tuple[dict[int, str], dict[str, set[str]]]:
    """gid -> group name and group name -> members, from root/etc/group."""
    names: dict[int, str] = {}
    members: dict[str, set[str]] = {}
    try:
        text = (root / "etc/group").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return names, members
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[2].isdigit():
            names[int(parts[2])] = parts[0]
            members[parts[0]] = {m for m in parts[3].split(",") if m}
    return names, members


def _allowed(node: DeviceNode, rules: Sequence[tuple[str, str]], char_names: Mapping[int, str]) -> bool:
    for spec, access in rules:
        if not {"r", "w"} <= set(access):
            continue
        if spec.startswith("/dev/") and fnmatch.fnmatch(node.path, spec):
            return True
        if spec.startswith("char-") and node.major is not None:
            name = char_names.get(node.major)
            if name is not None and fnmatch.fnmatch(name, spec[len("char-") :]):
                return True
    return False


def device_access(
    root: Path, unit: UnitSettings | None, nodes: Sequence[DeviceNode] | None = None
) -> CheckResult:
    """Whether the service can open every GPU node: DeviceAllow covers it and a service group may use it."""
    nodes = list(nodes) if nodes is not None else gpu_device_nodes(root)
    if not nodes:
        return CheckResult(
            "jetson.devices",
            CheckStatus.warn,
            "no GPU device nodes under /dev (a container without the NVIDIA runtime?)",
        )
    group_names, members = _groups(root)
    node_group = {n.path: group_names.get(n.gid, str(n.gid)) for n in nodes}
    needed_groups = sorted({node_group[n.path] for n in nodes if n.mode & 0o006 != 0o006})
    if unit is None:
        lines = " ".join(f"DeviceAllow={n.path} rw" for n in nodes)
        return CheckResult(
            "jetson.devices",
            CheckStatus.warn,
            f"thzedge@.service is not installed (systemd/install.sh); it will need: {lines} "
            f"SupplementaryGroups={' '.join(needed_groups)}",
        )
    problems: list[str] = []
    if unit.device_policy in ("closed", "strict"):
        missing = [n for n in nodes if not _allowed(n, unit.device_allow, _char_names(root))]
        if missing:
            problems.append(
                f"DevicePolicy={unit.device_policy} blocks {', '.join(n.path for n in missing)}: add "
                + "; ".join(f"DeviceAllow={n.path} rw" for n in missing)
            )
    service_groups = set(unit.groups) | {g for g, m in members.items() if unit.user and unit.user in m}
    unreachable = [
        n
        for n in nodes
        if n.mode & 0o006 != 0o006 and not (node_group[n.path] in service_groups and n.mode & 0o060 == 0o060)
    ]
    if unreachable:
        lacking = sorted({node_group[n.path] for n in unreachable})
        problems.append(
            f"the service's groups ({', '.join(sorted(service_groups)) or 'none'}) cannot open "
            f"{', '.join(n.path for n in unreachable)}: add SupplementaryGroups={' '.join(lacking)}"
        )
    where = unit.path.name if unit.path else "the unit"
    if problems:
        return CheckResult("jetson.devices", CheckStatus.fail, f"{where}: " + "; ".join(problems))
    return CheckResult(
        "jetson.devices",
        CheckStatus.ok,
        f"{len(nodes)} GPU device nodes allowed by {where}, groups {', '.join(needed_groups) or 'any'}",
    )


# --------------------------------------------------------------------------------------------
# Engine cache and telemetry
# --------------------------------------------------------------------------------------------


def engine_cache_check(cache: EngineCache, tensorrt: str | None) -> CheckResult:
    """Where the engine cache is and what it holds; warns about what would make the trt backend fall back."""
    s = cache.summary()
    where = f"{s['path']} ({s['source']})"
    if not s["exists"]:
        return CheckResult(
            "engine_cache",
            CheckStatus.warn,
            f"{where} does not exist yet: build engines with `thzedge export engine` "
            "(the daemon runs ONNX Runtime until then, and never builds)",
        )
    notes: list[str] = []
    if not s["writable"]:
        notes.append("not writable by this user: run `thzedge export engine` as the service user")
    if s["truncated"]:
        notes.append(f"truncated: {', '.join(s['truncated'])} (refused and deleted at the next load)")
    if s["orphans"]:
        notes.append(f"plans without a manifest (an interrupted build): {', '.join(s['orphans'])}")
    others = [v for v in s["tensorrt_versions"] if tensorrt is not None and v != tensorrt]
    if others:
        notes.append(
            f"engines for TensorRT {', '.join(others)} can no longer load: the next "
            "`thzedge export engine` prunes them"
        )
    if s["entries"] == 0:
        notes.append("no engines: run `thzedge export engine`")
    summary = f"{where}: {s['entries']} engines, {s['bytes'] / 2**20:.1f} MB"
    status = CheckStatus.warn if notes else CheckStatus.ok
    return CheckResult("engine_cache", status, summary + ("; " + "; ".join(notes) if notes else ""))


def telemetry_check(root: Path, timeout_s: float) -> CheckResult:
    """One tegrastats sample, summarised."""
    binary = find_tegrastats(root)
    if binary is None:
        return CheckResult(
            "jetson.telemetry",
            CheckStatus.warn,
            "tegrastats not found: no GPU/EMC/temperature/power metrics (JetPack's nvidia-l4t-tools)",
        )
    sample = read_one_sample([str(binary), "--interval", "200"], timeout_s)
    if sample is None:
        return CheckResult(
            "jetson.telemetry", CheckStatus.warn, f"{binary} gave no parsable line within {timeout_s:g} s"
        )
    return CheckResult("jetson.telemetry", CheckStatus.ok, sample.summary())


# --------------------------------------------------------------------------------------------
# All of them
# --------------------------------------------------------------------------------------------


def jetson_checks(
    root: Path = Path("/"),
    *,
    engine_cache: EngineCache | Path | None = None,
    unit: Path | None = None,
    python_tensorrt: Callable[[], str | None] = importable_tensorrt_version,
    device_nodes: Iterable[DeviceNode] | None = None,
    telemetry_timeout_s: float = 5.0,
) -> list[CheckResult]:
    """Run every check of the module docstring against the filesystem under `root`."""
    cache = engine_cache if isinstance(engine_cache, EngineCache) else resolve_engine_cache(engine_cache)
    l4t = read_l4t(root)
    packages = dpkg_versions(root)
    py_trt = python_tensorrt()
    if l4t is None:
        skipped = CheckResult(
            "jetson.release",
            CheckStatus.ok,
            "not a Jetson (no /etc/nv_tegra_release, no nvidia-l4t-core package): Jetson checks skipped",
        )
        return [skipped, engine_cache_check(cache, py_trt)]
    release = l4t.jetpack
    results = [
        CheckResult(
            "jetson.release",
            CheckStatus.ok if release is not None else CheckStatus.warn,
            f"L4T {l4t} ({l4t.source}): "
            + (f"JetPack {release.jetpack}" if release is not None else "a release thzedge does not know"),
        )
    ]
    pkg_trt = installed_tensorrt(packages)
    trt = py_trt or pkg_trt
    if trt is None:
        results.append(
            CheckResult(
                "jetson.tensorrt",
                CheckStatus.fail,
                "TensorRT is not installed: `sudo apt install nvidia-jetpack` (or python3-libnvinfer)",
            )
        )
    elif py_trt is None:
        results.append(
            CheckResult(
                "jetson.tensorrt",
                CheckStatus.fail,
                f"TensorRT {pkg_trt} is installed but this Python cannot import it: make the venv with "
                "`python3 -m venv --system-site-packages` (JetPack's tensorrt is not on PyPI for Jetson)",
            )
        )
    else:
        results.append(CheckResult("jetson.tensorrt", CheckStatus.ok, f"TensorRT {py_trt} importable"))
    cuda = installed_cuda(root, packages)
    results.append(
        CheckResult("jetson.cuda", CheckStatus.ok, f"CUDA {cuda}")
        if cuda is not None
        else CheckResult(
            "jetson.cuda", CheckStatus.fail, "no CUDA toolkit found (/usr/local/cuda): install nvidia-jetpack"
        )
    )
    if trt is not None:
        status, detail = support_problems(trt, cuda, l4t)
        results.append(CheckResult("jetson.support", status, detail))
    results.append(engine_cache_check(cache, trt))
    results.append(
        device_access(root, read_unit(root, unit), list(device_nodes) if device_nodes is not None else None)
    )
    results.append(telemetry_check(root, telemetry_timeout_s))
    return results
