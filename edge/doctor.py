"""`thzedge doctor`: is this device ready to run? Each check is one `CheckResult` row.

Checks come in two groups. The **static** ones (`static_checks`) are what `thzedge run` would
fail on at start-up: the config parses, the bundle is present and verified with the configured
precision, each source's calibration profile loads and its conditioning overrides are valid,
the gallery belongs to the bundle, CURVE key files load. `thzedge config validate` runs exactly
these. The **environment** ones add what an installer wants to know: Python and package
versions, extras installed, ONNX Runtime providers, TensorRT/CUDA/GPU and whether the bundle's
engines match them, whether each source answers, whether ports are free, and the permissions
of socket directories and key files.

A check function returns a list of `CheckResult`; other modules (e.g. Jetson checks) plug in
by appending functions to `EXTRA_CHECKS`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.checks import CheckResult, CheckStatus
from scanner_io.errors import ConfigError, ThzEdgeError
from scanner_io.extras import EXTRAS, is_installed, missing_modules


@dataclass
class DoctorReport:
    """Every check's result; `ready` when none failed."""

    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """True when no check failed."""
        return not any(c.status is CheckStatus.fail for c in self.checks)

    def failures(self) -> list[CheckResult]:
        """The failed checks, in order."""
        return [c for c in self.checks if c.status is CheckStatus.fail]

    def summary(self) -> str:
        """`N ok, N warn, N fail, N skip`."""
        counts = {s: sum(c.status is s for c in self.checks) for s in CheckStatus}
        return ", ".join(f"{n} {s}" for s, n in counts.items())

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form: ready, summary counts and every check."""
        return {
            "ready": self.ready,
            "counts": {str(s): sum(c.status is s for c in self.checks) for s in CheckStatus},
            "checks": [c.to_dict() for c in self.checks],
        }


PACKAGES = ("numpy", "pyzmq", "onnxruntime", "opencv-python-headless", "mcap", "typer", "prometheus-client")


def ok(name: str, detail: str = "") -> CheckResult:
    """A passed check."""
    return CheckResult(name, CheckStatus.ok, detail)


def fail(name: str, detail: str) -> CheckResult:
    """A failed check: run would not start."""
    return CheckResult(name, CheckStatus.fail, detail)


def warn(name: str, detail: str) -> CheckResult:
    """A check that passes with a caveat."""
    return CheckResult(name, CheckStatus.warn, detail)


def skip(name: str, detail: str) -> CheckResult:
    """A check that does not apply here."""
    return CheckResult(name, CheckStatus.skip, detail)


# ---------------------------------------------------------------------------------------------
# Environment


def python_checks() -> list[CheckResult]:
    """Python, thzedge and the core packages' versions."""
    from edge import __version__

    rows = [ok("python", f"{platform.python_version()} ({sys.executable})"), ok("thzedge", __version__)]
    for dist in PACKAGES:
        try:
            rows.append(ok(f"package {dist}", importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            rows.append(fail(f"package {dist}", f"{dist} is not installed; reinstall thzedge"))
    import zmq

    curve = "with CURVE" if zmq.has("curve") else "WITHOUT CURVE (tcp endpoints cannot be secured)"
    rows.append(ok("libzmq", f"{zmq.zmq_version()} {curve}"))
    return rows


def extras_checks() -> list[CheckResult]:
    """Which optional extras are installed (not installed is no failure: only their commands need them)."""
    rows = []
    for extra in EXTRAS.values():
        missing = missing_modules(extra.modules)
        name = f"extra {extra.name}"
        if missing:
            rows.append(
                skip(name, f"not installed ({', '.join(missing)} missing): needed for {extra.enables}")
            )
        else:
            rows.append(ok(name, f"installed ({extra.enables})"))
    return rows


def runtime_checks() -> list[CheckResult]:
    """ONNX Runtime providers, TensorRT, CUDA and the GPU when present."""
    rows = []
    try:
        import onnxruntime as ort

        rows.append(ok("onnxruntime providers", ", ".join(ort.get_available_providers())))
    except Exception as exc:  # a broken ORT install is a failure: it is the default backend
        rows.append(
            fail("onnxruntime providers", f"onnxruntime does not import: {type(exc).__name__}: {exc}")
        )
    if not is_installed("tensorrt"):
        rows.append(skip("tensorrt", "not installed (ONNX Runtime runs the model)"))
    else:
        try:
            from edge.backends.trt import current_platform

            plat = current_platform()
            rows.append(ok("tensorrt", plat.tensorrt_version))
            rows.append(
                ok(
                    "gpu",
                    f"{plat.gpu_name}, compute capability {plat.compute_capability}, "
                    f"CUDA {plat.cuda_runtime_version}",
                )
            )
        except ThzEdgeError as exc:
            rows.append(warn("tensorrt", str(exc)))
    if not is_installed("tensorrt"):
        smi = shutil.which("nvidia-smi")
        if smi is None:
            rows.append(skip("gpu", "no NVIDIA GPU tools (nvidia-smi) found"))
        else:
            rows.append(_nvidia_smi(smi))
    return rows


def _nvidia_smi(smi: str) -> CheckResult:
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return warn("gpu", f"nvidia-smi failed: {exc}")
    if out.returncode != 0 or not out.stdout.strip():
        return warn("gpu", f"nvidia-smi found no GPU: {out.stderr.strip()[:200]}")
    first = out.stdout.strip().splitlines()[0]
    name, _, cc = first.partition(",")
    return ok("gpu", f"{name.strip()}, compute capability {cc.strip()}")


# ---------------------------------------------------------------------------------------------
# Configuration: what `thzedge run` would fail on (also `thzedge config validate`)


@dataclass
class _Loaded:
    """What the static checks loaded, for the checks that build on it."""

    cfg: Any = None  # edge.config.Config
    bundle: Any = None  # edge.bundle.Bundle


def static_checks(config: Path | None) -> list[CheckResult]:
    """The checks whose failure makes `thzedge run` exit at start-up (78 for a config problem)."""
    rows, _ = _static(config)
    return rows


def _static(config: Path | None) -> tuple[list[CheckResult], _Loaded]:
    from edge.config import load_config

    loaded = _Loaded()
    try:
        cfg = load_config(config)
    except ThzEdgeError as exc:
        return [fail("config", str(exc))], loaded
    loaded.cfg = cfg
    origin = str(cfg.path) if cfg.path else "built-in defaults (no config file)"
    rows = [ok("config", f"{origin}: parsed, {len(cfg.sources)} source(s)")]
    rows += [warn("config warning", note) for note in cfg.warnings()]
    rows += _bundle_checks(cfg, loaded)
    rows += _source_static_checks(cfg)
    rows += _gallery_checks(cfg, loaded)
    rows += _curve_checks(cfg)
    return rows, loaded


def _bundle_checks(cfg: Any, loaded: _Loaded) -> list[CheckResult]:
    from edge.bundle import Bundle, demo_bundle_path

    path = cfg.model.bundle or demo_bundle_path()
    what = "demo model" if cfg.model.bundle is None else str(path)
    try:
        bundle = Bundle.open(path)
    except ThzEdgeError as exc:
        return [fail("model bundle", str(exc))]
    loaded.bundle = bundle
    rows = [ok("model bundle", f"{what}: checksums verified, id {bundle.id[:12]}")]
    precision = str(cfg.model.precision)
    if precision == "auto":
        # `run` times these at start and keeps the fastest (edge/pipeline/assemble.py).
        candidates = ", ".join(bundle.gate_passed_precisions())
        rows.append(
            ok("model precision", f"auto: the fastest of {candidates} (gate passed), chosen at start")
        )
    elif precision not in bundle.precisions:
        rows.append(
            fail(
                "model precision",
                f"[model] precision = {precision!r} but the bundle has {', '.join(bundle.precisions)}; "
                f"add it with `thzedge export quantize --precision {precision}` or change [model] precision",
            )
        )
    else:
        rows.append(ok("model precision", precision))
    return rows


def _checked_precision(cfg: Any) -> str:
    """The precision the checks use: the pinned one; with `auto`, fp32 (the one always there)."""
    precision = str(cfg.model.precision)
    return "fp32" if precision == "auto" else precision


def _source_static_checks(cfg: Any) -> list[CheckResult]:
    from calibration.conditioning import ConditioningParams
    from edge.pipeline.assemble import refuse_uncalibrated, stream_profile
    from scanner_io.sources import split_queue_mode

    rows = []
    if not cfg.sources:
        rows.append(skip("sources", "none configured (give `thzedge run --source URI`)"))
    for name, src in cfg.sources.items():
        try:
            uri, _ = split_queue_mode(src.uri)
            rows.append(ok(f"source {name}", src.uri))
        except ThzEdgeError as exc:
            rows.append(fail(f"source {name}", str(exc)))
            continue
        base = ConditioningParams()
        label = f"calibration {name}"
        # The daemon's own rule (configured, else the scanner's active profile, else none).
        try:
            choice = stream_profile(src, cfg.calibration)
        except ThzEdgeError as exc:
            rows.append(fail(label, str(exc)))
            choice = None
        if choice is not None and choice.profile is not None:
            base = choice.profile.conditioning
            rows.append(ok(label, f"profile {choice.profile.profile_id}: {choice.origin}"))
            rows.append(_profile_age(name, choice.profile))
        elif choice is not None:
            try:
                refuse_uncalibrated(src, uri, cfg.calibration, choice.profile)
                if uri.startswith(("sim", "replay:")):
                    rows.append(
                        skip(label, "none configured: the source's own profile is used, if it has one")
                    )
                else:
                    rows.append(warn(label, "no profile: results are published `uncalibrated`"))
            except ConfigError as exc:
                rows.append(fail(label, str(exc)))
        if src.conditioning:
            # The profile's values (or the defaults when it failed) under the overrides, as run applies them.
            try:
                src.conditioning.apply(base)
                rows.append(ok(f"conditioning {name}", ", ".join(sorted(src.conditioning.values))))
            except ConfigError as exc:
                rows.append(fail(f"conditioning {name}", str(exc)))
    return rows


def _profile_age(name: str, profile: Any) -> CheckResult:
    """The profile against its validity envelope's age (the temperature needs a live frame)."""
    from calibration.validity import check_envelope

    verdict = check_envelope(profile, None)
    label = f"calibration {name} validity"
    if verdict.stale:
        return warn(label, f"{verdict.reason}; recalibrate (docs/calibration.md)")
    age = f"{verdict.age_s / 86400:.1f} days old" if verdict.age_s is not None else "fresh"
    return ok(label, f"within its validity envelope ({age})")


def _gallery_checks(cfg: Any, loaded: _Loaded) -> list[CheckResult]:
    from edge.gallery import Gallery, VerificationMode

    v = cfg.verification
    if v.gallery is None or VerificationMode(v.mode) is VerificationMode.off:
        return [skip("gallery", "no gallery configured: results carry no verification")]
    if loaded.bundle is None:
        return [skip("gallery", "not checked: the model bundle did not open")]
    from edge.templates import load_template_key

    try:
        # Loaded as `run` loads it: with the configured template key (protected templates need it).
        key = load_template_key(v.template_key) if v.template_key is not None else None
        precision = _checked_precision(cfg)
        g = Gallery.load(v.gallery, loaded.bundle, v.threshold, precision, template_key=key)
    except ThzEdgeError as exc:
        return [fail("gallery", str(exc))]
    rows = [ok("gallery", f"{v.gallery}: {len(g)} identities, bound to bundle {g.bundle_sha256[:12]}")]
    rows.append(_file_mode(v.gallery, "gallery file mode", biometric=True))
    return rows


def _curve_checks(cfg: Any) -> list[CheckResult]:
    from edge.security import load_allowed_clients, load_keypair

    curve = cfg.publisher.curve
    if not curve.enabled:
        return []
    rows = []
    for label, path, secret in (
        ("curve server key", curve.secret_key_file, True),
        ("curve client key", curve.client_key_file, True),
    ):
        if path is None:
            continue
        try:
            load_keypair(path, need_secret=secret)
            rows.append(ok(label, str(path)))
            rows.append(_file_mode(path, f"{label} mode", biometric=True))
        except ThzEdgeError as exc:
            rows.append(fail(label, str(exc)))
    try:
        n = len(load_allowed_clients(curve.allowed_clients_dir))
        rows.append(
            ok("curve allowed clients", f"{n} key(s)")
            if n
            else warn(
                "curve allowed clients", f"{curve.allowed_clients_dir} is empty: every client is refused"
            )
        )
    except ThzEdgeError as exc:
        rows.append(fail("curve allowed clients", str(exc)))
    return rows


def _file_mode(path: Path, name: str, biometric: bool) -> CheckResult:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        return fail(name, f"{path}: {exc}")
    if biometric and mode & 0o077:
        return warn(name, f"{path} is {oct(mode)}: readable beyond its owner; chmod 600 it")
    return ok(name, f"{path} {oct(mode)}")


# ---------------------------------------------------------------------------------------------
# What only a live device can tell: sources answering, ports, socket directories, engines


def _live_checks(loaded: _Loaded) -> list[CheckResult]:
    cfg = loaded.cfg
    if cfg is None:
        return []
    rows = [_source_answers(name, src.uri) for name, src in cfg.sources.items()]
    rows += _publisher_checks(cfg)
    if cfg.metrics.enabled:
        rows.append(_port_free("metrics port", cfg.metrics.host, cfg.metrics.port))
    rows += _engine_checks(cfg, loaded)
    return rows


def _source_answers(name: str, uri: str) -> CheckResult:
    from scanner_io.recording import resolve_recording
    from scanner_io.sources import split_queue_mode

    label = f"source {name} answers"
    try:
        base, _ = split_queue_mode(uri)
    except ThzEdgeError as exc:
        return fail(label, str(exc))
    base = base.split("?", 1)[0]
    if base.startswith("sim"):
        return ok(label, "the simulator (always there)")
    if base.startswith("replay:"):
        try:
            return ok(label, str(resolve_recording(base[len("replay:") :])))
        except ThzEdgeError as exc:
            return fail(label, str(exc))
    if base.startswith("ipc://"):
        from edge.security import ipc_socket_is_live

        path = Path(base[len("ipc://") :])
        if ipc_socket_is_live(path):
            return ok(label, f"{path} accepts connections")
        return warn(label, f"nothing listens on {path} yet (the daemon waits for the scanner)")
    if base.startswith("tcp://"):
        host, _, port = base[len("tcp://") :].rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return ok(label, f"{host}:{port} accepts connections")
        except (OSError, ValueError) as exc:
            return warn(label, f"{host}:{port} does not answer ({exc}); the daemon waits for the scanner")
    return warn(label, f"cannot probe {uri}")


def _publisher_checks(cfg: Any) -> list[CheckResult]:
    ep = cfg.publisher.endpoint
    if ep.startswith("tcp://"):
        host, _, port = ep[len("tcp://") :].rpartition(":")
        host = "0.0.0.0" if host == "*" else host.strip("[]")
        try:
            return [_port_free("results port", host, int(port))]
        except ValueError:
            return [skip("results port", f"{ep}: port chosen at bind time")]
    if not ep.startswith("ipc://"):
        return []
    from edge.security import ipc_socket_is_live

    path = Path(ep[len("ipc://") :])
    rows = []
    if ipc_socket_is_live(path):
        rows.append(
            warn("results socket", f"{path} is in use (a daemon is running; a second one cannot bind it)")
        )
    else:
        rows.append(ok("results socket", f"{path} is free"))
    parent = path.parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not parent.exists():
        if os.access(probe, os.W_OK):
            rows.append(ok("socket directory", f"{parent} will be created (0700) under {probe}"))
        else:
            rows.append(fail("socket directory", f"{parent} does not exist and {probe} is not writable"))
    else:
        mode = stat.S_IMODE(parent.stat().st_mode)
        if not os.access(parent, os.W_OK):
            rows.append(fail("socket directory", f"{parent} is not writable by this user"))
        elif mode & 0o007:
            rows.append(
                warn(
                    "socket directory", f"{parent} is {oct(mode)}: others may list it; the daemon tightens it"
                )
            )
        else:
            rows.append(ok("socket directory", f"{parent} {oct(mode)}"))
    return rows


def _port_free(name: str, host: str, port: int) -> CheckResult:
    if port == 0:
        return ok(name, "port 0: chosen at bind time")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return warn(
                name, f"{host}:{port} is in use ({exc.strerror}): a daemon already runs, or pick another"
            )
    return ok(name, f"{host}:{port} is free")


def _engine_checks(cfg: Any, loaded: _Loaded) -> list[CheckResult]:
    if loaded.bundle is None:
        return []
    from edge.backends.trt import can_run, open_cache

    precision = _checked_precision(cfg)
    cache = open_cache(cfg.model.engine_cache)
    if not can_run(loaded.bundle, precision, engine_cache=cache):
        return [
            skip(
                "tensorrt engines",
                f"none for {precision} in the engine cache {cache.root} ({cache.source}); "
                "ONNX Runtime runs it",
            )
        ]
    try:
        # The checks the trt backend makes before it deserialises anything (edge/backends/trt.py).
        from edge.backends.trt import current_platform, import_tensorrt, trt_generation, verified_engines

        trt = import_tensorrt()
        platform = current_platform(trt)
        generation = trt_generation(str(trt.__version__))
        verified_engines(loaded.bundle, precision, platform, cache, generation, cfg.model.dla_core)
    except ThzEdgeError as exc:
        level = fail if str(cfg.model.backend) == "trt" else warn
        return [level("tensorrt engines", str(exc))]
    return [ok("tensorrt engines", f"{precision} engines in {cache.root} match this TensorRT and GPU")]


def _jetson_rows(loaded: _Loaded) -> list[CheckResult]:
    """edge/jetson.py's checks (L4T, JetPack, TensorRT/CUDA match, device access, engine cache)."""
    from edge.jetson import jetson_checks

    cache = loaded.cfg.model.engine_cache if loaded.cfg is not None else None
    try:
        found = jetson_checks(engine_cache=cache)
    except (OSError, ThzEdgeError) as exc:
        return [warn("jetson", f"the Jetson checks could not run: {exc}")]
    return found


# Functions other modules add (each returns rows), e.g. Jetson power mode and clocks.
EXTRA_CHECKS: list[Callable[[], list[CheckResult]]] = []


def run_doctor(config: Path | None) -> DoctorReport:
    """Run every check and return the report."""
    report = DoctorReport()
    report.checks += python_checks()
    report.checks += extras_checks()
    report.checks += runtime_checks()
    rows, loaded = _static(config)
    report.checks += rows
    report.checks += _live_checks(loaded)
    report.checks += _jetson_rows(loaded)
    for extra in EXTRA_CHECKS:
        report.checks += extra()
    return report


def render_checks(checks: Iterable[CheckResult]) -> str:
    """The checks as an aligned text table: status, name, detail."""
    rows = list(checks)
    width = max((len(c.name) for c in rows), default=0)
    return "\n".join(f"{str(c.status).upper():<4}  {c.name:<{width}}  {c.detail}" for c in rows)


__all__ = [
    "EXTRA_CHECKS",
    "CheckResult",
    "CheckStatus",
    "DoctorReport",
    "render_checks",
    "run_doctor",
    "static_checks",
]
