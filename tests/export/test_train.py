"""Demo training: losses, a short run on a tiny simulated dataset, determinism, NaN skipping,
the checkpoint's round trip through import, export, threshold calibration and the Runner, and
the `thzedge train` / `thzedge export threshold` commands."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calibration.simulated import write_dataset  # noqa: E402
from edge.cli import main  # noqa: E402
from export import losses  # noqa: E402
from export.train import (  # noqa: E402
    TrainConfig,
    evaluate_split,
    load_triplet_data,
    split_identities,
    train,
    train_on,
)
from scanner_io.errors import EXIT_DATA, DataError, ThzEdgeError  # noqa: E402

# A tiny network (width 0.0625 -> 4 base channels) keeps every step in the milliseconds.
TINY = TrainConfig(width=0.0625, embedding_dim=16, epochs=4, batch_size=8, lr=3e-3, threads=1, seed=3)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 simulated identities x 5 postures x 2 samples; 8 for train_val, 2 for test."""
    out = tmp_path_factory.mktemp("tinyds")
    write_dataset(out, identities=10, samples=2, seed=5, test_identities=2)
    return out


# --- losses -------------------------------------------------------------------------------------


def test_supcon_is_lower_when_embeddings_group_by_label() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    centers = torch.eye(3)[labels] * 5.0
    good = losses.supcon_loss(centers + 0.01 * torch.randn(6, 3), labels)
    bad = losses.supcon_loss(centers[[2, 4, 0, 5, 1, 3]] + 0.01 * torch.randn(6, 3), labels)
    assert float(good) < float(bad)


def test_supcon_ignores_anchors_without_positives_and_stays_finite() -> None:
    emb = torch.randn(5, 8, requires_grad=True)
    loss = losses.supcon_loss(emb, torch.tensor([0, 0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    # No positive anywhere: zero loss, still differentiable.
    assert float(losses.supcon_loss(emb, torch.arange(5)).detach()) == 0.0


def test_triplet_label_schemes() -> None:
    ids = torch.tensor([[4, 7], [4, 7], [9, 4]])
    assert losses.triplet_labels(ids, "identity").tolist() == [4, 7, 4, 7, 9, 4]
    assert losses.triplet_labels(ids, "triplet").tolist() == [0, 1, 0, 1, 2, 3]
    with pytest.raises(ValueError):
        losses.triplet_labels(ids, "nope")


def test_torch_ssim_matches_the_evaluation_ssim() -> None:
    from edge.evaluation import ssim as ssim_np

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 64, 64, generator=g)
    b = (a + 0.2 * torch.rand(3, 1, 64, 64, generator=g)).clamp(0, 1)
    np.testing.assert_allclose(losses.ssim(a, b).numpy(), ssim_np(a.numpy(), b.numpy()), atol=1e-5)
    assert losses.ssim(a, a).min() > 0.9999


def test_charbonnier_and_reconstruction_loss() -> None:
    a = torch.zeros(2, 1, 64, 64)
    assert float(losses.charbonnier_loss(a, a)) == pytest.approx(1e-6, rel=1e-3)
    assert float(losses.charbonnier_loss(a, a + 0.5)) == pytest.approx(0.5, rel=1e-4)
    loss, s = losses.reconstruction_loss(a + 0.5, a + 0.5)
    assert float(s) == pytest.approx(1.0, abs=1e-5) and float(loss) < 1e-4


# --- training -----------------------------------------------------------------------------------


def test_split_identities_is_seeded_and_disjoint() -> None:
    names = [f"id{i:03d}" for i in range(1, 41)]
    val = split_identities(names, 0.15)
    assert val == split_identities(list(reversed(names)), 0.15)
    assert len(val) == 6 and set(val) < set(names)
    with pytest.raises(DataError):
        split_identities(["a"], 0.5)


def test_epoch_batches_random_and_pk(tiny_dataset: Path) -> None:
    from export.train import epoch_batches

    data = load_triplet_data(tiny_dataset, tiny_dataset / "train_val.csv")
    rows = np.arange(len(data.triplets))
    gen = torch.Generator().manual_seed(0)
    plain = epoch_batches(data, rows, replace(TINY, sampler="random"), gen)
    assert all(len(b) == TINY.batch_size for b in plain)
    assert len(np.unique(np.concatenate(plain))) == len(plain) * TINY.batch_size
    pk = epoch_batches(data, rows, replace(TINY, sampler="pk", samples_per_identity=2), gen)
    anchors = [data.triplets[b, 0] for b in pk]
    # Rows come in runs of two sharing identity and posture (the tiny set has 2 samples each).
    for a in anchors:
        key = data.identity[a] * 10 + data.posture[a]
        assert all(key[i] == key[i + 1] for i in range(0, len(key) - 1, 2))
    # Postures are mixed within a batch (one-posture batches break BatchNorm's statistics).
    assert any(len(np.unique(data.posture[a])) > 1 for a in anchors)


def test_training_lowers_the_losses_and_is_deterministic(tiny_dataset: Path, tmp_path: Path) -> None:
    data = load_triplet_data(tiny_dataset, tiny_dataset / "train_val.csv")
    rows = np.arange(len(data.triplets))
    torch.manual_seed(TINY.seed)
    from export.model import MTLNetwork

    before = evaluate_split(MTLNetwork(TINY.embedding_dim, 5, TINY.width), data, rows)
    records = []
    result = train_on(data, tmp_path / "a.pt", TINY, progress=False, on_epoch=records.append)
    assert [r.epoch for r in records] == list(range(1, TINY.epochs + 1))
    # Training loss falls over the run, and the trained model is better on what it saw.
    assert records[-1].train["total"] < records[0].train["total"]
    from export.checkpoint import import_checkpoint

    trained = import_checkpoint(tmp_path / "a.pt").model
    after = evaluate_split(trained, data, rows)
    assert after["loss_total"] < before["loss_total"]
    assert after["loss_reconstruction"] < before["loss_reconstruction"]
    assert after["ssim"] > before["ssim"]
    # The checkpoint holds the epoch with the best validation SSIM.
    best = max(records, key=lambda r: r.val["ssim"])
    assert result.best_epoch == best.epoch
    assert result.best_val["ssim"] == pytest.approx(best.val["ssim"])
    # Same seed, same data: bit-identical weights (a few steps suffice to show it).
    short = replace(TINY, max_steps=3)
    sds = []
    for name in ("b.pt", "c.pt"):
        train_on(data, tmp_path / name, short, progress=False)
        sds.append(torch.load(tmp_path / name, weights_only=True)["model_state_dict"])
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
    other = replace(short, seed=short.seed + 1)
    train_on(data, tmp_path / "d.pt", other, progress=False)
    sd_d = torch.load(tmp_path / "d.pt", weights_only=True)["model_state_dict"]
    assert not all(torch.equal(sds[0][k], sd_d[k]) for k in sd_d)
    # The thread count and determinism flag are restored after the run.
    assert not torch.are_deterministic_algorithms_enabled()


def test_non_finite_losses_are_skipped(tiny_dataset: Path, tmp_path: Path) -> None:
    data = load_triplet_data(tiny_dataset, tiny_dataset / "train_val.csv")
    # Poison the unconcealed images of one training identity: batches holding one give a NaN loss.
    val = split_identities(data.identity_names, TINY.val_fraction)
    poisoned = next(i for i, n in enumerate(data.identity_names) if n not in val)
    data.images[(data.identity == poisoned) & ~data.concealed] = np.nan
    cfg = replace(TINY, epochs=1, augment="none")
    result = train_on(data, tmp_path / "nan.pt", cfg, progress=False)
    assert 0 < result.skipped_steps < result.steps
    sd = torch.load(tmp_path / "nan.pt", weights_only=True)["model_state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_checkpoint_round_trips_through_export_threshold_and_runner(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    from edge.bundle import Bundle
    from edge.runner import Runner
    from export.bundle_writer import write_bundle
    from export.checkpoint import LAYOUT_THZ_ONLY, import_checkpoint
    from export.train import calibrate_threshold

    ckpt = tmp_path / "demo.pt"
    result = train(tiny_dataset, ckpt, replace(TINY, epochs=2), progress=False)
    raw = torch.load(ckpt, weights_only=True)
    assert {"model_state_dict", "epoch", "config", "best_val_ssim", "val_identities"} <= set(raw)
    assert raw["epoch"] == result.best_epoch
    assert all(k.startswith(("encoder.", "reconstruction_decoders.")) for k in raw["model_state_dict"])
    imported = import_checkpoint(ckpt)
    assert imported.layout == LAYOUT_THZ_ONLY
    assert imported.config.width == TINY.width and imported.config.embedding_dim == TINY.embedding_dim

    bundle_dir = tmp_path / "bundle"
    write_bundle(imported.model, bundle_dir, variant=imported.layout, source=imported.source())
    th = calibrate_threshold(bundle_dir, tiny_dataset, ckpt)
    bundle = Bundle.open(bundle_dir)
    assert bundle.threshold("fp32") == pytest.approx(th.threshold)
    assert 0.0 < th.threshold < 2.0 and th.identities == len(result.val_identities)
    assert bundle.manifest["variants"]["fp32"]["verification"]["method"] == "eer"

    data = load_triplet_data(tiny_dataset, tiny_dataset / "test.csv")
    x = data.images[:12]
    with torch.no_grad():
        ref = imported.model(torch.from_numpy(x))
    with Runner.from_bundle(bundle_dir, backend="ort") as runner:
        out = runner.infer(x, reconstruct=True)
    np.testing.assert_allclose(out.embedding, ref.embedding.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.posture_logits, ref.posture_logits.numpy(), atol=1e-3)
    np.testing.assert_allclose(out.reconstruction, ref.reconstruction.numpy(), atol=1e-4)


def test_train_rejects_bad_settings_and_missing_data(tmp_path: Path) -> None:
    with pytest.raises(ThzEdgeError, match="width"):
        TrainConfig(width=0.1)
    with pytest.raises(ThzEdgeError, match="augmentation"):
        TrainConfig(augment="strong")
    with pytest.raises(DataError, match="sim dataset"):
        train(tmp_path, tmp_path / "x.pt", TINY, progress=False)


# --- commands -----------------------------------------------------------------------------------


def test_train_and_threshold_commands(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "cli.pt"
    args = f"train --data {tiny_dataset} --out {ckpt} --width 0.0625 --epochs 1 --batch-size 8"
    code = main(["--json", *args.split(), "--threads", "1", "--max-steps", "3"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3 and report["checkpoint"] == str(ckpt) and ckpt.is_file()

    bundle_dir = tmp_path / "b"
    assert main(["export", "onnx", "--checkpoint", str(ckpt), "--out", str(bundle_dir)]) == 0
    capsys.readouterr()
    args = f"--json export threshold --model {bundle_dir} --data {tiny_dataset} --checkpoint {ckpt}"
    code = main(args.split())
    assert code == 0
    th = json.loads(capsys.readouterr().out)
    from edge.bundle import Bundle

    assert Bundle.open(bundle_dir).threshold("fp32") == pytest.approx(th["threshold"])
    roc = Path(th["roc"])
    assert roc == tmp_path / "b-roc-fp32.png" and roc.read_bytes()[:4] == b"\x89PNG"
    # One command, a target FAR instead of the EER point: another threshold, its own ROC file.
    far_png = tmp_path / "far.png"
    code = main([*args.split(), "--target-far", "0.05", "--roc", str(far_png)])
    assert code == 0
    far = json.loads(capsys.readouterr().out)
    assert far["method"] == "far" and far_png.is_file()
    assert Bundle.open(bundle_dir).threshold("fp32") == pytest.approx(far["threshold"])


def test_train_command_reports_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x.pt")])
    assert code == EXIT_DATA
    err = capsys.readouterr().err
    assert "train_val.csv not found" in err and "thzedge sim dataset" in err


# --- the field's pairing: other captures of a person ---------------------------------------------


def test_other_captures_are_the_same_person_and_posture_in_another_sample(tiny_dataset: Path) -> None:
    from export.train import _sample_other_captures, capture_groups
    from scanner_io.dataset import parse_crop_name

    data = load_triplet_data(tiny_dataset, tiny_dataset / "train_val.csv")
    pool = np.flatnonzero(data.concealed)
    anchors = data.triplets[:, 0]
    picks = _sample_other_captures(
        data, anchors, capture_groups(data, pool), torch.Generator().manual_seed(0)
    )
    assert data.concealed[picks].all()
    assert (data.identity[picks] == data.identity[anchors]).all()
    assert (data.posture[picks] == data.posture[anchors]).all()
    # Two samples per posture in this dataset: the other capture is always the other sample.
    samples = [(parse_crop_name(data.names[a]).sample, parse_crop_name(data.names[p]).sample)
               for a, p in zip(anchors, picks, strict=True)]  # fmt: skip
    assert all(s != t for s, t in samples)


def test_cross_capture_positives_train_and_select_on_cross_capture_eer(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    cfg = replace(TINY, epochs=2, positives="cross", select="cross-eer", val_fraction=0.25)
    result = train(tiny_dataset, tmp_path / "x.pt", cfg, progress=False)
    eers = [r.val["cross_eer"] for r in result.history]
    assert all(0.0 <= e <= 1.0 for e in eers)
    assert result.best_val["cross_eer"] == min(eers)
    assert all(np.isfinite(r.train["total"]) for r in result.history)
    with pytest.raises(ThzEdgeError, match="identity SupCon labels"):
        TrainConfig(positives="cross", label_scheme="triplet")
    # One validation person (10 % of 8) has no impostor: no cross-capture EER to select on.
    with pytest.raises(DataError, match="two validation identities"):
        train(tiny_dataset, tmp_path / "y.pt", replace(cfg, val_fraction=0.1), progress=False)


def test_threshold_on_gallery_pairs_of_the_validation_people(tiny_dataset: Path, tmp_path: Path) -> None:
    from edge.bundle import Bundle
    from export.bundle_writer import write_bundle
    from export.checkpoint import import_checkpoint
    from export.train import calibrate_threshold

    ckpt = tmp_path / "demo.pt"
    train(tiny_dataset, ckpt, replace(TINY, epochs=1, val_fraction=0.25), progress=False)
    imported = import_checkpoint(ckpt)
    bundle_dir = tmp_path / "bundle"
    write_bundle(imported.model, bundle_dir, variant=imported.layout, source=imported.source())
    th = calibrate_threshold(bundle_dir, tiny_dataset, ckpt, pairs="gallery", target_far=0.25)
    v = Bundle.open(bundle_dir).manifest["variants"]["fp32"]["verification"]
    assert v["method"] == "far" and v["chosen_on"]["pairs_kind"].startswith("gallery")
    assert v["threshold"] == pytest.approx(th.threshold)
    # Two validation people (25 % of 8), 5 postures: sample 1 enrolled, sample 2 probed, each
    # probe against both people -> 10 genuine and 10 impostor pairs.
    assert th.identities == 2 and th.n_pairs == 5 * 2 * 2
