"""Research checkpoint import: both layouts, both decoder key sets, safe loading and refusals."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_factory import random_network, research_state_dict, save_research_checkpoint  # noqa: E402

from export.checkpoint import (  # noqa: E402
    LAYOUT_DISTILLED,
    LAYOUT_THZ_ONLY,
    build_model,
    import_checkpoint,
    infer_config,
    normalise_keys,
)
from export.model import MTLNetwork, count_parameters  # noqa: E402
from scanner_io.errors import CheckpointError  # noqa: E402

DATA = Path(__file__).parent / "data"


def _doc_layout(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype) as listed in checkpoint-layouts.md (copied to tests/export/data)."""
    out = {}
    for line in (DATA / name).read_text().splitlines():
        key, shape, dtype = (
            line.split(" ", 1)[0],
            line.split(" ", 1)[1].rsplit(" ", 1)[0],
            line.rsplit(" ", 1)[1],
        )
        out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return out


def _shapes(sd: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}


def _outputs(model: MTLNetwork, x: torch.Tensor, postures: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.eval()(x, postures))


# --- research width: the network's names and shapes are the documented ones ----------------------


def test_research_width_thz_only_keys_and_shapes_match_the_documented_layout() -> None:
    model = MTLNetwork(embedding_dim=128, num_postures=5, width=1.0)
    assert count_parameters(model) == 23_498_010  # research-model.md §5.6
    # Layout 1 in the doc lists decoders under ids 1..5.
    assert _shapes(research_state_dict(model, "thz-only", "1..5")) == _doc_layout("layout_thz_only.txt")


def test_research_width_distilled_documented_layout_imports_to_a_64d_student() -> None:
    doc = _doc_layout("layout_distilled.txt")
    # Build the state dict from the documented shapes alone (zeros: contents do not matter here).
    sd = {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, (shape, dtype) in doc.items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k].fill_(1.0)
    normalised, layout, ids, dropped = normalise_keys(sd)
    config = infer_config(normalised)
    model = build_model(normalised, config)
    assert layout == LAYOUT_DISTILLED and ids == ("0", "1", "2", "3", "4")
    assert (config.embedding_dim, config.num_postures, config.width) == (64, 5, 1.0)
    assert count_parameters(model) == 23_481_562
    # Every dropped tensor is a training-only part: teacher, visible encoder, attention, projections.
    assert dropped == len(doc) - len(model.state_dict())


# --- import round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "decoder_ids", "bare"),
    [
        ("thz-only", "0..4", False),
        ("thz-only", "1..5", True),
        ("distilled", "0..4", False),
        ("distilled", "1..5", False),
    ],
)
def test_import_reproduces_the_saved_network(
    tmp_path: Path, layout: str, decoder_ids: str, bare: bool
) -> None:
    original = random_network(width=0.125, embedding_dim=64 if layout == "distilled" else 32, seed=3)
    path = save_research_checkpoint(tmp_path / "best.pth", original, layout, decoder_ids, bare=bare)
    imported = import_checkpoint(path)
    assert imported.layout == (LAYOUT_DISTILLED if layout == "distilled" else LAYOUT_THZ_ONLY)
    assert imported.config.width == 0.125
    assert imported.config.embedding_dim == original.config.embedding_dim
    assert not imported.model.training
    x = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    postures = torch.tensor([0, 1, 2, 3, 4, 2])
    for got, want in zip(_outputs(imported.model, x, postures), _outputs(original, x, postures), strict=True):
        assert torch.equal(got, want)
    if layout == "distilled":
        assert imported.dropped > 0
    if not bare:
        assert imported.source()["epoch"] == 12


def test_research_extras_need_the_allowlist_and_load_without_trust(tmp_path: Path) -> None:
    path = save_research_checkpoint(tmp_path / "c.pth", random_network(seed=1))
    # Without the numpy allowlist torch refuses the file: the allowlist is what admits it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert import_checkpoint(path).config.num_postures == 5


# --- refusals: one line naming what is wrong -----------------------------------------------------


def _refused(path: Path, *fragments: str, trust: bool = False) -> str:
    with pytest.raises(CheckpointError) as info:
        import_checkpoint(path, trust=trust)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@pytest.fixture(scope="module")
def small() -> MTLNetwork:
    return random_network(width=0.125, seed=5)


def test_unknown_layout_is_refused(tmp_path: Path, small: MTLNetwork) -> None:
    sd = {k.replace("encoder.", "net."): v for k, v in research_state_dict(small).items()}
    path = save_research_checkpoint(tmp_path / "c.pth", small, state_dict=sd)
    _refused(path, "unknown checkpoint layout", "net.")


def test_missing_key_is_refused(tmp_path: Path, small: MTLNetwork) -> None:
    sd = research_state_dict(small)
    del sd["encoder.backbone.backbone.stage3.bn2.running_var"]
    path = save_research_checkpoint(tmp_path / "c.pth", small, state_dict=sd)
    _refused(path, "missing key", "stage3.bn2.running_var")


def test_unexpected_key_is_refused(tmp_path: Path, small: MTLNetwork) -> None:
    sd = research_state_dict(small)
    sd["encoder.extra_head.weight"] = torch.zeros(3)
    path = save_research_checkpoint(tmp_path / "c.pth", small, state_dict=sd)
    _refused(path, "unexpected key", "encoder.extra_head.weight")


def test_wrong_shape_is_refused(tmp_path: Path, small: MTLNetwork) -> None:
    sd = research_state_dict(small)
    sd["reconstruction_decoders.2.up3.conv.weight"] = torch.zeros(7, 7, 3, 3)
    path = save_research_checkpoint(tmp_path / "c.pth", small, state_dict=sd)
    _refused(path, "wrong shape", "reconstruction_decoders.2.up3.conv.weight", "(7, 7, 3, 3)")


def test_odd_decoder_key_set_is_refused(tmp_path: Path, small: MTLNetwork) -> None:
    sd = {
        k.replace("reconstruction_decoders.4.", "reconstruction_decoders.7."): v
        for k, v in research_state_dict(small).items()
    }
    path = save_research_checkpoint(tmp_path / "c.pth", small, state_dict=sd)
    _refused(path, "decoder keys", "'7'")


def test_nan_weights_are_refused(tmp_path: Path, small: MTLNetwork) -> None:
    sd = research_state_dict(small)
    sd["encoder.classification_head.bias"] = torch.full_like(
        sd["encoder.classification_head.bias"], float("nan")
    )
    path = save_research_checkpoint(tmp_path / "c.pth", small, state_dict=sd)
    _refused(path, "NaN", "classification_head.bias")


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_file_is_refused(tmp_path: Path, small: MTLNetwork, keep: float) -> None:
    full = save_research_checkpoint(tmp_path / "full.pth", small).read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full[: int(len(full) * keep)])
    _refused(cut, "truncated")


def test_empty_and_foreign_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.pth").write_bytes(b"")
    _refused(tmp_path / "empty.pth", "empty")
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    _refused(tmp_path / "notes.pth", "not a PyTorch checkpoint")
    _refused(tmp_path / "absent.pth", "does not exist")


def test_checkpoint_without_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "config": {"a": 1}}, tmp_path / "c.pth")
    _refused(tmp_path / "c.pth", "model_state_dict")


class _RunsCode:
    """Unpickling this calls os.makedirs(marker): code execution with a visible side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def test_pickle_that_runs_code_is_refused_unless_trusted(tmp_path: Path, small: MTLNetwork) -> None:
    marker = tmp_path / "code-ran"
    path = save_research_checkpoint(tmp_path / "c.pth", small, extra={"config": _RunsCode(marker)})
    msg = _refused(path, "would run code", "--trust-checkpoint", "os.makedirs")
    assert "allowlist" in msg
    assert not marker.exists()  # refused before anything ran
    imported = import_checkpoint(path, trust=True)
    assert marker.is_dir()  # trusted: the pickle ran, and the model still imported
    assert imported.config.embedding_dim == small.config.embedding_dim


def test_numpy_histories_survive_as_numpy(tmp_path: Path, small: MTLNetwork) -> None:
    from export.checkpoint import load_raw

    obj = load_raw(save_research_checkpoint(tmp_path / "c.pth", small))
    assert isinstance(obj["val_metrics"]["confusion"][0], np.ndarray)
    assert isinstance(obj["best_val_loss"], np.floating)
