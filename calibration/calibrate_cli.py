"""`thzedge calibrate …`: capture, build, check, report, activate, list (docs/calibration.md).

Each command parses, calls one library function of this package and renders its answer.
capture / check / activate / list need only the core install; build and report need the
`calibrate` extra (astropy, scipy, matplotlib) and say so when it is missing (exit 69).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from calibration.capture import CaptureKind
from scanner_io.cli_common import global_options, stop_on_signals, terminal_progress
from scanner_io.errors import CalibrationError, DataError

calibrate_app = typer.Typer(
    help="Calibrate a scanner from its own captures: capture, build, check, report, activate, list.",
    no_args_is_help=True,
)

_STATE = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Calibration state directory (default: $THZEDGE_CALIBRATION_DIR, $STATE_DIRECTORY/calibration, "
        "or ~/.local/state/thzedge/calibration).",
    ),
]


@calibrate_app.command("capture")
def capture_command(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Option(
            "--source", help="Source URI (tcp://, ipc://, sim?scene=dark, replay:F) or a config source name."
        ),
    ],
    kind: Annotated[CaptureKind, typer.Option("--kind", help="dark (shutter closed) or flat (reflector).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the capture MCAP into (created).")],
    frames: Annotated[int, typer.Option("--frames", min=2, help="Frames to record.")] = 64,
    level: Annotated[
        float | None,
        typer.Option("--level", min=0.0, help="Flat: the reference's power level (a label, e.g. 0.5, 1)."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Give up after S seconds.")] = 60.0,
) -> None:
    """Record a dark or flat capture set and check it is usable (still, unsaturated, right kind)."""
    as_json = global_options(ctx).json
    from calibration.capture import record_capture

    if kind is CaptureKind.FLAT and level is None:
        level = 1.0
    if kind is CaptureKind.DARK and level is not None:
        raise typer.BadParameter("--level is for flat captures", param_hint="--level")
    named = global_options(ctx).resolve_source(source)
    with stop_on_signals() as stop, terminal_progress(f"capturing {kind}", frames) as progress:
        result = record_capture(
            named.uri,
            kind,
            frames,
            out,
            level=level,
            progress=progress,
            stop=stop,
            timeout_s=timeout,
            curve=named.curve,
        )
    if as_json:
        typer.echo(json.dumps({"path": str(result.path), **result.check.to_dict()}, sort_keys=True))
    else:
        typer.echo(f"{result.check.line()} → {result.path}")
    if not result.check.ok:
        raise DataError(f"capture refused and kept as {result.path}: {'; '.join(result.check.reasons)}")


def _capture_files(paths: list[Path]) -> list[Path]:
    from calibration.capture import REFUSED_SUFFIX

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.glob("*.mcap") if not f.name.endswith(REFUSED_SUFFIX)))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist; give capture files or directories from calibrate capture")
    if not files:
        raise DataError(f"no capture file in {', '.join(map(str, paths))}")
    return files


@calibrate_app.command("build")
def build_command(
    ctx: typer.Context,
    captures: Annotated[list[Path], typer.Argument(help="Capture MCAP files or directories of them.")],
    out: Annotated[
        Path, typer.Option("--out", help="Profile directory to write (must not exist or be empty).")
    ],
    base: Annotated[
        Path | None,
        typer.Option(
            "--base", help="Current profile to carry the conditioning (dB range, ROI rule) over from."
        ),
    ] = None,
    max_delta_t: Annotated[
        float, typer.Option("--max-delta-t", min=0.01, help="Allowed ±°C from calibration.")
    ] = 2.0,
    max_age_days: Annotated[
        float, typer.Option("--max-age-days", min=0.01, help="Maximum profile age.")
    ] = 30.0,
    dark_tc: Annotated[
        bool,
        typer.Option(
            "--dark-tc",
            help="Fit the dark's per-pixel temperature coefficient from darks at several temperatures "
            "(e.g. one capture cold, one after warm-up); the daemon then follows the sensor temperature.",
        ),
    ] = False,
    min_tc_span: Annotated[
        float,
        typer.Option("--min-tc-span", min=0.1, max=50.0, help="Temperature span (°C) --dark-tc needs."),
    ] = 1.0,
) -> None:
    """Build a calibration profile (dark, gain, bad pixels by class, EMVA figures, envelope)."""
    as_json = global_options(ctx).json
    from calibration.build import BuildSettings, build_profile, profile_summary, require_calibrate_extra
    from calibration.capture import read_capture
    from calibration.conditioning import ConditioningParams
    from calibration.profile import CalibrationProfile

    require_calibrate_extra("calibrate build")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CalibrationError(f"{out} exists and is not empty; choose a new --out directory")
    conditioning = CalibrationProfile.load(base).conditioning if base is not None else ConditioningParams()
    sets = [read_capture(f) for f in _capture_files(captures)]
    settings = BuildSettings(
        max_delta_t_c=max_delta_t,
        max_age_s=max_age_days * 86400.0,
        dark_tc=dark_tc,
        min_tc_span_c=min_tc_span,
    )
    profile = build_profile(sets, conditioning=conditioning, settings=settings)
    profile.save(out)
    if as_json:
        doc = {"profile_id": profile.profile_id, "path": str(out), "qa": profile.qa}
        typer.echo(json.dumps(doc, sort_keys=True))
        return
    typer.echo(f"wrote profile to {out}: {profile_summary(profile)}")


@calibrate_app.command("check")
def check_command(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Option(
            "--source", help="Source URI or config source name of the scanner (shutter closed or reflector)."
        ),
    ],
    profile: Annotated[Path, typer.Option("--profile", help="Profile directory to check against.")],
    kind: Annotated[CaptureKind, typer.Option("--kind", help="dark or flat frames.")] = CaptureKind.DARK,
    level: Annotated[
        float | None, typer.Option("--level", min=0.0, help="Flat: the reference level.")
    ] = None,
    frames: Annotated[int, typer.Option("--frames", min=2, help="Fresh frames to check on.")] = 32,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Give up after S seconds.")] = 30.0,
) -> None:
    """Check drift, residual non-uniformity, new bad pixels and temperature; exit 0/3/4 = pass/warn/fail."""
    as_json = global_options(ctx).json
    from calibration.capture import capture_set_from_frames, read_frames
    from calibration.check import check_capture_against
    from calibration.profile import CalibrationProfile

    prof = CalibrationProfile.load(profile)
    if kind is CaptureKind.FLAT and level is None:
        level = 1.0
    named = global_options(ctx).resolve_source(source)
    got = read_frames(named.uri, frames, timeout, curve=named.curve)
    report = check_capture_against(prof, capture_set_from_frames(kind, got, level))
    typer.echo(json.dumps(report.to_dict(), sort_keys=True) if as_json else report.line())
    if report.verdict.exit_code:
        raise typer.Exit(report.verdict.exit_code)


@calibrate_app.command("report")
def report_command(
    profile: Annotated[Path, typer.Argument(help="Profile directory.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the PNGs and report.html.")],
    capture: Annotated[
        Path | None,
        typer.Option(
            "--capture", help="A capture (MCAP) to show one raw frame of, before and after correction."
        ),
    ] = None,
) -> None:
    """Write the technician's report: maps, bad-pixel classes, histograms, profiles, figures (PNG + HTML)."""
    from calibration.build import require_calibrate_extra

    require_calibrate_extra("calibrate report", ("matplotlib",))
    from calibration.capture import read_capture
    from calibration.profile import CalibrationProfile
    from calibration.report import write_report

    prof = CalibrationProfile.load(profile)
    raw = read_capture(capture, max_frames=1).frames[0] if capture is not None else None
    written = write_report(prof, out, raw_frame=raw)
    typer.echo(f"wrote {len(written) - 1} PNGs and {written[-1]} for profile {prof.profile_id}")


@calibrate_app.command("activate")
def activate_command(
    ctx: typer.Context,
    profile: Annotated[Path, typer.Argument(help="Profile directory to make active.")],
    scanner: Annotated[
        str, typer.Option("--scanner", help="Scanner name (as the daemon's --source names it).")
    ],
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="Read one frame header from this source (URI or config name) to check "
            "serial/resolution/settings.",
        ),
    ] = None,
    state_dir: _STATE = None,
    max_bad: Annotated[float, typer.Option("--max-bad-fraction", min=0.0, help="Refuse above this.")] = 0.02,
    max_dsnu: Annotated[
        float, typer.Option("--max-residual-dsnu", min=0.0, help="Refuse above this residual DSNU, in DN.")
    ] = 5.0,
    max_prnu: Annotated[
        float, typer.Option("--max-residual-prnu", min=0.0, help="Refuse above this residual PRNU, in %.")
    ] = 1.0,
) -> None:
    """Make a profile the scanner's active one (atomic); refuses a mismatch or a profile failing QA."""
    as_json = global_options(ctx).json
    from calibration.active import ActivationLimits, activate_profile, calibration_state_dir
    from calibration.capture import read_frames

    named = global_options(ctx).resolve_source(source) if source is not None else None
    header = read_frames(named.uri, 1, 10.0, curve=named.curve)[0].header if named is not None else None
    limits = ActivationLimits(max_bad, max_dsnu, max_prnu)
    record = activate_profile(profile, scanner, state_dir, header=header, limits=limits)
    unchanged = record.previous == record.profile_id
    if as_json:
        typer.echo(json.dumps({**record.to_dict(), "changed": not unchanged}, sort_keys=True))
    elif unchanged:
        typer.echo(f"profile {record.profile_id} is already the active one for {scanner}; nothing changed")
    else:
        prev = f" (was {record.previous})" if record.previous else ""
        where = calibration_state_dir(state_dir) / scanner
        typer.echo(
            f"activated profile {record.profile_id} for {scanner}{prev} in {where}; "
            f"reload the daemon (systemctl reload thzedge@{scanner}) to apply it"
        )


@calibrate_app.command("list")
def list_command(
    ctx: typer.Context,
    scanner: Annotated[str, typer.Option("--scanner", help="Scanner name.")],
    state_dir: _STATE = None,
) -> None:
    """Show a scanner's activation history, the active profile marked."""
    as_json = global_options(ctx).json
    from calibration.active import activation_history, active_profile_path

    history = activation_history(scanner, state_dir)
    active = active_profile_path(scanner, state_dir)
    active_id = active.name if active is not None else None
    if as_json:
        typer.echo(
            json.dumps({"active": active_id, "history": [r.to_dict() for r in history]}, sort_keys=True)
        )
        return
    if not history:
        typer.echo(f"no profile was ever activated for {scanner}")
        return
    # The active profile may have been activated more than once: its last activation is marked.
    marked = max((i for i, r in enumerate(history) if r.profile_id == active_id), default=None)

    def figure(value: Any, unit: str, digits: int) -> str:
        return "–" if value is None else f"{float(value):.{digits}f} {unit}"

    for i, r in enumerate(history):
        f = r.figures
        typer.echo(
            f"{'*' if i == marked else ' '} {r.time_utc}  {r.profile_id}  serial {r.scanner_serial}  "
            f"bad {100 * (f.get('bad_pixel_fraction') or 0):.2f} %  "
            f"DSNU {figure(f.get('residual_dsnu_dn'), 'DN', 2)}  "
            f"PRNU {figure(f.get('residual_prnu_pct'), '%', 2)}  T {figure(f.get('sensor_temp_c'), '°C', 1)}"
        )
