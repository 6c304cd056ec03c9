"""The viewer against the real local stack: one synthetic slide through the pipeline (and one
unreadable upload), then every endpoint over HTTP, bad input included, the read-only database role,
token authentication on a second viewer process, and a real headless Chromium on the page.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from wsitk.shared.slides.synth import SynthSpec, generate_slide

from tests.browser import Browser, Page, chromium_binary
from tests.conftest import Pipeline

pytestmark = pytest.mark.e2e
TERMINAL = {"predicted", "rejected", "failed", "no_tissue"}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> Answer:
    request = urllib.request.Request(url, headers=headers or {}, data=data)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=60) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read())


@dataclass
class Scene:
    base: str
    slide_id: str
    upload_key: str
    rejected_key: str
    pipeline: Pipeline


@pytest.fixture(scope="module")
def scene(pipeline: Pipeline, fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Scene:
    folder = tmp_path_factory.mktemp("viewer-slides")
    path = folder / "viewer-case.svs"
    spec = SynthSpec(width=3000, height=2400, mpp=0.5, fmt="svs", seed=7, tumour_fraction=0.3, artefacts=True)
    generate_slide(path, spec)  # with pen strokes and blurred patches, so QC rejects some tiles
    key, rejected = "viewer/case-a.svs", "viewer/unreadable.svs"
    pipeline.upload(path, key)
    # The openslide fixture with a few trailing bytes: still unreadable, but content of its own, so it is a
    # new slide rather than the same slide an earlier test of the session already uploaded.
    unreadable = folder / "unreadable.svs"
    unreadable.write_bytes((fixtures_dir / "unreadable.svs").read_bytes() + b"\0viewer-scene")
    pipeline.upload(unreadable, rejected)

    def done() -> bool:
        statuses = pipeline.statuses([key, rejected])
        return len(statuses) == 2 and set(statuses.values()) <= TERMINAL

    pipeline.wait_for(done, 240, "the viewer's slides to reach an outcome")
    assert pipeline.statuses([key])[key] == "predicted"
    (slide_id,) = pipeline.query("SELECT slide_id FROM slide_sources WHERE upload_key = %s", (key,))[0]
    pipeline.wait_for(lambda: pipeline.ready("viewer"), 60, "the viewer to be ready")
    return Scene(f"http://127.0.0.1:{pipeline.metrics_port('viewer')}", slide_id, key, rejected, pipeline)


def assert_error(answer: Answer, status: int) -> str:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert b"Traceback" not in answer.body
    reason = answer.json()["error"]
    assert reason
    return str(reason)


# -- health, list, changes ------------------------------------------------------------------------
def test_health_readiness_and_metrics(scene: Scene) -> None:
    assert get(f"{scene.base}/healthz").status == 200
    assert get(f"{scene.base}/readyz").status == 200
    get(f"{scene.base}/api/slides")
    metrics = get(f"{scene.base}/metrics").body.decode()
    assert 'wsi_build_info{service="viewer"' in metrics
    assert 'wsi_ready{service="viewer"} 1.0' in metrics
    assert 'wsi_viewer_requests_total{route="/api/slides",status="200"}' in metrics


def test_the_address_the_demo_prints_is_the_viewers(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsitk.shared.ops import viewer_url

    monkeypatch.setenv("WSI_HOME", str(scene.pipeline.home))
    assert viewer_url(timeout_s=0) == f"{scene.base}/"


def test_slide_list_shows_outcomes_and_searches_filters_and_pages(scene: Scene) -> None:
    listing = get(f"{scene.base}/api/slides?limit=200").json()
    # Identity is content: an upload whose bytes an earlier test already sent joins that slide's keys.
    rows = {key: r for r in listing["slides"] for key in r["upload_keys"]}
    slide = rows[scene.upload_key]
    assert slide["slide_id"] == scene.slide_id and slide["status"] == "predicted"
    assert slide["label"] in {"tumour", "normal"} and 0.0 <= slide["probability"] <= 1.0
    assert slide["model_version"] and slide["tissue_area_mm2"] > 0
    assert slide["qc_tiles"] >= slide["qc_accepted"] > 0
    bad = rows[scene.rejected_key]
    assert bad["status"] == "rejected" and bad["status_reason"]
    assert "predicted" in listing["statuses"] and slide["model_version"] in listing["model_versions"]

    def search(**params: Any) -> list[str]:
        answer = get(f"{scene.base}/api/slides?{urllib.parse.urlencode(params)}")
        assert answer.status == 200, answer.body
        return [r["slide_id"] for r in answer.json()["slides"]]

    assert search(q="viewer/case") == [scene.slide_id]
    assert search(q=scene.slide_id[:10]) == [scene.slide_id]
    assert search(q=scene.slide_id[:10].upper()) == [scene.slide_id]
    assert search(q="no-such-upload") == []
    assert scene.slide_id not in search(status="rejected", limit=200)
    assert scene.slide_id in search(model=slide["model_version"], limit=200)
    assert search(model="no-such-model") == []
    first = [r["slide_id"] for r in listing["slides"]][:30]  # the same order, page by page
    paged = [sid for offset in range(0, len(first), 3) for sid in search(limit=3, offset=offset)]
    assert paged == first and len(set(paged)) == len(paged)

    cursor = listing["cursor"]
    assert get(f"{scene.base}/api/changes?since={urllib.parse.quote(cursor)}").json()["slides"] == []
    since_epoch = get(f"{scene.base}/api/changes?since=1970-01-01T00:00:00%2B00:00").json()
    assert scene.slide_id in [r["slide_id"] for r in since_epoch["slides"]]

    for harmless in ("'; DROP TABLE slides; --", "%", "_", "\\", "%00"):
        assert search(q=harmless) == [], harmless
    for query in (
        "status=bogus",
        "limit=0",
        "limit=9999",
        "offset=-1",
        "q=" + "x" * 201,
        "model=" + "m" * 300,
    ):
        assert_error(get(f"{scene.base}/api/slides?{query}"), 400)
    assert_error(get(f"{scene.base}/api/changes?since=yesterday"), 400)
    assert_error(get(f"{scene.base}/api/changes?since=1970-01-01T00:00:00"), 400)


# -- one slide --------------------------------------------------------------------------------------
def test_slide_details_overlays_top_tiles_and_downloads(scene: Scene) -> None:
    base, sid = scene.base, scene.slide_id
    slide = get(f"{base}/api/slides/{sid}").json()
    (prediction,) = slide["predictions"]
    assert [r["tiling_run_id"] for r in slide["runs"]] == [prediction["tiling_run_id"]]
    image = get(f"{base}/api/slides/{sid}/image").json()
    assert (image["width"], image["height"]) == (3000, 2400) and image["mpp"] == pytest.approx(0.5, abs=0.01)

    attention = get(f"{base}/api/slides/{sid}/attention").json()
    assert attention["model_version"] == prediction["model_version"]
    ranks = [t[4] for t in attention["tiles"]]
    assert ranks == sorted(ranks) and ranks[0] == 1 and len(ranks) == prediction["tiles_scored"]
    top = prediction["top_tiles"][0]
    assert attention["tiles"][0][:2] == [top["x"], top["y"]]

    tissue = get(f"{base}/api/slides/{sid}/tissue").json()
    assert tissue["type"] == "FeatureCollection" and tissue["features"]
    qc = get(f"{base}/api/slides/{sid}/qc").json()
    assert (
        sum(qc["rejected_by_reason"].values())
        == len(qc["rejected"])
        == slide["qc_tiles"] - slide["qc_accepted"]
    )
    assert qc["rejected"], "the artefacts of the synthetic slide should make QC reject some tiles"
    known = {"background", "blur", "pen", "fat", "underexposed", "overexposed"}
    assert {reason for _, _, reason in qc["rejected"]} <= known
    assert qc["rejected_by_reason"] == slide["qc_rejected"]

    from PIL import Image

    tile = get(f"{base}/api/slides/{sid}/top-tiles/{prediction['prediction_id']}/1.jpeg")
    assert tile.status == 200 and Image.open(io.BytesIO(tile.body)).size == (192, 192)
    query = urllib.parse.urlencode({"run": prediction["tiling_run_id"], "model": prediction["model_version"]})
    geojson = get(f"{base}/api/slides/{sid}/download/geojson?{query}")
    assert geojson.status == 200 and "attachment" in geojson.headers["Content-Disposition"]
    collection = geojson.json()
    assert len(collection["features"]) == prediction["tiles_scored"]
    assert collection["wsi"]["model_version"] == prediction["model_version"]
    h5 = get(f"{base}/api/slides/{sid}/download/h5?{query}")
    assert h5.status == 200 and h5.body.startswith(b"\x89HDF\r\n\x1a\n")


def test_deep_zoom_tiles_and_bad_coordinates(scene: Scene) -> None:
    from PIL import Image

    base, sid = scene.base, scene.slide_id
    dzi = get(f"{base}/slides/{sid}.dzi").body.decode()
    assert 'Width="3000"' in dzi and 'Height="2400"' in dzi and 'TileSize="254"' in dzi
    top_level = 12  # ceil(log2(3000))
    tile = Image.open(io.BytesIO(get(f"{base}/slides/{sid}_files/{top_level}/0_0.jpeg").body))
    assert tile.size == (255, 255)
    corner = Image.open(io.BytesIO(get(f"{base}/slides/{sid}_files/{top_level}/11_9.jpeg").body))
    assert corner.size == (3000 - 11 * 254 + 1, 2400 - 9 * 254 + 1)
    assert Image.open(io.BytesIO(get(f"{base}/slides/{sid}_files/0/0_0.jpeg").body)).size == (1, 1)

    assert "outside 0..12" in assert_error(get(f"{base}/slides/{sid}_files/13/0_0.jpeg"), 404)
    assert "outside the 12 x 10 tiles" in assert_error(get(f"{base}/slides/{sid}_files/12/12_0.jpeg"), 404)
    assert_error(get(f"{base}/slides/{sid}_files/12/0_99999999999.jpeg"), 400)
    assert_error(get(f"{base}/slides/{sid}_files/x/0_0.jpeg"), 400)
    assert_error(get(f"{base}/slides/{sid}_files/12/0_0.png"), 400)
    unknown = "0" * 32
    assert_error(get(f"{base}/slides/{unknown}.dzi"), 404)
    assert_error(get(f"{base}/slides/{unknown}_files/1/0_0.jpeg"), 404)
    assert_error(get(f"{base}/api/slides/{unknown}"), 404)
    assert_error(get(f"{base}/api/slides/{sid[:20]}"), 400)
    assert_error(get(f"{base}/api/slides/{sid}/attention?run=../../etc"), 404)
    assert_error(get(f"{base}/api/slides/{sid}/tissue?run=..%2F..%2Fqc"), 404)
    assert_error(get(f"{base}/api/slides/{sid}/top-tiles/nope/1.jpeg"), 404)
    for path in (
        "/slides/..%2F..%2Fetc%2Fpasswd.dzi",
        "/slides/%2e%2e/%2e%2e/etc/passwd_files/1/0_0.jpeg",
        "/static/..%2F..%2Fapp.py",
        "/static/../../pyproject.toml",
        "/api/slides/..%2F..%2Fetc",
    ):
        answer = get(f"{base}{path}")
        assert 400 <= answer.status < 500 and b"Traceback" not in answer.body, (path, answer.status)
        assert b"import " not in answer.body and b"[project]" not in answer.body


def test_the_viewer_database_role_reads_but_cannot_write(scene: Scene) -> None:
    import psycopg

    with psycopg.connect(scene.pipeline.stack.viewer_database_url()) as conn:
        slides = conn.execute("SELECT count(*) FROM wsi.slides").fetchone()
        assert slides is not None and slides[0] >= 2
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM wsi.audit_log LIMIT 1")
    with psycopg.connect(scene.pipeline.stack.viewer_database_url()) as conn, pytest.raises(psycopg.Error):
        conn.execute("UPDATE wsi.slides SET status = 'failed'")


# -- authentication -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_viewer(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second viewer process with bearer tokens required."""
    home = tmp_path_factory.mktemp("viewer-token")
    log_path = home / "viewer.log"
    env = {
        **os.environ,
        **scene.pipeline.env,
        "WSI_HOME": str(home),
        "WSI_VIEWER_TOKENS": "first-token, second-token",
        "WSI_VIEWER_PORT": "0",
    }
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "wsitk.shared.cli", "run", "viewer"], env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 60
        port = 0
        while not port and time.monotonic() < deadline:
            for line in log_path.read_text().splitlines():
                if '"service starting"' in line:
                    port = int(json.loads(line[line.index("{") :])["metrics_port"])
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.2)
        assert port, log_path.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_tokens_are_required_when_configured(token_viewer: str, scene: Scene) -> None:
    base = token_viewer
    reason = assert_error(get(f"{base}/api/slides"), 401)
    assert "token" in reason
    assert get(f"{base}/api/slides").headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(get(f"{base}/api/slides", {"Authorization": "Bearer wrong"}), 401)
    assert_error(get(f"{base}/slides/{scene.slide_id}.dzi"), 401)
    assert get(f"{base}/api/slides", {"Authorization": "Bearer second-token"}).status == 200
    assert get(f"{base}/healthz").status == 200 and get(f"{base}/").status == 200
    assert_error(get(f"{base}/login", data=b"token=wrong"), 401)
    login = get(f"{base}/login", data=b"token=first-token")
    assert login.status == 303
    cookie = login.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert get(f"{base}/api/slides", {"Cookie": cookie.split(";")[0]}).status == 200


def test_the_viewer_refuses_to_serve_a_network_without_authentication() -> None:
    from wsitk.services.viewer.main import refusal
    from wsitk.shared.config import Settings

    assert "WSI_VIEWER_TOKENS" in refusal(Settings(viewer_host="0.0.0.0"))
    assert refusal(Settings(viewer_host="0.0.0.0", viewer_tokens="t")) == ""
    assert refusal(Settings(viewer_host="127.0.0.1")) == ""


# -- a real browser ---------------------------------------------------------------------------------
def _near(pixel: float | tuple[int, ...] | None, colour: str, tolerance: int = 14) -> bool:
    assert isinstance(pixel, tuple), f"expected an RGB pixel, got {pixel!r}"
    wanted = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    return all(abs(int(p) - w) <= tolerance for p, w in zip(pixel[:3], wanted, strict=True))


def test_a_browser_shows_the_list_and_the_heatmap_over_the_top_tile(scene: Scene, tmp_path: Path) -> None:
    chromium_binary()  # fails (not skips) with what to install
    (tmp_path / "profile").mkdir()
    browser = Browser(tmp_path / "profile")
    try:
        asyncio.run(_browse(browser, scene, tmp_path))
    finally:
        browser.close()


async def _browse(browser: Browser, scene: Scene, out: Path) -> None:
    import aiohttp
    from PIL import Image

    async with aiohttp.ClientSession() as session:
        page = await Page(browser, session).connect()
        await page.navigate(f"{scene.base}/")
        await page.wait_for("Number(document.body.dataset.listVersion) >= 1", 30, "the slide list")
        table = await page.evaluate("document.querySelector('#slides').innerText")
        assert scene.slide_id[:12] in table and "predicted" in table and "rejected" in table
        assert scene.upload_key in table
        await page.screenshot(out / "list.png")

        await page.navigate(f"{scene.base}/#/slide/{scene.slide_id}")
        await page.wait_for(
            "document.body.dataset.overlaysReady === '1' && document.body.dataset.slideReady === '1'",
            60,
            "the slide, its tiles and overlays",
        )
        await page.evaluate(
            "(() => { const o = document.querySelector('#opacity'); o.value = 100;"
            " o.dispatchEvent(new Event('input'));"
            " document.querySelector('#show-tissue').click(); return true; })()"
        )
        await page.next_frames()
        top = await page.evaluate(
            "(() => { const a = wsiViewer.state.attention; const [x, y, colour] = a.tiles[0];"
            " const p = wsiViewer.screenPoint(x + a.tile_size / 2, y + a.tile_size / 2);"
            " const q = wsiViewer.screenPoint(x + a.tile_size, y + a.tile_size);"
            " const o = wsiViewer.screenPoint(x, y);"
            " return {x: p.x, y: p.y, colour, width: q.x - o.x}; })()"
        )
        assert top["width"] >= 8, f"the top tile is too small on screen to check: {top}"
        on = Image.open(await page.screenshot(out / "slide-heatmap-on.png")).convert("RGB")
        pixel = on.getpixel((round(top["x"]), round(top["y"])))
        assert _near(pixel, top["colour"]), (
            f"heatmap colour {top['colour']} expected at the top tile, saw {pixel}"
        )
        scale = await page.evaluate("document.querySelector('#scalebar span').textContent")
        assert scale.endswith(("µm", "mm")), scale

        await page.evaluate("document.querySelector('#show-heatmap').click()")
        await page.next_frames()
        off = Image.open(await page.screenshot(out / "slide-heatmap-off.png")).convert("RGB")
        pixel = off.getpixel((round(top["x"]), round(top["y"])))
        assert not _near(pixel, top["colour"], tolerance=20), (
            f"heatmap still drawn with the overlay off: {pixel}"
        )

        await page.wait_for(
            "[...document.querySelectorAll('#gallery img')].length > 0 &&"
            " [...document.querySelectorAll('#gallery img')].every((i) => i.complete && i.naturalWidth > 0)",
            30,
            "the top-tile gallery",
        )
        before = await page.evaluate("wsiViewer.state.viewer.viewport.getZoom()")
        await page.evaluate("document.querySelector('#gallery button').click()")
        await page.wait_for(
            f"wsiViewer.state.viewer.viewport.getZoom() > {before} * 1.5", 10, "the view to move to the tile"
        )
        await page.evaluate("document.querySelector('#show-heatmap').click()")
        await page.next_frames(4)
        await page.screenshot(out / "slide-top-tile.png")
        # the overview a pathologist first sees: half-transparent heatmap, tissue outline, QC rejections
        await page.evaluate(
            "(() => { const o = document.querySelector('#opacity'); o.value = 45;"
            " document.querySelector('#show-tissue').click(); document.querySelector('#show-qc').click();"
            " wsiViewer.state.viewer.viewport.goHome(true); o.dispatchEvent(new Event('input')); return true; })()"
        )
        await page.wait_for("document.body.dataset.slideReady === '1'", 20, "the overview tiles")
        await page.next_frames(4)
        await page.screenshot(out / "slide.png")


def test_a_reprocessed_slide_is_followed_live_and_both_runs_show_side_by_side(
    scene: Scene, tmp_path: Path
) -> None:
    """`wsi reprocess` gives the slide a second run and prediction: the open list refreshes by itself,
    the slide page lists both predictions, and the older run's heatmap can still be chosen."""
    (tmp_path / "profile").mkdir()
    browser = Browser(tmp_path / "profile")
    try:
        asyncio.run(_follow(browser, scene, tmp_path))
    finally:
        browser.close()


async def _follow(browser: Browser, scene: Scene, out: Path) -> None:
    import aiohttp

    first = get(f"{scene.base}/api/slides/{scene.slide_id}").json()
    (old,) = first["predictions"]
    async with aiohttp.ClientSession() as session:
        page = await Page(browser, session).connect()
        await page.navigate(f"{scene.base}/")
        version = await page.wait_for("Number(document.body.dataset.listVersion)", 30, "the slide list")
        command = [sys.executable, "-m", "wsitk.shared.cli", "reprocess", "--slides", scene.slide_id]
        command += ["--set", "qc_min_tissue_fraction=0.3", "--reason", "viewer test"]
        result = await asyncio.to_thread(
            subprocess.run, command, env={**os.environ, **scene.pipeline.env}, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        await page.wait_for(
            f"Number(document.body.dataset.listVersion) > {version}", 30, "the open list to follow the change"
        )

        deadline = time.monotonic() + 90
        slide = first
        while len(slide["predictions"]) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            slide = get(f"{scene.base}/api/slides/{scene.slide_id}").json()
        assert len(slide["predictions"]) == 2, "the reprocessed run was not scored in time"
        assert [r["origin"] for r in slide["runs"]] == ["upload", "reprocess"]
        assert slide["tiling_run_id"] == slide["runs"][1]["tiling_run_id"] != old["tiling_run_id"]
        query = urllib.parse.urlencode({"run": old["tiling_run_id"], "model": old["model_version"]})
        assert get(f"{scene.base}/api/slides/{scene.slide_id}/attention?{query}").json()["tiles"]

        await page.navigate(f"{scene.base}/#/slide/{scene.slide_id}")
        await page.wait_for("document.body.dataset.overlaysReady === '1'", 60, "the slide page")
        assert await page.evaluate("document.querySelectorAll('#predictions tbody tr').length") == 2
        assert await page.evaluate("wsiViewer.state.prediction.tiling_run_id") == slide["tiling_run_id"]
        await page.evaluate("document.querySelector('#predictions tbody tr input').click()")
        await page.wait_for(
            f"wsiViewer.state.attention && wsiViewer.state.attention.tiling_run_id === '{old['tiling_run_id']}'",
            20,
            "the older run's heatmap",
        )
        assert await page.evaluate("wsiViewer.state.qc.tiling_run_id") == old["tiling_run_id"]
        await page.next_frames()
        await page.screenshot(out / "slide-two-runs.png")
