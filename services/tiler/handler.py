"""tiler: an ingested slide becomes its tile plan, then shards of tissue tiles at a physical resolution.

For each ``SlideIngested`` the tiler (1) fetches the slide into the local cache, verifying the
checksum pinned at ingest, (2) in a memory-limited child process finds tissue on a thumbnail and
cuts tiles of ``tile_size`` pixels at ``target_mpp`` micrometres per pixel, packing them into
shards, (3) stores the shards, the tissue mask and polygons, and last a manifest, all put-if-absent,
and (4) publishes the ``TilePlan`` and then one ``TileShard`` per shard.

Pixels come from the fast reader (``shared/slides/fastread.py``: the slide's own JPEG tiles through
libjpeg-turbo, DCT-scaled for 20x from 40x) when the slide is Aperio or generic tiled TIFF with JPEG
tiles, and from OpenSlide otherwise; the plan records which (``reader``) and why not. A tile that is
exactly one stored JPEG tile (the slide's scale within ``MPP_TOLERANCE`` of the target, the profile's
tile size the stored one's) is written into its shard as the stored compressed bytes, neither decoded
nor re-encoded (``tiles_passed_through``). The plan records the tiles' true scale (``tile_mpp``: 0.499
for a 0.5 target on a 0.499 um/px scan, cut without resampling) and the tolerance used. When the
profile asks for stain normalisation, it is fitted here once per slide on an evenly spread sample of
its tissue tiles and carried on every ``TileShard`` (``stain``).

The slide's level-0 MPP follows ``shared/slides/reader.py: mpp_for``, with the lab's per-slide value
(``PipelineProfile.slide_mpp_override``, ``wsi mpp set``) first; the plan records the MPP used and its
source (``level0_mpp``, ``level0_mpp_source``).

The tiling run id is deterministic (slide id + profile id), and so are every key and event id: a
redelivered or re-driven slide finds the manifest and re-publishes the same events without reading
a pixel.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from wsitk.shared.bus.delivery import Incoming
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import new_meta, pb, tiling_run_id
from wsitk.shared.errors import DISK_FULL_ERRNOS, PermanentError, local_disk_full, scrub_local_paths
from wsitk.shared.isolation import IsolatedRunner, warm_up_decoder
from wsitk.shared.keys import tiles_prefix, tiling_manifest_key
from wsitk.shared.logging import get_logger
from wsitk.shared.metrics import SLIDE_STAGE_SECONDS, TILES
from wsitk.shared.objectstore import StoredObject
from wsitk.shared.topics import SLIDES_FAILED, TILE_PLANS, TILE_SHARDS

if TYPE_CHECKING:
    import numpy as np
    import openslide
    from numpy.typing import NDArray
    from wsitk.shared.shards import ShardTile
    from wsitk.shared.slides.fastread import FastTileReader
    from wsitk.shared.slides.tiling import TileGrid

SERVICE = "tiler"
log = get_logger()


def shard_id_for(index: int) -> str:
    return f"s{index:05d}"


@dataclass(frozen=True)
class TilingRejected:
    """The isolated child's answer for a slide that cannot be tiled as profiled (exceptions with extra
    fields do not cross the process boundary intact)."""

    code: str
    reason: str


def tile_slide(path: str, profile_json: str, out_dir: str, slide_id: str) -> dict[str, Any] | TilingRejected:
    """Runs in the isolated child. Writes shard files + mask files into ``out_dir``; returns the plan (the
    JSON document stored as the run's manifest), or why the slide cannot be tiled."""
    from wsitk.shared.slides.bundle import openable
    from wsitk.shared.slides.reader import SlideRejected

    try:  # a multi-file slide (DICOM series, MIRAX) comes as a zip: unpacked once beside the cached file
        return _tile_slide(str(openable(Path(path))), profile_json, out_dir, slide_id)
    except SlideRejected as exc:
        return TilingRejected(exc.code, exc.reason)


def _tile_slide(path: str, profile_json: str, out_dir: str, slide_id: str) -> dict[str, Any]:
    import numpy as np
    import openslide
    from wsitk.shared.heap import release_free_memory
    from wsitk.shared.shards import pack_shard
    from wsitk.shared.slides.fastread import open_fast_reader
    from wsitk.shared.slides.reader import mpp_for
    from wsitk.shared.slides.tiling import plan_tiles
    from wsitk.shared.slides.tissue import segment_tissue

    profile = json_format.Parse(profile_json, pb.PipelineProfile())
    out = Path(out_dir)
    with openslide.OpenSlide(path) as slide:
        # The lab's per-slide MPP (profile.slide_mpp_override) wins over the file's own.
        mpp = mpp_for(slide.properties, profile.mpp_override, slide_override=profile.slide_mpp_override)
        mpp0 = float(mpp.x)
        width, height = slide.dimensions
        tissue = segment_tissue(slide, mpp0=mpp0)
        grid = plan_tiles(
            width,
            height,
            mpp0,
            tissue,
            target_mpp=profile.target_mpp,
            tile_size=profile.tile_size,
            min_tissue_fraction=profile.min_tissue_fraction,
            level_downsamples=list(slide.level_downsamples),
        )
        np.save(out / "mask.npy", tissue.mask)
        if tissue.thumbnail is not None:  # shown under attention heatmaps; de-identified (no label image)
            from PIL import Image

            Image.fromarray(tissue.thumbnail).save(out / "thumbnail.jpg", quality=85)
        (out / "tissue.geojson").write_text(json.dumps(tissue.polygons))
        coords = np.asarray(grid.coords).reshape(-1, 2)
        fast, why_not = open_fast_reader(
            Path(path), slide.properties.get("openslide.vendor", ""), list(slide.level_dimensions)
        )
        if fast is not None and not fast.supports(grid):
            why_not = f"level {grid.level} is not stored as tiled JPEG ({why_not})"
            fast.close()
            fast = None

        cutter = ShardTileCutter(grid, (width, height), tissue.background.white, fast=fast, slide=slide)

        def tiles_of(indices: list[int]) -> Iterator[tuple[int, NDArray[np.uint8]]]:
            for index in indices:
                yield index, cutter.pixels(index)

        stain = _fit_stain(str(getattr(profile, "stain_method", "")), len(coords), tiles_of)
        per_shard = int(profile.tiles_per_shard)
        starts = list(range(0, len(coords), per_shard))
        plan = {
            "reader": "libjpeg-turbo" if fast is not None else "openslide",
            "reader_fallback_reason": why_not if fast is None else "",
            "stain": stain,
            "level": int(grid.level),
            "level0_mpp": mpp0,
            "level0_mpp_source": mpp.source,
            "tile_size_level0": float(grid.tile_size_level0),
            "tile_mpp": float(grid.tile_mpp),
            "mpp_tolerance": float(grid.mpp_tolerance),
            "resampled": bool(grid.resampled),
            "tissue_area_mm2": float(tissue.area_mm2),
            "background": tissue.background.to_dict(),
            "width": int(width),
            "height": int(height),
            "total_tiles": len(coords),
            "shards": [
                {"shard_id": shard_id_for(index), "tile_count": min(per_shard, len(coords) - start)}
                for index, start in enumerate(starts)
            ],
        }
        # The plan is known before any tile is read: announced now (the parent publishes it, and each
        # shard as it appears, while the rest are cut). Files appear whole: written, then renamed.
        _write_whole(out / PLAN_FILE, json.dumps(plan).encode())
        for index, start in enumerate(starts):
            indices = list(range(start, min(start + per_shard, len(coords))))
            header = {
                "slide_id": slide_id,
                "shard_id": shard_id_for(index),
                "tile_size": int(profile.tile_size),
                "mpp": float(profile.target_mpp),
                "tile_mpp": float(grid.tile_mpp),  # the tiles' true scale (within mpp_tolerance of mpp)
                "tile_size_level0": float(grid.tile_size_level0),
                "level": int(grid.level),
                "background": tissue.background.to_dict(),  # QC measures tissue against this glass
            }
            _write_whole(out / f"{shard_id_for(index)}.shard", pack_shard(header, cutter.tiles(indices)))
            release_free_memory()  # the shard's buffers go back to the OS (shared/heap.py)
        if fast is not None:
            fast.close()
    return {**plan, "tiles_passed_through": cutter.passed_through}


#: The plan file the tiling child writes into its work directory before it cuts any tile.
PLAN_FILE = "plan.json"


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader polling the directory never sees it half written."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


class ShardTileCutter:
    """The shard entries (level-0 x, y and JPEG bytes) of a plan's tiles, as the tiler stores them.

    A tile that is exactly one stored JPEG tile, wholly on the slide, is the stored compressed bytes
    (``FastTileReader.passthrough_jpeg``); any other is read (fast reader, else OpenSlide), painted
    with the slide's glass past its edge and encoded. Nothing else needs a shard tile's pixels here:
    tissue fractions come from the mask, and the stain fit reads its own sample.
    """

    def __init__(
        self,
        grid: TileGrid,
        slide_size: tuple[int, int],
        white: tuple[float, float, float],
        *,
        fast: FastTileReader | None,
        slide: openslide.OpenSlide,
    ) -> None:
        self.grid, self.slide_size, self.white = grid, slide_size, white
        self.fast, self.slide = fast, slide
        self.passed_through = 0

    def pixels(self, index: int) -> NDArray[np.uint8]:
        """Tile ``index`` of the plan as RGB: read (fast reader, else OpenSlide), glass past the slide."""
        from wsitk.shared.slides.tiling import fill_outside_slide, read_tile

        x, y = (int(v) for v in self.grid.coords[index])
        tile = (
            self.fast.read_tile(self.grid, x, y)
            if self.fast is not None
            else read_tile(self.slide, self.grid, x, y)
        )
        return fill_outside_slide(tile, self.grid, x, y, self.slide_size, self.white)

    def tiles(self, indices: Iterable[int]) -> Iterator[ShardTile]:
        """Shard entries of tiles ``indices``: the stored bytes where a tile is one stored tile, else encoded."""
        from wsitk.shared.shards import ShardTile, encode_jpeg
        from wsitk.shared.slides.tiling import tile_inside_slide

        for index in indices:
            x, y = (int(v) for v in self.grid.coords[index])
            if self.fast is not None and tile_inside_slide(self.grid, x, y, self.slide_size):
                stored = self.fast.passthrough_jpeg(self.grid, x, y)
                if stored is not None:
                    self.passed_through += 1
                    yield ShardTile(x, y, stored)
                    continue
            yield ShardTile(x, y, encode_jpeg(self.pixels(index)))


#: Tiles sampled (evenly over the plan) to fit a slide's stain normalisation.
STAIN_FIT_TILES = 32


def _fit_stain(
    method: str, tile_count: int, tiles_of: Callable[[list[int]], Iterator[tuple[int, NDArray[np.uint8]]]]
) -> dict[str, Any]:
    """StainParams fields fitted on up to ``STAIN_FIT_TILES`` tissue tiles spread over the slide."""
    import numpy as np
    from wsitk.shared.slides.stain import fit_stain

    if not method or tile_count == 0:
        return {"method": ""}
    sample = sorted({int(i) for i in np.linspace(0, tile_count - 1, min(STAIN_FIT_TILES, tile_count))})
    try:
        fit = fit_stain((tile for _, tile in tiles_of(sample)), method)
    except ValueError as exc:  # too little stained tissue: tiles go unnormalised, and the log says why
        log.warning("stain normalisation not fitted", method=method, error=str(exc))
        return {"method": ""}
    return {
        "method": fit.method,
        "stain_matrix": list(fit.stain_matrix),
        "max_concentrations": list(fit.max_concentrations),
        "lab_mean": list(fit.lab_mean),
        "lab_std": list(fit.lab_std),
    }


class SlideUntileable(PermanentError):
    """The slide opens but cannot be tiled as profiled (e.g. scanned coarser than the target MPP)."""


class TilerHandler:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.isolated = IsolatedRunner(
            ctx.settings.isolation_memory_bytes, timeout_s=3600, preload=(tile_slide.__module__,)
        )
        # One long-lived thread submits to the decoder pool and waits, while the handler's thread publishes
        # early. Long-lived because the decoder child dies with the thread that started it (PDEATHSIG).
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="tiler-child")

    def warm_up(self) -> None:
        """At start: the object store's client and the decoder process with the tiling code imported,
        started from the thread that keeps it (``shared/isolation.py: warm_up_decoder``)."""
        warm_up_decoder(
            [lambda: self.ctx.store, lambda: self._waiter.submit(self.isolated.start).result()], "slide"
        )

    def handle(self, message: Incoming) -> list[Outgoing]:
        event = message.event_as(pb.SlideIngested)
        slide_id = event.meta.slide_id
        run_id = tiling_run_id(slide_id, event.profile)
        prefix = tiles_prefix(slide_id, run_id)
        bucket = self.ctx.settings.artifacts_bucket
        manifest_ref = self.ctx.store.stat(bucket, tiling_manifest_key(slide_id, run_id))
        if manifest_ref is not None:
            manifest = json.loads(self.ctx.store.get_bytes(bucket, tiling_manifest_key(slide_id, run_id)))
            log.info("tiling run already stored; re-publishing its events", tiling_run_id=run_id)
        else:
            try:
                manifest = self._tile(event, run_id, prefix, message)
            except SlideUntileable as exc:  # deterministic and explained: fail the slide now, no retries
                failed = pb.SlideFailed(
                    meta=new_meta(service=SERVICE, slide_id=slide_id, event_parts=["untileable", run_id]),
                    stage=SERVICE,
                    reason_code=exc.code,
                    reason=exc.reason,
                    tiling_run_id=run_id,
                )
                return [Outgoing(SLIDES_FAILED, slide_id, failed)]
        published = set(manifest.pop("published_event_ids", ()))
        return [o for o in self._events(event, run_id, manifest) if _event_id(o) not in published]

    def _tile(
        self, event: pb.SlideIngested, run_id: str, prefix: str, message: Incoming | None = None
    ) -> dict[str, Any]:
        store, bucket = self.ctx.store, self.ctx.settings.artifacts_bucket
        source = event.source
        path, _ = self.ctx.cache.fetch(
            store, source.bucket, source.key, version_id=source.version_id, expected_sha256=source.sha256
        )
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="wsi-tiler-", dir=self.ctx.settings.cache_dir))
        early = _EarlyPublisher(self, event, run_id, prefix, work, message)
        try:
            profile_json = json_format.MessageToJson(event.profile)
            child = self._waiter.submit(
                self.isolated.run,
                f"tiling {event.meta.slide_id}",
                tile_slide,
                str(path),
                profile_json,
                str(work),
                event.meta.slide_id,
            )
            try:
                while not child.done():  # the plan, then each shard, downstream while the rest are cut
                    early.poll()
                    with contextlib.suppress(FutureTimeout):
                        child.result(timeout=EARLY_POLL_S)
            finally:
                plan = child.result()  # also after a failed publish: the work dir is the child's until then
            if isinstance(plan, TilingRejected):
                raise SlideUntileable(plan.code, plan.reason)
            refs = dict(early.refs)
            for shard in plan["shards"]:
                if shard["shard_id"] not in refs:
                    refs[shard["shard_id"]] = store.put_file_if_absent(
                        bucket, f"{prefix}/{shard['shard_id']}.shard", work / f"{shard['shard_id']}.shard"
                    )
            mask_ref, polygons_ref, thumbnail_ref = early.side_files()
        except OSError as exc:  # shards are cut into the work folder first: a full disk waits, never fails
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            raise local_disk_full("the tiler's work folder", work.parent, f"tiling {run_id}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
        manifest = {
            **plan,
            "tiling_run_id": run_id,
            "shard_refs": {sid: _ref_dict(ref) for sid, ref in refs.items()},
            "tissue_mask": _ref_dict(mask_ref),
            "tissue_polygons": _ref_dict(polygons_ref),
            **({"thumbnail": _ref_dict(thumbnail_ref)} if thumbnail_ref is not None else {}),
        }
        store.put_if_absent(
            bucket, f"{prefix}/manifest.json", json.dumps(manifest).encode(), "application/json"
        )
        manifest["published_event_ids"] = sorted(early.published)
        TILES.labels(SERVICE, "planned").inc(plan["total_tiles"])
        SLIDE_STAGE_SECONDS.labels(SERVICE).observe(time.perf_counter() - started)
        log.info(
            "slide tiled",
            tiling_run_id=run_id,
            tiles=plan["total_tiles"],
            shards=len(plan["shards"]),
            level=plan["level"],
            level0_mpp=plan["level0_mpp"],
            level0_mpp_source=plan["level0_mpp_source"],
            tile_mpp=plan["tile_mpp"],
            resampled=plan["resampled"],
            tiles_passed_through=plan["tiles_passed_through"],
            reader=plan["reader"],
            reader_fallback_reason=scrub_local_paths(plan["reader_fallback_reason"]),
            stain_method=plan["stain"].get("method", ""),
            background=plan["background"],
        )
        return manifest

    def _events(self, event: pb.SlideIngested, run_id: str, manifest: dict[str, Any]) -> list[Outgoing]:
        """The plan, the no-tissue failure when there is nothing to cut, and one ``TileShard`` per shard."""
        slide_id = event.meta.slide_id
        outputs = [self._plan_event(event, run_id, manifest)]
        if not manifest["shards"]:
            failed = pb.SlideFailed(
                meta=new_meta(service=SERVICE, slide_id=slide_id, event_parts=["no-tissue", run_id]),
                stage=SERVICE,
                reason_code="no-tissue",
                reason="no tissue was found on this slide (the tissue mask is empty at "
                f"min_tissue_fraction={event.profile.min_tissue_fraction}); check the scan, or lower WSI_MIN_TISSUE_FRACTION",
                tiling_run_id=run_id,
            )
            outputs.append(Outgoing(SLIDES_FAILED, slide_id, failed))
        outputs += [self._shard_event(event, run_id, manifest, i) for i in range(len(manifest["shards"]))]
        return outputs

    def _plan_event(self, event: pb.SlideIngested, run_id: str, manifest: dict[str, Any]) -> Outgoing:
        slide_id = event.meta.slide_id
        profile = event.profile
        plan = pb.TilePlan(
            meta=new_meta(
                service=SERVICE,
                slide_id=slide_id,
                event_parts=["plan", run_id],
                correlation_id=event.meta.correlation_id,
            ),
            tiling_run_id=run_id,
            profile=profile,
            shard_ids=[s["shard_id"] for s in manifest["shards"]],
            total_tiles=manifest["total_tiles"],
            tissue_area_mm2=manifest["tissue_area_mm2"],
            level=manifest["level"],
            level0_mpp=manifest["level0_mpp"],
            level0_mpp_source=manifest.get("level0_mpp_source", ""),
            tissue_mask=pb.ObjectRef(**manifest["tissue_mask"]),
            slide_width=manifest["width"],
            slide_height=manifest["height"],
            tile_size_level0=round(manifest["tile_size_level0"]),
            # Older manifests predate the tolerance: their tiles were resampled to the target.
            tile_mpp=float(manifest.get("tile_mpp", profile.target_mpp)),
            mpp_tolerance=float(manifest.get("mpp_tolerance", 0.0)),
        )
        background = manifest.get("background") or {}
        plan.background_rgb.extend(background.get("white", []))
        plan.background_noise_od = float(background.get("noise_od", 0.0))
        if "thumbnail" in manifest:
            plan.thumbnail.CopyFrom(pb.ObjectRef(**manifest["thumbnail"]))
        return Outgoing(TILE_PLANS, slide_id, plan)

    def _shard_event(
        self, event: pb.SlideIngested, run_id: str, manifest: dict[str, Any], index: int
    ) -> Outgoing:
        slide_id = event.meta.slide_id
        shard = manifest["shards"][index]
        sid = shard["shard_id"]
        tile_shard = pb.TileShard(
            meta=new_meta(
                service=SERVICE,
                slide_id=slide_id,
                event_parts=["shard", run_id, sid],
                correlation_id=event.meta.correlation_id,
            ),
            tiling_run_id=run_id,
            shard_id=sid,
            shard_index=index,
            shard=pb.ObjectRef(**manifest["shard_refs"][sid]),
            tile_count=shard["tile_count"],
            profile=event.profile,
            stain=pb.StainParams(**manifest.get("stain", {})),
        )
        return Outgoing(TILE_SHARDS, f"{slide_id}/{sid}", tile_shard)


#: How often the tiler looks for the plan and new shards of the slide being cut (seconds).
EARLY_POLL_S = 0.25


class _EarlyPublisher:
    """Publishes a slide's plan and each shard while the tiling child is still cutting the others.

    The child writes the tissue mask, polygons and thumbnail, then ``plan.json`` (the plan is known before
    any tile is read), then one shard file after another, each renamed into place whole. Each poll
    stores what appeared and, when the runtime lets the handler produce early (``Incoming.emit``),
    publishes it: quality-filter and the embedder start on the first shards while the rest are cut.
    Everything is deterministic (keys put-if-absent, event ids from the slide, run and shard), so a
    retry after a failure midway publishes the same events again, which downstream absorbs.
    """

    def __init__(
        self,
        handler: TilerHandler,
        event: pb.SlideIngested,
        run_id: str,
        prefix: str,
        work: Path,
        message: Incoming | None,
    ) -> None:
        self.handler, self.event, self.run_id, self.prefix, self.work = handler, event, run_id, prefix, work
        self.emit = message.emit if message is not None else None
        self.manifest: dict[str, Any] | None = None
        self.refs: dict[str, StoredObject] = {}
        self.published: set[str] = set()
        self._side: tuple[StoredObject, StoredObject, StoredObject | None] | None = None

    def side_files(self) -> tuple[StoredObject, StoredObject, StoredObject | None]:
        """Tissue mask, polygons and thumbnail (None without one), stored once."""
        if self._side is None:
            store, bucket = self.handler.ctx.store, self.handler.ctx.settings.artifacts_bucket
            mask = store.put_file_if_absent(bucket, f"{self.prefix}/tissue-mask.npy", self.work / "mask.npy")
            polygons = store.put_file_if_absent(
                bucket, f"{self.prefix}/tissue.geojson", self.work / "tissue.geojson"
            )
            thumbnail = None
            if (self.work / "thumbnail.jpg").is_file():
                thumbnail = store.put_file_if_absent(
                    bucket, f"{self.prefix}/thumbnail.jpg", self.work / "thumbnail.jpg"
                )
            self._side = (mask, polygons, thumbnail)
        return self._side

    def poll(self) -> None:
        if self.emit is None:
            return
        if self.manifest is None:
            if not (self.work / PLAN_FILE).is_file():
                return
            plan = json.loads((self.work / PLAN_FILE).read_text())
            if not plan["shards"]:
                return  # nothing to cut: the outcome (no tissue) is published at the end with the plan
            mask, polygons, thumbnail = self.side_files()
            self.manifest = {
                **plan,
                "shard_refs": {},
                "tissue_mask": _ref_dict(mask),
                "tissue_polygons": _ref_dict(polygons),
                **({"thumbnail": _ref_dict(thumbnail)} if thumbnail is not None else {}),
            }
            self._publish(self.handler._plan_event(self.event, self.run_id, self.manifest))
        store, bucket = self.handler.ctx.store, self.handler.ctx.settings.artifacts_bucket
        for index, shard in enumerate(self.manifest["shards"]):
            sid = shard["shard_id"]
            if sid in self.refs:
                continue
            path = self.work / f"{sid}.shard"
            if not path.is_file():
                return  # shards appear in order: the next one is not cut yet
            self.refs[sid] = store.put_file_if_absent(bucket, f"{self.prefix}/{sid}.shard", path)
            self.manifest["shard_refs"][sid] = _ref_dict(self.refs[sid])
            self._publish(self.handler._shard_event(self.event, self.run_id, self.manifest, index))

    def _publish(self, output: Outgoing) -> None:
        assert self.emit is not None
        self.emit([output])
        self.published.add(_event_id(output))


def _event_id(output: Outgoing) -> str:
    return str(output.message.meta.event_id) if output.message is not None else ""


def _ref_dict(ref: StoredObject) -> dict[str, Any]:
    return {
        "bucket": ref.bucket,
        "key": ref.key,
        "size": ref.size,
        "sha256": ref.sha256,
        "etag": ref.etag,
        "version_id": ref.version_id,
    }
