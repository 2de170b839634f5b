"""`thzedge run` with `precision = "auto"` runs the fastest gate-passed variant, and says which."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import edge.pipeline.assemble as assemble
from edge.bundle import Bundle, demo_bundle_path
from edge.pipeline.assemble import RunOptions, choose_precision, run_daemon, time_variants
from edge.pipeline.stats import RunSummary
from edge.runner import Runner


def _demo() -> Bundle:
    try:
        return Bundle.open(demo_bundle_path())
    except Exception as exc:  # a checkout without the shipped demo bundle
        pytest.skip(f"no demo bundle: {exc}")


def test_choose_keeps_fp32_unless_another_variant_is_clearly_faster() -> None:
    assert choose_precision({"fp32": 1.0, "int8": 0.5}) == "int8"
    assert choose_precision({"fp32": 1.0, "int8": 0.9}) == "fp32"  # within the margin: the reference
    assert choose_precision({"fp32": 1.0, "int8": 1.3}) == "fp32"
    assert choose_precision({"int8": 0.4, "fp16": 0.3}) == "fp16"


def test_gate_passed_precisions(tiny_bundle: Path) -> None:
    assert Bundle.open(tiny_bundle).gate_passed_precisions() == ("fp32",)
    demo = _demo()
    assert "int8" in demo.precisions
    assert demo.gate_passed_precisions() == ("fp32", "int8")


def test_time_variants_measures_every_runner() -> None:
    demo = _demo()
    runners = {p: Runner.from_bundle(demo, backend="ort", precision=p) for p in ("fp32", "int8")}
    try:
        t = time_variants(runners, reconstruct=True)
    finally:
        for r in runners.values():
            r.close()
    assert sorted(t) == ["fp32", "int8"]
    assert all(math.isfinite(v) and v > 0 for v in t.values())


def _run(tmp_path: Path, precision: str | None) -> RunSummary:
    cfg = tmp_path / "thzedge.toml"
    pin = f'[model]\nprecision = "{precision}"\n' if precision else ""
    cfg.write_text(f"[metrics]\nenabled = false\n{pin}")
    return run_daemon(
        RunOptions(
            source="sim?frames=4",
            config=cfg,
            model=demo_bundle_path(),
            backend="ort",
            publish=f"ipc://{tmp_path}/r.sock",
            max_frames=3,
        )
    )


def test_auto_runs_the_fastest_variant_and_closes_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _demo()
    closed: list[str] = []
    close = Runner.close

    def tracking_close(self: Runner) -> None:
        closed.append(self.backend.precision)
        close(self)

    monkeypatch.setattr(Runner, "close", tracking_close)
    monkeypatch.setattr(assemble, "time_variants", lambda runners, reconstruct: {"fp32": 2.0, "int8": 1.0})
    with caplog.at_level("INFO", logger="thzedge.daemon"):
        summary = _run(tmp_path, None)
    assert summary.published == 3
    assert summary.precision == "int8" and summary.backend == "ort"
    assert "precision=int8" in summary.render()
    assert closed[0] == "fp32"  # the slower variant is released before streaming starts
    assert any("precision auto: int8" in r.getMessage() for r in caplog.records)


def test_a_pinned_precision_is_not_timed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _demo()

    def no_timing(runners: object, reconstruct: bool) -> dict[str, float]:
        raise AssertionError("a pinned precision must not be timed")

    monkeypatch.setattr(assemble, "time_variants", no_timing)
    summary = _run(tmp_path, "int8")
    assert summary.precision == "int8"
