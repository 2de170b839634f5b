"""Shared test set-up: the `gpu` marker, zmq context teardown checks, tiny model bundles."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import threading
from collections.abc import Iterator

import pytest
import zmq
import zmq.utils.garbage as zmq_garbage


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


# --- the engine cache: never the developer's or the device's real one ---------------------------


@pytest.fixture(autouse=True)
def _engine_cache_in_tmp(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Point $THZEDGE_ENGINE_CACHE at a per-test directory (created only when a test builds)."""
    from edge.backends.engine_cache import ENGINE_CACHE_ENV

    name = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    monkeypatch.setenv(ENGINE_CACHE_ENV, str(tmp_path_factory.getbasetemp() / "engine-cache" / name))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)


# --- zmq: every context a test creates must terminate -------------------------------------------
# A context terminates only when all its sockets are closed, so a socket left open anywhere (a
# test, a fixture, a library thread that was not stopped) fails the test that created the context.

ZMQ_TERM_TIMEOUT_S = 10.0


@pytest.fixture(autouse=True)
def _zmq_contexts_terminate() -> Iterator[None]:
    """Fail the test if a zmq context it created (`zmq.Context()`, `.instance()`) does not terminate."""
    created: list[zmq.Context] = []
    init = zmq.Context.__init__

    def recording_init(self: zmq.Context, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        created.append(self)

    zmq.Context.__init__ = recording_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        zmq.Context.__init__ = init  # type: ignore[method-assign]
    # pyzmq's own zero-copy garbage collector keeps a context with a live pipe for the process.
    pyzmq_gc = zmq_garbage.gc._context
    checked = [ctx for ctx in created if ctx is not pyzmq_gc and not ctx._shadow and not ctx.closed]
    stuck = [ctx for ctx in checked if not _terminates(ctx)]
    if stuck:
        if zmq.Context._instance in stuck:
            zmq.Context._instance = None  # later tests get a fresh process context, not a dying one
        pytest.fail(
            f"{len(stuck)} zmq context(s) did not terminate within {ZMQ_TERM_TIMEOUT_S:g} s: "
            "a socket was left open (close every socket, with linger=0)",
            pytrace=False,
        )


def _terminates(ctx: zmq.Context) -> bool:
    # term() blocks while a socket is open; run it aside so a leak fails the test instead of hanging it.
    done = threading.Event()

    def term() -> None:
        ctx.term()
        done.set()

    threading.Thread(target=term, daemon=True, name="zmq-term-check").start()
    return done.wait(ZMQ_TERM_TIMEOUT_S)


@pytest.fixture
def zmq_ctx() -> zmq.Context:
    """The process context; `_zmq_contexts_terminate` fails the test if it does not terminate."""
    return zmq.Context.instance()


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
