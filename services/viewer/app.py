"""The viewer's HTTP surface (aiohttp): the page, its JSON API, deep-zoom tiles, downloads, health.

Routes (docs/viewer.md lists them with their parameters):

- ``/`` and ``/static/...``: the one page, its script and style, OpenSeadragon (no data, no login);
- ``/api/slides``, ``/api/changes``, ``/api/slides/{id}`` and its overlays, downloads and top tiles;
- ``/slides/{id}.dzi``, ``/slides/{id}_files/{level}/{col}_{row}.jpeg``: the deep-zoom pyramid;
- ``/login`` (POST a token, get a cookie), ``/healthz``, ``/readyz``, ``/metrics``.

Every parameter is checked before use: slide ids are 32 hex digits (prefixes only in search), runs,
model versions and predictions must be ones the database lists for that slide, levels and tiles are
integers inside the pyramid. A bad request gets a 4xx with a JSON ``{"error": reason}``; anything
unexpected is logged and answered 500 with no trace. Nothing here writes anywhere.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from wsitk.services.viewer.deepzoom import TileOutOfRange, TileServer
from wsitk.services.viewer.overlays import Overlays
from wsitk.services.viewer.repository import STATUSES, ViewerRepository
from wsitk.shared.cache import SlideCache
from wsitk.shared.config import Settings
from wsitk.shared.errors import PermanentError, TransientError
from wsitk.shared.logging import get_logger
from wsitk.shared.metrics import READY, VIEWER_REQUEST_SECONDS, VIEWER_REQUESTS, VIEWER_TILE_CACHE
from wsitk.shared.objectstore import ObjectStore
from wsitk.shared.slides.bundle import openable

log = get_logger()

WEB_DIR = Path(__file__).resolve().parent / "web"
STATIC_DIR = WEB_DIR / "public"
SLIDE_ID = re.compile(r"[0-9a-f]{32}")
SEARCH = re.compile(r"[^\x00-\x1f\x7f]{0,200}")  # printable text; it only ever reaches SQL as a parameter
TOKEN_COOKIE = "wsi_viewer_token"  # noqa: S105 - a cookie name, not a secret
PUBLIC_PATHS = {"/", "/healthz", "/readyz", "/metrics", "/login", "/favicon.ico"}
TOP_TILE_PX = 192
MAX_PAGE = 200
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def bad_request(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=_error_json(reason), content_type="application/json")


def not_found(reason: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=_error_json(reason), content_type="application/json")


def _error_json(reason: str) -> str:
    import json

    return json.dumps({"error": reason})


def _int(request: web.Request, name: str, value: str, low: int, high: int) -> int:
    if not value.isdigit() or len(value) > 9:
        raise bad_request(f"{name} must be a whole number, got {value[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise bad_request(f"{name} must be within {low}..{high}, got {number}")
    return number


def slide_id_of(request: web.Request) -> str:
    slide_id = request.match_info.get("slide_id", "")
    if not SLIDE_ID.fullmatch(slide_id):
        raise bad_request(
            "a slide id is 32 lowercase hex digits (the start of the SHA-256 of the slide file)"
        )
    return slide_id


@dataclass
class Auth:
    """Bearer tokens (header or the cookie /login sets) and/or an identity header from a trusted proxy."""

    tokens: list[str]
    identity_header: str

    @property
    def required(self) -> bool:
        return bool(self.tokens or self.identity_header)

    def identity(self, request: web.Request) -> str | None:
        """Who is asking ("anonymous" when no authentication is configured), or None when refused."""
        if not self.required:
            return "anonymous"
        if self.identity_header:
            who = request.headers.get(self.identity_header, "").strip()
            if who:
                return who
        presented = ""
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            presented = header[7:].strip()
        presented = presented or request.cookies.get(TOKEN_COOKIE, "")
        if presented and self.valid_token(presented):
            return "token"
        return None

    def valid_token(self, presented: str) -> bool:
        matched = False
        for token in self.tokens:  # compare with every token, in constant time
            matched |= hmac.compare_digest(presented.encode(), token.encode())
        return matched


class Viewer:
    """The handlers, with the repository, object store and tile server they read from."""

    def __init__(self, settings: Settings, repository: ViewerRepository, store: ObjectStore) -> None:
        self.settings = settings
        self.repository = repository
        self.store = store
        self.overlays = Overlays(store, settings.artifacts_bucket)
        self.cache = SlideCache(Path(settings.cache_dir) / "viewer", settings.viewer_cache_max_bytes)
        self.tiles = TileServer(
            self._slide_path,
            open_slides=settings.viewer_open_slides,
            cached_tiles=settings.viewer_tile_cache_tiles,
            on_cache=lambda hit: VIEWER_TILE_CACHE.labels("hit" if hit else "miss").inc(),
        )
        self.auth = Auth(settings.viewer_token_list(), settings.viewer_identity_header)
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="viewer")
        self._ready_at = 0.0
        self._ready = False

    # -- plumbing ---------------------------------------------------------------------------------
    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _slide_path(self, slide_id: str) -> Path:
        source = self.repository.source(slide_id)
        if source is None:
            raise LookupError(f"no slide {slide_id}")
        path, _ = self.cache.fetch(
            self.store,
            source["bucket"],
            source["upload_key"],
            version_id=source["version_id"] or "",
            expected_sha256=source["source_sha256"] or "",
        )
        return openable(path)  # a multi-file slide's zip: the file OpenSlide opens in its unpacked folder

    def is_ready(self) -> bool:
        now = time.monotonic()
        if now - self._ready_at > 2.0:
            self._ready_at = now
            self._ready = (
                self.repository.ping() and self.store.stat(self.settings.artifacts_bucket, "-") is None
            )
        return self._ready

    async def slide_or_404(self, slide_id: str) -> dict[str, Any]:
        slide: dict[str, Any] | None = await self.run(self.repository.slide, slide_id)
        if slide is None:
            raise not_found(f"no slide {slide_id}")
        return slide

    def pick_run(self, request: web.Request, slide: dict[str, Any]) -> str:
        runs = [r["tiling_run_id"] for r in slide["runs"]]
        run = request.query.get("run") or slide["tiling_run_id"] or (runs[-1] if runs else "")
        if run not in runs:
            raise not_found(f"slide {slide['slide_id']} has no tiling run {run[:80]!r}; it has {runs}")
        return str(run)

    def pick_prediction(self, request: web.Request, slide: dict[str, Any]) -> dict[str, Any]:
        run = request.query.get("run", "")
        model = request.query.get("model", "")
        found = [
            p
            for p in slide["predictions"]
            if (not run or p["tiling_run_id"] == run) and (not model or p["model_version"] == model)
        ]
        if not found:
            raise not_found(
                f"slide {slide['slide_id']} has no prediction for run {run[:80]!r} and model {model[:80]!r}"
            )
        current = [p for p in found if p["tiling_run_id"] == slide["tiling_run_id"]]
        return (current or found)[-1]

    # -- pages and lists --------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = str(form.get("token", ""))
        if not self.auth.tokens or not self.auth.valid_token(token):
            raise web.HTTPUnauthorized(text=_error_json("unknown token"), content_type="application/json")
        response = web.HTTPSeeOther("/")
        secure = request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", secure=secure, path="/")
        raise response

    async def slides(self, request: web.Request) -> web.Response:
        query = request.query.get("q", "").strip()
        if not SEARCH.fullmatch(query):
            raise bad_request("search text: up to 200 printable characters")
        status = request.query.get("status", "")
        if status and status not in STATUSES:
            raise bad_request(f"status must be one of {list(STATUSES)}")
        model = request.query.get("model", "")
        if len(model) > 200:
            raise bad_request("model version too long")
        limit = _int(request, "limit", request.query.get("limit", "50"), 1, MAX_PAGE)
        offset = _int(request, "offset", request.query.get("offset", "0"), 0, 10**9)
        cursor = await self.run(self.repository.cursor)
        rows, total = await self.run(
            lambda: self.repository.list_slides(
                query=query,
                status=status,
                model=model,
                limit=limit,
                offset=offset,
            )
        )
        models = await self.run(self.repository.model_versions)
        return web.json_response(
            {
                "slides": rows,
                "total": total,
                "limit": limit,
                "offset": offset,
                "cursor": cursor,
                "statuses": list(STATUSES),
                "model_versions": models,
            }
        )

    async def changes(self, request: web.Request) -> web.Response:
        since = request.query.get("since", "")
        try:
            moment = datetime.fromisoformat(since)
        except ValueError:
            raise bad_request("since must be the cursor a previous answer gave (an ISO 8601 time)") from None
        if moment.tzinfo is None:
            raise bad_request("since must carry its time zone, as the cursor does")
        rows = await self.run(self.repository.changed_since, moment)
        cursor = rows[-1]["changed_at"] if rows else since
        return web.json_response({"slides": rows, "cursor": cursor})

    async def slide(self, request: web.Request) -> web.Response:
        slide = await self.slide_or_404(slide_id_of(request))
        return web.json_response(slide)

    # -- deep zoom --------------------------------------------------------------------------------
    async def dzi(self, request: web.Request) -> web.Response:
        opened = await self.run(self.tiles.slide, slide_id_of(request))
        return web.Response(text=opened.pyramid.dzi(), content_type="application/xml")

    async def info(self, request: web.Request) -> web.Response:
        slide_id = slide_id_of(request)
        slide = await self.slide_or_404(slide_id)
        opened = await self.run(self.tiles.slide, slide_id)
        return web.json_response(
            {
                "width": opened.pyramid.width,
                "height": opened.pyramid.height,
                "max_level": opened.pyramid.max_level,
                "mpp": slide["mpp"],
                "icc_profile": opened.has_icc_profile,
            }
        )

    async def tile(self, request: web.Request) -> web.Response:
        slide_id = slide_id_of(request)
        info = request.match_info
        level = _int(request, "level", info["level"], 0, 64)
        col = _int(request, "column", info["col"], 0, 10**7)
        row = _int(request, "row", info["row"], 0, 10**7)
        if info["format"] != "jpeg":
            raise bad_request("tiles are served as .jpeg only")
        try:  # one worker hop: an unknown slide is a LookupError (404) from the file lookup
            data = await self.run(self.tiles.tile, slide_id, level, col, row)
        except TileOutOfRange as exc:
            raise not_found(str(exc)) from exc
        return web.Response(
            body=data, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
        )

    # -- overlays and downloads -------------------------------------------------------------------
    async def attention(self, request: web.Request) -> web.Response:
        slide = await self.slide_or_404(slide_id_of(request))
        chosen = self.pick_prediction(request, slide)
        data = await self.run(
            self.overlays.attention, slide["slide_id"], chosen["tiling_run_id"], chosen["model_version"]
        )
        return web.json_response(data)

    async def tissue(self, request: web.Request) -> web.Response:
        slide = await self.slide_or_404(slide_id_of(request))
        run = self.pick_run(request, slide)
        data = await self.run(self.overlays.tissue, slide["slide_id"], run)
        return web.Response(body=data, content_type="application/geo+json")

    async def qc(self, request: web.Request) -> web.Response:
        slide = await self.slide_or_404(slide_id_of(request))
        run = self.pick_run(request, slide)
        profile = await self.run(self.repository.run_profile, slide["slide_id"], run) or {}
        data = await self.run(self.overlays.qc, slide["slide_id"], run, profile)
        return web.json_response(data)

    async def top_tile(self, request: web.Request) -> web.Response:
        slide = await self.slide_or_404(slide_id_of(request))
        prediction_id = request.match_info["prediction_id"]
        match = [p for p in slide["predictions"] if p["prediction_id"] == prediction_id]
        if not match:
            raise not_found(f"slide {slide['slide_id']} has no prediction {prediction_id[:80]!r}")
        top = match[0]["top_tiles"] or []
        rank = _int(request, "rank", request.match_info["rank"], 1, max(1, len(top)))
        if not top:
            raise not_found("this prediction lists no top tiles")
        entry = top[rank - 1]
        size = int(entry.get("size") or 1)
        opened = await self.run(self.tiles.slide, slide["slide_id"])
        data = await self.run(
            opened.region, int(entry.get("x", 0)), int(entry.get("y", 0)), size, TOP_TILE_PX
        )
        return web.Response(body=data, content_type="image/jpeg")

    async def download(self, request: web.Request) -> web.Response:
        slide = await self.slide_or_404(slide_id_of(request))
        kind = request.match_info["kind"]
        chosen = self.pick_prediction(request, slide)
        slide_id = slide["slide_id"]
        if kind == "geojson":
            data = await self.run(
                self.overlays.geojson, slide_id, chosen["tiling_run_id"], chosen["model_version"]
            )
            content_type, name = "application/geo+json", f"{slide_id}-{chosen['model_version']}.geojson"
        else:
            data = await self.run(self.overlays.h5, slide_id, chosen["tiling_run_id"], chosen["backbone_id"])
            content_type, name = "application/x-hdf5", f"{slide_id}.h5"
        safe_name = re.sub(r"[^\w.-]", "_", name)
        return web.Response(
            body=data,
            content_type=content_type,
            headers={"Content-Disposition": f'attachment; filename="{safe_name}"'},
        )

    # -- health -----------------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        try:
            ready = bool(await self.run(self.is_ready))
        except Exception as exc:  # noqa: BLE001 - any failure of a dependency is "not ready", never a 500
            log.info("not ready", error=f"{type(exc).__name__}: {exc}")
            ready = False
        READY.labels("viewer").set(1 if ready else 0)
        if ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def build_app(viewer: Viewer) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = _route_name(request)
        try:
            response = await _answer(viewer, request, handler)
        except web.HTTPException as exc:
            if exc.content_type != "application/json" and exc.status >= 400:
                exc.text = _error_json(exc.reason)
                exc.content_type = "application/json"
            response = exc
        except (LookupError, PermanentError) as exc:
            response = web.json_response({"error": str(exc)}, status=404)
        except TransientError as exc:
            log.warning("viewer dependency unavailable", path=request.path, error=str(exc))
            response = web.json_response({"error": "a dependency is unavailable; try again"}, status=503)
        except Exception as exc:
            if type(exc).__name__ == "S3Error" and getattr(exc, "code", "") in {"NoSuchKey", "NoSuchObject"}:
                response = web.json_response({"error": "not stored (yet) for this slide"}, status=404)
            else:
                log.exception("viewer request failed", path=request.path)
                response = web.json_response({"error": "internal error; see the viewer's log"}, status=500)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        VIEWER_REQUESTS.labels(route, str(response.status)).inc()
        VIEWER_REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)
        return response

    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    v = viewer
    app.router.add_get("/", v.index)
    app.router.add_post("/login", v.login)
    app.router.add_get("/healthz", v.healthz)
    app.router.add_get("/readyz", v.readyz)
    app.router.add_get("/metrics", v.metrics)
    app.router.add_get("/api/slides", v.slides)
    app.router.add_get("/api/changes", v.changes)
    app.router.add_get("/api/slides/{slide_id}", v.slide)
    app.router.add_get("/api/slides/{slide_id}/image", v.info)
    app.router.add_get("/api/slides/{slide_id}/attention", v.attention)
    app.router.add_get("/api/slides/{slide_id}/tissue", v.tissue)
    app.router.add_get("/api/slides/{slide_id}/qc", v.qc)
    app.router.add_get("/api/slides/{slide_id}/top-tiles/{prediction_id}/{rank}.jpeg", v.top_tile)
    app.router.add_get(r"/api/slides/{slide_id}/download/{kind:geojson|h5}", v.download)
    app.router.add_get("/slides/{slide_id}.dzi", v.dzi)
    app.router.add_get(r"/slides/{slide_id}_files/{level}/{col}_{row}.{format}", v.tile)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False, append_version=False)
    return app


async def _answer(viewer: Viewer, request: web.Request, handler: Handler) -> web.StreamResponse:
    if not (request.path in PUBLIC_PATHS or request.path.startswith("/static/")):
        who = viewer.auth.identity(request)
        if who is None:
            raise web.HTTPUnauthorized(
                text=_error_json("authentication required: a bearer token or the identity proxy's header"),
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="wsi-viewer"'},
            )
    return await handler(request)
