"""Visit decisions: fused from a visit's first frames, frozen, per scanner, bounded."""

from __future__ import annotations

import numpy as np
import pytest

from edge.gallery import Gallery, VerificationMode
from edge.visits import VisitFusion

DIM = 8
AUTO, ONE, MANY = VerificationMode.auto, VerificationMode.one_to_one, VerificationMode.one_to_n


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


def axis(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1
    return v


@pytest.fixture
def gallery() -> Gallery:
    g = Gallery("a" * 64, DIM, threshold=0.5)
    g.enroll("alice", axis(0)[None])
    g.enroll("bob", axis(2)[None])
    return g


def near(i: int, j: int, w: float) -> np.ndarray:
    """A probe between axis i and axis j (w = weight of j)."""
    return unit((1 - w) * axis(i) + w * axis(j))


def test_the_decision_waits_for_its_frames_then_is_the_mean_and_stays(gallery):
    fusion = VisitFusion(frames=3)
    # Each frame alone: alice accepted, then a frame nearer bob, then alice again.
    probes = [near(0, 1, 0.1), near(2, 0, 0.3), near(0, 1, 0.2), near(2, 1, 0.0)]
    out = [fusion.add("s0", 7, gallery, gallery.scores(p, 0), None, MANY) for p in probes]
    assert [o["decision"] for o in out[:2]] == ["pending", "pending"]
    assert [o["frames"] for o in out] == [1, 2, 3, 4]
    assert all(o["id"] == 7 and o["decision_frames"] == 3 for o in out)
    d = np.stack([gallery.distances(p, 0) for p in probes[:3]]).mean(axis=0)  # alice, bob
    assert out[2]["mode"] == "1:N" and out[2]["identity"] == "alice"
    assert out[2]["score"] == pytest.approx(d[0]) and out[2]["decision"] == "accept"
    assert out[2]["threshold"] == 0.5
    # The 4th frame is bob exactly, but the visit's decision is made: it is repeated, unchanged.
    assert {k: out[3][k] for k in ("identity", "score", "decision")} == {
        k: out[2][k] for k in ("identity", "score", "decision")
    }
    assert gallery.match_1toN(probes[3], 0).identity == "bob"


def test_the_mean_decides_where_no_single_frame_would(gallery):
    # Frames alternate: nearly alice, then farther than the threshold from everyone.
    fusion = VisitFusion(frames=4, identify_threshold=0.8)
    probes = [near(0, 1, 0.05), near(0, 1, 0.6)] * 2
    per_frame = [gallery.match_1toN(p, 0) for p in probes]
    assert [m.decision for m in per_frame] == ["accept", "unknown"] * 2  # at the gallery's 0.5
    out = [fusion.add("s0", 1, gallery, gallery.scores(p, 0), None, MANY) for p in probes][-1]
    assert out["decision"] == "accept" and out["identity"] == "alice" and out["threshold"] == 0.8
    # The same visit under a strict visit threshold is left unknown, with no identity named.
    fusion = VisitFusion(frames=4, threshold=0.9, identify_threshold=0.1)  # 1:N uses its own
    last = [fusion.add("s0", 1, gallery, gallery.scores(p, 0), None, MANY) for p in probes][-1]
    assert last["decision"] == "unknown" and last["identity"] is None and last["score"] > 0.1


def test_one_to_one_fuses_the_claimed_identity_and_an_unenrolled_claim_is_unknown(gallery):
    fusion = VisitFusion(frames=2)
    a = [fusion.add("s0", 1, gallery, gallery.scores(near(0, 2, 0.45), 0), "bob", AUTO) for _ in range(2)][-1]
    d_bob = float(gallery.distances(near(0, 2, 0.45), 0)[gallery.identities.index("bob")])
    assert a["mode"] == "1:1" and a["identity"] == "bob" and a["score"] == pytest.approx(d_bob)
    assert a["decision"] == ("accept" if d_bob <= 0.5 else "reject")
    b = [fusion.add("s0", 2, gallery, gallery.scores(axis(0), 0), "carol", AUTO) for _ in range(2)][-1]
    assert (b["decision"], b["score"], b["identity"]) == ("unknown", None, "carol")
    # Forced 1:1 with a claim decides 1:1; a claim in 1:N mode is ignored.
    assert [fusion.add("s0", 3, gallery, gallery.scores(axis(0), 0), "alice", ONE) for _ in range(2)][-1][
        "decision"
    ] == "accept"
    many = [fusion.add("s0", 4, gallery, gallery.scores(axis(0), 0), "bob", MANY) for _ in range(2)][-1]
    assert (many["mode"], many["identity"]) == ("1:N", "alice")


def test_one_to_one_and_one_to_n_have_their_own_visit_thresholds(gallery):
    fusion = VisitFusion(frames=2, threshold=0.9, identify_threshold=0.01)
    probe = near(0, 1, 0.3)  # alice, at a distance between the two thresholds
    one = [fusion.add("s0", 1, gallery, gallery.scores(probe, 0), "alice", AUTO) for _ in range(2)][-1]
    many = [fusion.add("s0", 2, gallery, gallery.scores(probe, 0), None, AUTO) for _ in range(2)][-1]
    assert (one["decision"], one["threshold"]) == ("accept", 0.9)
    assert (many["decision"], many["threshold"], many["identity"]) == ("unknown", 0.01, None)


def test_a_new_visit_another_scanner_or_a_reloaded_gallery_starts_afresh(gallery):
    fusion = VisitFusion(frames=2)
    assert (
        fusion.add("s0", None, gallery, gallery.scores(axis(0), 0), None, MANY) is None
    )  # no visit: frames alone
    assert fusion.add("s0", 1, gallery, gallery.scores(axis(0), 0), None, VerificationMode.off) is None
    assert fusion.add("s0", 1, gallery, gallery.scores(axis(0), 0), None, MANY)["decision"] == "pending"
    assert (
        fusion.add("s1", 1, gallery, gallery.scores(axis(2), 0), None, MANY)["decision"] == "pending"
    )  # its own
    assert fusion.add("s0", 1, gallery, gallery.scores(axis(0), 0), None, MANY)["identity"] == "alice"
    assert fusion.add("s1", 1, gallery, gallery.scores(axis(2), 0), None, MANY)["identity"] == "bob"
    assert (
        fusion.add("s0", 2, gallery, gallery.scores(axis(2), 0), None, MANY)["frames"] == 1
    )  # the next visit
    gallery.enroll("carol", axis(4)[None])  # enrolled in place mid-visit: fused afresh too
    assert fusion.add("s0", 2, gallery, gallery.scores(axis(2), 0), None, MANY)["frames"] == 1
    reloaded = Gallery("a" * 64, DIM, threshold=0.5)
    reloaded.enroll("bob", axis(2)[None])
    # The same visit after SIGHUP swapped the gallery: fused again against the new one only.
    out = fusion.add("s0", 2, reloaded, reloaded.scores(axis(2), 0), None, MANY)
    assert out["frames"] == 1 and out["decision"] == "pending"


def test_state_is_one_visit_per_scanner_and_bounded(gallery):
    fusion = VisitFusion(frames=3, max_scanners=4)
    for i in range(100):
        fusion.add(f"s{i}", i, gallery, gallery.scores(axis(0), 0), None, MANY)
    assert len(fusion._visits) == 4 and list(fusion._visits) == ["s96", "s97", "s98", "s99"]
    with pytest.raises(ValueError, match="at least 1 frame"):
        VisitFusion(frames=0)


def test_a_gallery_without_a_threshold_is_refused_when_the_visit_decides():
    from scanner_io.errors import ConfigError

    g = Gallery("a" * 64, DIM)
    g.enroll("alice", axis(0)[None])
    fusion = VisitFusion(frames=1)
    with pytest.raises(ConfigError, match="no verification threshold"):
        fusion.add("s0", 1, g, g.scores(axis(0), 0), None, MANY)
    assert (
        VisitFusion(frames=1, identify_threshold=0.3).add("s0", 1, g, g.scores(axis(0), 0), None, MANY)[
            "decision"
        ]
        == "accept"
    )
