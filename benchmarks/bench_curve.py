"""Measure what CURVE encryption costs on the results socket: plain tcp vs CURVE+ZAP, same run.

PUB -> SUB over tcp loopback, one subscriber, for message sizes that thzedge sends: a result
header (~1 KiB), a header plus a 64x64 float32 reconstruction (~17 KiB) and a raw 256x256
uint16 frame (128 KiB). Prints messages/s and MB/s for both and their ratio. Not a test: the
numbers depend on the machine (operations.md §4.6 asks for this figure on the Jetson).

    python benchmarks/bench_curve.py [--seconds 2] [--sizes 1024,17408,131072]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import zmq

from edge.security import EndpointSecurity, generate_keys, load_keypair, secure_client_socket


def run_once(ctx: zmq.Context, size: int, seconds: float, curve: bool, keydir: Path) -> tuple[float, float]:
    """Return (messages/s, MB/s) received by one subscriber in `seconds`."""
    if curve:
        server = load_keypair(keydir / "server.key_secret")
        client = load_keypair(keydir / "client.key_secret")
        sec = EndpointSecurity(ctx, server_keys=server, allowed_clients_dir=keydir / "clients")
        sec.start()
    else:
        sec = EndpointSecurity(ctx, insecure_dev=True)
    payload = b"\0" * size
    bound: list[str] = []
    ready, subscribed, stop = threading.Event(), threading.Event(), threading.Event()

    def sender() -> None:
        # The PUB socket is created, used and closed in this thread only (one socket, one thread).
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.sndhwm = 1000
        try:
            bound.append(sec.bind(pub, "tcp://127.0.0.1:0"))
            ready.set()
            while not subscribed.is_set() and not stop.is_set():
                pub.send_multipart([b"warmup", b""])  # until the subscription arrives (slow joiner)
                time.sleep(0.01)
            while not stop.is_set():
                try:
                    pub.send_multipart([b"result/scanner0", payload], flags=zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0)
        finally:
            pub.close()
            ready.set()

    t = threading.Thread(target=sender)
    t.start()
    ready.wait()
    if not bound:
        t.join()
        sec.close()
        raise RuntimeError("the PUB socket could not bind")
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.rcvhwm = 1000
    if curve:
        secure_client_socket(sub, server.public, client)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(bound[0])
    while not sub.poll(10):
        pass
    subscribed.set()
    got = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if sub.poll(100):
            got += sub.recv_multipart()[0] != b"warmup"  # late warm-up messages do not count
    dt = time.perf_counter() - t0
    stop.set()
    t.join()
    sub.close()
    sec.close()
    return got / dt, got * size / dt / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--sizes", default="1024,17408,131072")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the insecure_dev bind warning is expected here
    sizes = [int(s) for s in args.sizes.split(",")]
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as d:
        keydir = Path(d)
        generate_keys(keydir, "server")
        generate_keys(keydir, "client")
        (keydir / "clients").mkdir()
        (keydir / "clients" / "client.key").write_bytes((keydir / "client.key").read_bytes())
        print(f"libzmq {zmq.zmq_version()}, pyzmq {zmq.__version__}, curve={zmq.has('curve')}")
        cols = ("bytes", "plain msg/s", "plain MB/s", "curve msg/s", "curve MB/s", "ratio")
        print(" ".join(f"{c:>{w}}" for c, w in zip(cols, (8, 12, 11, 12, 11, 6), strict=True)))
        for size in sizes:
            pm, pb = run_once(ctx, size, args.seconds, False, keydir)
            cm, cb = run_once(ctx, size, args.seconds, True, keydir)
            print(f"{size:>8} {pm:>12.0f} {pb:>11.1f} {cm:>12.0f} {cb:>11.1f} {cm / pm:>6.2f}")
    ctx.term()


if __name__ == "__main__":
    main()
