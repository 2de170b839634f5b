"""The device's TensorRT engine cache: engines live outside bundles, keyed by everything a plan depends on.

A serialized TensorRT plan is valid only for the TensorRT version, the GPU (name and compute
capability), the DLA core and the precision it was built with, and for the exact ONNX it came
from; on a Jetson the L4T release belongs to it too (driver and TensorRT packages move together).
So engines are not written into bundles (read-only, copied between devices) but into one cache
directory per device:

    <cache>/<graph>.<precision>.<key16>.plan    the serialized engine
    <cache>/<graph>.<precision>.<key16>.json    its manifest, written last: no manifest, no entry
    <cache>/timing/<gpu>-sm<cc>-trt<ver>.cache  TensorRT timing caches
    <cache>/.lock                               held while `thzedge export engine` writes

`key16` starts the sha256 of the key (`EngineKey`), so after a JetPack upgrade or a re-export the
loader looks up another name and can never hand TensorRT a stale plan. Every file is written to a
temporary name, fsynced and renamed. Before a plan is deserialised its manifest is checked
against the key and the plan's size and sha256; an entry that fails (truncated by a power cut,
corrupted, copied from another device) is deleted with one log line, and only
`thzedge export engine` builds a new one: the daemon never builds (R-NEW-14).

Where the cache is (`resolve_engine_cache`): a path given explicitly (`--engine-cache`,
`[model] engine_cache`), else $THZEDGE_ENGINE_CACHE, else the `engines` entry of systemd's
$STATE_DIRECTORY (the unit declares `StateDirectory=thzedge/%i thzedge/engines`, so every
instance shares one cache), else /var/lib/thzedge/engines on an installed device, else
~/.cache/thzedge/engines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge.bundle import Bundle
from scanner_io.errors import BundleError, ThzEdgeError

log = logging.getLogger(__name__)

ENGINE_CACHE_ENV = "THZEDGE_ENGINE_CACHE"
SYSTEM_STATE_DIR = Path("/var/lib/thzedge")
ENGINE_MANIFEST_FORMAT = "thzedge-engine"
ENGINE_MANIFEST_VERSION = 2
PLAN_SUFFIX = ".plan"
MANIFEST_SUFFIX = ".json"
PART_SUFFIX = ".part"
TIMING_DIR = "timing"
LOCK_NAME = ".lock"


class EngineMismatchError(BundleError):
    """No engine in the cache fits this bundle, TensorRT and GPU; `thzedge export engine` must build one."""


class EngineCacheError(ThzEdgeError):
    """The engine cache cannot be used as asked (not writable, locked by another build)."""


@dataclass(frozen=True)
class Platform:
    """The running TensorRT and GPU, as engine manifests record and the loader compares them."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" on Orin
    cuda_runtime_version: str | None = None
    l4t: str | None = None

    def cache_key(self) -> str:
        """File-name-safe key of GPU + TensorRT version (timing caches are only valid there)."""
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower()
        return f"{gpu}-sm{self.compute_capability.replace('.', '')}-trt{self.tensorrt_version}"


@dataclass(frozen=True)
class EngineKey:
    """Everything one engine depends on; equal keys mean the plan can be loaded here."""

    tensorrt_version: str
    l4t: str | None
    gpu_name: str
    compute_capability: str
    dla_core: int | None
    precision: str
    onnx_sha256: str

    @classmethod
    def for_platform(
        cls, platform: Platform, precision: str, onnx_sha256: str, dla_core: int | None = None
    ) -> EngineKey:
        """The key of one graph's engine on this platform."""
        return cls(
            platform.tensorrt_version,
            platform.l4t,
            platform.gpu_name,
            platform.compute_capability,
            dla_core,
            str(precision),
            onnx_sha256,
        )

    @property
    def digest(self) -> str:
        """sha256 of the key's fields (canonical JSON)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def entry_name(self, graph: str) -> str:
        """The cache file stem of `graph`'s engine under this key."""
        return f"{graph}.{self.precision}.{self.digest[:16]}"


def source_variant(precisions: Iterable[str], precision: str, generation: int) -> str | None:
    """Which ONNX variant of a bundle a `precision` engine is built from (None: the bundle lacks it).

    8.6/10.x build fp16 from the FP32 graph with the FP16 builder flag when there is no fp16
    graph; 11.x takes the precision from the graph only, so it needs the variant itself.
    """
    have = list(precisions)
    if precision in have:
        return precision
    if precision == "fp16" and generation < 11 and "fp32" in have:
        return "fp32"
    return None


def graph_sha256(bundle: Bundle, graph: str, variant: str) -> str:
    """sha256 of one graph's ONNX, as the bundle's manifest records it (checked by Bundle.open)."""
    rel = bundle.variant(variant)["graphs"][graph]
    return str(bundle.manifest["files"][rel]["sha256"])


def check_engine_manifest(
    manifest: Mapping[str, Any], key: EngineKey, plan: bytes | None = None
) -> list[str]:
    """Reasons why this cache entry must not be deserialised under `key` (empty list: it matches)."""
    if manifest.get("format") != ENGINE_MANIFEST_FORMAT:
        return [f"not a thzedge engine manifest (format {manifest.get('format')!r})"]
    reasons = _platform_reasons(manifest, key)
    if manifest.get("precision") != key.precision:
        reasons.append(f"built for {manifest.get('precision')}, wanted {key.precision}")
    if manifest.get("onnx_sha256") != key.onnx_sha256:
        reasons.append("built from a different ONNX than the bundle now holds (stale engine)")
    if plan is not None:
        want = manifest.get("engine_bytes")
        if len(plan) != want:
            reasons.append(f"engine file is {len(plan)} bytes, its manifest says {want} (truncated?)")
        elif hashlib.sha256(plan).hexdigest() != manifest.get("engine_sha256"):
            reasons.append("engine file fails its sha256 (corrupted or replaced)")
    return reasons


def _platform_reasons(manifest: Mapping[str, Any], key: EngineKey) -> list[str]:
    reasons = []
    if str(manifest.get("tensorrt_version")) != key.tensorrt_version:
        reasons.append(
            f"built with TensorRT {manifest.get('tensorrt_version')}, running {key.tensorrt_version}"
        )
    if str(manifest.get("compute_capability")) != key.compute_capability:
        reasons.append(
            f"built for compute capability {manifest.get('compute_capability')}, this GPU is "
            f"{key.compute_capability}"
        )
    if str(manifest.get("gpu_name")) != key.gpu_name:
        reasons.append(f"built on GPU {manifest.get('gpu_name')!r}, this is {key.gpu_name!r}")
    if manifest.get("l4t") != key.l4t:
        reasons.append(f"built on L4T {manifest.get('l4t')}, this is {key.l4t}")
    if manifest.get("dla_core") != key.dla_core:
        reasons.append(f"built for DLA core {manifest.get('dla_core')}, wanted {key.dla_core}")
    return reasons


# --------------------------------------------------------------------------------------------
# Locating the cache
# --------------------------------------------------------------------------------------------


def resolve_engine_cache(
    explicit: Path | str | None = None, env: Mapping[str, str] | None = None
) -> EngineCache:
    """The engine cache to use: explicit path, $THZEDGE_ENGINE_CACHE, $STATE_DIRECTORY, system, user."""
    env = os.environ if env is None else env
    if explicit is not None:
        return EngineCache(Path(explicit), "configured")
    if env.get(ENGINE_CACHE_ENV):
        return EngineCache(Path(env[ENGINE_CACHE_ENV]), f"${ENGINE_CACHE_ENV}")
    state = [Path(p) for p in env.get("STATE_DIRECTORY", "").split(":") if p]
    if state:
        # The unit lists the shared `thzedge/engines` after the per-instance directory.
        named = [p for p in state if p.name == "engines"]
        return EngineCache(named[0] if named else state[0] / "engines", "$STATE_DIRECTORY")
    if SYSTEM_STATE_DIR.is_dir():
        return EngineCache(SYSTEM_STATE_DIR / "engines", "installed default")
    home = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return EngineCache(home / "thzedge" / "engines", "per-user default")


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """One readable entry: its name (file stem), manifest and files."""

    name: str
    manifest: Mapping[str, Any]
    plan: Path
    manifest_path: Path

    @property
    def nbytes(self) -> int:
        return self.plan.stat().st_size if self.plan.exists() else 0


class EngineCache:
    """A directory of engines and their manifests; see the module docstring for the layout."""

    def __init__(self, root: Path, source: str = "configured") -> None:
        self.root = Path(root)
        self.source = source  # why this directory (shown by doctor and `export engine`)

    def __repr__(self) -> str:
        return f"EngineCache({str(self.root)!r}, source={self.source!r})"

    def paths(self, graph: str, key: EngineKey) -> tuple[Path, Path]:
        """(plan, manifest) paths of `graph`'s engine under `key`."""
        stem = key.entry_name(graph)
        return self.root / f"{stem}{PLAN_SUFFIX}", self.root / f"{stem}{MANIFEST_SUFFIX}"

    def timing_cache_path(self, platform: Platform) -> Path:
        """Where the timing cache for this GPU and TensorRT version lives."""
        return self.root / TIMING_DIR / f"{platform.cache_key()}.cache"

    # -- reading -------------------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every entry whose manifest parses (sorted by name)."""
        out: list[CacheEntry] = []
        if not self.root.is_dir():
            return out
        for man in sorted(self.root.glob(f"*{MANIFEST_SUFFIX}")):
            data = _read_json(man)
            if data is not None:
                out.append(CacheEntry(man.stem, data, man.with_suffix(PLAN_SUFFIX), man))
        return out

    def has_any(self, graph: str, precision: str, onnx_sha256: str) -> bool:
        """Whether some manifest claims an engine of this graph's ONNX (any platform): a file check only."""
        pattern = f"{graph}.{precision}.*{MANIFEST_SUFFIX}"
        for man in self.root.glob(pattern) if self.root.is_dir() else ():
            data = _read_json(man)
            if data is not None and data.get("onnx_sha256") == onnx_sha256:
                return True
        return False

    def load(self, graph: str, key: EngineKey, fix: str) -> tuple[bytes, dict[str, Any]]:
        """Read and verify `graph`'s plan under `key`; EngineMismatchError (ending with `fix`) otherwise.

        A broken entry (truncated, corrupted, not matching its own name) is deleted with one
        warning, so the next `thzedge export engine` replaces it instead of tripping on it.
        """
        plan_path, man_path = self.paths(graph, key)
        if not man_path.is_file():
            if plan_path.is_file():  # a write that never finished: the manifest is written last
                self._discard(graph, plan_path, man_path, "plan without a manifest (interrupted build)")
            why = self._explain_missing(graph, key)
            raise EngineMismatchError(
                f"no {key.precision} TensorRT engine for {graph} in {self.root}{why}; {fix}"
            )
        manifest = _read_json(man_path)
        if manifest is None:
            self._discard(graph, plan_path, man_path, "unreadable manifest")
            raise EngineMismatchError(f"engine manifest of {graph} ({key.precision}) was unreadable; {fix}")
        if not plan_path.is_file():
            self._discard(graph, plan_path, man_path, "manifest without its plan file")
            raise EngineMismatchError(
                f"no {key.precision} TensorRT engine for {graph} in {self.root} (its plan is gone); {fix}"
            )
        plan = plan_path.read_bytes()
        reasons = check_engine_manifest(manifest, key, plan)
        if reasons:
            self._discard(graph, plan_path, man_path, "; ".join(reasons))
            raise EngineMismatchError(
                f"engine {plan_path.name} ({key.precision}) refused: {'; '.join(reasons)}; {fix}"
            )
        return plan, manifest

    def _explain_missing(self, graph: str, key: EngineKey) -> str:
        """Why no entry fits: the nearest engine of this graph that is here, and how it differs."""
        same_graph = [e for e in self.entries() if e.manifest.get("graph") == graph]
        same_onnx = [e for e in same_graph if e.manifest.get("onnx_sha256") == key.onnx_sha256]
        same_onnx.sort(key=lambda e: e.manifest.get("precision") != key.precision)  # same precision first
        for entry in same_onnx:
            reasons = check_engine_manifest(entry.manifest, key)
            if reasons:
                return f" (there is one, but {'; '.join(reasons)})"
        if any(e.manifest.get("precision") == key.precision for e in same_graph):
            return " (there is one, but built from a different ONNX than the bundle now holds: stale engine)"
        return ""

    def _discard(self, graph: str, plan: Path, manifest: Path, reason: str) -> None:
        try:
            manifest.unlink(missing_ok=True)
            plan.unlink(missing_ok=True)
            done = "discarded"
        except OSError as exc:  # a read-only cache (e.g. the daemon without write access)
            done = f"cannot discard it ({exc.strerror})"
        log.warning("engine cache: %s entry %s: %s; %s", graph, plan.stem, reason, done)

    # -- writing -------------------------------------------------------------------------------

    def ensure_writable(self) -> None:
        """Create the directory and prove a file can be written there; EngineCacheError saying what to do."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe.", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise EngineCacheError(
                f"engine cache {self.root} ({self.source}) is not writable ({exc.strerror or exc}); run "
                "`thzedge export engine` as the service user (`sudo -u thzedge ...`), or choose another "
                "directory with --engine-cache or [model] engine_cache"
            ) from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the cache's build lock (one writer at a time); EngineCacheError when another holds it."""
        import fcntl

        self.ensure_writable()
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EngineCacheError(
                    f"another engine build holds {self.root / LOCK_NAME}; wait for it to finish"
                ) from None
            yield
        finally:
            os.close(fd)

    def store(self, graph: str, key: EngineKey, plan: bytes, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Write `graph`'s plan, then its manifest (size, sha256), each atomically; returns the manifest."""
        plan_path, man_path = self.paths(graph, key)
        full = {
            **manifest,
            "format": ENGINE_MANIFEST_FORMAT,
            "format_version": ENGINE_MANIFEST_VERSION,
            "graph": graph,
            "key": key.digest,
            "engine_file": plan_path.name,
            "engine_bytes": len(plan),
            "engine_sha256": hashlib.sha256(plan).hexdigest(),
            **{k: v for k, v in asdict(key).items()},
        }
        man_path.unlink(missing_ok=True)  # an old manifest must never describe the new plan
        write_atomic(plan_path, plan)
        write_atomic(man_path, (json.dumps(full, indent=2) + "\n").encode())
        return full

    def prune(self, keep: Iterable[str], keep_timing: Iterable[Path] = ()) -> list[Path]:
        """Delete entries not named in `keep`, orphan plans, leftover temp files and other timing caches."""
        if not self.root.is_dir():
            return []
        keep_names, keep_t = set(keep), {Path(p).resolve() for p in keep_timing}
        removed: list[Path] = []
        for path in sorted(self.root.iterdir()):
            if path.is_dir() or path.name == LOCK_NAME:
                continue
            stale = path.name.endswith(PART_SUFFIX) or (
                path.suffix in (PLAN_SUFFIX, MANIFEST_SUFFIX) and path.stem not in keep_names
            )
            if stale:
                path.unlink(missing_ok=True)
                removed.append(path)
        timing = self.root / TIMING_DIR
        for path in sorted(timing.iterdir()) if timing.is_dir() else ():
            if path.resolve() not in keep_t:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def summary(self) -> dict[str, Any]:
        """Entries, bytes and leftovers, for doctor and the build report (no plan is read)."""
        entries = self.entries()
        plans = {p.stem for p in self.root.glob(f"*{PLAN_SUFFIX}")} if self.root.is_dir() else set()
        truncated = [
            e.name for e in entries if e.plan.exists() and e.nbytes != e.manifest.get("engine_bytes")
        ]
        return {
            "path": str(self.root),
            "source": self.source,
            "exists": self.root.is_dir(),
            "writable": os.access(self.root if self.root.is_dir() else _existing_parent(self.root), os.W_OK),
            "entries": len(entries),
            "bytes": sum(e.nbytes for e in entries),
            "orphans": sorted(plans - {e.name for e in entries}),
            "truncated": truncated,
            "tensorrt_versions": sorted({str(e.manifest.get("tensorrt_version")) for e in entries}),
        }


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temp file beside it: fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # directory fsync: the rename itself survives a power cut
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
