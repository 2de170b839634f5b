"""Build a calibration profile from dark and flat captures (`thzedge calibrate build`).

Per pixel, robust statistics over each stack (sigma-clipped mean, median and temporal σ along
the frame axis, astropy), then:

- dark offset = clipped mean of the dark stack;
- gain from flat − dark, normalised to a median of 1 over good pixels; with two or more flat
  levels a per-pixel linear fit of the signal against the frame's level, whose residual is the
  non-linearity;
- bad pixels by class (stuck, hot, dead, flickering, noisy — that order decides a pixel that
  fits several), clusters and defective columns/rows (scipy.ndimage.label);
- the EMVA 1288 non-uniformity figures (DSNU, PRNU: total, row, column, pixel) and temporal
  dark noise, before and after correction — "after" measured on frames the maps were not
  estimated from (split halves), so it is an honest residual;
- the validity envelope from the frame headers; conditioning carried over from a base profile.

astropy and scipy are the `calibrate` extra; without them `require_calibrate_extra` raises
MissingDependencyError naming it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from calibration.capture import CaptureKind, CaptureSet
from calibration.conditioning import ConditioningParams
from calibration.emva import nonuniformity
from calibration.profile import BadPixelClass, CalibrationProfile
from calibration.validity import DEFAULT_MAX_AGE_S, DEFAULT_MAX_DELTA_T_C, ValidityEnvelope
from scanner_io.errors import CalibrationError, DataError, MissingDependencyError

__all__ = [
    "BuildSettings",
    "StackStats",
    "build_profile",
    "classify_bad_pixels",
    "profile_summary",
    "require_calibrate_extra",
    "stack_stats",
]

CALIBRATE_EXTRA_HINT = "pip install 'thzedge[calibrate]'"


def require_calibrate_extra(
    what: str = "this command", needed: tuple[str, ...] = ("astropy", "scipy")
) -> None:
    """Fail with what to install when a module of the `calibrate` extra is not installed."""
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"{what} needs {', '.join(missing)}; install the calibrate extra: {CALIBRATE_EXTRA_HINT}"
        )


@dataclass(frozen=True)
class BuildSettings:
    """Thresholds of the build (noise units are the population's robust σ unless noted)."""

    # Sigma clipping along the frame axis, about the median with a MAD σ: wide, so it takes out
    # spikes (a flickering pixel's, a cosmic-ray-like hit) but not the tails of honest noise.
    clip_sigma: float = 6.0
    clip_iters: int = 5
    neighbourhood: int = 5  # median-filter window for "far above its neighbours"
    hot_sigma: float = 8.0  # hot: dark − local median above this many spatial σ …
    hot_min_counts: float = 1000.0  # … and at least this many counts
    dead_ratio: float = 0.5  # dead: response below this fraction of the local median response
    stuck_margin: float = 0.002  # stuck: clipped median within this fraction of full scale
    # A spike: above the neighbours' level by the hot threshold and this many temporal σ.
    flicker_min_population: float = 20.0
    noisy_ratio: float = 3.0  # noisy: clipped temporal σ above this multiple of the population's
    cluster_min: int = 2  # connected bad pixels (8-neighbourhood) that count as a cluster
    line_fraction: float = 0.25  # a column/row with this fraction bad is a defective line
    max_delta_t_c: float = DEFAULT_MAX_DELTA_T_C
    max_age_s: float = DEFAULT_MAX_AGE_S
    # Temperature-compensated dark (format 3): fit dark(T) per pixel from darks spanning at
    # least this many °C (header sensor_temp_c of every frame).
    dark_tc: bool = False
    min_tc_span_c: float = 1.0


@dataclass(frozen=True)
class DarkTempFit:
    """Per-pixel dark temperature coefficient fitted from dark frames at several temperatures."""

    tc: np.ndarray  # float32 DN/°C, shrunk towards the population (see fit_dark_tc)
    ref_temp_c: float  # the frames' mean temperature: where the fitted dark is
    temps_c: np.ndarray  # [N] float64, one per dark frame
    qa: dict[str, Any]


def frame_temps(captures: Sequence[CaptureSet], what: str) -> np.ndarray:
    """The header sensor temperature of every frame of `captures`, in order; refuses gaps."""
    temps = [h.sensor_temp_c for c in captures for h in c.headers]
    if any(t is None or not np.isfinite(t) for t in temps):
        missing = sum(t is None or not np.isfinite(t) for t in temps)
        raise CalibrationError(
            f"{missing} of {len(temps)} {what} frames carry no sensor temperature; a temperature-"
            "compensated dark needs sensor_temp_c in every header (build without --dark-tc)"
        )
    return np.asarray(temps, np.float64)


def fit_dark_tc(dark_frames: np.ndarray, temps_c: np.ndarray, s: BuildSettings) -> DarkTempFit:
    """Fit dark = d0 + tc·(T − T0) per pixel by least squares over the dark frames.

    One stack rarely pins each pixel's slope well (read noise σ over a temperature spread
    gives σ/√Σ(T−T̄)² DN/°C per pixel), so each slope is shrunk towards the population's
    median by its own reliability (an empirical-Bayes weight τ²/(τ²+σ_b²), τ² the spread of
    the true slopes): few frames or a narrow span give about the common slope, many frames
    at well-separated temperatures the pixel's own. Refuses a span below `min_tc_span_c`.
    """
    t = np.asarray(temps_c, np.float64)
    span = float(t.max() - t.min()) if t.size else 0.0
    if t.size < 3 or span < s.min_tc_span_c:
        raise CalibrationError(
            f"the dark captures span {span:.2f} °C ({t.min():.2f}–{t.max():.2f} °C over {t.size} frames); "
            f"a temperature-compensated dark needs at least {s.min_tc_span_c:g} °C: capture darks "
            "cold and again after warm-up (docs/calibration.md, 'Temperature compensation')"
        )
    t0 = float(t.mean())
    dt = t - t0
    sxx = float((dt**2).sum())
    x = dark_frames.astype(np.float64, copy=False)
    mean = x.mean(axis=0)
    slope = np.tensordot(dt, x, axes=1) / sxx  # Σdt = 0, so the mean drops out
    resid = x - mean[None] - slope[None] * dt[:, None, None]
    var = (resid**2).sum(axis=0) / max(len(t) - 2, 1)
    slope_var = var / sxx
    med = float(np.median(slope))
    mad = float(np.median(np.abs(slope - med))) * 1.4826
    tau2 = max(mad**2 - float(np.median(slope_var)), 0.0)
    weight = tau2 / (tau2 + slope_var + 1e-30)
    tc = (med + weight * (slope - med)).astype(np.float32)
    qa = {
        "span_c": round(span, 3),
        "min_c": round(float(t.min()), 3),
        "max_c": round(float(t.max()), 3),
        "frames": int(t.size),
        "tc_median_dn_per_c": med,
        "tc_spread_dn_per_c": float(np.sqrt(tau2)),
        "tc_fit_sigma_dn_per_c": float(np.sqrt(np.median(slope_var))),
        "shrink_weight_median": float(np.median(weight)),
    }
    return DarkTempFit(tc, t0, t, qa)


def detrend(frames: np.ndarray, temps_c: np.ndarray, fit: DarkTempFit) -> np.ndarray:
    """Frames moved to the fit's reference temperature: x − tc·(T − T0), float32."""
    dt = (np.asarray(temps_c, np.float64) - fit.ref_temp_c).astype(np.float32)
    return (frames - fit.tc[None] * dt[:, None, None]).astype(np.float32)


@dataclass(frozen=True)
class StackStats:
    """Robust per-pixel statistics of one stack (all [H, W] float32 except `frames`)."""

    mean: np.ndarray  # sigma-clipped mean over frames
    median: np.ndarray
    std: np.ndarray  # sigma-clipped temporal σ (ddof 1)
    frames: int


def stack_stats(frames: np.ndarray, settings: BuildSettings | None = None) -> StackStats:
    """Return sigma-clipped mean / median / temporal σ along the frame axis."""
    from astropy.stats import sigma_clip

    settings = settings or BuildSettings()
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 3 or len(frames) < 2:
        raise DataError(f"a stack needs at least 2 frames of [H, W], got shape {frames.shape}")
    clipped = sigma_clip(
        frames,
        sigma=settings.clip_sigma,
        maxiters=settings.clip_iters,
        axis=0,
        masked=True,
        copy=True,
        cenfunc="median",
        # A robust σ, so a pixel spiking in a fifth of the frames still has its spikes clipped.
        stdfunc="mad_std",
    )
    mean = np.ma.mean(clipped, axis=0).filled(np.nan)
    median = np.ma.median(clipped, axis=0).filled(np.nan)
    std = np.ma.std(clipped, axis=0, ddof=1).filled(0.0)
    # A pixel all of whose values were clipped away (cannot happen with maxiters finite and a
    # constant pixel, but be safe) falls back to the plain statistics.
    bad = ~np.isfinite(mean)
    if bad.any():
        mean[bad] = frames.mean(axis=0)[bad]
        median[bad] = np.median(frames, axis=0)[bad]
    std = np.nan_to_num(std, nan=0.0)
    f32 = np.float32
    return StackStats(mean.astype(f32), median.astype(f32), std.astype(f32), len(frames))


def _robust_sigma(values: np.ndarray) -> float:
    med = np.median(values)
    return float(1.4826 * np.median(np.abs(values - med)))


def _intermittent(frames: np.ndarray, reference: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels that in this stack are sometimes near `reference` and sometimes far above it."""
    spikes = (frames > (reference + threshold)[None]).sum(axis=0)
    return (spikes > 0) & (spikes < len(frames))


def classify_bad_pixels(
    dark: StackStats,
    flats: Sequence[StackStats],
    response: np.ndarray,
    full_scale: float,
    settings: BuildSettings | None = None,
    stacks: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Return the uint8 class map (BadPixelClass.code, 0 = good) from dark and flat statistics.

    `stacks` are the frames behind [dark, *flats] (in that order); without them flickering
    pixels (intermittent spikes) cannot be found.
    """
    from scipy import ndimage

    s = settings or BuildSettings()
    codes = np.zeros(dark.mean.shape, np.uint8)

    def assign(mask: np.ndarray, cls: BadPixelClass) -> None:
        codes[mask & (codes == 0)] = cls.code

    # Stuck at full scale: saturated in the dark already.
    if np.isfinite(full_scale):
        assign(dark.median >= full_scale * (1.0 - s.stuck_margin), BadPixelClass.STUCK)
    local = ndimage.median_filter(dark.median, size=s.neighbourhood, mode="reflect")
    resid = dark.median - local
    hot_thr = max(s.hot_min_counts, s.hot_sigma * _robust_sigma(resid))
    # Flickering: intermittent spikes far above the neighbours in at least one stack. Before
    # hot, since a pixel that happened to spike in most dark frames has a high dark median.
    pop = max(float(np.median(dark.std)), 1e-6)
    spike_thr = max(hot_thr, s.flicker_min_population * pop)
    flicker = np.zeros(codes.shape, bool)
    # In the dark the reference is the lower of the pixel's median and its neighbours' (a pixel
    # that spiked in most dark frames still counts); in a flat, where responses differ by more
    # than the threshold, the pixel's own median.
    references = [np.minimum(dark.median, local), *(f.median for f in flats)]
    for frames, ref in zip(stacks, references, strict=False):
        flicker |= _intermittent(frames, ref, spike_thr)
    assign(flicker, BadPixelClass.FLICKERING)
    # Hot: dark level far above the neighbourhood's, all the time.
    assign(resid > hot_thr, BadPixelClass.HOT)
    # Dead: (almost) no response to the flat, relative to the local response.
    if flats:
        local_resp = ndimage.median_filter(response, size=s.neighbourhood, mode="reflect")
        ratio = response / np.maximum(np.abs(local_resp), 1e-6)
        assign(ratio < s.dead_ratio, BadPixelClass.DEAD)
    # Noisy: temporal σ far above the population's. Each stack is compared with its own
    # population (a flat adds shot noise to everyone) and the ratios pooled over all stacks, so
    # a short dark stack's sampling luck does not decide alone.
    num = np.zeros(dark.std.shape, np.float64)
    dof = 0
    for st in (dark, *flats):
        pop = max(float(np.median(st.std)), 1e-6)
        num += (st.frames - 1) * (st.std.astype(np.float64) / pop) ** 2
        dof += st.frames - 1
    ratio = np.sqrt(num / max(dof, 1))
    assign(ratio > s.noisy_ratio, BadPixelClass.NOISY)
    return codes


def defect_structures(bad: np.ndarray, settings: BuildSettings | None = None) -> dict[str, Any]:
    """Return the clusters (connected bad pixels) and defective columns/rows of a bad-pixel mask."""
    from scipy import ndimage

    s = settings or BuildSettings()
    labels, n = ndimage.label(bad, structure=np.ones((3, 3), bool))
    clusters: list[dict[str, Any]] = []
    if n:
        sizes = ndimage.sum_labels(bad, labels, index=np.arange(1, n + 1))
        for i, sl in enumerate(ndimage.find_objects(labels)):
            if sl is not None and sizes[i] >= s.cluster_min:
                y, x = sl
                clusters.append(
                    {
                        "size": int(sizes[i]),
                        "bbox": [int(x.start), int(y.start), int(x.stop - x.start), int(y.stop - y.start)],
                    }
                )
    h, w = bad.shape
    cols = np.flatnonzero(bad.sum(axis=0) >= s.line_fraction * h).tolist()
    rows = np.flatnonzero(bad.sum(axis=1) >= s.line_fraction * w).tolist()
    clusters.sort(key=lambda c: -c["size"])
    return {"clusters": clusters, "columns": cols, "rows": rows}


@dataclass(frozen=True)
class _Maps:
    dark: np.ndarray
    gain: np.ndarray
    response: np.ndarray
    dark_stats: StackStats
    flat_stats: list[StackStats]
    signals: list[np.ndarray]
    levels: list[float]
    nonlinearity: float | None
    steady_flats: list[np.ndarray]


def _steady(flat: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """Scale each flat frame's signal to the stack's median level (source-power fluctuation).

    The fluctuation is common to all pixels; left in, per-pixel clipping would drop different
    frames for different pixels and turn it into gain noise.
    """
    signal = flat - dark[None]
    level = np.median(signal.reshape(len(flat), -1), axis=1)
    ref = float(np.median(level))
    k = np.where(np.abs(level) > 1e-6, ref / np.where(np.abs(level) > 1e-6, level, 1.0), 1.0)
    return (dark[None] + signal * k[:, None, None].astype(np.float32)).astype(np.float32)


def _estimate(
    dark_frames: np.ndarray, flat_stacks: Sequence[np.ndarray], good: np.ndarray | None, s: BuildSettings
) -> _Maps:
    """Dark, response and normalised gain from a dark stack and flat stacks (one per level)."""
    dstats = stack_stats(dark_frames, s)
    dark = dstats.mean
    steady = [_steady(f, dark) for f in flat_stacks]
    fstats = [stack_stats(f, s) for f in steady]
    signals = [f.mean - dark for f in fstats]
    sel = good if good is not None else np.ones(dark.shape, bool)
    levels = [float(np.median(sig[sel])) for sig in signals]
    nonlin = None
    if len(signals) >= 2:
        # Per-pixel least squares signal = a + b·level; b is the relative response.
        x = np.asarray(levels, np.float64)
        y = np.stack(signals).astype(np.float64)
        xm = x.mean()
        b = ((x - xm)[:, None, None] * (y - y.mean(axis=0))).sum(axis=0) / max(((x - xm) ** 2).sum(), 1e-12)
        a = y.mean(axis=0) - b * xm
        resid = y - (a[None] + b[None] * x[:, None, None])
        # EMVA-style linearity error: the largest fit deviation relative to the signal span.
        span = max(x.max() - x.min(), 1e-9)
        nonlin = float(np.median((np.abs(resid).max(axis=0) / (np.abs(b) * span + 1e-9))[sel]))
        response = b.astype(np.float32)
    elif signals:
        response = (signals[0] / max(levels[0], 1e-9)).astype(np.float32)
    else:
        response = np.ones(dark.shape, np.float32)
    resp_med = float(np.median(response[sel])) if signals else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(np.abs(response) > 1e-6, resp_med / response, 1.0).astype(np.float32)
    gain = np.nan_to_num(gain, nan=1.0, posinf=1.0, neginf=1.0)
    return _Maps(dark, gain, response, dstats, fstats, signals, levels, nonlin, steady)


def _figures(
    dark_stack: np.ndarray,
    flat_stack: np.ndarray | None,
    dark_map: np.ndarray | None,
    gain_map: np.ndarray | None,
    good: np.ndarray,
    noise_extra: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    """DSNU, PRNU and temporal dark noise of stacks, raw or corrected with the given maps.

    `noise_extra` is the temporal variance the maps themselves carry (dark, relative gain),
    so a correction estimated from other frames is not credited with removing its own noise.
    """
    nd = len(dark_stack)
    dmean = dark_stack.mean(axis=0)
    dvar = dark_stack.var(axis=0, ddof=1)
    tnoise = float(np.sqrt(np.mean(dvar[good])))
    if dark_map is None:
        dsnu = nonuniformity(dmean, good, float(np.mean(dvar[good])) / nd)
    else:
        dsnu = nonuniformity(dmean - dark_map, good, float(np.mean(dvar[good])) / nd + noise_extra[0])
    out: dict[str, Any] = {"dsnu_dn": dsnu, "temporal_dark_noise_dn": tnoise}
    if flat_stack is not None:
        nf = len(flat_stack)
        fmean = flat_stack.mean(axis=0)
        fvar = flat_stack.var(axis=0, ddof=1)
        signal = fmean - (dmean if dark_map is None else dark_map)
        var = float(np.mean(fvar[good])) / nf + (
            float(np.mean(dvar[good])) / nd if dark_map is None else noise_extra[0]
        )
        if gain_map is not None:
            signal = signal * gain_map
            var = (
                var * float(np.mean(gain_map[good] ** 2)) + noise_extra[1] * float(np.mean(signal[good])) ** 2
            )
        nu = nonuniformity(signal, good, var)
        mu = nu.pop("mean")
        out["prnu_pct"] = {k: 100.0 * v / max(abs(mu), 1e-9) for k, v in nu.items()}
        out["signal_dn"] = mu
    out["dsnu_dn"].pop("mean")
    return out


def _halves(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Even and odd frames: interleaved, so both halves share any slow drift of the stack."""
    return frames[0::2], frames[1::2]


def _consistent_envelope(captures: Sequence[CaptureSet], s: BuildSettings) -> ValidityEnvelope:
    first = captures[0].headers[0]
    for cap in captures:
        h = cap.headers[0]
        if (h.scanner, tuple(h.shape), h.dtype, h.settings) != (
            first.scanner,
            tuple(first.shape),
            first.dtype,
            first.settings,
        ):
            raise CalibrationError(
                f"captures come from different scanners or settings ({first.scanner} {tuple(first.shape)} "
                f"{first.settings} vs {h.scanner} {tuple(h.shape)} {h.settings} in {cap.path}); "
                "build one profile from captures of one scanner at one setting"
            )
    darks = [c for c in captures if c.kind is CaptureKind.DARK]
    temps = [h.sensor_temp_c for c in darks for h in c.headers if h.sensor_temp_c is not None]
    latest = max(h.t_capture_ns for c in captures for h in c.headers)
    return ValidityEnvelope(
        scanner=first.scanner,
        shape=(int(first.shape[0]), int(first.shape[1])),
        dtype=first.dtype,
        settings=dict(first.settings),
        sensor_temp_c=round(float(np.mean(temps)), 3) if temps else None,
        captured_ns=int(latest),
        max_delta_t_c=s.max_delta_t_c,
        max_age_s=s.max_age_s,
    )


def build_profile(
    captures: Sequence[CaptureSet],
    conditioning: ConditioningParams | None = None,
    settings: BuildSettings | None = None,
    meta: Mapping[str, Any] | None = None,
) -> CalibrationProfile:
    """Build a format-2 calibration profile from dark and flat captures of one scanner.

    Needs at least one dark capture; flats (one per level; two levels or more give the
    non-linearity) give the gain and the dead pixels. Refuses captures of different scanners,
    shapes or settings.
    """
    require_calibrate_extra("calibrate build")
    s = settings or BuildSettings()
    if not captures:
        raise CalibrationError("no capture given; capture a dark and at least one flat first")
    darks = [c for c in captures if c.kind is CaptureKind.DARK]
    flats = [c for c in captures if c.kind is CaptureKind.FLAT]
    if not darks:
        raise CalibrationError(
            "no dark capture among the inputs; capture one (calibrate capture --kind dark)"
        )
    envelope = _consistent_envelope(captures, s)
    full_scale = darks[0].full_scale
    dark_frames = np.concatenate([c.frames for c in darks])
    tfit = None
    if s.dark_tc:
        tfit = fit_dark_tc(dark_frames, frame_temps(darks, "dark"), s)
        # Everything below sees the stacks as if taken at T0: the noise, the classes and the
        # gain are not blurred by the warm-up.
        dark_frames = detrend(dark_frames, tfit.temps_c, tfit)
        # Valid over the fitted span, widened by the usual excursion.
        lo, hi = float(tfit.temps_c.min()), float(tfit.temps_c.max())
        envelope = replace(
            envelope, sensor_temp_c=round((lo + hi) / 2, 3), max_delta_t_c=(hi - lo) / 2 + s.max_delta_t_c
        )
    # One stack per flat level (captures of the same level are pooled), lowest level first.
    by_level: dict[float, list[np.ndarray]] = {}
    for c in flats:
        key = float(c.level) if c.level is not None else float(np.median(c.frames))
        frames = c.frames
        if tfit is not None:  # a flat's dark is the dark at the flat's temperature
            frames = detrend(frames, frame_temps([c], "flat"), tfit)
        by_level.setdefault(key, []).append(frames)
    flat_stacks = [np.concatenate(v) for _, v in sorted(by_level.items())]
    if any(len(f) < 2 for f in [dark_frames, *flat_stacks]):
        raise CalibrationError("every capture stack needs at least 2 frames")

    first = _estimate(dark_frames, flat_stacks, None, s)
    codes = classify_bad_pixels(
        first.dark_stats, first.flat_stats, first.response, full_scale, s, [dark_frames, *first.steady_flats]
    )
    bad = codes > 0
    good = ~bad
    maps = _estimate(dark_frames, flat_stacks, good, s)  # gain normalised over good pixels only

    # Figures: raw (before) on all frames; after correction on the second half of each stack
    # with maps estimated from the first half only.
    ref_flat = None
    if flat_stacks:
        # EMVA takes PRNU near 50 % of saturation: the level closest to it.
        target = 0.5 * (full_scale if np.isfinite(full_scale) else 2 * max(maps.levels))
        ref_flat = int(np.argmin([abs(lv + float(np.median(maps.dark)) - target) for lv in maps.levels]))
    before = _figures(dark_frames, flat_stacks[ref_flat] if ref_flat is not None else None, None, None, good)
    d_a, d_b = _halves(dark_frames)
    f_halves = [_halves(f) for f in flat_stacks]
    maps_a = _estimate(d_a, [fa for fa, _ in f_halves], good, s)
    dark_noise = float(np.mean(maps.dark_stats.std[good] ** 2))
    extra_dark = dark_noise / len(d_a)
    extra_gain = 0.0
    if ref_flat is not None:
        fa = f_halves[ref_flat][0]
        sig = max(maps.levels[ref_flat], 1e-9)
        flat_noise = float(np.mean(maps.flat_stats[ref_flat].std[good] ** 2))
        extra_gain = (flat_noise / len(fa) + extra_dark) / sig**2
    after = _figures(
        d_b,
        f_halves[ref_flat][1] if ref_flat is not None else None,
        maps_a.dark,
        maps_a.gain if ref_flat is not None else None,
        good,
        (extra_dark, extra_gain),
    )
    structures = defect_structures(bad, s)
    counts = {c.value: int((codes == c.code).sum()) for c in BadPixelClass}
    qa: dict[str, Any] = {
        "bad_pixel_fraction": float(bad.mean()),
        "bad_pixels": counts,
        **structures,
        "before": before,
        "after": after,
        "residual_dsnu_dn": after["dsnu_dn"]["total"],
        "residual_prnu_pct": after.get("prnu_pct", {}).get("total"),
        "nonlinearity_pct": None if maps.nonlinearity is None else 100.0 * maps.nonlinearity,
        "flat_levels_dn": maps.levels,
        # Signal above dark per nominal flat level: what `calibrate check` compares a flat with.
        "flat_signal": [
            {"level": lv, "signal_dn": sig} for lv, sig in zip(sorted(by_level), maps.levels, strict=True)
        ],
        "frames": {"dark": int(len(dark_frames)), "flat": [int(len(f)) for f in flat_stacks]},
        "settings": asdict(s),
    }
    if tfit is not None:
        qa["dark_tc"] = tfit.qa
    profile_meta = {
        "source": "thzedge calibrate build",
        "captures": [
            {
                "kind": str(c.kind),
                "level": c.level,
                "frames": len(c.frames),
                "file": c.path.name if c.path else None,
            }
            for c in captures
        ],
        "sensor_temp_c": envelope.sensor_temp_c,
        **dict(meta or {}),
    }
    return CalibrationProfile(
        scanner=envelope.scanner,
        shape=envelope.shape,
        dark=maps.dark,
        gain=maps.gain if flats else np.ones(envelope.shape, np.float32),
        bad_pixels=bad,
        conditioning=conditioning or ConditioningParams(),
        meta=profile_meta,
        defects=codes,
        envelope=envelope,
        qa=_jsonable(qa),
        noise=maps.dark_stats.std,
        dark_tc=tfit.tc if tfit is not None else None,
        dark_ref_temp_c=round(tfit.ref_temp_c, 4) if tfit is not None else None,
    )


def profile_summary(profile: CalibrationProfile) -> str:
    """One line a technician reads: id, bad pixels by class, DSNU/PRNU before → after, envelope."""
    qa = profile.qa or {}
    counts = ", ".join(f"{v} {k}" for k, v in (qa.get("bad_pixels") or {}).items())
    before, after = qa.get("before") or {}, qa.get("after") or {}
    parts = [
        f"profile {profile.profile_id} for {profile.scanner} {profile.shape[1]}x{profile.shape[0]}",
        f"{100 * profile.bad_pixel_fraction:.2f} % bad pixels ({counts}; "
        f"{len(qa.get('clusters') or [])} clusters, columns {qa.get('columns') or []})",
    ]
    if "dsnu_dn" in before:
        parts.append(f"DSNU {before['dsnu_dn']['total']:.1f} → {after['dsnu_dn']['total']:.2f} DN")
    if "prnu_pct" in before:
        parts.append(f"PRNU {before['prnu_pct']['total']:.2f} → {after['prnu_pct']['total']:.3f} %")
    if "temporal_dark_noise_dn" in before:
        parts.append(f"temporal dark noise {before['temporal_dark_noise_dn']:.2f} DN")
    if qa.get("nonlinearity_pct") is not None:
        parts.append(f"non-linearity {qa['nonlinearity_pct']:.3f} %")
    tc = qa.get("dark_tc")
    if profile.temperature_compensated and tc:
        parts.append(
            f"dark temperature-compensated: {tc['tc_median_dn_per_c']:.2f} DN/°C median "
            f"(fitted over {tc['min_c']:.2f}–{tc['max_c']:.2f} °C, {tc['frames']} frames)"
        )
    env = profile.envelope
    if env is not None:
        parts.append(
            f"valid at {env.sensor_temp_c} ± {env.max_delta_t_c:g} °C for {env.max_age_s / 86400:g} days"
        )
    return ", ".join(parts)


def _jsonable(value: Any) -> Any:
    """Round floats for a stable, readable profile.json (NaN becomes None)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return round(v, 6) if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
