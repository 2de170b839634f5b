"""Gallery: distances and decisions, bundle binding, 0600 files, no identities in logs; `thzedge enroll`."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pytest

from edge.gallery import Gallery, Match
from scanner_io.errors import ConfigError, DataError, ThzEdgeError

DIM = 8


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def axis(i: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i] = 1
    return v


@pytest.fixture
def gallery() -> Gallery:
    g = Gallery("a" * 64, DIM, threshold=0.5)
    g.enroll("alice", np.stack([axis(0), unit(axis(0) + 0.2 * axis(1))]))
    g.enroll("bob", axis(2)[None])
    return g


def test_template_is_normalised_mean_and_score_is_euclidean(gallery):
    probe = unit(axis(0) + 0.1 * axis(3))
    template = unit(axis(0) + unit(axis(0) + 0.2 * axis(1)))
    expected = float(np.linalg.norm(template - probe))
    m = gallery.match_1to1(probe, "alice")
    assert m.score == pytest.approx(expected, abs=1e-6)
    assert m.decision == "accept" and m.threshold == 0.5 and m.mode == "1:1"
    d = gallery.distances(probe)
    assert gallery.identities == ("alice", "bob")
    assert d[1] == pytest.approx(np.sqrt(2), abs=1e-6)  # orthogonal unit vectors


def test_1to1_decisions(gallery):
    assert gallery.match_1to1(axis(2), "alice").decision == "reject"
    assert gallery.match_1to1(axis(2), "bob").decision == "accept"
    unknown = gallery.match_1to1(axis(2), "carol")
    assert (unknown.decision, unknown.score, unknown.identity) == ("unknown", None, "carol")


def test_threshold_boundary_accepts_at_equality():
    g = Gallery("b" * 64, 2, threshold=None)
    g.enroll("x", np.array([[1.0, 0.0]]))
    probe = unit([1.0, 1.0])
    d = float(np.linalg.norm(np.array([1.0, 0.0]) - probe))
    g.threshold = d
    assert g.match_1to1(probe, "x").decision == "accept"
    g.threshold = d - 1e-4
    assert g.match_1to1(probe, "x").decision == "reject"


def test_1toN_returns_best_within_threshold_else_unknown_without_name(gallery):
    m = gallery.match_1toN(unit(axis(2) + 0.1 * axis(5)))
    assert (m.identity, m.decision, m.mode) == ("bob", "accept", "1:N")
    far = gallery.match_1toN(axis(7))
    assert far.decision == "unknown" and far.identity is None
    assert far.score == pytest.approx(np.sqrt(2), abs=1e-6)
    empty = Gallery("c" * 64, DIM, threshold=0.5)
    assert empty.match_1toN(axis(0)).decision == "unknown"


def test_probe_is_normalised_and_checked(gallery):
    assert gallery.match_1to1(axis(2) * 7.0, "bob").score == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DataError, match=r"expected \[k, 8\]"):
        gallery.match_1toN(np.zeros(5))
    with pytest.raises(DataError, match="NaN"):
        gallery.match_1toN(np.full(DIM, np.nan))
    with pytest.raises(DataError, match="zero embedding"):
        gallery.enroll("z", np.zeros((1, DIM)))


def test_no_threshold_is_a_config_error():
    g = Gallery("d" * 64, DIM, threshold=None)
    g.enroll("x", axis(0)[None])
    with pytest.raises(ConfigError, match=r"\[verification\] threshold"):
        g.match_1toN(axis(0))


def test_enroll_appends_or_replaces_and_remove(gallery):
    assert gallery.enroll("bob", axis(3)[None]) == 2
    assert gallery.enroll("bob", axis(3)[None], replace=True) == 1
    assert gallery.match_1to1(axis(3), "bob").decision == "accept"
    assert gallery.remove("bob") and not gallery.remove("bob")
    assert gallery.identities == ("alice",)
    with pytest.raises(ThzEdgeError, match="non-empty"):
        gallery.enroll(" ", axis(0)[None])


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_save_is_owner_only_and_round_trips(gallery, tmp_path, umask):
    old = os.umask(umask)
    try:
        path = gallery.save(tmp_path / "g" / "gallery.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob(".*tmp"))  # the temp file was renamed, not left behind
    loaded = Gallery.load(path, threshold=0.5)
    assert loaded.identities == gallery.identities
    assert loaded.reference_count("alice") == 2
    probe = unit(axis(0) + 0.3 * axis(4))
    assert loaded.match_1to1(probe, "alice").score == pytest.approx(gallery.match_1to1(probe, "alice").score)
    np.testing.assert_allclose(loaded.distances(probe), gallery.distances(probe), atol=1e-6)


def test_gallery_of_another_bundle_is_refused(gallery, tmp_path):
    class OtherBundle:  # only what Gallery.load reads from a Bundle
        sha256 = "f" * 64
        embedding_dim = DIM

        def threshold(self, precision: str = "fp32") -> float | None:
            return 0.4

    path = gallery.save(tmp_path / "g.npz")
    with pytest.raises(ConfigError, match="enrolled with model bundle aaaaaaaaaaaa.*re-enrol"):
        Gallery.load(path, OtherBundle())


def test_bundle_threshold_is_used_and_a_missing_one_refused(gallery, tmp_path):
    class SameBundle:
        sha256 = "a" * 64
        embedding_dim = DIM

        def __init__(self, t):
            self.t = t

        def threshold(self, precision: str = "fp32") -> float | None:
            return self.t.get(precision)

    path = gallery.save(tmp_path / "g.npz")
    assert Gallery.load(path, SameBundle({"int8": 0.7}), precision="int8").threshold == 0.7
    assert Gallery.load(path, SameBundle({"int8": 0.7}), threshold=0.2, precision="int8").threshold == 0.2
    with pytest.raises(ConfigError, match=r"no verification threshold for fp32.*\[verification\] threshold"):
        Gallery.load(path, SameBundle({}))
    assert Gallery.load(path, SameBundle({}), require_threshold=False).threshold is None


def test_bad_files_are_data_errors(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a thzedge gallery"):
        Gallery.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(DataError, match="not a thzedge gallery"):
        Gallery.load(other)
    with pytest.raises(ConfigError, match="does not exist"):
        Gallery.load(tmp_path / "missing.npz")


def test_identities_never_reach_logs_or_reprs(gallery, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        path = gallery.save(tmp_path / "g.npz")
        g = Gallery.load(path, threshold=0.5)
        m = g.match_1toN(axis(2))
        text = caplog.text + repr(g) + repr(m)
    assert m.identity == "bob"
    for name in ("alice", "bob"):
        assert name not in text


def test_match_feeds_the_result_header(gallery):
    m = gallery.match_1to1(axis(2), "bob")
    assert isinstance(m, Match)
    assert m.to_dict() == {
        "mode": "1:1",
        "identity": "bob",
        "score": m.score,
        "decision": "accept",
        "threshold": 0.5,
    }


# --- thzedge enroll with a real bundle and the real ONNX Runtime runner -----------------------


def test_enroll_cli_then_match_with_the_runner(tiny_bundle, tmp_path, capsys, caplog):
    from edge.bundle import Bundle
    from edge.cli import main
    from edge.runner import Runner

    rng = np.random.default_rng(0)
    alice = rng.random((3, 64, 64), dtype=np.float32)
    bob = rng.random((2, 64, 64), dtype=np.float32)
    np.save(tmp_path / "alice.npy", alice)
    np.save(tmp_path / "bob.npy", bob)
    gallery = tmp_path / "gallery.npz"
    with caplog.at_level(logging.INFO):
        for name in ("alice", "bob"):
            code = main(
                [
                    "enroll",
                    "--model",
                    str(tiny_bundle),
                    "--gallery",
                    str(gallery),
                    "--identity",
                    name,
                    "--backend",
                    "ort",
                    str(tmp_path / f"{name}.npy"),
                ]
            )
            assert code == 0
    out = capsys.readouterr().out
    assert "enrolled 2 embedding(s); 'bob' now has 2" in out
    assert "alice" not in caplog.text and "bob" not in caplog.text
    assert stat.S_IMODE(gallery.stat().st_mode) == 0o600

    bundle = Bundle.open(tiny_bundle)
    g = Gallery.load(gallery, bundle, threshold=0.3)
    assert g.bundle_sha256 == bundle.sha256 and g.identities == ("alice", "bob")
    with Runner.from_bundle(bundle, backend="ort") as runner:
        emb = runner.encode(alice[:, None]).embedding
    # The stored references are exactly what the runner gives for the same conditioned input.
    template = emb.mean(axis=0)
    template /= np.linalg.norm(template)
    m = g.match_1to1(template, "alice")
    assert m.decision == "accept" and m.score == pytest.approx(0.0, abs=1e-5)

    # gallery info hides names unless asked
    assert main(["gallery", "info", str(gallery)]) == 0
    info = capsys.readouterr().out
    assert "identities: 2" in info and "alice" not in info
    assert main(["gallery", "remove", str(gallery), "--identity", "bob"]) == 0
    assert Gallery.load(gallery).identities == ("alice",)
    capsys.readouterr()
    assert (
        main(["enroll", "--model", str(tiny_bundle), "--gallery", str(gallery), str(tmp_path / "bob.npy")])
        == 1
    )
    assert "--identity NAME is required" in capsys.readouterr().err


def test_enroll_from_raw_frames_uses_the_daemons_conditioning(tiny_bundle, tmp_path, capsys):
    """--source: frames go through calibrate_and_condition, the function the daemon uses, with the
    profile the daemon would pick (here the simulator's true sensor maps)."""
    from calibration.conditioning import calibrate_and_condition
    from calibration.profile import profile_carried_by
    from edge.bundle import Bundle
    from edge.cli import main
    from edge.runner import Runner
    from scanner_io.sources import open_source

    gallery = tmp_path / "g.npz"
    code = main(
        [
            "enroll",
            "--model",
            str(tiny_bundle),
            "--gallery",
            str(gallery),
            "--identity",
            "sim-7",
            "--source",
            "sim?seed=7&frames=3",
            "--frames",
            "2",
            "--backend",
            "ort",
        ]
    )
    assert code == 0, capsys.readouterr().err
    src = open_source("sim?seed=7&frames=3")
    try:
        frames = [src.read(1.0) for _ in range(2)]
        profile, _ = profile_carried_by(src)
    finally:
        src.close()
    x = np.stack([calibrate_and_condition(f.data, profile) for f in frames])[:, None].astype(np.float32)
    with Runner.from_bundle(Bundle.open(tiny_bundle), backend="ort") as runner:
        emb = runner.encode(x).embedding
    t = emb.mean(axis=0)
    t /= np.linalg.norm(t)
    m = Gallery.load(gallery, threshold=0.1).match_1to1(t, "sim-7")
    assert m.score == pytest.approx(0.0, abs=1e-5)


def test_daemon_publishes_the_gallerys_decision_for_each_frame(tiny_bundle, tmp_path, caplog):
    """In-process daemon run: each result's verification equals Gallery.match_1toN on its embedding."""
    import time

    import zmq

    from edge.daemon import RunOptions, run_daemon
    from edge.gallery import enroll_from_source
    from edge.results import decode_message

    gpath = tmp_path / "gallery.npz"
    enroll_from_source(gpath, tiny_bundle, "person-alpha", "sim?seed=3&frames=2", 2, backend="ort")
    enroll_from_source(gpath, tiny_bundle, "person-bravo", "sim?seed=9&frames=2", 2, backend="ort")
    endpoint = f"ipc://{tmp_path}/run/results.sock"
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(
        f'[publisher]\nendpoint = "{endpoint}"\n[metrics]\nenabled = false\n'
        "[privacy]\npublish_embedding = true\n"
        f'[verification]\nmode = "1:N"\ngallery = "{gpath}"\nthreshold = 0.4\n'
    )
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"result/")

    daemons = []

    def on_ready(daemon) -> None:
        daemons.append(daemon)
        sub.connect(endpoint)
        time.sleep(0.5)  # let the subscription reach the publisher before the first result

    caplog.set_level(logging.DEBUG)
    try:
        run_daemon(
            RunOptions(
                source="sim?seed=3&frames=6",
                model=tiny_bundle,
                config=cfg,
                backend="ort",
                max_frames=6,
                reconstruction=False,
            ),
            on_ready=on_ready,
        )
        results = []
        while sub.poll(500):
            results.append(decode_message(sub.recv_multipart()))
    finally:
        sub.close()
        ctx.term()
    assert len(results) == 6
    g = Gallery.load(gpath, threshold=0.4)
    decisions = set()
    for r in results:
        v = r.header["verification"]
        expected = g.match_1toN(r.arrays["embedding"].reshape(-1))
        assert v["mode"] == "1:N" and v["threshold"] == 0.4
        assert v["decision"] == expected.decision and v["identity"] == expected.identity
        assert v["score"] == pytest.approx(expected.score, abs=1e-5)
        decisions.add(v["decision"])
    # The two enrolled frames of seed 3 match "person-alpha"; the later ones are farther than 0.4.
    assert decisions == {"accept", "unknown"}
    assert {r.header["verification"]["identity"] for r in results} == {"person-alpha", None}
    # R-SEC-5: identities reach the result only, never the logs or the metrics.
    scrape = daemons[0].metrics.impl.render().decode()
    assert "thzedge_frames_processed_total 6.0" in scrape
    for name in ("person-alpha", "person-bravo"):
        assert name not in scrape
        assert name not in caplog.text
