"""Revocable templates (R-NEW-3): keyed orthogonal projection, key files, rotation revokes, no plaintext."""

from __future__ import annotations

import json
import logging
import stat

import numpy as np
import pytest

from edge.gallery import Gallery
from edge.templates import TemplateKey, generate_template_key, load_template_key
from scanner_io.errors import ConfigError

DIM = 16


def unit_rows(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    e = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_projection_keeps_every_distance_and_differs_per_key_and_epoch():
    e = unit_rows(50)
    k1 = TemplateKey("site", 1, b"\x11" * 32)
    t = k1.project(e)
    d_plain = np.linalg.norm(e[:, None] - e[None], axis=2)
    d_tmpl = np.linalg.norm(t[:, None] - t[None], axis=2)
    np.testing.assert_allclose(d_tmpl, d_plain, atol=1e-5)  # thresholds and ROCs carry over exactly
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    # Same person, two keys (another epoch, another site): as far apart as two random people.
    for other in (TemplateKey("site", 2, b"\x11" * 32), TemplateKey("site", 1, b"\x22" * 32)):
        cross = np.linalg.norm(t - other.project(e), axis=1)
        assert abs(float(cross.mean()) - np.sqrt(2)) < 0.15
    assert TemplateKey("site", 1, b"\x11" * 32).project(e[0]) == pytest.approx(
        t[0], abs=1e-6
    )  # deterministic


def test_key_files_are_owner_only_never_overwritten_and_rotate_to_the_next_epoch(tmp_path):
    path = generate_template_key(tmp_path, "site", site="gate-3")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k1 = load_template_key(path)
    assert (k1.epoch, k1.site) == (1, "gate-3") and "secret" not in repr(k1)
    with pytest.raises(ConfigError, match="--rotate"):
        generate_template_key(tmp_path, "site")
    k2 = load_template_key(generate_template_key(tmp_path, "site", rotate=True))
    assert (k2.epoch, k2.site) == (2, "gate-3") and k2.key_id != k1.key_id and k2.secret != k1.secret
    bad = tmp_path / "bad.tkey"
    bad.write_text(json.dumps({"kind": "thzedge-template-key", "epoch": 1, "secret": "00"}))
    with pytest.raises(ConfigError, match="not a thzedge template key") as err:
        load_template_key(bad)
    assert "00" not in str(err.value).split("(")[-1]
    with pytest.raises(ConfigError, match="keys generate --kind template"):
        load_template_key(tmp_path / "missing.tkey")


def test_protected_gallery_stores_no_plaintext_and_rotation_revokes_it(tmp_path, caplog):
    key = load_template_key(generate_template_key(tmp_path, "k"))
    # 64-d, the student's embedding size: the keys are random, and in 16-d an old-epoch template
    # lands within 0.8 of its probe in ~2 % of runs (cos > 0.68 has p ≈ 1.3e-3 per pair); in 64-d ≈ 4e-9.
    dim = 64
    refs = unit_rows(6, seed=1, dim=dim)
    g = Gallery("e" * 64, dim, threshold=0.5, template_key=key)
    g.enroll("alice", refs[:3], postures=[0, 1, 2])
    g.enroll("bob", refs[3:], postures=[0, 1, 2])
    path = g.save(tmp_path / "g.npz")
    with np.load(path) as z:
        stored = z["embeddings"]
        meta = json.loads(str(z["meta"]))
    # Neither the embeddings nor their negatives are in the file (nearest stored row is far away).
    gap = np.abs(stored[:, None, :] - refs[None, :, :]).max(axis=2)
    assert gap.min() > 0.05 and np.abs(stored[:, None, :] + refs[None, :, :]).max(axis=2).min() > 0.05
    assert meta["template"]["key_id"] == key.key_id and meta["template"]["epoch"] == 1
    assert key.secret.hex() not in path.read_bytes().hex()

    loaded = Gallery.load(path, threshold=0.5, template_key=key)
    probe = refs[1] + 0.01 * np.sqrt(DIM / dim)  # the same 0.04 nudge as in 16-d
    m = loaded.match_1to1(probe / np.linalg.norm(probe), "alice", posture=1)
    assert m.decision == "accept" and m.score == pytest.approx(0.0, abs=0.05)
    with pytest.raises(ConfigError, match="set \\[verification\\] template_key"):
        Gallery.load(path, threshold=0.5)
    rotated = load_template_key(generate_template_key(tmp_path, "k", rotate=True))
    with pytest.raises(ConfigError, match="revoked; re-enrol"):
        Gallery.load(path, threshold=0.5, template_key=rotated)
    # Old-epoch templates against probes protected with the new key: impostor-level distances.
    loaded.template_key = rotated
    d = np.array([loaded.distances(r)[i // 3] for i, r in enumerate(refs)])
    assert d.min() > 0.8 and not (d <= 0.5).any()
    # Re-enrolled under the new key, the same people match again.
    g2 = Gallery("e" * 64, dim, threshold=0.5, template_key=rotated)
    g2.enroll("alice", refs[:3])
    assert g2.match_1to1(refs[0], "alice").decision == "accept"
    # Inspecting / erasing needs no key, and keeps the file protected.
    bare = Gallery.load(path, threshold=0.5, need_key=False)
    assert bare.remove("bob") and bare.template_description["key_id"] == key.key_id
    bare.save(path)
    with pytest.raises(ConfigError, match="with its template key"):
        bare.match_1toN(refs[0])
    again = Gallery.load(path, threshold=0.5, template_key=key)
    assert again.identities == ("alice",)
    assert again.match_1to1(refs[2], "alice", posture=2).decision == "accept"


def test_a_plaintext_gallery_is_refused_under_a_key_and_warned_about_without(tmp_path, caplog):
    g = Gallery("e" * 64, DIM, threshold=0.5)
    g.enroll("alice", unit_rows(2))
    path = g.save(tmp_path / "plain.npz")
    with caplog.at_level(logging.WARNING):
        Gallery.load(path, threshold=0.5)
    assert "plaintext embeddings" in caplog.text
    with pytest.raises(ConfigError, match="plaintext embeddings but a template key is configured"):
        Gallery.load(path, threshold=0.5, template_key=TemplateKey("s", 1, b"\x01" * 32))


def test_keys_generate_template_cli(tmp_path, capsys):
    from edge.cli import main

    assert main(["keys", "generate", "--kind", "template", "--out", str(tmp_path), "--site", "s1"]) == 0
    out = capsys.readouterr().out
    key = load_template_key(tmp_path / "template.tkey")
    assert key.key_id in out and "epoch 1" in out and key.secret.hex() not in out
    assert main(["keys", "generate", "--kind", "template", "--out", str(tmp_path)]) != 0
    assert "--rotate" in capsys.readouterr().err
    assert main(["keys", "generate", "--kind", "template", "--out", str(tmp_path), "--rotate"]) == 0
    assert load_template_key(tmp_path / "template.tkey").epoch == 2
