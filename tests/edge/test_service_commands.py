"""`thzedge config show|validate` and `thzedge keys generate|show` through the real CLI."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import tomllib

from edge.cli import main
from edge.config import config_from_dict


def test_config_validate_ok_and_error_exit_78(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('[sources.scanner0]\nuri = "sim"\n')
    assert main(["config", "validate", "--config", str(good)]) == 0
    assert "ok (1 source(s))" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy]\npublish_embeding = true\n")
    assert main(["config", "validate", "--config", str(bad)]) == 78
    err = capsys.readouterr().err.strip()
    assert err.startswith("thzedge: error:") and "did you mean 'publish_embedding'" in err
    assert len(err.splitlines()) == 1


def test_config_error_exit_code_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[publisher]\nendpoint = "tcp://0.0.0.0:5560"\n')
    r = subprocess.run(
        [sys.executable, "-m", "edge", "config", "validate", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 78
    assert "R-SEC-1" in r.stderr and "Traceback" not in r.stderr


def test_config_show_prints_effective_toml_and_json(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text(
        '[model]\nmax_batch = 4\n[daemon]\ninsecure_dev = true\n[publisher]\nendpoint = "tcp://127.0.0.1:5560"\n'
    )
    assert main(["config", "show", "--config", str(f)]) == 0
    captured = capsys.readouterr()
    shown = tomllib.loads(captured.out)
    assert shown["model"]["max_batch"] == 4 and shown["daemon"]["stop_timeout_s"] == 5.0
    assert config_from_dict(shown).publisher.endpoint == "tcp://127.0.0.1:5560"
    assert "insecure_dev" in captured.err  # the warning goes to stderr
    assert main(["--json", "config", "show", "--config", str(f)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["path"] == str(f) and data["metrics"]["bind"] == "127.0.0.1:9464"


def test_keys_generate_and_show(tmp_path, capsys):
    assert main(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "consumer1"]) == 0
    out = capsys.readouterr().out
    public = out.split()[2]
    assert len(public) == 40
    secret_file = tmp_path / "k" / "consumer1.key_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert main(["keys", "show", str(secret_file)]) == 0
    shown = capsys.readouterr().out.strip()
    assert shown == public
    assert "secret" not in shown
    assert main(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "consumer1"]) == 1
    assert "--force" in capsys.readouterr().err


def test_enroll_from_a_config_source_with_the_daemons_mode_parameter(tiny_bundle, tmp_path, capsys):
    """A [sources] URI may carry the daemon's own `mode=lockstep`; enrolment reads it all the same."""
    import threading

    import numpy as np
    import zmq

    from scanner_io.codec import encode_frame
    from scanner_io.frame import FrameHeader

    scan = f"ipc://{tmp_path}/scan.sock"
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(f'[sources.scan]\nuri = "{scan}?mode=lockstep"\n')
    done = threading.Event()

    def scanner() -> None:  # the PUSH socket lives in this thread only
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.sndtimeo = 10_000  # no reader (enrolment failed): give up instead of blocking forever
        push.bind(scan)
        rng = np.random.default_rng(0)
        try:
            for seq in range(3):
                header = FrameHeader(scanner="s", seq=seq, t_capture_ns=1, shape=(96, 96), dtype="uint16")
                push.send_multipart(encode_frame(header, rng.integers(100, 4000, (96, 96), dtype=np.uint16)))
            done.wait(30)
        except zmq.Again:
            pass  # the assertions below say why
        finally:
            push.close()
            ctx.term()

    t = threading.Thread(target=scanner, daemon=True)
    t.start()
    try:
        args = ["enroll", "--model", str(tiny_bundle), "--gallery", str(tmp_path / "g.npz")]
        args += ["--identity", "p", "--config", str(cfg), "--source", "scan", "--frames", "2"]
        code = main([*args, "--backend", "ort"])
    finally:
        done.set()
        t.join(15)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "enrolled 2 embedding(s)" in out
