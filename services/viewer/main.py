"""Entry point: ``wsi run viewer``, the read-only web viewer (docs/viewer.md).

It consumes nothing from Kafka: it reads PostgreSQL through its read-only role and the object store,
and serves the page, the API, deep-zoom tiles, ``/healthz``, ``/readyz`` and ``/metrics`` on one port.
Without any authentication configured it only listens on a loopback address, unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import sys

from aiohttp import web
from wsitk.services.viewer.app import STATIC_DIR, Viewer, build_app
from wsitk.services.viewer.repository import ViewerRepository
from wsitk.shared.config import Settings
from wsitk.shared.contracts import package_version
from wsitk.shared.logging import configure_logging, get_logger
from wsitk.shared.metrics import BUILD_INFO, READY
from wsitk.shared.objectstore import open_store

SERVICE = "viewer"
log = get_logger()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refusal(settings: Settings) -> str:
    """Why the viewer must not start with these settings ("" when it may)."""
    authenticated = bool(settings.viewer_token_list() or settings.viewer_identity_header)
    if not authenticated and not _loopback(settings.viewer_host) and not settings.viewer_allow_anonymous:
        return (
            f"the viewer would serve {settings.viewer_host} without authentication: set WSI_VIEWER_TOKENS "
            "(bearer tokens) or WSI_VIEWER_IDENTITY_HEADER (behind an OIDC proxy), or "
            "WSI_VIEWER_ALLOW_ANONYMOUS=true if the network in front already restricts it"
        )
    if not (STATIC_DIR / "openseadragon" / "openseadragon.min.js").is_file():
        return "the viewer's front-end assets are missing: run `make viewer-assets` (npm ci)"
    return ""


async def serve(settings: Settings) -> int:
    problem = refusal(settings)
    if problem:
        log.error("viewer not started", reason=problem)
        return 2
    viewer = Viewer(settings, ViewerRepository(settings.viewer_dsn()), open_store(settings))
    runner = web.AppRunner(build_app(viewer), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.viewer_host, settings.viewer_port, shutdown_timeout=5)
    await site.start()
    server = site._server  # an asyncio.Server once started (aiohttp types it as AbstractServer)
    sockets = server.sockets if isinstance(server, asyncio.Server) else ()
    port = sockets[0].getsockname()[1] if sockets else settings.viewer_port
    BUILD_INFO.labels(SERVICE, package_version()).set(1)
    READY.labels(SERVICE).set(0)
    log.info(
        "service starting",
        settings=settings.masked(),
        metrics_port=port,
        url=f"http://{settings.viewer_host}:{port}/",
        authentication=("tokens " if viewer.auth.tokens else "")
        + (f"header {settings.viewer_identity_header}" if settings.viewer_identity_header else "")
        or "none (loopback)",
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    readiness = asyncio.create_task(_report_readiness(viewer, stopping))
    await stopping.wait()
    log.info("service stopping")
    readiness.cancel()
    await runner.cleanup()
    viewer.executor.shutdown(wait=False, cancel_futures=True)
    return 0


async def _report_readiness(viewer: Viewer, stopping: asyncio.Event, interval_s: float = 5.0) -> None:
    """Keep wsi_ready current without a probe asking (as the consumers' runtime does)."""
    while not stopping.is_set():
        try:
            ready = bool(await viewer.run(viewer.is_ready))
        except Exception as exc:  # noqa: BLE001 - a dependency that fails to answer is "not ready", whatever the error
            log.info("not ready", error=f"{type(exc).__name__}: {exc}")
            ready = False
        READY.labels(SERVICE).set(1 if ready else 0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=interval_s)


def main(settings: Settings) -> int:
    configure_logging(SERVICE, settings.log_level)
    try:
        return asyncio.run(serve(settings))
    except OSError as exc:
        log.error(
            "viewer could not listen", host=settings.viewer_host, port=settings.viewer_port, error=str(exc)
        )
        print(
            f"viewer: cannot listen on {settings.viewer_host}:{settings.viewer_port}: {exc}", file=sys.stderr
        )
        return 1
