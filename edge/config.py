"""The daemon's configuration: one TOML file, one frozen dataclass per section.

`load_config(path)` reads and validates the file; every problem is a `ConfigError` (exit 78,
so systemd does not restart a daemon whose config is wrong). Unknown keys name the nearest
valid key. Relative paths are resolved against the config file's directory, and `${VAR}` in a
path or endpoint is expanded from the environment (e.g. `${CREDENTIALS_DIRECTORY}` for keys
delivered by systemd `LoadCredential=`, `${RUNTIME_DIRECTORY}` for `ipc://` sockets).

Every key, its default and its meaning: docs/config.md; an annotated example:
systemd/thzedge.toml.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.backends import BackendKind
from edge.bundle import Precision
from edge.gallery import VerificationMode
from scanner_io.choices import Choice
from scanner_io.errors import ConfigError, ThzEdgeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    from calibration.conditioning import ConditioningParams

log = logging.getLogger("thzedge.config")

DEFAULT_CONFIG_PATH = Path("/etc/thzedge/thzedge.toml")
# Overrides the default path (not an explicit --config) so a unit or a shell can point elsewhere.
CONFIG_ENV = "THZEDGE_CONFIG"
DEFAULT_METRICS_PORT = 9464
# Every number in the file has a finite range (`min`/`max` field metadata; NaN and infinity are
# refused everywhere): values beyond these break the daemon rather than tune it.
MAX_BATCH = 1024  # frames per inference batch
MAX_HWM = 100_000  # messages queued per subscriber (libzmq takes an int; memory is per message)
MAX_QUEUE = 10_000  # frames between acquisition and inference (each holds a raw frame)
MAX_SECONDS = 86_400.0  # a day: any longer age, heartbeat or stall timeout is no timeout at all
MAX_STOP_S = 600.0  # systemd's TimeoutStopSec is far below this; the daemon must end on SIGTERM


def default_runtime_dir() -> Path:
    """Return where `ipc://` sockets live: systemd's RuntimeDirectory, else a per-user temp dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        # systemd may pass several colon-separated directories; the first is this instance's.
        return Path(runtime.split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "thzedge"
    return Path(tempfile.gettempdir()) / f"thzedge-{os.getuid()}"


def default_results_endpoint() -> str:
    """Return the default results endpoint: an `ipc://` socket in the runtime directory."""
    return f"ipc://{default_runtime_dir() / 'results.sock'}"


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class ConditioningOverrides:
    """Per-source overrides of the calibration profile's conditioning parameters.

    Keys are the field names of `calibration.conditioning.ConditioningParams` (e.g. the dB
    range and the ROI); only the keys set here replace the profile's values.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    where: str = "[sources.NAME.conditioning]"

    def __bool__(self) -> bool:
        return bool(self.values)

    def apply(self, params: ConditioningParams) -> ConditioningParams:
        """Return `params` with these overrides applied; ConfigError if invalid."""
        if not self.values:
            return params
        try:
            return dataclasses.replace(params, **dict(self.values))
        except (TypeError, ValueError, ThzEdgeError) as exc:
            raise ConfigError(f"{self.where}: {exc}") from None


@dataclass(frozen=True)
class SourceConfig:
    """One named frame source: its URI, calibration profile and conditioning overrides."""

    uri: str
    calibration: Path | None = None
    conditioning: ConditioningOverrides = field(default_factory=ConditioningOverrides)
    name: str | None = None
    # CURVE on a tcp acquisition link: the scanner's public key (`scanner serve --curve-secret`'s
    # pair) and this daemon's own certificate (public + secret). Both set = encrypted, authenticated.
    curve_server_key: Path | None = None
    curve_client_key: Path | None = None

    @property
    def curve(self) -> bool:
        """True when the source connects as a CURVE client."""
        return self.curve_server_key is not None and self.curve_client_key is not None


class ModelPrecision(Choice):
    """Which variant `thzedge run` loads: `auto` times the gate-passed ones and keeps the fastest."""

    auto = "auto"
    fp32 = Precision.fp32.value
    fp16 = Precision.fp16.value
    int8 = Precision.int8.value


@dataclass(frozen=True)
class ModelConfig:
    """Which model bundle to run and how; `bundle = None` means the shipped demo bundle."""

    bundle: Path | None = None
    # Directory of Ed25519 public keys (`*.pub`, `thzedge keys generate --kind signing`): when set,
    # only bundles whose manifest one of them signed are loaded (`thzedge export sign`).
    trusted_keys_dir: Path | None = None
    backend: BackendKind = BackendKind.auto
    # A fixed precision pins the variant; `auto` picks the fastest that passed the accuracy gate.
    precision: ModelPrecision = ModelPrecision.auto
    max_batch: int | None = field(default=None, metadata={"min": 1, "max": MAX_BATCH})
    # Where `thzedge export engine` puts TensorRT engines and the trt backend finds them (None:
    # $THZEDGE_ENGINE_CACHE, else the unit's $STATE_DIRECTORY/engines; edge/backends/engine_cache.py).
    engine_cache: Path | None = None
    # The DLA core the engines were built for (`export engine --dla-core`); None: the GPU.
    dla_core: int | None = field(default=None, metadata={"min": 0, "max": 7})


@dataclass(frozen=True)
class CurveConfig:
    """CURVE encryption and ZAP client authentication for a `tcp://` endpoint we bind."""

    enabled: bool = False
    # Certificate file holding the server's public and secret key (`thzedge keys generate`).
    secret_key_file: Path | None = None
    # Directory of allowed clients' public certificates (`*.key`); re-read on SIGHUP.
    allowed_clients_dir: Path | None = None
    domain: str = "thzedge"
    # Key pair (`thzedge keys generate --name NAME`) that thzedge's own consumers (`tail`,
    # `view`) connect with; its public .key must be in allowed_clients_dir.
    client_key_file: Path | None = None


@dataclass(frozen=True)
class PublisherConfig:
    """The results PUB socket."""

    endpoint: str = field(default_factory=default_results_endpoint)
    hwm: int = field(default=100, metadata={"min": 1, "max": MAX_HWM})
    curve: CurveConfig = field(default_factory=CurveConfig)
    # Mode of `ipc://` socket files (R-NEW-2): 0o600, or 0o660 together with `ipc_group`.
    ipc_mode: int = field(default=0o600, metadata={"file_modes": (0o600, 0o660)})
    ipc_group: str | None = None
    # A lockstep source starts reading once a first subscriber has joined, or after this long
    # (0: at once). Messages sent before a subscription arrives are not delivered to it.
    wait_subscriber_s: float = field(default=0.0, metadata={"min": 0.0, "max": MAX_SECONDS})


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus / health HTTP server; loopback only unless configured (R-SEC-4)."""

    enabled: bool = True
    bind: str = f"127.0.0.1:{DEFAULT_METRICS_PORT}"

    @property
    def host(self) -> str:
        return split_host_port(self.bind)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.bind)[1]


@dataclass(frozen=True)
class PrivacyConfig:
    """Opt-in flags for biometric outputs; all off by default (R-SEC-5, R-NEW-1)."""

    publish_embedding: bool = False
    publish_reconstruction: bool = False
    # The conditioned 64x64 model input of each frame, as a result part (for `thzedge view`).
    publish_input: bool = False
    record_results: bool = False


@dataclass(frozen=True)
class ViewConfig:
    """`thzedge view`, the live page: loopback only unless allowed here (and then with a token)."""

    allow_remote: bool = False


@dataclass(frozen=True)
class StorageConfig:
    """Biometric data at rest: the storage key, consent and retention of recordings (R-SEC-7)."""

    # AES-256 key (`thzedge keys generate --kind storage`); default: $CREDENTIALS_DIRECTORY/storage.key
    # when systemd passes it (LoadCredential=), else $THZEDGE_STORAGE_KEY.
    key_file: Path | None = None
    # Refuse to record or write a gallery in plaintext (no key found): exit 78.
    require_encryption: bool = False
    # Recordings are deleted by the next sweep once this old (stored in each file); None: kept.
    retention_days: float | None = field(default=None, metadata={"min": 0.0, "max": 36500.0})
    consent: str = "unspecified"
    purpose: str = "unspecified"
    # The daemon deletes expired recordings in this directory every sweep_interval_s (None: no sweep).
    sweep_dir: Path | None = None
    sweep_interval_s: float = field(default=3600.0, metadata={"min": 1.0, "max": 86400.0 * 7})
    # The last rejected messages, kept sealed under the storage key for diagnosis (R-NEW-17);
    # None: not kept. Bounded by count and size, the oldest evicted first.
    quarantine_dir: Path | None = None
    quarantine_frames: int = field(default=16, metadata={"min": 1, "max": 10_000})
    quarantine_max_mb: float = field(default=64.0, metadata={"min": 0.1, "max": 100_000.0})


@dataclass(frozen=True)
class VerificationConfig:
    """Gallery matching: 1:1 with a claimed identity, 1:N otherwise (`auto`), or off."""

    mode: VerificationMode = VerificationMode.auto
    gallery: Path | None = None
    # Overrides the bundle's per-precision threshold: Euclidean distance between unit-length
    # embeddings (0..2), a match is accepted when distance <= threshold.
    threshold: float | None = field(default=None, metadata={"min": 0.0, "max": 2.0})
    # Template key file (`thzedge keys generate --kind template`): references are stored and
    # compared as keyed projections (R-NEW-3); the gallery must have been enrolled under it.
    template_key: Path | None = None
    # Frames tagged with a `visit` (docs/protocol.md) also get one visit decision, fused from the
    # visit's first `visit_frames` frames (edge/visits.py); 0 turns fusion off.
    visit_frames: int = field(default=8, metadata={"min": 0, "max": 1000})
    # The fused (mean) distance a visit is accepted at, 1:1 and 1:N (identification needs a lower
    # one: docs/operations.md); unset: the per-frame threshold.
    visit_threshold: float | None = field(default=None, metadata={"min": 0.0, "max": 2.0})
    visit_identify_threshold: float | None = field(default=None, metadata={"min": 0.0, "max": 2.0})


@dataclass(frozen=True)
class CalibrationConfig:
    """How the daemon treats calibration: where active profiles live, and what it refuses."""

    # `thzedge calibrate activate` state; None: $THZEDGE_CALIBRATION_DIR, $STATE_DIRECTORY/calibration, …
    state_dir: Path | None = None
    # A live source (tcp://, ipc://) without a fitting profile is refused (exit 78); with this,
    # its results are published marked `uncalibrated` instead (never `ok`).
    allow_uncalibrated: bool = False
    # Input monitoring against the profile (R-NEW-11) on every Nth frame; 0 turns it off.
    monitor_every: int = field(default=10, metadata={"min": 0, "max": 1_000_000})
    # At start-up, how long to wait for a live source's first frame to check it fits the profile
    # before READY; a later first frame is checked when it comes.
    match_wait_s: float = field(default=5.0, metadata={"min": 0.0, "max": 600.0})
    # Frames with no head in them (blank, flat, saturated) are published `no_face` without
    # running the model; off: every frame goes to the model (e.g. synthetic test patterns).
    frame_quality: bool = True


@dataclass(frozen=True)
class DaemonConfig:
    """Queueing, shutdown and liveness settings of the streaming loop."""

    queue_size: int = field(default=8, metadata={"min": 1, "max": MAX_QUEUE})
    # Frames older than this (capture to dequeue) are dropped as `stale`; 0 disables the check.
    max_age_s: float = field(default=2.0, metadata={"min": 0.0, "max": MAX_SECONDS})
    stop_timeout_s: float = field(default=5.0, metadata={"min": 0.0, "max": MAX_STOP_S})
    # The watchdog is pinged only while the main loop's heartbeat is younger than this.
    heartbeat_timeout_s: float = field(default=10.0, metadata={"min": 0.1, "max": MAX_SECONDS})
    # A source silent for this long is reported as `stalled` (not restarted).
    stalled_after_s: float = field(default=5.0, metadata={"min": 0.1, "max": MAX_SECONDS})
    # Allows tcp:// endpoints without CURVE. For development only; logged at WARNING (R-SEC-1).
    insecure_dev: bool = False
    # Golden file (`thzedge replay --make-golden`) replayed after warm-up and before READY; a
    # mismatch keeps the daemon from becoming ready and exits 79 (R-NEW-12). Unset: the
    # bundle's own `canary.mcap`, if it carries one.
    canary: Path | None = None


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration; `path` is the file it came from (None: defaults)."""

    sources: Mapping[str, SourceConfig] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    publisher: PublisherConfig = field(default_factory=PublisherConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    path: Path | None = None

    def source_names(self) -> dict[str, str]:
        """Return name → URI for `scanner_io.sources.open_source(uri, names=...)`."""
        return {name: s.uri for name, s in self.sources.items()}

    def resolve_source(self, name_or_uri: str) -> SourceConfig:
        """Return the named source, or an ad-hoc one for a URI; unknown names are a ConfigError."""
        if name_or_uri in self.sources:
            return self.sources[name_or_uri]
        if is_source_uri(name_or_uri):
            if name_or_uri.startswith("tcp://"):
                # The same rule as for a configured tcp source (R-SEC-1), for a URI on the command line.
                if not self.daemon.insecure_dev:
                    raise ConfigError(_plain_tcp_source_message(name_or_uri))
                log.warning(
                    "insecure_dev = true: source %s runs without CURVE encryption or client "
                    "authentication; never use this on a production network",
                    name_or_uri,
                )
            return SourceConfig(uri=name_or_uri)
        known = sorted(self.sources)
        hint = _nearest(name_or_uri, known)
        where = f" in {self.path}" if self.path else " (no config file loaded)"
        raise ConfigError(
            f"unknown source {name_or_uri!r}{where}{hint}; known sources: {', '.join(known) or 'none'}; "
            "give a URI (sim, replay:FILE, tcp://, ipc://) or add [sources.NAME] to the config"
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the effective configuration as TOML-ready plain values (for `config show`)."""
        out: dict[str, Any] = {"sources": {}}
        for name, src in self.sources.items():
            entry: dict[str, Any] = {"uri": src.uri}
            if src.calibration is not None:
                entry["calibration"] = str(src.calibration)
            if src.conditioning:
                entry["conditioning"] = {k: _plain(v) for k, v in src.conditioning.values.items()}
            for key in ("curve_server_key", "curve_client_key"):
                if getattr(src, key) is not None:
                    entry[key] = str(getattr(src, key))
            out["sources"][name] = entry
        for section in SECTIONS:
            out[section] = _plain(getattr(self, section))
        out["publisher"]["ipc_mode"] = _Octal(self.publisher.ipc_mode)  # shown as 0o600, not 384
        return out

    def to_toml(self) -> str:
        """Return the effective configuration as TOML text (paths resolved, defaults filled in)."""
        return render_toml(self.to_dict())

    def warnings(self) -> list[str]:
        """Return the conditions that are allowed but must be logged at WARNING on every start."""
        notes = []
        if self.daemon.insecure_dev:
            plain = [e for e in self._tcp_endpoints() if not e[2]]
            if plain:
                names = ", ".join(f"{what} {ep}" for what, ep, _ in plain)
                notes.append(
                    f"insecure_dev = true: {names} run without CURVE encryption or client "
                    "authentication; never use this on a production network"
                )
            else:
                notes.append("insecure_dev = true (no plaintext tcp endpoint configured right now)")
        if self.metrics.enabled and self.metrics.host not in ("127.0.0.1", "::1", "localhost"):
            notes.append(f"metrics server binds {self.metrics.bind}, reachable beyond this host")
        return notes

    def _tcp_endpoints(self) -> list[tuple[str, str, bool]]:
        """Return (what, endpoint, curve on) for every tcp endpoint in the config."""
        eps = []
        if self.publisher.endpoint.startswith("tcp://"):
            eps.append(("publisher endpoint", self.publisher.endpoint, self.publisher.curve.enabled))
        for name, src in self.sources.items():
            if src.uri.startswith("tcp://"):
                eps.append((f"source {name!r}", src.uri, src.curve))
        return eps


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "publisher": PublisherConfig,
    "metrics": MetricsConfig,
    "privacy": PrivacyConfig,
    "verification": VerificationConfig,
    "calibration": CalibrationConfig,
    "daemon": DaemonConfig,
    "storage": StorageConfig,
    "view": ViewConfig,
}
TOP_LEVEL_KEYS = ("sources", *SECTIONS)
SOURCE_KEYS = ("uri", "calibration", "conditioning", "curve_server_key", "curve_client_key")
_URI_RE = re.compile(r"^[a-z][a-z0-9+.-]*://")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ---------------------------------------------------------------------------------------------
# Loading


def _read_config_file(path: Path | str | None) -> tuple[Path, dict[str, Any] | None]:
    """Find and parse the config file; `None` uses $THZEDGE_CONFIG or the default path.

    Returns (path, parsed TOML), or (path, None) when there is no file at the default path. An
    explicitly given path that does not exist, unreadable bytes or bad TOML are a ConfigError.
    """
    explicit = path is not None
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        path, explicit = (Path(env), True) if env else (DEFAULT_CONFIG_PATH, False)
    path = Path(path)
    if not path.exists():
        if explicit:
            raise ConfigError(f"config file {path} does not exist; create it or drop --config")
        log.debug("no config file at %s; using built-in defaults", path)
        return path, None
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level: a hostile file nests thousands deep
        raise ConfigError(f"{path}: not a thzedge config: tables or arrays nested too deep") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate a config file; `None` uses $THZEDGE_CONFIG or the default path.

    With `None` and no file at the default path, the built-in defaults are returned. An
    explicitly given path that does not exist is an error.
    """
    found, raw = _read_config_file(path)
    return validate(Config()) if raw is None else config_from_dict(raw, path=found)


def load_model_config(path: Path | str | None = None) -> ModelConfig:
    """Read only the [model] section of a config file (same lookup and checks as `load_config`).

    For tools that run outside the service (`thzedge export engine` as the service user): the
    rest of a production config may name `${CREDENTIALS_DIRECTORY}` and other paths only
    systemd provides, which must not stop them from finding the engine cache and the bundle.
    """
    found, raw = _read_config_file(path)
    if raw is None:
        return ModelConfig()
    base = found.resolve().parent
    model: ModelConfig = _build(ModelConfig, raw.get("model", {}), f"{found}: [model]", base)
    return model


def config_from_dict(raw: Mapping[str, Any], path: Path | None = None) -> Config:
    """Build and validate a Config from parsed TOML; `path` anchors relative paths."""
    where = str(path) if path else "config"
    base = path.resolve().parent if path else Path.cwd()
    _check_keys(raw, TOP_LEVEL_KEYS, where)
    kwargs: dict[str, Any] = {"path": path}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        kwargs[name] = _build(cls, table, f"{where}: [{name}]", base)
    kwargs["sources"] = _build_sources(raw.get("sources", {}), where, base)
    return validate(Config(**kwargs))


def apply_overrides(config: Config, **sections: Mapping[str, Any]) -> Config:
    """Return `config` with some keys replaced (CLI flags), validated like the file.

    Example: `apply_overrides(cfg, publisher={"endpoint": url}, model={"backend": "ort"})`.
    """
    changed: dict[str, Any] = {}
    for name, values in sections.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section {name!r}{_nearest(name, list(SECTIONS))}")
        current = getattr(config, name)
        _check_keys(values, [f.name for f in dataclasses.fields(current)], f"override [{name}]")
        clean = {k: v for k, v in values.items() if v is not None}
        # Re-run the same per-field checks as for the file, relative to the working directory.
        table = {**_plain(current), **{k: _plain(v) for k, v in clean.items()}}
        changed[name] = _build(type(current), table, f"override [{name}]", Path.cwd())
    return validate(dataclasses.replace(config, **changed))


def _plain_tcp_source_message(uri: str) -> str:
    return (
        f"{uri} is tcp without CURVE: configure it as [sources.NAME] with curve_server_key (the "
        "scanner's public key) and curve_client_key (this daemon's certificate), use ipc:// on the "
        "scanner's host, or set [daemon] insecure_dev = true for development (R-SEC-1)"
    )


def validate(config: Config) -> Config:
    """Check rules spanning several sections (security, privacy); return the config unchanged."""
    try:
        return _validate(config)
    except ConfigError as exc:
        if config.path is None:
            raise
        raise ConfigError(f"{config.path}: {exc}") from None


def _validate(config: Config) -> Config:
    pub = config.publisher
    scheme = _scheme(pub.endpoint)
    if scheme not in ("ipc", "tcp", "inproc"):
        raise ConfigError(f"[publisher] endpoint {pub.endpoint!r}: expected ipc://PATH or tcp://HOST:PORT")
    curve = pub.curve
    if curve.enabled:
        if scheme != "tcp":
            raise ConfigError(
                "[publisher.curve] enabled = true needs a tcp:// endpoint; ipc uses file permissions"
            )
        if curve.secret_key_file is None or curve.allowed_clients_dir is None:
            raise ConfigError(
                "[publisher.curve] enabled = true needs secret_key_file (server certificate) and "
                "allowed_clients_dir (client public keys); create them with `thzedge keys generate`"
            )
    if pub.ipc_group is not None and pub.ipc_mode != 0o660:
        raise ConfigError(
            "[publisher] ipc_group is set: set ipc_mode = 0o660 too (group members may connect)"
        )
    if pub.ipc_mode == 0o660 and pub.ipc_group is None:
        raise ConfigError("[publisher] ipc_mode = 0o660 needs ipc_group (the group allowed to connect)")
    # Biometric payloads only over an authenticated channel: CURVE+ZAP on tcp, file permissions
    # on ipc (R-NEW-1, R-SEC-5). insecure_dev does not lift this rule.
    biometric = [
        k
        for k in ("publish_embedding", "publish_reconstruction", "publish_input")
        if getattr(config.privacy, k)
    ]
    if biometric and scheme == "tcp" and not curve.enabled:
        raise ConfigError(
            f"[privacy] {' and '.join(biometric)} = true but [publisher] endpoint {pub.endpoint} has no "
            "CURVE: biometric data only goes to an ipc:// endpoint or a tcp:// endpoint with "
            "[publisher.curve] enabled (insecure_dev does not lift this)"
        )
    if not config.daemon.insecure_dev:
        for what, ep, secured in config._tcp_endpoints():
            if not secured and what.startswith("source"):
                raise ConfigError(f"{what}: " + _plain_tcp_source_message(ep))
            if not secured:
                raise ConfigError(
                    f"{what} {ep} is tcp without CURVE: enable [publisher.curve], use ipc://, or set "
                    "[daemon] insecure_dev = true for development (R-SEC-1)"
                )
    if config.metrics.enabled:
        split_host_port(config.metrics.bind)
    mode = config.verification.mode
    if (
        mode in (VerificationMode.one_to_one, VerificationMode.one_to_n)
        and config.verification.gallery is None
    ):
        raise ConfigError(f"[verification] mode = '{mode}' needs gallery = PATH")
    return config


def log_start_warnings(config: Config, logger: logging.Logger | None = None) -> None:
    """Log every allowed-but-dangerous setting at WARNING; call once on every daemon start."""
    for note in config.warnings():
        (logger or log).warning("%s", note)


def split_host_port(bind: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 as `[::1]:PORT`); a bad value is a ConfigError."""
    m = re.fullmatch(r"\[([0-9a-fA-F:]+)\]:(\d+)|([^:\[\]]+):(\d+)", bind)
    if not m:
        raise ConfigError(
            f"[metrics] bind {bind!r}: expected HOST:PORT such as 127.0.0.1:{DEFAULT_METRICS_PORT}"
        )
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"[metrics] bind {bind!r}: port must be 0..65535")
    return host, port


def render_toml(data: Mapping[str, Any]) -> str:
    """Render nested dicts of str/int/float/bool/list values as TOML (tables after scalars)."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        if prefix and (scalars or not tables):
            lines.append("")
        for k, v in tables.items():
            emit(v, f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k))

    emit(data, "")
    return "\n".join(lines).rstrip() + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else '"' + key.replace('"', '\\"') + '"'


class _Octal(int):
    """An int that TOML output writes in octal (file modes)."""


def _toml_value(value: Any) -> str:
    if isinstance(value, _Octal):
        return f"0o{int(value):o}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


# ---------------------------------------------------------------------------------------------
# Helpers


def is_source_uri(text: str) -> bool:
    """True for a source URI (sim, replay:, tcp://, ipc://), False for a source name."""
    return bool(_URI_RE.match(text)) or text.startswith(("sim", "replay:"))


def _scheme(endpoint: str) -> str:
    return endpoint.split("://", 1)[0] if "://" in endpoint else ""


def _nearest(key: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(table: Mapping[str, Any], valid: list[str] | tuple[str, ...], where: str) -> None:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    for key in table:
        if key not in valid:
            raise ConfigError(
                f"{where}: unknown key {key!r}{_nearest(key, valid)} (valid keys: {', '.join(valid)})"
            )


def _build_sources(table: Any, where: str, base: Path) -> dict[str, SourceConfig]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: [sources] must be a table of [sources.NAME] tables")
    out = {}
    for name, entry in table.items():
        here = f"{where}: [sources.{name}]"
        if isinstance(entry, str):  # shorthand: scanner0 = "tcp://..."
            entry = {"uri": entry}
        _check_keys(entry, SOURCE_KEYS, here)
        if "uri" not in entry:
            raise ConfigError(f"{here}: missing key 'uri' (e.g. uri = \"tcp://scanner0.local:5555\")")
        uri = _expand(_expect(entry["uri"], str, f"{here} uri"), f"{here} uri")
        if not is_source_uri(uri):
            raise ConfigError(
                f"{here} uri {uri!r}: expected sim…, replay:FILE, tcp://HOST:PORT or ipc://PATH"
            )
        calib = entry.get("calibration")
        calib_path = _path(calib, f"{here} calibration", base) if calib is not None else None
        cond = _conditioning(entry.get("conditioning", {}), f"{where}: [sources.{name}.conditioning]")
        keys = {
            k: _path(entry[k], f"{here} {k}", base) if entry.get(k) is not None else None
            for k in ("curve_server_key", "curve_client_key")
        }
        if (keys["curve_server_key"] is None) != (keys["curve_client_key"] is None):
            raise ConfigError(
                f"{here}: CURVE needs both curve_server_key (the scanner's public key) and "
                "curve_client_key (this daemon's certificate from `thzedge keys generate`)"
            )
        if keys["curve_server_key"] is not None and not uri.startswith("tcp://"):
            raise ConfigError(f"{here}: curve_server_key is for tcp:// sources; {uri} is not one")
        out[name] = SourceConfig(uri=uri, calibration=calib_path, conditioning=cond, name=name, **keys)
    return out


def _conditioning(table: Any, where: str) -> ConditioningOverrides:
    """Check overrides against the fields of calibration.conditioning.ConditioningParams."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table")
    if not table:
        return ConditioningOverrides()
    from calibration.conditioning import ConditioningParams

    hints = typing.get_type_hints(ConditioningParams)
    names = [f.name for f in dataclasses.fields(ConditioningParams)]
    _check_keys(table, names, where)
    values = {k: _coerce(v, hints.get(k, Any), f"{where} {k}", Path.cwd()) for k, v in table.items()}
    # Cross-field checks (db_min < db_max, ...) need the profile's values: `apply` runs them.
    return ConditioningOverrides(values, where=where)


def _build(cls: type, table: Any, where: str, base: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(table, list(fields), where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in table.items():
        meta, here = fields[key].metadata, f"{where} {key}"
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, f"{where[:-1]}.{key}]", base)
            continue
        v = kwargs[key] = _coerce(value, hints[key], here, base)
        if "file_modes" in meta and v not in meta["file_modes"]:
            raise ConfigError(f"{here} = {oct(v)}: expected one of {', '.join(map(oct, meta['file_modes']))}")
        if v is not None and "min" in meta and v < meta["min"]:
            raise ConfigError(f"{here} = {v}: must be >= {meta['min']}")
        if v is not None and "max" in meta and v > meta["max"]:
            raise ConfigError(f"{here} = {v}: must be <= {meta['max']}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str, base: Path) -> Any:
    """Check `value` against a type hint; returns it converted (Path, tuple, enum) or raises.

    The hints the sections use: X | None, str, int, float, bool, Path, Choice enums, fixed
    tuples (a conditioning ROI) and Any.
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner, where, base)
    if hint is Any:
        return value
    if hint is Path:
        return _path(value, where, base)
    if isinstance(hint, type) and issubclass(hint, Choice):
        text = _expect(value, str, where)
        if text not in hint.values():
            raise ConfigError(
                f"{where} = {_show(text)}: expected one of {', '.join(map(_show, hint.values()))}"
            )
        return hint(text)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {_show(value)}: expected an array ({_type_name(hint)})")
        if len(value) != len(args):
            raise ConfigError(f"{where} = {_show(value)}: expected {len(args)} values ({_type_name(hint)})")
        return tuple(_coerce(v, a, where, base) for v, a in zip(value, args, strict=True))
    if hint is str:
        return _expand(_expect(value, str, where), where)
    return _expect(value, hint, where)


def _expect(value: Any, typ: type, where: str) -> Any:
    # TOML has no bool/int confusion but Python does: True is an int; refuse it explicitly.
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is float and is_number:
        if not math.isfinite(value):  # TOML has nan and inf; no setting means either
            raise ConfigError(f"{where} = {_show(value)}: expected a finite number")
        return float(value)
    if not isinstance(value, typ) or (typ in (int, float) and not is_number):
        raise ConfigError(f"{where} = {_show(value)}: expected {_type_name(typ)}")
    return value


def _expand(text: str, where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in os.environ:
            name = m.group(1)
            raise ConfigError(f"{where}: environment variable {name} is not set (used as ${{{name}}})")
        return os.environ[m.group(1)]

    return _VAR_RE.sub(sub, text)


def _path(value: Any, where: str, base: Path) -> Path:
    p = Path(_expand(_expect(value, str, where), where)).expanduser()
    return p if p.is_absolute() else base / p


def _type_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}
    if typing.get_origin(hint) is tuple:
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(hint)) + "]"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _plain(value: Any) -> Any:
    """Turn dataclasses, paths and tuples into TOML-ready plain values (None left out)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, (Path, Choice)):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
