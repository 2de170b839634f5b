"""`thzedge infer` and `thzedge eval` through the real CLI, a real ONNX Runtime bundle and files."""

from __future__ import annotations

import csv
import json
import stat
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main
from edge.infer import array_to_inputs, load_inputs
from scanner_io.errors import EXIT_DATA, DataError


def _run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("thzedge: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------
# input files (no model needed)


def test_uint8_and_float_arrays_become_model_inputs():
    u8 = np.arange(2 * 64 * 64, dtype=np.int64).reshape(2, 64, 64) % 256
    x = array_to_inputs(u8.astype(np.uint8), "a.npy")
    assert x.shape == (2, 1, 64, 64) and x.dtype == np.float32
    assert np.array_equal(x[:, 0] * 255, u8.astype(np.float32))
    f = np.linspace(0, 1, 64 * 64).reshape(1, 1, 64, 64)
    assert np.array_equal(array_to_inputs(f, "b.npy"), f.astype(np.float32))


def test_npy_rows_are_named_by_file_and_index(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 64, 64), np.uint8))
    np.save(tmp_path / "b.npy", np.ones((1, 1, 64, 64), np.float32))
    batch = load_inputs([tmp_path / "b.npy", tmp_path / "a.npy"])
    assert batch.names == ["b.npy[0]", "a.npy[0]", "a.npy[1]", "a.npy[2]"]
    assert batch.x.shape == (4, 1, 64, 64)
    assert batch.x[0].min() == 1.0 and batch.x[1:].max() == 0.0
    # a directory stands for its files in name order
    assert load_inputs([tmp_path]).names == ["a.npy[0]", "a.npy[1]", "a.npy[2]", "b.npy[0]"]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 32, 32), np.uint8), "not [N,64,64] or [N,1,64,64]"),
        (np.zeros((2, 3, 64, 64), np.uint8), "not [N,64,64] or [N,1,64,64]"),
        (np.zeros((64, 64), np.uint8), "not [N,64,64] or [N,1,64,64]"),
        (np.zeros((1, 64, 64), np.uint16), "dtype uint16 is not supported"),
        (np.zeros((1, 64, 64), np.int32), "dtype int32 is not supported"),
        (np.full((1, 64, 64), 1.5, np.float32), "outside [0,1]"),
        (np.full((1, 64, 64), -0.1, np.float64), "outside [0,1]"),
        (np.full((1, 64, 64), np.nan, np.float32), "NaN or inf"),
    ],
)
def test_bad_npy_is_one_line_naming_the_file(tmp_path, capsys, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    code, out, err = _run_cli(
        capsys, "infer", "--model", tmp_path / "nobundle", path, "--out", tmp_path / "r.npz"
    )
    assert code == EXIT_DATA
    line = _one_line_error(err)
    assert "bad.npy" in line and message in line
    assert not (tmp_path / "r.npz").exists()


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy: not a readable .npy array"):
        load_inputs([path])


def test_missing_and_unsupported_inputs_are_named(tmp_path, capsys):
    code, _, err = _run_cli(
        capsys, "infer", "--model", tmp_path, tmp_path / "nope.png", "--out", tmp_path / "r.npz"
    )
    assert code == EXIT_DATA
    assert "nope.png: no such input file" in _one_line_error(err)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8")
    code, _, err = _run_cli(
        capsys, "infer", "--model", tmp_path, tmp_path / "x.jpg", "--out", tmp_path / "r.npz"
    )
    assert code == EXIT_DATA
    assert "x.jpg: unsupported input type .jpg" in _one_line_error(err)


# ---------------------------------------------------------------------------------------------
# a real bundle and research-format files


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle) -> Path:
    """The shared tiny real ONNX bundle (tests/conftest.py), read-only."""
    return Path(tiny_bundle)


@pytest.fixture(scope="module")
def runner(bundle_dir):
    from edge.runner import Runner

    with Runner.from_bundle(bundle_dir, backend="ort") as r:
        yield r


def _face(rng: np.random.Generator, identity: int, posture: int, size: int = 64) -> np.ndarray:
    """An 8-bit crop with identity- and posture-dependent structure, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(2 * np.pi * (identity + 1) * xx + posture) * np.cos(np.pi * (posture + 1) * yy)
    img = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
    return (img * 255).round().astype(np.uint8)


def _write_png(path: Path, img: np.ndarray) -> None:
    import cv2

    assert cv2.imwrite(str(path), img)


def _write_dataset(root: Path, identities: int = 3, samples: int = 1) -> Path:
    """Research-format crops (concealed b<k>b, unconcealed n<k>n) and a triplet CSV; returns the CSV."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(1, identities + 1):
        for k in range(1, 6):
            for n in range(1, samples + 1):
                clean = _face(rng, i, k - 1)
                concealed = np.clip(clean * 0.6 + rng.normal(40, 15, clean.shape), 0, 255).astype(np.uint8)
                _write_png(root / f"{i}_n{k}n_{n}.png", clean)
                _write_png(root / f"{i}_b{k}b_{n}.png", concealed)
                other = i % identities + 1
                rows.append([f"{i}_b{k}b_{n}.png", f"{i}_n{k}n_{n}.png", f"{other}_b{k}b_{n}.png"])
    csv_path = root / "test.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["anchor", "positive", "negative"])
        w.writerows(rows)
    return csv_path


def test_infer_on_png_and_npy_matches_the_runner(tmp_path, capsys, runner, bundle_dir):
    from scanner_io.dataset import load_crop

    rng = np.random.default_rng(1)
    a, b = _face(rng, 1, 0), _face(rng, 2, 2, size=80)  # b is resized to 64x64 on load
    _write_png(tmp_path / "1_b1b_1.png", a)
    _write_png(tmp_path / "2_b3b_1.png", b)
    arr = rng.random((2, 1, 64, 64)).astype(np.float32)
    np.save(tmp_path / "more.npy", arr)
    out = tmp_path / "results.npz"
    code, stdout, err = _run_cli(
        capsys, "infer", "--model", bundle_dir, "--backend", "ort",
        tmp_path / "1_b1b_1.png", tmp_path / "2_b3b_1.png", tmp_path / "more.npy", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}: 4 inputs")
    res = np.load(out, allow_pickle=False)
    assert res["names"].tolist() == ["1_b1b_1.png", "2_b3b_1.png", "more.npy[0]", "more.npy[1]"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # biometric data: owner only

    # the same inputs, built independently, through the library runner
    x = np.concatenate(
        [(a / 255.0)[None, None], load_crop(tmp_path / "2_b3b_1.png")[None, None], arr]
    ).astype(np.float32)
    want = runner.infer(x)
    assert res["embedding"].shape == (4, runner.embedding_dim) and res["embedding"].dtype == np.float32
    assert np.allclose(res["embedding"], want.embedding, atol=1e-5)
    assert np.allclose(res["posture_logits"], want.posture_logits, atol=1e-5)
    assert np.array_equal(res["posture"], want.posture)
    assert np.allclose(res["confidence"], want.confidence, atol=1e-5)
    assert res["reconstruction"].shape == (4, 1, 64, 64) and res["reconstruction"].dtype == np.float32
    assert np.allclose(res["reconstruction"], want.reconstruction, atol=1e-5)


def test_infer_routing_truth_and_no_reconstruction(tmp_path, capsys, runner, bundle_dir):
    rng = np.random.default_rng(2)
    names = ["1_b1b_1.png", "1_b4b_2.png", "3_n5n_1.png"]
    imgs = [_face(rng, 1, 0), _face(rng, 1, 3), _face(rng, 3, 4)]
    for name, img in zip(names, imgs, strict=True):
        _write_png(tmp_path / name, img)
    x = (np.stack(imgs)[:, None] / 255.0).astype(np.float32)
    truth = np.array([0, 3, 4])

    out = tmp_path / "truth.npz"
    code, _, err = _run_cli(
        capsys, "infer", "--model", bundle_dir, tmp_path, "--out", out, "--routing", "truth"
    )
    assert code == 0, err
    res = np.load(out)
    assert res["names"].tolist() == sorted(names)
    order = [names.index(n) for n in res["names"].tolist()]
    want = runner.infer(x[order], postures=truth[order])
    assert np.allclose(res["reconstruction"], want.reconstruction, atol=1e-5)
    # predicted routing gives the decoder of the predicted posture instead
    pred = runner.infer(x[order])
    differs = pred.posture != truth[order]
    if differs.any():
        assert not np.allclose(res["reconstruction"][differs], pred.reconstruction[differs], atol=1e-4)

    out2 = tmp_path / "norecon.npz"
    code, stdout, err = _run_cli(
        capsys, "infer", "--model", bundle_dir, tmp_path, "--out", out2, "--no-reconstruction"
    )
    assert code == 0, err
    assert "no reconstruction" in stdout
    res2 = np.load(out2)
    assert "reconstruction" not in res2.files
    assert np.allclose(res2["embedding"], res["embedding"], atol=1e-6)


def test_infer_routing_truth_refuses_npy(tmp_path, capsys, bundle_dir):
    np.save(tmp_path / "a.npy", np.zeros((1, 64, 64), np.uint8))
    code, _, err = _run_cli(
        capsys,
        "infer",
        "--model",
        bundle_dir,
        tmp_path / "a.npy",
        "--out",
        tmp_path / "r.npz",
        "--routing",
        "truth",
    )
    assert code == EXIT_DATA
    assert "--routing truth needs research-named PNG crops" in _one_line_error(err)


def test_infer_with_a_missing_bundle_is_one_line(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((1, 64, 64), np.uint8))
    code, _, err = _run_cli(
        capsys, "infer", "--model", tmp_path / "nobundle", tmp_path / "a.npy", "--out", tmp_path / "r.npz"
    )
    assert code != 0
    assert "nobundle" in _one_line_error(err)


def test_eval_json_matches_metrics_computed_by_hand(tmp_path, capsys, runner, bundle_dir):
    from edge.evaluation import reconstruction_metrics, verification_metrics
    from scanner_io.dataset import load_crop

    data = tmp_path / "data"
    csv_path = _write_dataset(data)
    code, stdout, err = _run_cli(
        capsys, "--json", "eval", "--model", bundle_dir, "--data", data, "--triplets", csv_path,
        "--routing", "truth", "--backend", "ort",
    )  # fmt: skip
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["routing"] == "truth"
    assert (
        rep["data"]["n_triplets"] == 15 and rep["data"]["n_images"] == 30 and rep["data"]["n_anchors"] == 15
    )
    assert list(rep["per_posture"]) == ["Front", "Left", "Right", "Up", "Down"]
    assert rep["model"]["sha256"] == runner.bundle.sha256

    # recompute from the files with the runner alone
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))

    def load(names):
        return np.stack([load_crop(data / n) for n in names])[:, None].astype(np.float32)

    anchors, positives, negatives = (load([r[c] for r in rows]) for c in ("anchor", "positive", "negative"))
    truth = np.array([int(r["anchor"].split("_")[1][1]) - 1 for r in rows])
    ea = runner.infer(anchors, postures=truth)
    ep, en = runner.infer(positives, reconstruct=False), runner.infer(negatives, reconstruct=False)
    d_pos = np.linalg.norm(ea.embedding - ep.embedding, axis=1)
    d_neg = np.linalg.norm(ea.embedding - en.embedding, axis=1)
    want_v = verification_metrics(d_pos, d_neg)
    got_v = rep["overall"]["verification"]
    for key in (
        "triplet_accuracy",
        "margin_rate",
        "roc_auc",
        "eer",
        "tar_at_far",
        "d_pos_mean",
        "d_neg_mean",
    ):
        assert got_v[key] == pytest.approx(want_v[key], abs=1e-5), key
    want_r = reconstruction_metrics(ea.reconstruction, positives)
    assert rep["overall"]["reconstruction"]["ssim_mean"] == pytest.approx(want_r["ssim_mean"], abs=1e-5)
    assert rep["overall"]["reconstruction"]["psnr_mean"] == pytest.approx(want_r["psnr_mean"], abs=1e-4)
    post = rep["overall"]["posture"]
    assert post["accuracy"] == pytest.approx(np.mean(ea.posture == truth))
    assert np.array(post["confusion"]).sum(axis=1).tolist() == [3, 3, 3, 3, 3]
    up = rep["per_posture"]["Up"]
    assert up["verification"]["n"] == 3
    assert up["posture"]["accuracy"] == pytest.approx(np.mean(ea.posture[truth == 3] == 3))

    # deployed routing: the decoder of the predicted posture
    code, stdout, err = _run_cli(
        capsys, "--json", "eval", "--model", bundle_dir, "--data", data, "--triplets", csv_path
    )
    assert code == 0, err
    rep_pred = json.loads(stdout)
    assert rep_pred["routing"] == "predicted"
    want_p = reconstruction_metrics(runner.infer(anchors).reconstruction, positives)
    assert rep_pred["overall"]["reconstruction"]["ssim_mean"] == pytest.approx(want_p["ssim_mean"], abs=1e-5)
    if (ea.posture != truth).any():  # routing changes what is scored
        assert rep_pred["overall"]["reconstruction"]["ssim_mean"] != pytest.approx(
            want_r["ssim_mean"], abs=1e-6
        )


def test_eval_renders_tables(tmp_path, capsys, bundle_dir):
    data = tmp_path / "data"
    csv_path = _write_dataset(data, identities=2)
    code, stdout, err = _run_cli(
        capsys, "eval", "--model", bundle_dir, "--data", data, "--triplets", csv_path
    )
    assert code == 0, err
    assert "Verification" in stdout and "Confusion matrix" in stdout and "Reconstruction" in stdout
    assert "routing  reconstruction decoder chosen by predicted posture" in stdout


def test_eval_names_a_missing_file(tmp_path, capsys, bundle_dir):
    data = tmp_path / "data"
    csv_path = _write_dataset(data, identities=2)
    (data / "2_n3n_1.png").unlink()
    (data / "1_b4b_1.png").unlink()
    code, _, err = _run_cli(capsys, "eval", "--model", bundle_dir, "--data", data, "--triplets", csv_path)
    assert code == EXIT_DATA
    line = _one_line_error(err)
    # anchor 1_b4b_1 is in triplet 4 = CSV line 5 (and the negative of triplet 9); 2_n3n_1 the
    # positive of triplet 8
    assert "test.csv line 5: anchor file 1_b4b_1.png not found" in line
    assert "(2 more missing)" in line


def test_eval_names_a_malformed_csv_row(tmp_path, capsys, bundle_dir):
    data = tmp_path / "data"
    csv_path = _write_dataset(data, identities=2)
    with open(csv_path, "a") as f:
        f.write("1_b1b_1.png,1_n1n_1.png\n")  # line 12: header + 10 triplets before it
    code, _, err = _run_cli(capsys, "eval", "--model", bundle_dir, "--data", data, "--triplets", csv_path)
    assert code == EXIT_DATA
    line = _one_line_error(err)
    assert "test.csv line 12" in line


def test_eval_names_a_file_outside_the_research_format(tmp_path, capsys, bundle_dir):
    data = tmp_path / "data"
    csv_path = _write_dataset(data, identities=2)
    _write_png(data / "face.png", np.zeros((64, 64), np.uint8))
    with open(csv_path, "a") as f:
        f.write("face.png,1_n1n_1.png,2_b1b_1.png\n")
    code, _, err = _run_cli(capsys, "eval", "--model", bundle_dir, "--data", data, "--triplets", csv_path)
    assert code == EXIT_DATA
    assert "face.png" in _one_line_error(err)


def test_eval_on_a_simulated_dataset_written_by_write_dataset(tmp_path, capsys, bundle_dir):
    from calibration.simulated import write_dataset

    summary = write_dataset(tmp_path / "sim", identities=4, samples=1, seed=0, test_identities=2)
    sim = tmp_path / "sim"
    code, stdout, err = _run_cli(
        capsys, "--json", "eval", "--model", bundle_dir, "--data", sim, "--triplets", sim / "test.csv"
    )
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["data"]["n_triplets"] == summary.test_triplets == 10
    assert rep["overall"]["posture"]["n"] == 10  # 2 identities x 5 postures, one sample
    assert 0.0 <= rep["overall"]["verification"]["roc_auc"] <= 1.0
    assert -1.0 <= rep["overall"]["reconstruction"]["ssim_mean"] <= 1.0


def test_eval_finds_research_names_under_data_when_the_csv_lives_elsewhere(tmp_path, capsys, bundle_dir):
    data = tmp_path / "faceData_cropped_64x64"
    csv_in_data = _write_dataset(data, identities=2)
    elsewhere = tmp_path / "datafiles" / "test_dataset.csv"
    elsewhere.parent.mkdir()
    csv_in_data.rename(elsewhere)  # bare file names, relative to the image folder
    code, stdout, err = _run_cli(
        capsys, "--json", "eval", "--model", bundle_dir, "--data", data, "--triplets", elsewhere
    )
    assert code == 0, err
    assert json.loads(stdout)["data"]["n_triplets"] == 10
    code, _, err = _run_cli(
        capsys, "--json", "eval", "--model", bundle_dir, "--data", tmp_path, "--triplets", elsewhere
    )
    assert code == EXIT_DATA
    assert "anchor file 1_b1b_1.png not found under" in _one_line_error(err)
