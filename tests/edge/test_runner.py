"""Runner and ORT backend on a real exported bundle, compared with the eval-mode PyTorch network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edge.backends import create_backend
from edge.backends.ort import OrtBackend
from edge.bundle import Bundle
from edge.runner import Runner, softmax
from scanner_io.errors import DataError, MissingDependencyError, ThzEdgeError

torch = pytest.importorskip("torch")

TOL = 1e-4


@pytest.fixture(scope="module")
def runner(tiny_bundle: Path):
    r = Runner.from_bundle(tiny_bundle, backend="ort")
    yield r
    r.close()


def _frames(n: int, seed: int = 0) -> np.ndarray:
    from model_factory import probe_frames

    return probe_frames(n, seed=seed + 100)  # varied frames, so predicted postures differ


def _torch(model, x: np.ndarray, postures: np.ndarray | None = None):
    with torch.no_grad():
        t = torch.from_numpy(x)
        return model(t, None if postures is None else torch.from_numpy(postures))


def test_predicted_routing_matches_pytorch_across_split_batches(runner: Runner, tiny_model) -> None:
    x = _frames(11)  # max batch is 4: three encoder chunks
    got = runner.infer(x)
    want = _torch(tiny_model, x)
    assert np.abs(got.embedding - want.embedding.numpy()).max() < TOL
    assert np.abs(got.posture_logits - want.posture_logits.numpy()).max() < TOL
    np.testing.assert_array_equal(got.posture, want.posture_logits.argmax(1).numpy())
    assert len(set(got.posture.tolist())) > 1  # several decoders were exercised
    assert got.routed_by == "predicted"
    assert np.abs(got.reconstruction - want.reconstruction.numpy()).max() < TOL
    np.testing.assert_allclose(np.linalg.norm(got.embedding, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got.confidence, softmax(got.posture_logits).max(axis=1), rtol=1e-6)


def test_given_postures_route_each_frame_to_its_decoder(runner: Runner, tiny_model) -> None:
    x = _frames(10, seed=1)
    postures = np.array([4, 4, 0, 1, 2, 3, 4, 0, 4, 4])  # five frames for one decoder: split in two
    got = runner.infer(x, postures=postures)
    want = _torch(tiny_model, x, postures)
    assert got.routed_by == "given"
    assert np.abs(got.reconstruction - want.reconstruction.numpy()).max() < TOL
    # Different decoders really give different images: routing is not a no-op.
    other = runner.reconstruct(runner.encode(x), (postures + 1) % 5)
    assert np.abs(other - got.reconstruction).max() > 1e-3


def test_reconstruction_can_be_switched_off(runner: Runner) -> None:
    res = runner.infer(_frames(3), reconstruct=False)
    assert res.reconstruction is None and res.embedding.shape == (3, 32)


@pytest.mark.parametrize(
    ("x", "fragment"),
    [
        (np.zeros((2, 64, 64), np.float32), "shape"),
        (np.zeros((2, 1, 32, 32), np.float32), "shape"),
        (np.zeros((0, 1, 64, 64), np.float32), "N >= 1"),
        (np.zeros((2, 1, 64, 64), np.uint8), "uint8"),
        (np.full((2, 1, 64, 64), 255.0, np.float32), "[0,1]"),
        (np.full((2, 1, 64, 64), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_input_is_a_data_error(runner: Runner, x: np.ndarray, fragment: str) -> None:
    with pytest.raises(DataError, match=None) as info:
        runner.infer(x)
    assert fragment in str(info.value)


def test_bad_postures_are_a_data_error(runner: Runner) -> None:
    with pytest.raises(DataError, match="shape"):
        runner.infer(_frames(3), postures=np.array([0, 1]))
    with pytest.raises(DataError, match="out of range"):
        runner.infer(_frames(2), postures=np.array([0, 5]))


def test_backend_validates_feeds_against_the_spec(tiny_bundle: Path) -> None:
    with create_backend(Bundle.open(tiny_bundle), "ort") as be:
        x = _frames(2)
        out = be.infer("encoder", {"thz": x})
        assert set(out) == {"embedding", "posture_logits", "feat1", "feat2", "feat3", "feat4"}
        with pytest.raises(DataError, match="unknown graph"):
            be.infer("decoder_9", {"thz": x})
        with pytest.raises(DataError, match="takes inputs"):
            be.infer("encoder", {"x": x})
        with pytest.raises(DataError, match="float32"):
            be.infer("encoder", {"thz": x.astype(np.float64)})
        with pytest.raises(DataError, match="shape"):
            be.infer("encoder", {"thz": x[:, :, :32]})
        with pytest.raises(DataError, match="max batch"):
            be.infer("encoder", {"thz": _frames(5)})
        feats = {k: out[k] for k in ("feat1", "feat2", "feat3", "feat4")}
        feats["feat4"] = feats["feat4"][:1]
        with pytest.raises(DataError, match="batch size"):
            be.infer("decoder_0", feats)
    with pytest.raises(ThzEdgeError, match="closed"):
        be.infer("encoder", {"thz": x})


def test_sessions_do_not_spin(tiny_bundle: Path) -> None:
    be = OrtBackend(Bundle.open(tiny_bundle), threads=2)
    try:
        for sess in be._sessions.values():
            opts = sess.get_session_options()
            assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
            assert opts.intra_op_num_threads == 2
        assert be.describe()["providers"][-1] == "CPUExecutionProvider"
    finally:
        be.close()


def test_backend_choice(tiny_bundle: Path) -> None:
    b = Bundle.open(tiny_bundle)
    with create_backend(b, "auto") as be:
        assert be.name == "ort"  # no GPU/TensorRT here
    with pytest.raises(ThzEdgeError, match="unknown backend"):
        create_backend(b, "cuda")
    with pytest.raises(ThzEdgeError, match="int8"):
        create_backend(b, "ort", precision="int8")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(ThzEdgeError) as info:
            create_backend(b, "trt")
        if importlib.util.find_spec("edge.backends.trt") is None:
            assert isinstance(info.value, MissingDependencyError)


class _BreaksOn:
    """A real runner whose encoder rejects any batch holding frame `bad_enc`, and whose decoders
    fail for any group holding the frame with features equal to frame `bad_dec`'s."""

    def __init__(self, inner: Runner, x: np.ndarray, bad_enc: int, bad_dec: int) -> None:
        self.inner = inner
        self.max_batch = inner.max_batch
        self.postures = inner.postures
        self.bad_x = x[bad_enc]
        self.bad_feat = inner.encode(x[bad_dec : bad_dec + 1]).features["feat4"][0]

    def encode(self, x: np.ndarray):
        if any(np.array_equal(row, self.bad_x) for row in x):
            raise RuntimeError("encoder failed")
        return self.inner.encode(x)

    def reconstruct(self, enc, postures: np.ndarray) -> np.ndarray:
        if any(np.array_equal(f, self.bad_feat) for f in enc.features["feat4"]):
            raise RuntimeError("decoder failed")
        return self.inner.reconstruct(enc, postures)


def test_infer_isolated_costs_a_failure_only_its_own_frame(runner: Runner) -> None:
    from edge.runner import Task, infer_isolated

    x = _frames(4)
    want = runner.infer(x)
    # A batch the encoder rejects: every frame is retried alone, only frame 1 fails.
    got = infer_isolated(_BreaksOn(runner, x, bad_enc=1, bad_dec=2), x)
    assert [[f.task for f in o.failures] for o in got.frames] == [[], [Task.encoder], [Task.reconstruct], []]
    assert got.frames[1].prediction is None
    for i in (0, 2, 3):
        p = got.frames[i].prediction
        assert p is not None and p.posture == int(want.posture[i])
        assert abs(p.confidence - float(want.confidence[i])) < 1e-6
        np.testing.assert_allclose(p.embedding, want.embedding[i], atol=1e-6)
    # Frame 2's decoder failed alone: it keeps its posture, the others their reconstructions.
    assert got.frames[2].prediction.reconstruction is None
    for i in (0, 3):
        np.testing.assert_allclose(
            got.frames[i].prediction.reconstruction, want.reconstruction[i, 0], atol=1e-6
        )
    assert got.encode_ms > 0 and got.reconstruct_ms is not None


def test_infer_isolated_one_batch_when_nothing_fails(runner: Runner) -> None:
    from edge.runner import infer_isolated

    x = _frames(3)
    got = infer_isolated(runner, x, reconstruct=False)
    assert all(not o.failures and o.prediction is not None for o in got.frames)
    assert got.reconstruct_ms is None
    assert all(o.prediction.reconstruction is None for o in got.frames)
