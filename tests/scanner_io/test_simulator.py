"""The THz scanner simulator: determinism, identities, postures, raw sensor truth.

What needs calibration or conditioning (true profile, conditioned pairs, targets, datasets) is
tested in tests/calibration/test_simulated.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from scanner_io.errors import ConfigError
from scanner_io.frame import POSTURES
from scanner_io.simulator import ScannerSimulator, SimTruth, identity_name


@pytest.fixture(scope="module")
def sim() -> ScannerSimulator:
    return ScannerSimulator(seed=3, identities=24, start_time_ns=1_700_000_000_000_000_000)


def test_same_seed_same_frames_in_any_call_order():
    a = ScannerSimulator(seed=5, identities=4, start_time_ns=0)
    b = ScannerSimulator(seed=5, identities=4, start_time_ns=0)
    b.render(1, 3, 9)  # extra work first must not shift anything
    fa, fb = a.render(2, 1, 4), b.render(2, 1, 4)
    np.testing.assert_array_equal(fa.data, fb.data)
    np.testing.assert_array_equal(fa.truth.reference, fb.truth.reference)
    sa = [a.next_frame() for _ in range(5)]
    sb = ScannerSimulator(seed=5, identities=4, start_time_ns=0)
    for f in sa:
        g = sb.next_frame()
        np.testing.assert_array_equal(f.data, g.data)
        # Header seq counts every frame made (a's render took one); the stream itself is unchanged.
        assert f.seq == g.seq + 1
        assert f.header.sensor_temp_c == g.header.sensor_temp_c
        assert (f.truth.identity, f.truth.posture) == (g.truth.identity, g.truth.posture)
    other = ScannerSimulator(seed=6, identities=4).render(2, 1, 4)
    assert not np.array_equal(fa.data, other.data)


def test_identity_does_not_depend_on_population_size():
    small = ScannerSimulator(seed=2, identities=3)
    large = ScannerSimulator(seed=2, identities=50)
    assert small.identity_params(2) == large.identity_params(2)
    np.testing.assert_array_equal(small.render(2, 0, 1).data, large.render(2, 0, 1).data)


def test_frame_header_and_truth(sim):
    f = sim.render(4, 2, 7, concealed=True)
    assert f.data.dtype == np.uint16 and f.data.shape == (128, 128)
    assert f.header.shape == (128, 128) and f.header.dtype == "uint16"
    assert f.header.scanner == "sim0" and f.header.sensor_temp_c == pytest.approx(35.0)
    t = f.truth
    assert isinstance(t, SimTruth)
    assert (t.identity, t.posture, t.sample, t.concealed) == (4, 2, 7, True)
    assert t.identity_name == identity_name(4) == "id005" and t.posture_name == POSTURES[2]
    ref = t.reference  # the unconcealed, frame-averaged capture of the same pose
    assert ref.shape == (128, 128) and ref.dtype == np.uint16
    assert ref is t.reference  # made once
    np.testing.assert_array_equal(ref, sim.capture(4, 2, 7, concealed=False, reference=True).raw)
    np.testing.assert_array_equal(f.data, sim.capture(4, 2, 7, concealed=True).raw)


def test_sensor_maps_are_the_truth_of_frames_at_the_calibration_temperature(sim):
    f = sim.render(0, 0, 1)
    maps = sim.sensor_maps()
    assert (maps.scanner, maps.shape) == ("sim0", (128, 128))
    assert maps.meta == {"source": "simulator", "seed": 3, "sensor_temp_c": 35.0}
    np.testing.assert_array_equal(f.truth.dark, maps.dark)
    np.testing.assert_array_equal(f.truth.gain, maps.gain)
    np.testing.assert_array_equal(f.truth.bad_pixels, maps.bad_pixels)
    assert maps.dark.dtype == maps.gain.dtype == np.float32 and maps.bad_pixels.dtype == bool
    assert not maps.dark.flags.writeable and not maps.gain.flags.writeable
    assert 0.002 < maps.bad_pixels.mean() < 0.02
    # Away from the calibration temperature the dark level moves (warm-up drift).
    warm = sim.sensor_maps(38.0)
    assert warm.meta["sensor_temp_c"] == 38.0 and warm.dark.mean() > maps.dark.mean() + 10.0


def test_other_frame_shapes():
    s = ScannerSimulator(seed=0, identities=2, shape=(96, 160))
    f = s.render(1, 1, 1)
    assert f.data.shape == (96, 160) and s.sensor_maps().shape == (96, 160)


def test_stream_seq_time_and_temperature_drift():
    s = ScannerSimulator(seed=1, identities=3, start_time_ns=1000, nominal_fps=100.0)
    frames = [s.next_frame() for _ in range(12)]
    assert [f.seq for f in frames] == list(range(12))
    assert [f.header.t_capture_ns for f in frames] == [1000 + i * 10_000_000 for i in range(12)]
    assert all(f.truth.concealed for f in frames)
    assert s.temperature_at(3000) > s.temperature_at(0) + 1.0  # warms up
    assert ScannerSimulator(drift=False).temperature_at(3000) == pytest.approx(35.0)


def test_distinct_identities(sim):
    heads = [sim.identity_params(i) for i in range(24)]
    assert len(set(heads)) == 24
    # Without pose jitter two captures of one person have the same scene; two people never do.
    no_jitter = replace(
        sim.config, jitter_angle_deg=0.0, jitter_roll_deg=0.0, jitter_shift_px=0.0, jitter_scale=0.0
    )
    still = ScannerSimulator(
        seed=sim.seed, identities=sim.identities, start_time_ns=sim.start_time_ns, config=no_jitter
    )
    clean = [np.log1p(still.render(i, 0, 1, concealed=False).truth.clean) for i in range(24)]
    np.testing.assert_array_equal(np.log1p(still.render(0, 0, 2, concealed=False).truth.clean), clean[0])
    diffs = [np.abs(clean[i] - clean[j]).mean() for i in range(24) for j in range(i + 1, 24)]
    assert min(diffs) > 0.1 * np.mean(diffs) > 0.0


def test_concealment_attenuates_and_speckle_is_sparse(sim):
    conc = sim.render(5, 0, 4, concealed=True).truth
    bare = sim.render(5, 0, 4, concealed=False).truth
    face = bare.clean > 0.05 * bare.clean.max()
    assert conc.clean[face].sum() < 0.8 * bare.clean[face].sum()
    # Specular: a small part of the head returns most of the power.
    head = bare.clean > 1.0
    top = np.sort(bare.clean[head])[::-1]
    assert top[: len(top) // 10].sum() > 0.5 * top.sum()


def test_claimed_identity_with_impostors():
    s = ScannerSimulator(seed=4, identities=5, claim_identity=True, impostor_rate=0.5)
    frames = [s.next_frame() for _ in range(300)]
    claims = [(f.header.claimed_identity, f.truth.identity_name) for f in frames]
    assert all(c is not None for c, _ in claims)
    genuine = sum(c == t for c, t in claims)
    assert 0 < genuine < 300


def test_stream_frames_carry_their_visit_and_one_person_and_claim_per_visit():
    s = ScannerSimulator(seed=4, identities=5, claim_identity=True, impostor_rate=0.5)
    frames = [s.next_frame() for _ in range(400)]
    visits = np.array([f.header.visit for f in frames])
    assert visits[0] == 0 and set(np.diff(visits)) <= {0, 1}  # numbered in order, no gaps
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, visits, visits[-1] + 1])))
    assert runs[:-1].min() >= 8 and runs.max() < 40  # visits last 8-39 frames (the last is cut)
    for v in np.unique(visits):
        mine = [f for f, k in zip(frames, visits, strict=True) if k == v]
        assert len({f.truth.identity for f in mine}) == 1
        assert len({f.header.claimed_identity for f in mine}) == 1  # a claim is made per passage
    claims = {
        v: (f.header.claimed_identity, f.truth.identity_name) for f, v in zip(frames, visits, strict=True)
    }
    genuine = sum(c == t for c, t in claims.values())
    assert 0 < genuine < len(claims)
    # Renders and calibration scenes are not visits.
    assert s.render(0, 0, 1).header.visit is None
    assert ScannerSimulator(seed=4, scene="dark").next_frame().header.visit is None


def test_invalid_arguments():
    s = ScannerSimulator(seed=0, identities=2)
    with pytest.raises(ValueError):
        s.render(2, 0, 1)
    with pytest.raises(ValueError):
        s.render(0, 5, 1)
    with pytest.raises(ConfigError, match="identities"):
        ScannerSimulator(identities=0)
    with pytest.raises(ConfigError, match="impostor_rate"):
        ScannerSimulator(impostor_rate=2.0)


def test_speckle_has_unit_mean_and_l_look_contrast():
    s = ScannerSimulator(seed=9, identities=2)
    ratios = []
    for n in range(1, 7):
        t = s.render(0, 0, n, concealed=False).truth
        m = t.clean > 100.0
        ratios.append(t.power[m] / t.clean[m])
    r = np.concatenate(ratios)
    looks = s.config.looks
    assert r.mean() == pytest.approx(1.0, abs=0.08)
    assert r.std() == pytest.approx(1.0 / np.sqrt(looks), rel=0.2)


def test_calibration_scenes_share_the_sensor_and_are_deterministic() -> None:
    from scanner_io.simulator import DEFECT_CLASSES, SceneTruth, full_defects_config

    sim = ScannerSimulator(seed=2, config=full_defects_config(), scene="dark")
    a = [sim.next_frame() for _ in range(3)]
    again = ScannerSimulator(seed=2, config=full_defects_config(), scene="dark")
    assert all(np.array_equal(f.data, again.next_frame().data) for f in a)
    assert isinstance(a[0].truth, SceneTruth) and a[0].truth.power.max() == 0.0
    maps = sim.defect_maps()
    assert tuple(maps) == DEFECT_CLASSES
    stacked = np.stack(list(maps.values()))
    assert (stacked.sum(axis=0) <= 1).all(), "a pixel belongs to one class"
    assert np.array_equal(stacked.any(axis=0), sim.sensor_maps().bad_pixels)
    good = ~sim.sensor_maps().bad_pixels
    dark = np.stack([f.data for f in a]).astype(np.float32)
    assert abs(float(np.median(dark[:, good])) - 1500.0) < 30.0
    assert (dark[:, maps["stuck"]] == 65535).all()
    flat = ScannerSimulator(seed=2, config=full_defects_config(), scene="flat", level=0.5).next_frame()
    assert 9000 < float(np.median(flat.data[good])) < 13000
    # The default sensor has none of the optional classes: today's frames are unchanged.
    default = ScannerSimulator(seed=2).defect_maps()
    assert not default["noisy"].any() and not default["stuck"].any()


def test_forced_drift_moves_dark_and_gain() -> None:
    base = ScannerSimulator(seed=1, scene="dark", drift=False).next_frame()
    warm = ScannerSimulator(seed=1, scene="dark", drift=False, temp_offset_c=3.0).next_frame()
    assert warm.header.sensor_temp_c == base.header.sensor_temp_c + 3.0
    good = ~base.truth.bad_pixels
    shift = float(np.median(warm.data[good].astype(np.float32) - base.data[good]))
    assert 25.0 < shift < 35.0  # ≈ 10 counts/°C
    flat = ScannerSimulator(seed=1, scene="flat", drift=False).next_frame()
    more = ScannerSimulator(seed=1, scene="flat", drift=False, gain_drift=0.1).next_frame()
    ratio = (more.data[good].astype(np.float32) - base.data[good]) / (
        flat.data[good].astype(np.float32) - base.data[good]
    )
    assert abs(float(np.median(ratio)) - 1.1) < 0.01


def test_sim_uri_scene_parameters() -> None:
    from scanner_io.errors import ConfigError
    from scanner_io.sources import open_source

    src = open_source("sim?scene=flat&level=0.5&temp_offset_c=-2&gain_drift=-0.05&defects=full&start=10")
    try:
        frame = src.read(1.0)
    finally:
        src.close()
    assert frame.header.sensor_temp_c < 34.0
    for bad in ("sim?scene=moon", "sim?defects=all", "sim?temp_offset_c=warm", "sim?gain_drift=-2"):
        with pytest.raises(ConfigError):
            open_source(bad).close()


def test_a_session_is_another_capture_of_the_same_people():
    """session= changes pose jitter, clothing, speckle and sensor temperature, never the person."""
    from scanner_io.simulator import SESSION_TEMP_RANGE_C

    a = ScannerSimulator(seed=4, identities=1)
    b = ScannerSimulator(seed=4, identities=1, session=3)
    assert a.session_temp_c == 0.0 and SESSION_TEMP_RANGE_C[0] <= b.session_temp_c <= SESSION_TEMP_RANGE_C[1]
    assert b.session_temp_c != 0.0
    assert a.identity_params(0) == b.identity_params(0)  # the same head
    fa, fb = a.next_frame(), b.next_frame()
    assert fa.truth.identity == fb.truth.identity == 0
    assert fa.truth.sample != fb.truth.sample  # another capture: own pose, cloth and speckle draws
    assert fb.header.sensor_temp_c == pytest.approx(a.temperature_at(0) + b.session_temp_c, abs=1e-3)
    # Two sessions never share a stream sample, however long they run.
    assert ScannerSimulator(seed=4, session=1)._stream_index == 0
    c = ScannerSimulator(seed=4, identities=1, session=3)
    assert c.next_frame().data.tobytes() == fb.data.tobytes()  # still deterministic


def test_sim_uri_people_sessions_and_claims():
    from scanner_io.errors import ConfigError
    from scanner_io.sources import open_source

    with open_source("sim?seed=2&identity=7&frames=12&session=2") as src:
        frames = list(src)
        maps = src.sensor_maps()
        sim = src.simulator
    assert {f.truth.identity for f in frames} == {7} and {f.truth.identity_name for f in frames} == {"id008"}
    assert all(f.header.claimed_identity is None for f in frames)
    # The profile the source carries is that session's calibration (a site calibrates each day).
    np.testing.assert_array_equal(
        maps.dark, sim.sensor_maps(sim.config.reference_temp_c + sim.session_temp_c).dark
    )
    with open_source("sim?seed=2&identities=3,5,9-10&frames=150") as src:
        assert src.simulator.people == (3, 5, 9, 10)
        seen = {f.truth.identity for f in src}
    assert seen <= {3, 5, 9, 10} and len(seen) >= 2
    with open_source("sim?seed=2&identities=4&claim=1&frames=20") as src:
        assert all(f.header.claimed_identity == f.truth.identity_name for f in src)
    with open_source("sim?seed=2&identities=20-23&claim=1&impostor_rate=1&frames=20") as src:
        frames = list(src)
    claims = {f.header.claimed_identity for f in frames}
    assert all(f.header.claimed_identity != f.truth.identity_name for f in frames)
    assert claims <= {"id021", "id022", "id023", "id024"}
    with open_source("sim?seed=2&identities=3&claim=1&impostor_rate=0.5&frames=600") as src:
        # Claims are made per visit: count visits.
        visits = {f.header.visit: f.header.claimed_identity != f.truth.identity_name for f in src}
    assert len(visits) > 15 and 0.25 < np.mean(list(visits.values())) < 0.75
    for bad in (
        "sim?identities=abc",
        "sim?identities=5-2",
        "sim?identity=2&identities=3,4",
        "sim?claim=2",
        "sim?impostor_rate=1.5",
        "sim?session=-1",
    ):
        with pytest.raises(ConfigError):
            open_source(bad).close()
