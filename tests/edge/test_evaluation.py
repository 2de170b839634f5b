"""Metrics of edge.evaluation on hand-checkable cases and against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.evaluation import (
    confusion_matrix,
    equal_error_rate,
    error_rates,
    posture_metrics,
    psnr,
    reconstruction_metrics,
    roc_auc,
    row_cosine,
    ssim,
    threshold_at_eer,
    threshold_at_far,
    verification_metrics,
)
from scanner_io.errors import ThzEdgeError

# ---------------------------------------------------------------------------------------------
# verification


def test_row_cosine_of_matching_rows():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    b = np.array([[2.0, 0.0], [0.0, -1.0], [4.0, -3.0], [1.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(row_cosine(a, b), [1.0, -1.0, 0.0, 0.0], atol=1e-12)


def test_perfectly_separated_pairs():
    d_pos = [0.1, 0.2, 0.3]
    d_neg = [0.8, 0.9, 1.0]
    m = verification_metrics(d_pos, d_neg)
    assert m["triplet_accuracy"] == 1.0
    assert m["margin_rate"] == 1.0
    assert m["roc_auc"] == 1.0
    assert m["eer"] == 0.0
    # Every t in [0.3, 0.8) separates them: the middle of the gap is returned.
    assert m["threshold_eer"] == pytest.approx(0.55)
    assert m["tar_at_far"] == 1.0 and m["far_achieved"] == 0.0
    assert m["threshold_far"] == pytest.approx(0.55)
    assert m["d_pos_mean"] == pytest.approx(0.2)
    assert m["d_neg_mean"] == pytest.approx(0.9)
    assert m["d_pos_std"] == pytest.approx(np.std([0.1, 0.2, 0.3]))
    assert m["gap"] == pytest.approx(0.7)


def test_reversed_pairs_score_worst():
    m = verification_metrics([0.8, 0.9], [0.1, 0.2])
    assert m["triplet_accuracy"] == 0.0
    assert m["roc_auc"] == 0.0
    assert m["eer"] == 1.0
    assert m["tar_at_far"] == 0.0


def test_margin_rate_counts_only_pairs_beyond_the_margin():
    # Triplet 1 is correct with margin 0.25, triplet 2 correct with margin 0.1, triplet 3 wrong.
    m = verification_metrics([0.5, 0.5, 0.5], [0.75, 0.6, 0.4])
    assert m["triplet_accuracy"] == pytest.approx(2 / 3)
    assert m["margin_rate"] == pytest.approx(1 / 3)


def test_identical_distributions_give_eer_and_auc_near_half():
    rng = np.random.default_rng(0)
    d_pos = rng.normal(1.0, 0.2, 20000)
    d_neg = rng.normal(1.0, 0.2, 20000)
    assert equal_error_rate(d_pos, d_neg) == pytest.approx(0.5, abs=0.02)
    assert roc_auc(d_pos, d_neg) == pytest.approx(0.5, abs=0.02)


def test_auc_counts_ties_half():
    # pairs (pos, neg): (.1,.3) 1, (.1,.5) 1, (.5,.3) 0, (.5,.5) 0.5
    assert roc_auc([0.1, 0.5], [0.3, 0.5]) == pytest.approx(2.5 / 4)


def test_eer_at_an_exact_crossing():
    # t in [0.3, 0.4): FAR = 1/2 (0.3 accepted), FRR = 1/2 (0.4 rejected)
    assert equal_error_rate([0.1, 0.4], [0.3, 0.6]) == pytest.approx(0.5)
    assert threshold_at_eer([0.1, 0.4], [0.3, 0.6]) == pytest.approx(0.35)


def test_eer_interpolates_across_a_step():
    # t < 0.4: FAR 0, FRR 1/2;  t >= 0.4: FAR 1, FRR 1/2  -> the ROC crosses half-way.
    assert equal_error_rate([0.2, 0.5], [0.4]) == pytest.approx(0.5)
    assert threshold_at_eer([0.2, 0.5], [0.4]) == pytest.approx(0.3)


def test_error_rates_follow_the_accept_when_below_or_equal_convention():
    thr, far, frr = error_rates([0.2, 0.4], [0.4, 0.8])
    assert thr.tolist() == [0.2, 0.4, 0.8]
    assert far.tolist() == [0.0, 0.5, 1.0]  # a negative at exactly t is accepted
    assert frr.tolist() == [0.5, 0.0, 0.0]


def test_threshold_at_far_allows_floor_far_times_n_false_accepts():
    d_neg = np.linspace(0.5, 1.5, 200)  # 200 negatives: 1% = 2 false accepts
    d_pos = np.array([0.1, 0.3, 0.52, 0.9])
    t = threshold_at_far(d_pos, d_neg, 0.01)
    assert np.sum(d_neg <= t) == 2
    # the largest distance below the third negative is the second negative (0.505...)
    assert t == pytest.approx((d_neg[1] + d_neg[2]) / 2)
    m = verification_metrics(np.resize(d_pos, 200), d_neg)
    assert m["far_achieved"] <= 0.01


def test_threshold_at_far_with_few_negatives_accepts_none():
    t = threshold_at_far([0.1, 0.2], [0.5, 0.6, 0.7], 0.01)
    assert 0.2 < t < 0.5


def test_threshold_at_far_rejects_bad_target():
    with pytest.raises(ThzEdgeError, match="FAR"):
        threshold_at_far([0.1], [0.5], 1.5)


def test_empty_or_unpaired_distances_are_refused():
    with pytest.raises(ThzEdgeError, match="no distances"):
        verification_metrics([], [0.5])
    with pytest.raises(ThzEdgeError, match="pair up"):
        verification_metrics([0.1, 0.2], [0.5])
    with pytest.raises(ThzEdgeError, match="NaN"):
        verification_metrics([np.nan], [0.5])


_dist = st.lists(st.integers(0, 20).map(lambda i: i / 10), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(_dist, _dist)
def test_eer_lies_between_the_rates_of_any_threshold(d_pos, d_neg):
    thr, far, frr = error_rates(d_pos, d_neg)
    # add the operating point below every distance (accept nothing)
    far = np.concatenate([[0.0], far])
    frr = np.concatenate([[1.0], frr])
    eer = equal_error_rate(d_pos, d_neg)
    assert np.max(np.minimum(far, frr)) - 1e-12 <= eer <= np.min(np.maximum(far, frr)) + 1e-12


@settings(max_examples=150, deadline=None)
@given(_dist, _dist, st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 1.0]))
def test_threshold_at_far_is_the_best_threshold_within_the_target(d_pos, d_neg, far):
    pos, neg = np.array(d_pos), np.array(d_neg)
    t = threshold_at_far(pos, neg, far)
    assert np.mean(neg <= t) <= far + 1e-12
    tar = np.mean(pos <= t)
    # brute force over every threshold that changes the rates
    for c in np.unique(np.concatenate([pos, neg])):
        if np.mean(neg <= c) <= far + 1e-12:
            assert np.mean(pos <= c) <= tar


@settings(max_examples=100, deadline=None)
@given(_dist, _dist)
def test_auc_matches_pair_counting(d_pos, d_neg):
    pos, neg = np.array(d_pos), np.array(d_neg)
    wins = (pos[:, None] < neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(pos, neg) == pytest.approx(wins / (pos.size * neg.size))


# ---------------------------------------------------------------------------------------------
# posture


def test_known_confusion_matrix_and_f1():
    y_true = [0, 0, 1, 1, 2, 3, 4, 4]
    y_pred = [0, 1, 1, 1, 2, 3, 4, 0]
    conf = [0.9, 0.6, 0.8, 0.7, 0.9, 0.95, 0.85, 0.4]
    m = posture_metrics(y_true, y_pred, conf)
    assert m["confusion"] == [
        [1, 1, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [1, 0, 0, 0, 1],
    ]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["f1"] == pytest.approx([0.5, 0.8, 1.0, 1.0, 2 / 3])
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 1 + 1 + 2 / 3) / 5)
    assert m["mean_confidence"] == pytest.approx(np.mean(conf))
    assert m["mean_confidence_correct"] == pytest.approx(np.mean([0.9, 0.8, 0.7, 0.9, 0.95, 0.85]))
    assert m["mean_confidence_incorrect"] == pytest.approx(0.5)


def test_macro_f1_leaves_out_classes_never_seen():
    m = posture_metrics([0, 0], [0, 1])
    assert m["f1"][:2] == pytest.approx([2 / 3, 0.0])
    assert m["f1"][2:] == [None, None, None]
    assert m["macro_f1"] == pytest.approx(1 / 3)


def test_confusion_matrix_refuses_out_of_range_labels():
    with pytest.raises(ThzEdgeError, match="outside 0..4"):
        confusion_matrix([0, 5], [0, 1])


# ---------------------------------------------------------------------------------------------
# reconstruction


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Direct SSIM of two 2-D images: a full 2-D Gaussian window visited position by position."""
    size, sigma, c1, c2 = 11, 1.5, 0.01**2, 0.03**2
    r = np.arange(size) - size // 2
    w2 = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    w2 /= w2.sum()
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            mx, my = (w2 * px).sum(), (w2 * py).sum()
            vx, vy = (w2 * (px - mx) ** 2).sum(), (w2 * (py - my) ** 2).sum()
            cxy = (w2 * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_of_identical_images_is_one():
    rng = np.random.default_rng(1)
    img = rng.random((3, 1, 64, 64))
    assert np.allclose(ssim(img, img), 1.0, atol=1e-12)


def test_ssim_matches_a_direct_reference():
    rng = np.random.default_rng(2)
    a = rng.random((2, 32, 40))
    # a structured pair: smooth gradient vs noisy, shifted copy
    grad = np.tile(np.linspace(0, 1, 40), (32, 1))
    b = np.stack([np.clip(a[0] * 0.6 + 0.2 + rng.normal(0, 0.05, a[0].shape), 0, 1), grad])
    got = ssim(a, b)
    want = [_ssim_reference(a[k], b[k]) for k in range(2)]
    assert got.shape == (2,)
    assert got == pytest.approx(want, abs=1e-9)
    assert not np.allclose(want, 1.0)  # the pair really differs


def test_ssim_matches_the_pytorch_msssim_computation():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    a = rng.random((4, 1, 64, 64)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    # pytorch_msssim's _ssim: a 1-D Gaussian along H then W with grouped, unpadded conv2d.
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()

    def blur(t):
        t = F.conv2d(t, g.view(1, 1, 11, 1))
        return F.conv2d(t, g.view(1, 1, 1, 11))

    x, y = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    mu1, mu2 = blur(x), blur(y)
    s1, s2, s12 = blur(x * x) - mu1**2, blur(y * y) - mu2**2, blur(x * y) - mu1 * mu2
    cs = (2 * s12 + 0.03**2) / (s1 + s2 + 0.03**2)
    smap = (2 * mu1 * mu2 + 0.01**2) / (mu1**2 + mu2**2 + 0.01**2) * cs
    want = smap.flatten(2).mean(-1).mean(1).numpy()
    assert ssim(a, b) == pytest.approx(want, abs=1e-9)


def test_ssim_refuses_small_or_mismatched_images():
    with pytest.raises(ThzEdgeError, match="at least 11x11"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ThzEdgeError, match="differ in shape"):
        ssim(np.zeros((1, 64, 64)), np.zeros((2, 64, 64)))


def test_psnr_of_a_known_error():
    a = np.zeros((2, 1, 16, 16))
    b = np.full((2, 1, 16, 16), 0.1)
    b[1] = 0.01
    assert psnr(a, b) == pytest.approx([20.0, 40.0])
    assert psnr(a, a)[0] == math.inf


def test_reconstruction_metrics_summarise_per_sample_values():
    rng = np.random.default_rng(4)
    target = rng.random((6, 1, 64, 64))
    recon = target.copy()
    recon[3:] = np.clip(target[3:] + rng.normal(0, 0.2, target[3:].shape), 0, 1)
    m = reconstruction_metrics(recon, target)
    s = ssim(recon, target)
    assert m["n"] == 6
    assert m["ssim_mean"] == pytest.approx(s.mean())
    assert m["share_ssim_at_least_0_95"] == pytest.approx(0.5)
    assert m["share_ssim_below_0_7"] == pytest.approx(np.mean(s < 0.7))
    # identical samples are capped at 100 dB before averaging
    p = np.minimum(psnr(recon, target), 100.0)
    assert m["psnr_mean"] == pytest.approx(p.mean())
    assert m["l1_mean"] == pytest.approx(np.abs(recon - target).mean())


# ---------------------------------------------------------------------------------------------
# scoring collected outputs (no runner needed)


def _outputs(rng: np.random.Generator):
    """Hand-built outputs: 4 anchors (postures 0, 0, 1, 3), 4 positives, negatives reuse anchors."""
    from edge.evaluation import EvalOutputs

    n_anchor = 4
    emb = rng.normal(size=(8, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[4:] = emb[:4] + 0.05  # positives close to their anchors
    emb[4:] /= np.linalg.norm(emb[4:], axis=1, keepdims=True)
    truth = np.array([0, 0, 1, 3, 0, 0, 1, 3])
    pred = np.array([0, 1, 1, 3, 0, 0, 1, 3])
    images = rng.random((8, 1, 64, 64)).astype(np.float32)
    # anchor i: positive 4+i, negative the next anchor; anchor 0 appears in two triplets
    triplets = np.array([[0, 4, 1], [1, 5, 2], [2, 6, 3], [3, 7, 0], [0, 4, 2]])
    recon = np.clip(images[4:] + rng.normal(0, 0.05, images[4:].shape), 0, 1).astype(np.float32)
    return EvalOutputs(
        routing="predicted",
        names=[f"f{i}.png" for i in range(8)],
        images=images,
        truth_posture=truth,
        embedding=emb,
        posture_logits=np.zeros((8, 5), np.float32),
        posture=pred,
        confidence=np.linspace(0.5, 0.9, 8).astype(np.float32),
        triplets=triplets,
        anchors=np.arange(n_anchor),
        reconstruction=recon,
        recon_pairs=np.unique(triplets[:, :2], axis=0),
        inference_s=0.5,
        model={"bundle": "b", "sha256": "0" * 64, "backend": "ort", "precision": "fp32"},
        data={"data_dir": "d", "triplets_csv": "t.csv", "n_triplets": 5, "n_images": 8, "n_anchors": 4},
    )


def test_report_groups_by_the_anchor_posture():
    import json

    from edge.evaluation import report_from_outputs

    out = _outputs(np.random.default_rng(5))
    rep = report_from_outputs(out)
    assert list(rep.per_posture) == ["Front", "Left", "Up"]
    front = rep.per_posture["Front"]
    assert front["verification"]["n"] == 3  # triplets 0, 1 and 4 have a Front anchor
    assert front["posture"]["n"] == 2  # distinct anchors 0 and 1
    assert front["posture"]["accuracy"] == 0.5  # anchor 1 was predicted Left
    assert front["reconstruction"]["n"] == 2  # distinct (anchor, positive) pairs
    assert rep.overall["verification"]["n"] == 5
    assert rep.overall["reconstruction"]["n"] == 4
    assert rep.overall["posture"]["confusion"][0] == [1, 1, 0, 0, 0]
    # distances are those of the embeddings, per triplet
    d_pos = np.linalg.norm(out.embedding[[0, 1, 2, 3, 0]] - out.embedding[[4, 5, 6, 7, 4]], axis=1)
    assert rep.overall["verification"]["d_pos_mean"] == pytest.approx(d_pos.mean(), rel=1e-6)
    want = reconstruction_metrics(out.reconstruction[[0, 1]], out.images[[4, 5]])
    assert front["reconstruction"]["ssim_mean"] == pytest.approx(want["ssim_mean"])
    # JSON-ready: serialises with strict JSON (no NaN/Infinity)
    text = json.dumps(rep.to_dict(), allow_nan=False)
    assert json.loads(text)["per_posture"]["Up"]["posture"]["n"] == 1


def test_report_renders_plain_tables():
    from edge.evaluation import report_from_outputs

    text = report_from_outputs(_outputs(np.random.default_rng(6))).render()
    for heading in ("Verification", "Posture", "Confusion matrix", "Reconstruction", "TAR@FAR1%"):
        assert heading in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Verification"))
    stop = next(i for i, line in enumerate(lines) if line.startswith("thresholds"))
    # header, rule, then one row per group: overall and the postures that have anchors
    assert [line.split()[0] for line in lines[start + 3 : stop]] == ["all", "Front", "Left", "Up"]
    assert "\x1b" not in text  # no terminal colour codes


def test_eval_warns_when_the_dataset_holds_the_bundles_training_people(tmp_path):
    from calibration.simulated import write_dataset
    from edge.evaluation import training_people_warning

    def manifest(seed: int, identities: int) -> dict:
        chosen = {"dataset": {"name": "ds", "seed": seed, "identities": identities}}
        return {"variants": {"fp32": {"verification": {"chosen_on": chosen}}}}

    ds = tmp_path / "ds"
    write_dataset(ds, identities=4, samples=1, seed=0, test_identities=2)
    # The training dataset itself: its held-out test split is unseen, its train split is not.
    assert training_people_warning(manifest(0, 4), ds, ds / "test.csv") is None
    assert "not for unseen people" in training_people_warning(manifest(0, 4), ds, ds / "train_val.csv")
    # Another dataset of the training seed (the default `sim dataset`): the same people.
    assert "seed 0" in training_people_warning(manifest(0, 240), ds, ds / "test.csv")
    assert training_people_warning(manifest(7, 4), ds, ds / "test.csv") is None
    assert training_people_warning({"variants": {}}, ds, ds / "test.csv") is None
