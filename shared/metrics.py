"""Prometheus metrics every service exports, and the HTTP endpoint that serves them with health.

Names follow Prometheus conventions: base units (seconds, bytes), ``_total`` on counters, the
service as a label so one dashboard query covers every stage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

EVENTS_IN = Counter("wsi_events_consumed_total", "Events consumed", ["service", "topic"])
EVENTS_OUT = Counter("wsi_events_produced_total", "Events produced", ["service", "topic"])
ERRORS = Counter("wsi_errors_total", "Handler and infrastructure errors", ["service", "kind"])
DEAD_LETTERS = Counter(
    "wsi_dead_letters_total", "Messages sent to the dead-letter topic", ["service", "topic"]
)
REDELIVERIES = Counter(
    "wsi_redeliveries_total", "Messages seen again after a failure or restart (attempt > 1)", ["service"]
)
HANDLE_SECONDS = Histogram(
    "wsi_handle_duration_seconds", "Time to handle one message", ["service", "topic"], buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram(
    "wsi_batch_size", "Messages per consumed batch", ["service"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
IN_FLIGHT = Gauge("wsi_in_flight_messages", "Messages being handled now", ["service"])
CONSUMER_LAG = Gauge(
    "wsi_consumer_lag_messages", "End offset minus position", ["service", "topic", "partition"]
)
READY = Gauge("wsi_ready", "1 when the service can do work (dependencies reachable)", ["service"])
TILES = Counter("wsi_tiles_total", "Tiles processed", ["service", "outcome"])
SLIDE_STAGE_SECONDS = Histogram(
    "wsi_slide_stage_duration_seconds",
    "Per-slide time spent in a stage",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
SLIDE_OUTCOMES = Counter(
    "wsi_slide_outcomes_total",
    "Slides recorded per outcome (first recording only)",
    ["outcome", "reason_code"],
)
SLIDES_INGESTED = Counter("wsi_slides_ingested_total", "Distinct slides the recorder saw ingested")
END_TO_END_SECONDS = Histogram(
    "wsi_slide_end_to_end_seconds",
    "From a slide's first ingest to its recorded prediction",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
MODEL_INFO = Gauge("wsi_model_info", "Model in use (value 1)", ["service", "kind", "version"])
BUILD_INFO = Gauge(
    "wsi_build_info", "Package version of the running service (value 1)", ["service", "version"]
)

# The viewer (an HTTP service, not a consumer): requests by route and status, and its tile cache.
VIEWER_REQUESTS = Counter(
    "wsi_viewer_requests_total", "HTTP requests answered by the viewer", ["route", "status"]
)
VIEWER_REQUEST_SECONDS = Histogram(
    "wsi_viewer_request_duration_seconds",
    "Time to answer one viewer request",
    ["route"],
    buckets=(0.001, 0.0025, *LATENCY_BUCKETS),
)
VIEWER_TILE_CACHE = Counter(
    "wsi_viewer_tile_cache_total", "Deep-zoom tile lookups in the viewer's memory cache", ["result"]
)


class HealthServer:
    """``/metrics``, ``/healthz`` (the process is alive) and ``/readyz`` (dependencies reachable)."""

    def __init__(self, host: str, port: int, ready: Callable[[], bool]) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sockets: Sequence[Any] = self._server.sockets or []
        self.port = sockets[0].getsockname()[1] if sockets else self.port
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            path = request.split(b" ")[1].decode() if request.count(b" ") >= 2 else "/"
            status, ctype, body = self._route(path.split("?")[0])
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self._ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready\n"
        return "404 Not Found", "text/plain", b"not found\n"
