"""Gallery: distances and decisions, bundle binding, 0600 files, no identities in logs; `thzedge enroll`."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pytest

from edge.gallery import Gallery, Match, enroll_from_source
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


def test_decisions_from_precomputed_scores_equal_the_matches(gallery):
    from edge.gallery import VerificationMode, match_probe

    for probe in (axis(0), unit(axis(0) + axis(2)), axis(5)):
        sc = gallery.scores(probe)
        assert sc.names == gallery.identities
        np.testing.assert_array_equal(sc.distances, gallery.distances(probe))
        assert gallery.decide_1toN(sc) == gallery.match_1toN(probe)
        for who in ("alice", "bob", "carol"):
            assert gallery.decide_1to1(sc, who) == gallery.match_1to1(probe, who)
            for mode in VerificationMode:
                claim = None if mode is VerificationMode.one_to_n else who
                assert match_probe(gallery, probe, claim, -1, mode, sc) == match_probe(
                    gallery, probe, claim, -1, mode
                )
    # Another threshold decides the same distances differently.
    sc = gallery.scores(unit(axis(0) + axis(2)))
    assert gallery.decide_1toN(sc).decision == "unknown"
    assert gallery.decide_1toN(sc, threshold=1.0).decision == "accept"


def test_score_is_euclidean_to_the_nearest_reference_without_postures(gallery):
    probe = unit(axis(0) + 0.1 * axis(3))
    refs = [axis(0), unit(axis(0) + 0.2 * axis(1))]
    expected = min(float(np.linalg.norm(r - probe)) for r in refs)  # not the mean template's distance
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
    assert g.distances(probe)[0] == pytest.approx(d, abs=1e-7)  # the Euclidean distance ...
    d = float(g.distances(probe)[0])  # ... and exactly the score the decision compares
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


def test_probe_is_compared_with_the_reference_of_its_predicted_posture():
    g = Gallery("c" * 64, DIM, threshold=0.5)
    g.enroll("carl", np.stack([axis(0), axis(1)]), postures=[0, 1])  # Front, Left
    g.enroll("dana", axis(2)[None], postures=[0])
    probe = unit(axis(1) + 0.1 * axis(5))
    to_front, to_left = (float(np.linalg.norm(probe - axis(i))) for i in (0, 1))
    assert g.enrolled_postures("carl") == (0, 1)
    # Posture 0 (Front): carl's Front reference, although his Left one is nearer.
    assert g.match_1to1(probe, "carl", posture=0).score == pytest.approx(to_front, abs=1e-6)
    assert g.match_1to1(probe, "carl", posture=0).decision == "reject"
    assert g.match_1to1(probe, "carl", posture=1).score == pytest.approx(to_left, abs=1e-6)
    assert g.match_1to1(probe, "carl", posture=1).decision == "accept"
    # Fallback: a posture carl never enrolled (Up), or no posture at all -> his nearest reference.
    assert g.match_1to1(probe, "carl", posture=3).score == pytest.approx(to_left, abs=1e-6)
    assert g.match_1to1(probe, "carl").score == pytest.approx(to_left, abs=1e-6)
    # 1:N uses the same rule for every identity.
    np.testing.assert_allclose(
        g.distances(probe, posture=0), [to_front, np.linalg.norm(probe - axis(2))], atol=1e-6
    )
    assert g.match_1toN(probe, posture=1).identity == "carl"
    assert g.match_1toN(probe, posture=0).decision == "unknown"
    # Appending keeps each reference's posture; replacing drops the old ones.
    g.enroll("dana", axis(3)[None], postures=[2])
    assert g.enrolled_postures("dana") == (0, 2)
    g.enroll("dana", axis(3)[None], replace=True)
    assert g.enrolled_postures("dana") == (-1,)


def test_bad_enrolment_postures_are_data_errors(gallery):
    with pytest.raises(DataError, match="postures must be 0..4"):
        gallery.enroll("x", axis(0)[None], postures=[5])
    with pytest.raises(DataError, match="expected 2 integer postures"):
        gallery.enroll("x", np.stack([axis(0), axis(1)]), postures=[0])
    assert "x" not in gallery


def test_postures_round_trip_and_a_format_1_file_is_read_by_nearest_reference(tmp_path, caplog):
    import json

    g = Gallery("d" * 64, DIM, threshold=0.5)
    g.enroll("carl", np.stack([axis(0), axis(1)]), postures=[0, 1])
    path = g.save(tmp_path / "g.npz")
    with np.load(path) as z:
        assert json.loads(str(z["meta"]))["format"] == 3 and z["postures"].tolist() == [0, 1]
    loaded = Gallery.load(path, threshold=0.5)
    assert loaded.enrolled_postures("carl") == (0, 1)
    assert loaded.match_1to1(axis(1), "carl", posture=0).score == pytest.approx(np.sqrt(2), abs=1e-6)

    # A file of format 1 (no postures; it matched by mean template) is read, with every posture
    # unknown, so it matches by the nearest reference; saving it writes format 3.
    old = tmp_path / "old.npz"
    meta = {
        "format": 1,
        "kind": "thzedge-gallery",
        "bundle_sha256": "d" * 64,
        "embedding_dim": DIM,
        "precision": "fp32",
        "identities": ["carl"],
        "created": "2026-11-01T00:00:00+00:00",
    }
    np.savez(
        old,
        embeddings=np.stack([axis(0), axis(1)]),
        labels=np.zeros(2, np.int32),
        meta=np.array(json.dumps(meta)),
    )
    with caplog.at_level(logging.WARNING):
        v1 = Gallery.load(old, threshold=0.5)
    assert "format 1" in caplog.text and "re-enrol" in caplog.text
    assert v1.enrolled_postures("carl") == (-1,)
    assert v1.match_1to1(axis(1), "carl", posture=0).score == pytest.approx(0.0, abs=1e-6)
    with np.load(v1.save(tmp_path / "new.npz")) as z:
        assert json.loads(str(z["meta"]))["format"] == 3
    meta["format"] = 4
    np.savez(
        old, embeddings=np.stack([axis(0)]), labels=np.zeros(1, np.int32), meta=np.array(json.dumps(meta))
    )
    with pytest.raises(DataError, match="format 1 or 2 or 3 .found 4.; re-enrol"):
        Gallery.load(old)


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
        encoder_sha256 = "e" * 64
        embedding_dim = DIM

        def threshold(self, precision: str = "fp32") -> float | None:
            return 0.4

    path = gallery.save(tmp_path / "g.npz")
    with pytest.raises(
        ConfigError, match="enrolled with encoder aaaaaaaaaaaa.*encoder is eeeeeeeeeeee.*re-enrol"
    ):
        Gallery.load(path, OtherBundle())


def test_bundle_threshold_is_used_and_a_missing_one_refused(gallery, tmp_path):
    class SameBundle:
        sha256 = "a" * 64
        encoder_sha256 = "a" * 64
        embedding_dim = DIM

        def __init__(self, t):
            self.t = t

        def threshold(self, precision: str = "fp32") -> float | None:
            return self.t.get(precision)

        def accuracy_gate(self, precision: str) -> dict | None:
            return {"passed": True, "lines": []}

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
    assert "postures enrolled: " in out and "missing: " in out  # 2-3 crops cannot cover 5 postures
    assert "alice" not in caplog.text and "bob" not in caplog.text
    assert stat.S_IMODE(gallery.stat().st_mode) == 0o600

    bundle = Bundle.open(tiny_bundle)
    g = Gallery.load(gallery, bundle, threshold=0.3)
    assert g.bundle_sha256 == bundle.sha256 and g.identities == ("alice", "bob")
    with Runner.from_bundle(bundle, backend="ort") as runner:
        enc = runner.encode(alice[:, None])
    emb, post = enc.embedding, enc.posture_logits.argmax(axis=1)
    # The stored references (and their postures) are exactly what the runner gives for the same
    # conditioned input: each one matches itself at distance 0.
    assert g.enrolled_postures("alice") == tuple(sorted({int(p) for p in post}))
    for e, p in zip(emb, post, strict=True):
        m = g.match_1to1(e, "alice", posture=int(p))
        assert m.decision == "accept" and m.score == pytest.approx(0.0, abs=1e-5)

    # gallery info hides names unless asked
    assert main(["gallery", "info", str(gallery)]) == 0
    info = capsys.readouterr().out
    assert "identities: 2" in info and "alice" not in info
    assert "template: none (plaintext embeddings" in info
    assert main(["gallery", "info", "--names", str(gallery)]) == 0
    assert "alice: 3 reference(s); postures " in capsys.readouterr().out
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
    # Enrolment from the simulator reads the enrolment session unless the URI names one.
    src = open_source("sim?seed=7&frames=3&session=1")
    try:
        frames = [src.read(1.0) for _ in range(2)]
        profile, _ = profile_carried_by(src)
    finally:
        src.close()
    x = np.stack([calibrate_and_condition(f.data, profile) for f in frames])[:, None].astype(np.float32)
    with Runner.from_bundle(Bundle.open(tiny_bundle), backend="ort") as runner:
        enc = runner.encode(x)
    g = Gallery.load(gallery, threshold=0.1)
    for e, p in zip(enc.embedding, enc.posture_logits.argmax(axis=1), strict=True):
        assert g.match_1to1(e, "sim-7", posture=int(p)).score == pytest.approx(0.0, abs=1e-5)


def test_daemon_publishes_the_gallerys_decision_for_each_frame(tiny_bundle, tmp_path, caplog):
    """In-process daemon run: each result's verification equals Gallery.match_1toN on its embedding."""
    import time

    import zmq

    from edge.gallery import enroll_from_source
    from edge.pipeline.assemble import RunOptions, run_daemon
    from edge.results import decode_message

    gpath = tmp_path / "gallery.npz"
    # session=0: the very frames the daemon then streams, so some probes must be accepted.
    enroll_from_source(gpath, tiny_bundle, "person-alpha", "sim?seed=3&frames=2&session=0", 2, backend="ort")
    enroll_from_source(gpath, tiny_bundle, "person-bravo", "sim?seed=9&frames=2&session=0", 2, backend="ort")
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
        # The daemon matches with the frame's predicted posture (the result header's posture).
        expected = g.match_1toN(r.arrays["embedding"].reshape(-1), posture=r.header["posture"]["index"])
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


# docs/operations.md, "Gallery and enrolment": measured with the demo bundle on this set
# (simulator seed 7, people the demo never saw; 6 identities; enrolment = 3 concealed renders per
# posture, samples 100-102; probes = concealed renders of samples 1-2: 60 genuine claims, 300
# impostor claims; fp32 stored threshold 0.2873, FAR 1 % on validation gallery pairs): GAR 0.767
# (46/60), FAR 0.007 (2/300), 1:N correct 0.767; the format-1 mean template accepted none (0/60)
# of the same genuine probes.
DEMO_SET = {"seed": 7, "identities": 6, "enrol_samples": (100, 101, 102), "probe_samples": (1, 2)}
DEMO_FIGURES = {"gar": 0.767, "far": 0.007, "id_correct": 0.767, "gar_mean_template": 0.0}


def test_demo_bundle_accepts_most_genuine_probes_and_rejects_impostors():
    from calibration.conditioning import calibrate_and_condition
    from calibration.simulated import true_profile
    from edge.bundle import Bundle, demo_bundle_path
    from edge.runner import Runner
    from scanner_io.simulator import ScannerSimulator

    n = DEMO_SET["identities"]
    sim = ScannerSimulator(seed=DEMO_SET["seed"], identities=n)
    profile = true_profile(sim)  # the daemon's path: true sensor maps, calibrate_and_condition

    def crops(samples):
        keys = [(i, p, s) for i in range(n) for p in range(5) for s in samples]
        x = [calibrate_and_condition(sim.render(i, p, s, concealed=True).data, profile) for i, p, s in keys]
        return np.stack(x)[:, None].astype(np.float32), np.array([k[0] for k in keys])

    bundle = Bundle.open(demo_bundle_path())
    (ex, eid), (px, pid) = crops(DEMO_SET["enrol_samples"]), crops(DEMO_SET["probe_samples"])
    with Runner.from_bundle(bundle, backend="ort") as runner:
        enrol, probe = runner.infer(ex, reconstruct=False), runner.infer(px, reconstruct=False)
    g = Gallery.for_bundle(bundle)
    assert g.threshold == pytest.approx(0.2873, abs=1e-4)  # the stored one, not tuned on this set
    for i in range(n):
        g.enroll(f"person-{i}", enrol.embedding[eid == i], postures=enrol.posture[eid == i])
    genuine, impostor, identified = [], [], []
    for e, p, i in zip(probe.embedding, probe.posture, pid, strict=True):
        for j in range(n):
            accepted = g.match_1to1(e, f"person-{j}", posture=int(p)).decision == "accept"
            (genuine if i == j else impostor).append(accepted)
        identified.append(g.match_1toN(e, posture=int(p)).identity == f"person-{i}")
    gar, far, id_correct = np.mean(genuine), np.mean(impostor), np.mean(identified)
    assert (len(genuine), len(impostor)) == (60, 300)
    assert gar == pytest.approx(DEMO_FIGURES["gar"], abs=0.1) and gar >= 0.7
    assert far == pytest.approx(DEMO_FIGURES["far"], abs=0.03)
    assert id_correct == pytest.approx(DEMO_FIGURES["id_correct"], abs=0.1)
    # The rule is what makes the difference: the old mean template rejects nearly everyone.
    mean_accepted = []
    for e, i in zip(probe.embedding, pid, strict=True):
        t = enrol.embedding[eid == i].mean(axis=0)
        mean_accepted.append(np.linalg.norm(e - t / np.linalg.norm(t)) <= g.threshold)
    assert np.mean(mean_accepted) == pytest.approx(DEMO_FIGURES["gar_mean_template"], abs=0.05)


@pytest.mark.parametrize("claims", [True, False], ids=["1:1", "1:N"])
def test_run_score_matches_the_published_results_against_truth(tiny_bundle, tmp_path, claims):
    """`run --score`: the figures equal those recomputed from the published results and the truth,
    per frame and per visit (one frozen decision from each visit's first 3 frames)."""
    import time

    import zmq

    from edge.pipeline.assemble import RunOptions, run_daemon
    from edge.results import decode_message
    from scanner_io.sources import open_source

    gpath = tmp_path / "gallery.npz"
    # 1:N: id001 and id002 enrolled (session 1), id003 walks past unenrolled; 1:1: all three
    # enrolled, so the impostor claims (of id003 by others) are of an enrolled person.
    for k in (0, 1, 2) if claims else (0, 1):
        enroll_uri = f"sim?seed=7&identity={k}&frames=4"
        enroll_from_source(gpath, tiny_bundle, f"id{k + 1:03d}", enroll_uri, 4, backend="ort")
    # Seed 7's session-0 stream (visits last 8-40 frames): id002, id003, id001; with claims
    # (drawn per visit, so other visits): id002 claiming id003, id002, id001, id001 claiming id003.
    n = 60
    uri = f"sim?seed=7&identities=0-2&frames={n}" + ("&claim=1&impostor_rate=0.5" if claims else "")
    endpoint = f"ipc://{tmp_path}/run/results.sock"
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(
        f'[publisher]\nendpoint = "{endpoint}"\n[metrics]\nenabled = false\n'
        f'[verification]\ngallery = "{gpath}"\nthreshold = 0.3\nvisit_frames = 3\n'
        "visit_threshold = 0.35\nvisit_identify_threshold = 0.32\n"
    )
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"result/")

    def on_ready(daemon) -> None:
        sub.connect(endpoint)
        time.sleep(0.5)

    try:
        summary = run_daemon(
            RunOptions(source=uri, model=tiny_bundle, config=cfg, backend="ort", max_frames=n, score=True),
            on_ready=on_ready,
        )
        results = []
        while sub.poll(500):
            results.append(decode_message(sub.recv_multipart()).header)
    finally:
        sub.close()
        ctx.term()
    with open_source(uri) as src:
        frames = list(src)
    truth = [f.truth for f in frames]
    claimed = [f.header.claimed_identity for f in frames]
    assert len(results) == n
    s = summary.score
    assert s is not None and s["scored"] == n and s["unscored"] == 0 and s["threshold"] == 0.3
    post = [r["posture"]["index"] == t.posture for r, t in zip(results, truth, strict=True)]
    assert s["posture_accuracy"] == pytest.approx(np.mean(post))
    assert s["ssim_frames"] == n and -1.0 <= s["ssim_mean"] <= 1.0
    enrolled = {"id001", "id002", "id003"} if claims else {"id001", "id002"}
    if claims:
        one = s["1:1"]
        pairs = [
            (r["verification"], t.identity_name, c) for r, t, c in zip(results, truth, claimed, strict=True)
        ]
        gen = [v["decision"] == "accept" for v, name, c in pairs if c == name and c in enrolled]
        imp = [v["decision"] == "accept" for v, name, c in pairs if c != name and c in enrolled]
        assert (one["genuine"], one["impostor"]) == (len(gen), len(imp)) and gen and imp
        assert one["claimed_not_enrolled"] == sum(c not in enrolled for _, _, c in pairs)
        assert one["tar"] == pytest.approx(np.mean(gen)) and one["far"] == pytest.approx(np.mean(imp))
    else:
        many = s["1:N"]
        mine = [(r["verification"], t.identity_name) for r, t in zip(results, truth, strict=True)]
        known = [(v, n) for v, n in mine if n in enrolled]
        strangers = [v for v, n in mine if n not in enrolled]
        assert (many["enrolled_probes"], many["unenrolled_probes"]) == (len(known), len(strangers))
        assert known and strangers
        ok = [v["decision"] == "accept" and v["identity"] == n for v, n in known]
        wrong = [v["decision"] == "accept" and v["identity"] != n for v, n in known]
        assert many["identified"] == pytest.approx(np.mean(ok))
        assert many["false_identification"] == pytest.approx(np.mean(wrong))
        assert many["unenrolled_rejected"] == pytest.approx(
            np.mean([v["decision"] != "accept" for v in strangers])
        )
    # Per visit: pending for 2 frames, then one decision repeated to the visit's end.
    decided: dict[int, tuple[dict, str, str | None]] = {}
    for r, f in zip(results, frames, strict=True):
        v = r["verification"]["visit"]
        assert v["id"] == f.header.visit and v["decision_frames"] == 3
        if v["frames"] < 3:
            assert v["decision"] == "pending"
            continue
        assert v["threshold"] == (0.35 if claims else 0.32) and v["decision"] != "pending"
        first = decided.setdefault(v["id"], (v, f.truth.identity_name, f.header.claimed_identity))[0]
        assert {k: v[k] for k in ("identity", "score", "decision")} == {
            k: first[k] for k in ("identity", "score", "decision")
        }
    assert len(decided) == (4 if claims else 3) and s["visits"]["decision_frames"] == 3
    if claims:
        one = s["visits"]["1:1"]
        gen = [v["decision"] == "accept" for v, name, c in decided.values() if c == name]
        imp = [v["decision"] == "accept" for v, name, c in decided.values() if c != name]
        assert (one["genuine"], one["impostor"]) == (len(gen), len(imp)) == (2, 2)
        assert one["tar"] == pytest.approx(np.mean(gen)) and one["far"] == pytest.approx(np.mean(imp))
    else:
        many = s["visits"]["1:N"]
        known = [(v, name) for v, name, _ in decided.values() if name in enrolled]
        assert (many["enrolled_probes"], many["unenrolled_probes"]) == (2, 1)
        ok = [v["decision"] == "accept" and v["identity"] == name for v, name in known]
        assert many["identified"] == pytest.approx(np.mean(ok))
        strangers = [v["decision"] != "accept" for v, name, _ in decided.values() if name not in enrolled]
        assert many["unenrolled_rejected"] == pytest.approx(np.mean(strangers))


def test_enrolment_skips_frames_without_a_face_and_refuses_a_capture_of_none(tiny_bundle, tmp_path, capsys):
    from edge.cli import main

    gallery = tmp_path / "g.npz"
    args = ["enroll", "--model", str(tiny_bundle), "--gallery", str(gallery), "--identity", "id001"]
    # The shutter closed: every frame is blank, so nothing is enrolled.
    assert main([*args, "--source", "sim?scene=dark&frames=6", "--frames", "2", "--backend", "ort"]) == 1
    err = capsys.readouterr().err
    assert "ended after 0 of 2 frames with a face" in err and "blank 6" in err
    assert not gallery.exists()
    assert (
        main([*args, "--source", "sim?seed=3&identity=0&frames=4", "--frames", "2", "--backend", "ort"]) == 0
    )
    out, err = capsys.readouterr()
    assert "no template key" in err and "no verification threshold for fp32 yet" in err
    assert "plaintext" in out and "postures enrolled" in out
