"""`resolve_profile`: the one rule for which calibration conditions a stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration.conditioning import ConditioningParams
from calibration.profile import CalibrationProfile, ProfileChoice, resolve_profile
from calibration.simulated import profile_from_sensor_maps
from scanner_io.errors import CalibrationError
from scanner_io.sources import open_source


def test_configured_then_carried_then_none(tmp_path: Path) -> None:
    configured = CalibrationProfile.identity("sim0", (128, 128), ConditioningParams(db_min=11.0))
    path = configured.save(tmp_path / "prof")
    with open_source("sim?seed=3&frames=1") as src:
        carried = profile_from_sensor_maps(src.sensor_maps())
        chosen = resolve_profile(path, src)  # configured wins over what the source carries
        assert chosen.profile is not None and chosen.profile.profile_id == configured.profile_id
        from_source = resolve_profile(None, src)
    assert from_source.profile is not None and from_source.profile.profile_id == carried.profile_id
    assert "simulator" in from_source.origin and from_source.calibration_id == carried.profile_id
    none = resolve_profile(None, _NoCarrier())
    assert none.profile is None and none.calibration_id == "identity"
    # What was read off the source already stands in for the source.
    given = ProfileChoice(carried, "read before")
    assert resolve_profile(None, carried=given) is given


def test_a_bad_configured_profile_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError):
        resolve_profile(tmp_path / "missing")


class _NoCarrier:
    """A stream that carries no calibration (a live scanner over ZeroMQ)."""

    def calibration(self) -> None:
        return None

    def sensor_maps(self) -> None:
        return None
