"""Shared test set-up: the `gpu` marker skips where no CUDA device and TensorRT exist."""

from __future__ import annotations

import importlib.util
import shutil

import pytest


def _gpu_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    return shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with TensorRT")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- model bundles (export-core) ---------------------------------------------------------------
# A real bundle from random weights through the real exporter, for any test that needs one
# without waiting for the demo model. Needs torch/onnx (the export extra); skipped without them.


@pytest.fixture(scope="session")
def tiny_model():  # -> export.model.MTLNetwork
    """A small random MTLNetwork (width 1/8, 32-d embedding, 5 postures, non-trivial BN stats), eval mode."""
    pytest.importorskip("torch")
    from model_factory import random_network

    return random_network(width=0.125, embedding_dim=32, seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model, tmp_path_factory: pytest.TempPathFactory):  # -> pathlib.Path
    """Path of a verified bundle exported from `tiny_model` (max batch 4). Treat it as read-only."""
    pytest.importorskip("onnx")
    from model_factory import write_tiny_bundle

    return write_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle") / "bundle", tiny_model, max_batch=4)
