"""CURVE + ZAP over real tcp sockets: good key, unknown key, no key; fail closed; reload; ipc modes."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from edge.config import config_from_dict
from edge.security import (
    EndpointSecurity,
    KeyPair,
    generate_keys,
    load_keypair,
    secure_client_socket,
    secure_server_socket,
)
from scanner_io.errors import ConfigError, ThzEdgeError

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def keys(tmp_path):
    """A server certificate, one allowed client and one client that is not in the allow-list."""
    server_dir, clients_dir, other_dir = tmp_path / "server", tmp_path / "clients", tmp_path / "other"
    _, server_secret = generate_keys(server_dir, "server")
    _, good_secret = generate_keys(other_dir, "good")
    _, bad_secret = generate_keys(other_dir, "intruder")
    clients_dir.mkdir()
    (clients_dir / "good.key").write_bytes((other_dir / "good.key").read_bytes())
    return {
        "server": load_keypair(server_secret),
        "good": load_keypair(good_secret),
        "bad": load_keypair(bad_secret),
        "clients_dir": clients_dir,
        "other_dir": other_dir,
        "server_secret_file": server_secret,
    }


def sub_client(ctx, endpoint: str, server_public: bytes | None, client: KeyPair | None) -> zmq.Socket:
    s = ctx.socket(zmq.SUB)
    s.linger = 0
    if client is not None:
        secure_client_socket(s, server_public, client)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    return s


def who_receives(pub: zmq.Socket, subs: dict[str, zmq.Socket], seconds: float = 1.5) -> set[str]:
    """Publish for a while; return the names of the subscribers that got anything."""
    got: set[str] = set()
    poller = zmq.Poller()
    for s in subs.values():
        poller.register(s, zmq.POLLIN)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pub.send_multipart([b"result/scanner0", b"{}"])
        for sock, _ in poller.poll(20):
            sock.recv_multipart()
            got.update(name for name, s in subs.items() if s is sock)
        if got == set(subs):
            break
    return got


def monitor_events(mon: zmq.Socket, seconds: float = 0.3) -> list[int]:
    events = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if mon.poll(20):
            events.append(recv_monitor_message(mon)["event"])
    return events


def test_three_clients_only_the_allowed_key_gets_results(ctx, keys):
    cfg = config_from_dict(
        {
            "publisher": {
                "endpoint": "tcp://127.0.0.1:0",
                "curve": {
                    "enabled": True,
                    "secret_key_file": str(keys["server_secret_file"]),
                    "allowed_clients_dir": str(keys["clients_dir"]),
                },
            }
        }
    )
    with EndpointSecurity.from_config(ctx, cfg.publisher) as sec:
        assert sec.authenticator_running  # started before bind
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        mon = pub.get_monitor_socket()
        endpoint = sec.bind(pub, cfg.publisher.endpoint)
        assert pub.getsockopt(zmq.ZAP_ENFORCE_DOMAIN) == 1
        assert pub.getsockopt(zmq.ZAP_DOMAIN) == b"thzedge"
        server_pub = keys["server"].public
        subs = {
            "good": sub_client(ctx, endpoint, server_pub, keys["good"]),
            "unknown": sub_client(ctx, endpoint, server_pub, keys["bad"]),
            "none": sub_client(ctx, endpoint, None, None),
        }
        try:
            assert who_receives(pub, subs) == {"good"}
            events = monitor_events(mon)
            assert sec.allow_list.allowed >= 1 and sec.allow_list.denied >= 1
            assert events.count(zmq.EVENT_HANDSHAKE_SUCCEEDED) == 1  # only the good key
            assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in events  # the unknown key
            assert zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL in events  # the client without CURVE
        finally:
            for s in subs.values():
                s.close()
            pub.disable_monitor()
            mon.close()
            pub.close()


def test_every_client_fails_when_the_authenticator_is_stopped(ctx, keys):
    """ZAP_ENFORCE_DOMAIN=1: without a ZAP handler even the allowed key is refused (fail closed)."""
    sec = EndpointSecurity(ctx, server_keys=keys["server"], allowed_clients_dir=keys["clients_dir"])
    sec.start()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    endpoint = sec.bind(pub, "tcp://127.0.0.1:0")
    sec.close()  # authenticator gone after bind
    assert not sec.authenticator_running
    good = sub_client(ctx, endpoint, keys["server"].public, keys["good"])
    try:
        assert who_receives(pub, {"good": good}, seconds=1.0) == set()
    finally:
        good.close()
        pub.close()


def test_libzmq_default_would_fail_open(ctx, keys):
    """The trap this module closes: without ZAP_ENFORCE_DOMAIN and no handler, any key gets in."""
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    secure_server_socket(pub, keys["server"])
    pub.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 0)  # the libzmq default
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    bad = sub_client(ctx, f"tcp://127.0.0.1:{port}", keys["server"].public, keys["bad"])
    try:
        assert who_receives(pub, {"bad": bad}, seconds=1.5) == {"bad"}
    finally:
        bad.close()
        pub.close()


def test_bind_refused_without_running_authenticator(ctx, keys):
    sec = EndpointSecurity(ctx, server_keys=keys["server"], allowed_clients_dir=keys["clients_dir"])
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    try:
        with pytest.raises(ThzEdgeError, match="authenticator is not running"):
            sec.bind(pub, "tcp://127.0.0.1:0")
    finally:
        pub.close()


def test_plain_tcp_needs_insecure_dev(ctx):
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    try:
        with pytest.raises(ConfigError, match="R-SEC-1"):
            EndpointSecurity(ctx).bind(pub, "tcp://127.0.0.1:0")
        assert (
            EndpointSecurity(ctx, insecure_dev=True)
            .bind(pub, "tcp://127.0.0.1:0")
            .startswith("tcp://127.0.0.1:")
        )
    finally:
        pub.close()


def test_reload_adds_and_revokes_clients_without_restart(ctx, keys):
    """R-SEC-3: after reload(), a newly allowed key connects and a removed one no longer does."""
    with EndpointSecurity(ctx, server_keys=keys["server"], allowed_clients_dir=keys["clients_dir"]) as sec:
        sec.start()
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        endpoint = sec.bind(pub, "tcp://127.0.0.1:0")
        sp = keys["server"].public
        try:
            intruder = sub_client(ctx, endpoint, sp, keys["bad"])
            assert who_receives(pub, {"x": intruder}, 0.8) == set()
            intruder.close()
            # Allow the second key, revoke the first.
            (keys["clients_dir"] / "intruder.key").write_bytes(
                (keys["other_dir"] / "intruder.key").read_bytes()
            )
            (keys["clients_dir"] / "good.key").unlink()
            assert sec.reload() == 1
            newly = sub_client(ctx, endpoint, sp, keys["bad"])
            revoked = sub_client(ctx, endpoint, sp, keys["good"])
            assert who_receives(pub, {"new": newly, "revoked": revoked}) == {"new"}
            newly.close()
            revoked.close()
            # A broken directory keeps the previous list and says so.
            os.rename(keys["clients_dir"], keys["clients_dir"].with_name("gone"))
            with pytest.raises(ConfigError, match="does not exist"):
                sec.reload()
            assert len(sec.allow_list) == 1
        finally:
            pub.close()


def test_generated_keys_are_private_and_loadable(tmp_path):
    pub_file, sec_file = generate_keys(tmp_path / "k", "server")
    assert stat.S_IMODE(sec_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_file.stat().st_mode) == 0o644
    kp = load_keypair(sec_file)
    assert zmq.curve_public(kp.secret) == kp.public
    assert kp.secret.decode() not in repr(kp)
    # pyzmq's own loader reads the same files
    assert zmq.auth.load_certificate(sec_file) == (kp.public, kp.secret)
    assert load_keypair(pub_file, need_secret=False).public == kp.public
    with pytest.raises(ConfigError, match="only a public key"):
        load_keypair(pub_file)
    with pytest.raises(ThzEdgeError, match="exists"):
        generate_keys(tmp_path / "k", "server")
    bare = tmp_path / "bare.key"
    bare.write_bytes(kp.secret + b"\n")
    assert load_keypair(bare).public == kp.public
    junk = tmp_path / "junk"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="not a ZeroMQ certificate"):
        load_keypair(junk)


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_ipc_socket_file_is_owner_only_whatever_the_umask(ctx, tmp_path, umask):
    """R-NEW-2: the socket file is 0600 and its new directory 0700, regardless of umask."""
    old = os.umask(umask)
    try:
        path = tmp_path / "run" / "thzedge" / "results.sock"
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        try:
            EndpointSecurity(ctx).bind(pub, f"ipc://{path}")
            assert stat.S_ISSOCK(path.stat().st_mode)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        finally:
            pub.close()
    finally:
        os.umask(old)


def test_ipc_group_mode(ctx, tmp_path):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    path = tmp_path / "g" / "results.sock"
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    try:
        EndpointSecurity(ctx, ipc_mode=0o660, ipc_group=group).bind(pub, f"ipc://{path}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert path.stat().st_gid == os.getgid()
    finally:
        pub.close()


def test_a_live_ipc_endpoint_is_not_taken_over_but_a_stale_file_is_reused(ctx, tmp_path):
    """libzmq would unlink a live socket file and bind anyway; a second daemon must be refused."""
    import socket as pysocket

    from scanner_io.errors import SourceUnavailableError

    path = tmp_path / "run" / "results.sock"
    first, second = ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    first.linger = second.linger = 0
    try:
        EndpointSecurity(ctx).bind(first, f"ipc://{path}")
        with pytest.raises(SourceUnavailableError, match="in use by another running process"):
            EndpointSecurity(ctx).bind(second, f"ipc://{path}")
    finally:
        first.close()
        second.close()
    # A file left by a crashed process: a unix socket nobody listens on.
    path.unlink(missing_ok=True)
    stale = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert path.is_socket()
    third = ctx.socket(zmq.PUB)
    third.linger = 0
    try:
        EndpointSecurity(ctx).bind(third, f"ipc://{path}")
    finally:
        third.close()


def test_world_writable_socket_dir_is_refused(ctx, tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    try:
        with pytest.raises(ConfigError, match="writable by group or others"):
            EndpointSecurity(ctx).bind(pub, f"ipc://{d / 'x.sock'}")
    finally:
        pub.close()
    assert Path(d).exists()


# --- a real `thzedge run` process with a CURVE publisher: allow-list, SIGHUP reload (R-SEC-2/3) --


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_daemon_process_curve_allow_list_and_sighup_reload(tiny_bundle, tmp_path, ctx, keys):
    import signal
    import socket as pysocket
    import subprocess
    import sys
    import tempfile

    repo = Path(__file__).resolve().parents[2]
    with pysocket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    generate_keys(keys["other_dir"], "latecomer")
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(
        f'[publisher]\nendpoint = "{endpoint}"\n'
        f'[publisher.curve]\nenabled = true\nsecret_key_file = "{keys["server_secret_file"]}"\n'
        f'allowed_clients_dir = "{keys["clients_dir"]}"\n'
        "[metrics]\nenabled = false\n[daemon]\nstop_timeout_s = 3.0\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    err = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in the finally block
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge",
            "run",
            "--source",
            "sim?fps=20",
            "--model",
            str(tiny_bundle),
            "--config",
            str(cfg),
            "--backend",
            "ort",
        ],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    sp = keys["server"].public
    latecomer = load_keypair(keys["other_dir"] / "latecomer.key_secret")
    socks: list[zmq.Socket] = []

    def client(kp: KeyPair | None) -> zmq.Socket:
        s = sub_client(ctx, endpoint, sp, kp)
        socks.append(s)
        return s

    def receives(s: zmq.Socket, seconds: float) -> bool:
        return bool(s.poll(int(seconds * 1000)))

    try:
        good = client(keys["good"])
        assert receives(good, 60), "the allowed client got no result (daemon did not start?)"
        assert not receives(client(latecomer), 2.0)
        assert not receives(client(None), 1.0)
        # Allow the latecomer and revoke the good key, then reload without a restart.
        (keys["clients_dir"] / "latecomer.key").write_bytes(
            (keys["other_dir"] / "latecomer.key").read_bytes()
        )
        (keys["clients_dir"] / "good.key").unlink()
        proc.send_signal(signal.SIGHUP)
        time.sleep(2.0)
        assert receives(client(latecomer), 10), "SIGHUP did not load the new client key"
        assert not receives(client(keys["good"]), 2.0), "a revoked key still connects"
        assert proc.poll() is None  # same process throughout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.seek(0)
        stderr = err.read()
        err.close()
    assert keys["server"].secret.decode() not in stderr
    assert "CURVE client rejected" in stderr
