"""`thzedge view` in a real headless browser: Debian's chromium driven by Playwright.

A real daemon (publishing input and reconstruction over ipc), a real `thzedge view` process
and a real browser: the page loads, frames and decisions arrive and change, the
reconstruction never reaches a page that did not ask for it, and closing the tab leaves the
daemon untouched. `.ci/run` installs chromium; outside CI the tests skip without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon_helpers import REPO, Subscriber, finish, thzedge_run, write_config

from edge.cli import main

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: .ci/run installs it with apt-get")
    pytest.skip("chromium is not installed (apt-get install chromium)")


class Viewer:
    """A `thzedge view` subprocess; `url` is read from the line it prints at start."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge", *args],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def url(self, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.lines:
                if " open http" in line:
                    return line.split(" open ", 1)[1].strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"viewer printed no URL: {''.join(self.lines)}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def daemon(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    d = tmp_path_factory.mktemp("view")
    crops = d / "crops.npy"
    np.save(crops, np.random.default_rng(2).random((3, 64, 64), dtype=np.float32))
    gallery = d / "g.npz"
    assert (
        main(
            [
                "enroll",
                str(crops),
                "--model",
                str(tiny_bundle),
                "--gallery",
                str(gallery),
                "--identity",
                "p-3",
            ]
        )
        == 0
    )
    pub = f"ipc://{d}/results.sock"
    cfg = write_config(
        d / "thzedge.toml",
        f'[verification]\ngallery = "{gallery}"\nthreshold = 1.0\n'
        "[privacy]\npublish_input = true\npublish_reconstruction = true\n"
        f'[publisher]\nendpoint = "{pub}"\n',
    )
    proc = thzedge_run("sim?fps=20&seed=3", tiny_bundle, cfg, pub, "--max-frames", "100000")
    sub = Subscriber(pub)
    try:
        sub.wait_state(proc=proc)
    finally:
        sub.close()
    yield pub, cfg, proc
    proc.terminate()
    rc, _, err = finish(proc)
    assert rc == 0, err[-2000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    path = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _watch(page: object) -> list[dict]:
    """Every WebSocket frame the page receives, decoded."""
    frames: list[dict] = []

    def on_ws(ws: object) -> None:
        ws.on("framereceived", lambda payload: frames.append(json.loads(payload)))  # type: ignore[attr-defined]

    page.on("websocket", on_ws)  # type: ignore[attr-defined]
    return frames


def test_page_shows_live_frames_and_decisions_and_never_the_reconstruction(daemon, browser) -> None:
    pub, cfg, proc = daemon
    viewer = Viewer("--config", str(cfg), "view", pub, "--bind", "127.0.0.1:0", "--max-fps", "5")
    try:
        page = browser.new_page(bypass_csp=True)  # type: ignore[attr-defined]  # page CSP forbids eval
        frames = _watch(page)
        t0 = time.monotonic()
        page.goto(viewer.url())
        assert page.title() == "thzedge view"
        page.wait_for_function("document.body.dataset.seq !== ''", timeout=30000)
        first_seq = int(page.get_attribute("body", "data-seq"))
        first_src = page.get_attribute("#input", "src")
        assert first_src.startswith("data:image/png;base64,") and page.is_visible("#input")
        page.wait_for_function(f"Number(document.body.dataset.seq) > {first_seq}", timeout=30000)
        assert page.get_attribute("#input", "src") != first_src  # a new frame, not the same picture
        assert page.inner_text("#posture") in ("Front", "Left", "Right", "Up", "Down")
        assert page.inner_text("#decision") in ("accept", "unknown")
        assert page.inner_text("#state") == "daemon: ready" and page.inner_text("#link") == "live"
        page.wait_for_function("Number(document.getElementById('seen').textContent) >= 10", timeout=30000)
        assert float(page.inner_text("#fps")) > 0
        # On a loaded machine the page may have had only two snapshots so far: wait for a third.
        deadline = time.monotonic() + 30
        while len({f["seq"] for f in frames if f["seq"] is not None}) < 3 and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        # The daemon publishes reconstructions, but this page was not started with the flag.
        assert not page.is_visible("#recon-figure") and not page.is_visible("#banner")
        # At most --max-fps snapshots a second reach the page (the daemon sends 20 results a second).
        assert len(frames) <= 5 * (time.monotonic() - t0) + 2
        assert frames and all("reconstruction" not in f for f in frames)
        assert all(not f["reconstruction_enabled"] for f in frames)
        seqs = [f["seq"] for f in frames if f["seq"] is not None]
        assert len(set(seqs)) >= 3  # decisions and frames change
        assert len({f["decision"]["decision"] for f in frames if f["decision"]}) >= 1
        page.close()  # the tab goes away
        time.sleep(1.0)
        assert proc.poll() is None and viewer.proc.poll() is None
        sub = Subscriber(pub)  # the daemon carries on publishing as before
        try:
            sub.pump(10, until=lambda s: len(s.results) >= 5)
            assert len(sub.results) >= 5
        finally:
            sub.close()
    finally:
        assert viewer.stop() == 0, "".join(viewer.lines)
    assert proc.poll() is None  # stopping the viewer does not stop the daemon either


def test_reconstruction_only_with_the_flag_and_a_banner(daemon, browser) -> None:
    pub, cfg, proc = daemon
    viewer = Viewer("--config", str(cfg), "view", pub, "--bind", "127.0.0.1:0", "--show-reconstruction")
    try:
        page = browser.new_page(bypass_csp=True)  # type: ignore[attr-defined]  # page CSP forbids eval
        page.goto(viewer.url())
        page.wait_for_function(
            "document.getElementById('recon').src.startsWith('data:image/png')", timeout=30000
        )
        assert page.is_visible("#banner") and "biometric" in page.inner_text("#banner")
        assert page.is_visible("#recon")
        assert any("biometric" in line for line in viewer.lines)
        page.close()
    finally:
        assert viewer.stop() == 0
    assert proc.poll() is None


def test_remote_bind_needs_the_config_setting_and_then_a_token(daemon, tmp_path: Path) -> None:
    pub, cfg, _ = daemon
    refused = Viewer("--config", str(cfg), "view", pub, "--bind", "0.0.0.0:0")
    assert refused.proc.wait(timeout=30) == 78
    refused._reader.join(5)
    assert "allow_remote" in "".join(refused.lines)
    remote = tmp_path / "remote.toml"
    remote.write_text(cfg.read_text() + "[view]\nallow_remote = true\n")
    viewer = Viewer("--config", str(remote), "view", pub, "--bind", "0.0.0.0:0")
    try:
        url = viewer.url()
        assert "?token=" in url
        local = url.replace("0.0.0.0", "127.0.0.1")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(local.split("?")[0], timeout=10)
        assert err.value.code == 403
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(local.split("?")[0] + "?token=wrong", timeout=10)
        with urllib.request.urlopen(local, timeout=10) as r:
            assert r.status == 200 and b"thzedge view" in r.read()
    finally:
        viewer.stop()


def test_the_input_is_published_only_where_biometric_data_may_go() -> None:
    from edge.config import config_from_dict
    from scanner_io.errors import ConfigError

    plain_tcp = {"publisher": {"endpoint": "tcp://127.0.0.1:5999"}, "daemon": {"insecure_dev": True}}
    with pytest.raises(ConfigError, match="publish_input = true but .* has no CURVE"):
        config_from_dict({**plain_tcp, "privacy": {"publish_input": True}})
    assert config_from_dict({"privacy": {"publish_input": True}}).privacy.publish_input  # ipc default


def test_state_folds_drops_and_calibration_events_and_drops_unasked_reconstructions() -> None:
    from edge.results import FrameResult, Provenance, decode_message, encode_event, encode_result
    from edge.view.state import ViewState

    r = FrameResult("s0", 7, 1, "ok", Provenance("b" * 64, "fp32", "ort", "p1"), latency_ms={"total": 3.0})
    r.reconstruction = np.full((64, 64), 0.5, np.float32)
    r.input = np.zeros((64, 64), np.float32)
    msg = decode_message(encode_result(r, 2, publish_reconstruction=True, publish_input=True))
    events = [
        encode_event("s0", "drop", {"reason": "stale", "count": 2, "seq": 5}),
        encode_event("s0", "drop", {"reason": "stale", "count": 3, "seq": 6}),
        encode_event("s0", "calibration", {"check": "envelope", "state": "stale", "reason": "30 days old"}),
    ]
    for show in (False, True):
        state = ViewState("ipc:///x", show_reconstruction=show)
        state.update(msg, now=10.0)
        for e in events:
            state.update(decode_message(e), now=10.1)
        snap = state.snapshot(now=10.2)
        assert snap["seq"] == 7 and snap["connected"] and snap["drops"] == {"stale": 5}
        assert snap["calibration_checks"] == {"envelope": {"state": "stale", "reason": "30 days old"}}
        assert snap["input"].startswith("data:image/png;base64,")
        assert ("reconstruction" in snap) is show and (not show or snap["reconstruction"].startswith("data:"))
        assert not state.snapshot(now=20.0)["connected"]  # silent for 2 s: "no daemon"
