"""Explanations of an attention-MIL prediction: a heatmap, a mosaic of the top tiles, QuPath GeoJSON.

Everything starts from what the mil-scorer stores per scored slide in the artifacts bucket,
``attention/{slide}/{tiling run}/{model version}.npz``: ``coords`` int [N, 2] (level-0 top-left x, y
of each tile), ``attention`` float32 [N] (softmax weights summing to 1) and ``tile_size_level0``.

**Colour scale: by rank, not min-max.** Attention from a softmax over thousands of tiles is heavy
tailed: a handful of tiles hold most of the mass, so min-max scaling would paint all but those few in
the bottom colour and hide the structure among the rest. Colours follow each tile's *mid-rank
percentile* instead (``attention_ranks``: 0 = lowest, 1 = highest, tied tiles share a value, a slide
of equal weights is uniformly 0.5). The raw weight stays in the GeoJSON measurements for anyone who
wants the absolute scale. The colormap is ``inferno``: perceptually uniform, lightness rising
monotonically (readable in greyscale and by colour-blind viewers), hot meaning high. It is a
256-entry lookup table interpolated from 17 anchors sampled from matplotlib's ``inferno``, so the
service path needs only numpy and pillow.

**Bounded memory.** The heatmap is drawn directly at its output size (at most ``max_side`` pixels on
the long side), never at level 0; tile pixels are read from the tiler's shards, only from the shards
that hold a wanted tile (``load_top_tiles``).

**GeoJSON for QuPath 0.4+.** One ``Feature`` per tile, a closed square ``Polygon`` in level-0 pixel
coordinates (x right, y down: the image frame QuPath uses, not WGS84 longitude/latitude as RFC 7946
assumes; QuPath, like every slide viewer, reads them as pixels). Each ring is counter-clockwise in
the numeric (x, y) plane, as RFC 7946 asks of exterior rings: (x, y) -> (x+s, y) -> (x+s, y+s) ->
(x, y+s) -> (x, y). Drawn on screen, where y points down, the same ring looks clockwise; QuPath
ignores winding. The properties are the ones QuPath's GeoJSON reader understands: ``objectType``,
``isLocked``, ``name``, ``color``, ``classification`` and ``measurements`` (an object of
name -> number). See ``attention_geojson`` for the choices made.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from wsitk.shared.contracts import deterministic_id
from wsitk.shared.objectstore import ObjectStore
from wsitk.shared.shards import Shard

# matplotlib's ``inferno`` sampled at i/16, i = 0..16 (RGB, 0-255).
_INFERNO_ANCHORS = (
    (0, 0, 4),
    (11, 7, 36),
    (33, 12, 74),
    (61, 9, 101),
    (87, 16, 110),
    (113, 25, 110),
    (138, 34, 106),
    (163, 44, 97),
    (188, 55, 84),
    (210, 70, 68),
    (228, 90, 49),
    (241, 115, 29),
    (249, 142, 9),
    (252, 172, 17),
    (249, 203, 53),
    (242, 234, 105),
    (252, 255, 164),
)


def _build_colormap(anchors: Sequence[tuple[int, int, int]], entries: int = 256) -> NDArray[np.uint8]:
    stops = np.linspace(0.0, 1.0, len(anchors))
    positions = np.linspace(0.0, 1.0, entries)
    channels = [np.interp(positions, stops, [anchor[c] for anchor in anchors]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


#: The attention colormap: uint8 [256, 3], entry 0 = lowest attention, entry 255 = highest.
ATTENTION_COLORMAP: NDArray[np.uint8] = _build_colormap(_INFERNO_ANCHORS)

#: QuPath keeps one colour per class name (the first one it sees), so the per-tile heat colour goes
#: in each feature's own ``color`` and the classes get one fixed colour each.
TOP_CLASS = "Top attention"
TILE_CLASS = "Tile"
TOP_CLASS_COLOR = (252, 255, 164)  # the hot end of the colormap
TILE_CLASS_COLOR = (188, 55, 84)  # its middle

#: Pixels between the cells of a mosaic (and no border around it).
MOSAIC_GAP_PX = 4


def colormap_rgb(scaled: ArrayLike) -> NDArray[np.uint8]:
    """RGB uint8 ``[..., 3]`` of values in [0, 1] (clipped) through ``ATTENTION_COLORMAP``."""
    values = np.clip(np.asarray(scaled, dtype=np.float64), 0.0, 1.0)
    return ATTENTION_COLORMAP[np.rint(values * (len(ATTENTION_COLORMAP) - 1)).astype(np.intp)]


def attention_ranks(attention: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """(rank, scaled) per tile: rank 1 = highest attention (ties in input order, so ranks are distinct);
    scaled = mid-rank percentile in [0, 1] (ties share it; a single tile is 1.0)."""
    weights = np.asarray(attention, dtype=np.float64).reshape(-1)
    count = len(weights)
    rank = np.empty(count, dtype=np.int64)
    rank[np.argsort(-weights, kind="stable")] = np.arange(1, count + 1)
    if count <= 1:
        return rank, np.ones(count, dtype=np.float64)
    ordered = np.sort(weights)
    below = np.searchsorted(ordered, weights, side="left")
    up_to = np.searchsorted(ordered, weights, side="right")
    return rank, (below + up_to - 1) / 2.0 / (count - 1)


def top_indices(attention: ArrayLike, k: int) -> NDArray[np.intp]:
    """Indices of the ``k`` highest-attention tiles, highest first (ties in input order)."""
    weights = np.asarray(attention, dtype=np.float64).reshape(-1)
    return np.argsort(-weights, kind="stable")[: max(0, k)]


def _check_attention(
    coords: ArrayLike, attention: ArrayLike, tile_size_level0: float
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    xy = np.asarray(coords)
    weights = np.asarray(attention, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords must be [N, 2] level-0 (x, y) top-left corners, got shape {xy.shape}")
    if weights.shape != (len(xy),):
        raise ValueError(
            f"attention must be [N], one weight per tile ({len(xy)} tiles), got shape {weights.shape}"
        )
    if not np.all(np.isfinite(weights)):
        raise ValueError("attention holds NaN or infinite weights; re-score the slide to replace the map")
    if not np.all(np.rint(xy) == xy):
        raise ValueError("coords must be whole level-0 pixels (the tiler's tile corners)")
    if not (math.isfinite(tile_size_level0) and tile_size_level0 > 0):
        raise ValueError(f"tile_size_level0 must be a positive number of pixels, got {tile_size_level0}")
    return xy.astype(np.int64), weights


# -- heatmap ---------------------------------------------------------------------------------------


def attention_heatmap(
    coords: ArrayLike,
    attention: ArrayLike,
    tile_size_level0: float,
    slide_width: int,
    slide_height: int,
    *,
    thumbnail: NDArray[np.uint8] | None = None,
    max_side: int = 1024,
    opacity: float = 0.6,
) -> bytes:
    """PNG of the slide with each tile's square in its attention colour (rank scale, see the module).

    The image covers the whole slide at ``max_side`` pixels on its long side (never upscaled beyond
    level 0). Without ``thumbnail`` it is RGBA and untiled area is transparent, ready to overlay in a
    viewer; with one (uint8 [H, W] / [H, W, 3] / [H, W, 4] of the whole slide, any size: it is resized)
    it is RGB with the heat blended over the thumbnail at ``opacity``. Where tiles are smaller than
    a pixel, the hotter tile wins the pixel, so hot spots never vanish at low resolution.
    """
    from PIL import Image

    xy, weights = _check_attention(coords, attention, tile_size_level0)
    if slide_width <= 0 or slide_height <= 0:
        raise ValueError(f"slide size must be positive, got {slide_width}x{slide_height}")
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1 pixel, got {max_side}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    scale = min(1.0, max_side / max(slide_width, slide_height))
    width = min(max_side, max(1, round(slide_width * scale)))
    height = min(max_side, max(1, round(slide_height * scale)))

    heat = np.zeros((height, width, 4), dtype=np.uint8)
    if len(xy):
        _, scaled = attention_ranks(weights)
        colours = colormap_rgb(scaled)
        x0 = np.floor(xy[:, 0] * scale).astype(np.int64)
        y0 = np.floor(xy[:, 1] * scale).astype(np.int64)
        x1 = np.minimum(width, np.maximum(x0 + 1, np.ceil((xy[:, 0] + tile_size_level0) * scale)))
        y1 = np.minimum(height, np.maximum(y0 + 1, np.ceil((xy[:, 1] + tile_size_level0) * scale)))
        x0, y0 = np.maximum(x0, 0), np.maximum(y0, 0)
        for i in np.argsort(scaled, kind="stable"):  # coolest first: hotter tiles paint over shared pixels
            if x1[i] > x0[i] and y1[i] > y0[i]:
                heat[int(y0[i]) : int(y1[i]), int(x0[i]) : int(x1[i]), :3] = colours[i]
                heat[int(y0[i]) : int(y1[i]), int(x0[i]) : int(x1[i]), 3] = 255
    if thumbnail is None:
        image = Image.fromarray(heat, "RGBA")
    else:
        base = np.asarray(_rgb_image(thumbnail).resize((width, height), Image.Resampling.BILINEAR))
        alpha = heat[:, :, 3:4].astype(np.float32) / 255.0 * opacity
        blended = base.astype(np.float32) * (1.0 - alpha) + heat[:, :, :3].astype(np.float32) * alpha
        image = Image.fromarray(np.rint(blended).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _rgb_image(pixels: NDArray[np.uint8]) -> Any:  # a PIL image; PIL is imported lazily
    from PIL import Image

    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 RGB, got dtype {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"images must be [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]), "RGB")


# -- top-tile mosaic -------------------------------------------------------------------------------


def top_tiles_mosaic(
    tiles: Sequence[NDArray[np.uint8]],
    attention: Sequence[float],
    *,
    columns: int = 4,
    tile_px: int = 224,
    captions: bool = True,
    image_format: str = "PNG",
) -> bytes:
    """A grid of tiles ordered by attention (highest top-left, row by row), each captioned
    ``#rank weight``; PNG (default) or JPEG bytes.

    ``min(columns, len(tiles))`` columns of ``tile_px`` squares with ``MOSAIC_GAP_PX`` between cells;
    tiles of another size are resized. Pass the top-k tiles (``load_top_tiles``) and their weights.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not tiles:
        raise ValueError("no tiles to lay out; pass at least one tile with its attention")
    if len(tiles) != len(attention):
        raise ValueError(f"{len(tiles)} tiles but {len(attention)} attention weights; pass one per tile")
    if columns < 1 or tile_px < 16:
        raise ValueError(f"need columns >= 1 and tile_px >= 16, got {columns} and {tile_px}")
    fmt = {"PNG": "PNG", "JPEG": "JPEG", "JPG": "JPEG"}.get(image_format.upper())
    if fmt is None:
        raise ValueError(f"image_format must be PNG or JPEG, got {image_format!r}")
    weights = np.asarray(attention, dtype=np.float64)
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new(
        "RGB",
        (columns * tile_px + (columns - 1) * MOSAIC_GAP_PX, rows * tile_px + (rows - 1) * MOSAIC_GAP_PX),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, tile_px // 16))
    for position, index in enumerate(top_indices(weights, len(tiles))):
        tile = _rgb_image(tiles[int(index)])
        if tile.size != (tile_px, tile_px):
            tile = tile.resize((tile_px, tile_px), Image.Resampling.LANCZOS)
        left = (position % columns) * (tile_px + MOSAIC_GAP_PX)
        top = (position // columns) * (tile_px + MOSAIC_GAP_PX)
        canvas.paste(tile, (left, top))
        if captions:
            text = f"#{position + 1}  {weights[int(index)]:.3g}"
            pad = max(2, tile_px // 64)
            box = draw.textbbox((left + 2 * pad, top + 2 * pad), text, font=font)
            draw.rectangle((box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad), fill=(0, 0, 0))
            draw.text((left + 2 * pad, top + 2 * pad), text, fill=(255, 255, 255), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# -- tile pixels from the shards -------------------------------------------------------------------


class _ObjectRefLike(Protocol):
    @property
    def bucket(self) -> str: ...
    @property
    def key(self) -> str: ...


@dataclass(frozen=True, eq=False)
class ShardSource:
    """One tile shard of a slide and, when known, the level-0 (x, y) of the tiles it holds.

    ``coords`` is an index that lets ``load_top_tiles`` skip the shard without fetching it; a shard
    without one is fetched only if wanted tiles are still missing after the indexed shards.
    """

    bucket: str
    key: str
    coords: NDArray[np.int64] | None = None

    @classmethod
    def from_ref(cls, ref: _ObjectRefLike, coords: ArrayLike | None = None) -> ShardSource:
        """From a ``TileShard.shard`` / ``QcResult.shard`` ObjectRef (or anything with bucket and key)."""
        index = None if coords is None else np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        return cls(ref.bucket, ref.key, index)


def slide_shard_sources(
    store: ObjectStore, bucket: str, slide_id: str, tiling_run_id: str, *, backbone_id: str = ""
) -> list[ShardSource]:
    """A tiling run's shards, found by the tiler's key scheme (``tiles/{slide}/{run}/{shard}.shard``).

    The object-store API has no ranged reads, so a shard's header cannot be read without its pixels.
    The per-shard index therefore comes from the embeddings (``embeddings/{slide}/{run}/{backbone}/
    {shard}.npz``, whose ``coords`` are exactly the tiles the scorer attended to), a small fraction of
    a shard's size; one backbone's set is enough (``backbone_id`` picks it, else the first). Shards
    without embeddings are returned unindexed.
    """
    from wsitk.shared.models.features_export import embedding_sets

    prefix = f"tiles/{slide_id}/{tiling_run_id}/"
    shard_keys = {}
    for item in store.list_keys(bucket, prefix):
        name = item.key.removeprefix(prefix)
        if name.endswith(".shard") and "/" not in name:
            shard_keys[name.removesuffix(".shard")] = item.key
    if not shard_keys:
        raise LookupError(
            f"no tile shards under {bucket}/{prefix}; check the slide id and tiling run "
            "(the run id is part of the attention map's key), and that the tiler's outputs were kept"
        )
    sets = {
        key: keys
        for key, keys in embedding_sets(store, bucket, slide_id).items()
        if key[0] == tiling_run_id and (not backbone_id or key[1] == backbone_id)
    }
    index: dict[str, NDArray[np.int64]] = {}
    for key in sets[min(sets)] if sets else []:
        with np.load(io.BytesIO(store.get_bytes(bucket, key))) as data:
            shard_id = key.rsplit("/", 1)[1].removesuffix(".npz")
            index[shard_id] = np.asarray(data["coords"], dtype=np.int64).reshape(-1, 2)
    return [ShardSource(bucket, key, index.get(shard_id)) for shard_id, key in sorted(shard_keys.items())]


def load_top_tiles(
    store: ObjectStore, shards: Sequence[ShardSource], coords_wanted: ArrayLike
) -> list[NDArray[np.uint8]]:
    """The tiles at ``coords_wanted`` (level-0 top-left x, y), uint8 [H, W, 3], in the order asked.

    Fetches each shard at most once, and only shards whose index holds a wanted tile; unindexed shards
    are searched afterwards, in order, until every wanted tile is found. Only wanted tiles are decoded.
    Raises ``LookupError`` naming the tiles found in no shard.
    """
    wanted = [(int(x), int(y)) for x, y in np.asarray(coords_wanted, dtype=np.int64).reshape(-1, 2)]
    pending = set(wanted)
    found: dict[tuple[int, int], NDArray[np.uint8]] = {}
    searched = 0
    for source in shards:
        if source.coords is not None and pending.intersection(map(tuple, source.coords.tolist())):
            searched += 1
            _decode_wanted(store, source, pending, found)
    unindexed = [source for source in shards if source.coords is None]
    for source in unindexed:
        if not pending:
            break
        searched += 1
        _decode_wanted(store, source, pending, found)
    if pending:
        missing = sorted(pending)
        raise LookupError(
            f"{len(missing)} of {len(set(wanted))} wanted tiles are in none of the {len(shards)} shards "
            f"({searched} fetched), e.g. (x, y) {missing[:5]}; were the coordinates taken from another "
            "tiling run of this slide?"
        )
    return [found[xy] for xy in wanted]


def _decode_wanted(
    store: ObjectStore,
    source: ShardSource,
    pending: set[tuple[int, int]],
    found: dict[tuple[int, int], NDArray[np.uint8]],
) -> None:
    shard = Shard(store.get_bytes(source.bucket, source.key))
    for index, (x, y) in enumerate(shard.coords.tolist()):
        if (x, y) in pending:
            found[(x, y)] = np.asarray(shard.decode(index), dtype=np.uint8)
            pending.discard((x, y))


# -- GeoJSON for QuPath ----------------------------------------------------------------------------


def _number(value: float) -> int | float:
    """Whole numbers as JSON integers (QuPath and diff tools show ``512``, not ``512.0``)."""
    return int(value) if float(value).is_integer() else float(value)


def attention_geojson(
    coords: ArrayLike,
    attention: ArrayLike,
    tile_size_level0: float,
    *,
    slide_id: str,
    model_version: str,
    probability: float | None = None,
    top_k_highlight: int = 8,
    tiling_run_id: str = "",
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the attended tiles that QuPath 0.4+ imports (File > Import objects).

    Features come highest attention first. Per feature:

    - ``id``: a UUID (QuPath 0.4+ keeps it as the object id), derived from slide, tiling run, model
      and tile, so re-exporting gives the same ids and two models' tiles never collide;
    - ``objectType: "tile"``: these are squares of a regular grid, which is what QuPath's tile objects
      are (``PathTileObject``, a kind of detection: measurement maps, colouring by measurement and
      measurement tables all work), not detected structures such as cells;
    - ``isLocked: true``: they are a model's output, not something to edit by hand;
    - ``name``: ``attention #rank``;
    - ``color``: the tile's heat colour (rank scale). QuPath caches one colour per class name, so
      ``classification`` carries a fixed colour per class: ``Top attention`` for the ``top_k_highlight``
      highest tiles, ``Tile`` for the rest;
    - ``measurements``: ``attention`` (raw weight), ``attention_rank`` (1 = highest),
      ``attention_scaled`` (mid-rank percentile in [0, 1], what the colour shows).

    The collection carries a ``bbox`` and a foreign member ``wsi`` (slide id, tiling run, model
    version, probability, tile size, what the coordinates mean), which RFC 7946 allows and QuPath ignores.
    """
    xy, weights = _check_attention(coords, attention, tile_size_level0)
    ranks, scaled = attention_ranks(weights)
    colours = colormap_rgb(scaled)
    size = _number(tile_size_level0)
    features = []
    for i in np.argsort(ranks):
        x, y, rank = int(xy[i, 0]), int(xy[i, 1]), int(ranks[i])
        top = rank <= top_k_highlight
        features.append(
            {
                "type": "Feature",
                "id": deterministic_id(
                    "attention-tile", slide_id, tiling_run_id, model_version, str(x), str(y), str(size)
                ),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]],
                },
                "properties": {
                    "objectType": "tile",
                    "isLocked": True,
                    "name": f"attention #{rank}",
                    "color": [int(c) for c in colours[i]],
                    "classification": {
                        "name": TOP_CLASS if top else TILE_CLASS,
                        "color": list(TOP_CLASS_COLOR if top else TILE_CLASS_COLOR),
                    },
                    "measurements": {
                        "attention": float(weights[i]),
                        "attention_rank": rank,
                        "attention_scaled": round(float(scaled[i]), 6),
                    },
                },
            }
        )
    collection: dict[str, Any] = {"type": "FeatureCollection"}
    if len(xy):
        collection["bbox"] = [
            int(xy[:, 0].min()),
            int(xy[:, 1].min()),
            _number(xy[:, 0].max() + tile_size_level0),
            _number(xy[:, 1].max() + tile_size_level0),
        ]
    collection["wsi"] = {
        "slide_id": slide_id,
        "tiling_run_id": tiling_run_id,
        "model_version": model_version,
        **({"probability": float(probability)} if probability is not None else {}),
        "tiles": len(xy),
        "tile_size_level0": size,
        "coordinates": "level-0 pixels, x right, y down (not longitude/latitude)",
        "attention_scaled": "mid-rank percentile of the attention weight, 0 lowest, 1 highest",
    }
    collection["features"] = features
    return collection


# -- attention maps in the artifacts bucket --------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SlideAttention:
    """One stored attention map: which run and model produced it, and its arrays."""

    slide_id: str
    tiling_run_id: str
    model_version: str
    key: str
    coords: NDArray[np.int64]
    attention: NDArray[np.float32]
    tile_size_level0: float


def attention_maps(store: ObjectStore, bucket: str, slide_id: str) -> dict[tuple[str, str], str]:
    """``{(tiling run, model version): key}`` of the attention maps stored for one slide."""
    prefix = f"attention/{slide_id}/"
    maps = {}
    for item in store.list_keys(bucket, prefix):
        run, separator, name = item.key.removeprefix(prefix).partition("/")
        if separator and name.endswith(".npz"):
            maps[(run, name.removesuffix(".npz"))] = item.key
    return maps


def load_attention(
    store: ObjectStore, bucket: str, slide_id: str, *, tiling_run_id: str = "", model_version: str = ""
) -> SlideAttention:
    """The slide's attention map; asks which one (listing the choices) when several match."""
    maps = attention_maps(store, bucket, slide_id)
    chosen = {
        key: object_key
        for key, object_key in maps.items()
        if (not tiling_run_id or key[0] == tiling_run_id) and (not model_version or key[1] == model_version)
    }
    if not chosen:
        raise LookupError(
            f"no attention map of slide {slide_id} in bucket {bucket}"
            + (f" for tiling run {tiling_run_id!r} / model {model_version!r}" if maps else "")
            + (f"; stored: {sorted(maps)}" if maps else "; is the slide id right, and has it been scored?")
        )
    if len(chosen) > 1:
        options = ", ".join(f"--tiling-run {run} --model {model}" for run, model in sorted(chosen))
        raise LookupError(
            f"slide {slide_id} has {len(chosen)} attention maps (tiling runs x models); choose one: {options}"
        )
    ((run_id, model), key) = next(iter(chosen.items()))
    with np.load(io.BytesIO(store.get_bytes(bucket, key))) as data:
        coords = np.asarray(data["coords"], dtype=np.int64).reshape(-1, 2)
        weights = np.asarray(data["attention"], dtype=np.float32).reshape(-1)
        tile_size = float(data["tile_size_level0"])
    return SlideAttention(slide_id, run_id, model, key, coords, weights, tile_size)


def slide_dimensions(store: ObjectStore, bucket: str, attention: SlideAttention) -> tuple[int, int]:
    """Level-0 (width, height) of the slide, from the tiler's manifest of the attention map's tiling
    run (``tiles/{slide}/{run}/manifest.json``); without one, the extent of the attended tiles."""
    key = f"tiles/{attention.slide_id}/{attention.tiling_run_id}/manifest.json"
    if store.stat(bucket, key) is not None:
        manifest = json.loads(store.get_bytes(bucket, key))
        width, height = int(manifest.get("width", 0)), int(manifest.get("height", 0))
        if width > 0 and height > 0:
            return width, height
    if not len(attention.coords):
        raise LookupError(f"slide {attention.slide_id}: no tiling manifest and no tiles to size a heatmap by")
    extent = attention.coords.max(axis=0) + attention.tile_size_level0
    return math.ceil(extent[0]), math.ceil(extent[1])


def stored_attention_geojson(
    store: ObjectStore,
    bucket: str,
    slide_id: str,
    *,
    tiling_run_id: str = "",
    model_version: str = "",
    top_k_highlight: int = 8,
) -> tuple[dict[str, Any], SlideAttention]:
    """The QuPath GeoJSON of a slide's stored attention map (``wsi export geojson``, the viewer's download)."""
    attention = load_attention(
        store, bucket, slide_id, tiling_run_id=tiling_run_id, model_version=model_version
    )
    collection = attention_geojson(
        attention.coords,
        attention.attention,
        attention.tile_size_level0,
        slide_id=slide_id,
        model_version=attention.model_version,
        tiling_run_id=attention.tiling_run_id,
        top_k_highlight=top_k_highlight,
    )
    return collection, attention
