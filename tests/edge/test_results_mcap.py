"""`run --record-results FILE`: the results as JSON-schema channels, read back with the `mcap` library."""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from daemon_helpers import Subscriber, finish, run_until_exit, summary_of, thzedge_run, write_config
from mcap.reader import make_reader

from edge.cli import main

pytestmark = pytest.mark.timeout(180)


def _read(path: Path) -> tuple[dict[str, list[dict]], dict[str, tuple[str, str]], dict[str, dict]]:
    by_topic: dict[str, list[dict]] = defaultdict(list)
    schemas: dict[str, tuple[str, str]] = {}
    with open(path, "rb") as f:
        reader = make_reader(f)
        for schema, channel, message in reader.iter_messages():
            assert channel.message_encoding == "json" and schema.encoding == "jsonschema"
            schemas[channel.topic] = (schema.name, json.loads(schema.data)["title"])
            by_topic[channel.topic].append(json.loads(message.data))
        metadata = {m.name: dict(m.metadata) for m in reader.iter_metadata()}
    return by_topic, schemas, metadata


@pytest.fixture(scope="module")
def gallery(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gallery")
    crops = d / "crops.npy"
    np.save(crops, np.random.default_rng(1).random((3, 64, 64), dtype=np.float32))
    g = d / "g.npz"
    assert (
        main(["enroll", str(crops), "--model", str(tiny_bundle), "--gallery", str(g), "--identity", "p-7"])
        == 0
    )
    return g


@pytest.mark.parametrize("biometric", [False, True])
def test_recorded_results_match_the_published_ones(
    tiny_bundle: Path, gallery: Path, tmp_path: Path, biometric: bool
) -> None:
    pub = f"ipc://{tmp_path}/r.sock"
    cfg = write_config(
        tmp_path / "thzedge.toml",
        f'[verification]\ngallery = "{gallery}"\nthreshold = 2.0\n'
        f"[privacy]\nrecord_results = {str(biometric).lower()}\n",
    )
    out = tmp_path / "results.mcap"
    sub = Subscriber(pub)
    # Live at 10 frames/s: the subscriber has joined (at bind) long before the last results.
    daemon = thzedge_run(
        "sim?seed=5&fps=10", tiny_bundle, cfg, pub, "--max-frames", "12", "--record-results", str(out)
    )
    try:
        sub.wait_state(proc=daemon)
        rc, stdout, err = run_until_exit(daemon, sub)
    finally:
        sub.close()
        if daemon.poll() is None:
            daemon.kill()
            finish(daemon)
    assert rc == 0, err[-2000:]
    assert summary_of(stdout)["published"] == 12
    topics, schemas, metadata = _read(out)
    assert schemas["/sim0/posture"] == ("thzedge.Posture", "thzedge.Posture")
    assert schemas["/sim0/decision"][0] == "thzedge.Decision"
    assert schemas["/sim0/latency"][0] == "thzedge.Latency"
    assert schemas["/sim0/status"][0] == "thzedge.ResultStatus"
    # Every published result is recorded, even those sent before the subscriber had joined.
    published = {r["seq"]: r for r in sub.results}
    assert [m["seq"] for m in topics["/sim0/status"]] == list(range(12))
    assert published and set(published) <= set(range(12))
    for m in (m for m in topics["/sim0/posture"] if m["seq"] in published):
        assert m["label"] == published[m["seq"]]["posture"]["label"]
        assert m["confidence"] == pytest.approx(published[m["seq"]]["posture"]["confidence"])
    for m in (m for m in topics["/sim0/latency"] if m["seq"] in published):
        assert m["total"] == pytest.approx(published[m["seq"]]["latency_ms"]["total"], abs=1e-3)
        # The frame's capture time, as the exported raw images carry it: one time axis in a viewer.
        t = published[m["seq"]]["t_capture_ns"]
        assert m["timestamp"] == {"sec": t // 1_000_000_000, "nsec": t % 1_000_000_000}
    decisions = topics["/sim0/decision"]
    assert len(decisions) == 12 and all(d["decision"] == "accept" and d["accepted"] == 1 for d in decisions)
    assert metadata["thzedge.results"]["biometric"] == str(biometric).lower()
    if biometric:
        assert {d["identity"] for d in decisions} == {"p-7"}
        recon = topics["/sim0/reconstruction"]
        assert schemas["/sim0/reconstruction"][0] == "foxglove.RawImage" and len(recon) == 12
        img = np.frombuffer(base64.b64decode(recon[0]["data"]), "<f4").reshape(64, 64)
        assert recon[0]["encoding"] == "32FC1" and 0.0 <= img.min() <= img.max() <= 1.0
    else:
        assert all("identity" not in d for d in decisions)
        assert "/sim0/reconstruction" not in topics
