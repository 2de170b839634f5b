"""The `thzedge view` web app (aiohttp): one page, one WebSocket, the latest picture only.

Why aiohttp: it is small, runs on asyncio, and has the HTTP server and the WebSocket in one
package (no ASGI server, no framework, no build step for the page). The page is a static
HTML file with a few lines of JavaScript.

Flow: a thread subscribes to the daemon's results (`edge.view.state.follow`, one more SUB
consumer of the daemon's PUB socket, which never waits for it); each WebSocket client gets the
latest snapshot at most `max_fps` times a second, only when something changed (and once a
second for the clock-driven fields). A slow browser therefore sees fewer updates; nothing
queues up, and the daemon sees nothing at all.

Access: 127.0.0.1 by default. Binding any other address needs `[view] allow_remote = true`
in the config and a token, generated at start and printed with the URL; every request must
carry it (`?token=`; the page passes it on to its WebSocket). Nothing is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aiohttp import WSMsgType, web

from edge.config import load_config, split_host_port
from edge.subscriber import resolve_target
from edge.view.state import ViewState, follow
from scanner_io.errors import ConfigError, SourceUnavailableError

log = logging.getLogger("thzedge.view")

# Clock-driven fields (fps, connected) are re-sent at least this often even without a change.
IDLE_RESEND_S = 1.0


@dataclass(frozen=True)
class ViewOptions:
    """The `thzedge view` flags."""

    endpoint: str | None = None
    source: str | None = None
    config: Path | None = None
    bind: str = "127.0.0.1:8642"
    show_reconstruction: bool = False
    max_fps: float = 10.0


STATE_KEY = web.AppKey("state", ViewState)
OPTIONS_KEY = web.AppKey("options", ViewOptions)
TOKEN_KEY = web.AppKey("token", str)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def page_html() -> str:
    """The page (edge/view/static/index.html)."""
    return resources.files("edge.view").joinpath("static/index.html").read_text(encoding="utf-8")


def build_app(state: ViewState, options: ViewOptions, token: str = "") -> web.Application:
    """The aiohttp application: `/` (the page) and `/ws` (the snapshots)."""
    app = web.Application(middlewares=[_token_middleware])
    app[STATE_KEY] = state
    app[OPTIONS_KEY] = options
    app[TOKEN_KEY] = token
    app.router.add_get("/", _page)
    app.router.add_get("/ws", _ws)
    return app


@web.middleware
async def _token_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    token = request.app[TOKEN_KEY]
    if token and not hmac.compare_digest(request.query.get("token", ""), token):
        raise web.HTTPForbidden(
            text="thzedge view: a valid ?token= is required (printed when the viewer started)"
        )
    response: web.StreamResponse = await handler(request)
    return response


async def _page(request: web.Request) -> web.Response:
    # The page loads nothing from elsewhere and may not be framed by another site.
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'self'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        "Referrer-Policy": "no-referrer",
    }
    return web.Response(text=page_html(), content_type="text/html", headers=headers)


async def _ws(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE_KEY]
    period = 1.0 / request.app[OPTIONS_KEY].max_fps
    ws = web.WebSocketResponse(heartbeat=10.0)
    await ws.prepare(request)
    reader = asyncio.ensure_future(_discard_incoming(ws))
    sent_version, sent_at = -1, 0.0
    loop = asyncio.get_running_loop()
    try:
        while not ws.closed and not reader.done():
            now = loop.time()
            if state.version != sent_version or now - sent_at >= IDLE_RESEND_S:
                sent_version = state.version
                # Awaiting the send is what rate-limits a slow browser: meanwhile newer
                # snapshots replace older ones instead of queueing.
                await ws.send_str(json.dumps(state.snapshot(), separators=(",", ":")))
                sent_at = now
            await asyncio.sleep(period)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        reader.cancel()
        await ws.close()
    return ws


async def _discard_incoming(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the page sends, so a closed tab is noticed at once."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            return


def check_bind(bind: str, allow_remote: bool) -> tuple[str, int, bool]:
    """Return (host, port, needs token); ConfigError for a remote bind the config does not allow."""
    try:
        host, port = split_host_port(bind)
    except ConfigError:
        raise ConfigError(f"--bind {bind!r}: expected HOST:PORT such as 127.0.0.1:8642") from None
    if is_loopback(host):
        return host, port, False
    if not allow_remote:
        raise ConfigError(
            f"--bind {bind} is reachable beyond this host: the page shows live scans and decisions; "
            "set [view] allow_remote = true in the config to allow it (access then needs the printed token)"
        )
    return host, port, True


def serve_view(
    options: ViewOptions, announce: Callable[[str], None], stop: threading.Event | None = None
) -> None:
    """Subscribe and serve the page until SIGINT/SIGTERM (or `stop`)."""
    cfg = load_config(options.config)
    host, port, needs_token = check_bind(options.bind, cfg.view.allow_remote)
    target = resolve_target(options.endpoint, options.config, options.source)
    token = secrets.token_urlsafe(18) if needs_token else ""
    state = ViewState(target.endpoint, show_reconstruction=options.show_reconstruction)
    stop = stop or threading.Event()
    follower = threading.Thread(
        target=follow, args=(target, state, stop), name="view-subscriber", daemon=True
    )
    follower.start()
    try:
        asyncio.run(_serve(build_app(state, options, token), host, port, token, announce, stop))
    finally:
        stop.set()
        follower.join(timeout=5.0)


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    token: str,
    announce: Callable[[str], None],
    stop: threading.Event,
) -> None:
    runner = web.AppRunner(app, access_log=None)  # an access log would record who watched when
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SourceUnavailableError(
            f"cannot serve the page on {host}:{port}: {exc.strerror}; use --bind"
        ) from None
    # Handlers before the URL is printed: whoever waits for that line may stop us at once.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    addresses = runner.addresses  # the real port when port 0 was asked for
    bound = int(addresses[0][1]) if addresses else port
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
    announce(f"view: subscribed to {app[STATE_KEY].endpoint}; open {url}")
    if app[STATE_KEY].show_reconstruction:
        announce("view: reconstructions are shown when the daemon publishes them (biometric data)")
    try:
        while not stop.is_set():
            await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
