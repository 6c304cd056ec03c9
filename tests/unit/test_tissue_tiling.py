"""Tissue segmentation and physical-resolution tiling on small synthetic slides read through OpenSlide."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from numpy.typing import NDArray
from wsitk.shared.slides.reader import SlideRejected
from wsitk.shared.slides.tiling import MPP_TOLERANCE, TileGrid, iter_tiles, plan_tiles, read_tile
from wsitk.shared.slides.tissue import (
    TissueMask,
    mask_to_geojson,
    read_thumbnail,
    segment_tissue,
    tissue_mask_from_rgb,
)

STROMA = (226, 140, 186)
NUCLEUS = (110, 70, 160)
BLUE_PEN = (35, 65, 175)
GLASS = (242, 240, 238)


@dataclass(frozen=True)
class Ellipse:
    centre_x_um: float
    centre_y_um: float
    radius_x_um: float
    radius_y_um: float

    def contains(self, x_um: NDArray[np.float64], y_um: NDArray[np.float64]) -> NDArray[np.bool_]:
        inside = ((x_um - self.centre_x_um) / self.radius_x_um) ** 2 + (
            (y_um - self.centre_y_um) / self.radius_y_um
        ) ** 2
        return np.asarray(inside <= 1.0)


@dataclass(frozen=True)
class Stroke:
    x0_um: float
    y0_um: float
    x1_um: float
    y1_um: float
    half_width_um: float

    def contains(self, x_um: NDArray[np.float64], y_um: NDArray[np.float64]) -> NDArray[np.bool_]:
        dx, dy = self.x1_um - self.x0_um, self.y1_um - self.y0_um
        along = np.clip(((x_um - self.x0_um) * dx + (y_um - self.y0_um) * dy) / (dx * dx + dy * dy), 0, 1)
        distance = np.hypot(x_um - (self.x0_um + along * dx), y_um - (self.y0_um + along * dy))
        return np.asarray(distance <= self.half_width_um)


@dataclass(frozen=True)
class SyntheticSlide:
    path: Path
    mpp0: float
    width: int
    height: int
    blobs: tuple[Ellipse, ...]
    strokes: tuple[Stroke, ...]

    def truth(self, x_um: NDArray[np.float64], y_um: NDArray[np.float64]) -> NDArray[np.bool_]:
        tissue = np.zeros(np.broadcast(x_um, y_um).shape, dtype=bool)
        for blob in self.blobs:
            tissue |= blob.contains(x_um, y_um)
        for stroke in self.strokes:
            tissue &= ~stroke.contains(x_um, y_um)
        return tissue


def write_synthetic_slide(
    path: Path,
    *,
    width_um: float,
    height_um: float,
    mpp0: float,
    blobs: tuple[Ellipse, ...] = (),
    strokes: tuple[Stroke, ...] = (),
    seed: int = 0,
) -> SyntheticSlide:
    """A pyramidal, tiled, JPEG generic TIFF with resolution tags: pink tissue ellipses on glass.

    Kept private to these tests on purpose: they must not depend on the project's slide generator.
    """
    rng = np.random.default_rng(seed)
    width, height = round(width_um / mpp0), round(height_um / mpp0)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = GLASS
    # Texture repeats every 256 px: cheap to make, and still noise to JPEG and to the segmenter.
    repeats = (-(-height // 256), -(-width // 256), 1)
    nuclei = np.tile(rng.random((256, 256, 1)) < 0.04, repeats)[:height, :width, 0]
    shapes: tuple[Ellipse | Stroke, ...] = (*blobs, *strokes)
    for shape in shapes:
        rows, cols = _bounding_slices(shape, mpp0, width, height)
        y_um = (np.arange(rows.start, rows.stop, dtype=np.float64)[:, None] + 0.5) * mpp0
        x_um = (np.arange(cols.start, cols.stop, dtype=np.float64)[None, :] + 0.5) * mpp0
        inside = shape.contains(x_um, y_um)
        window = image[rows, cols]
        if isinstance(shape, Stroke):
            window[inside] = BLUE_PEN
        else:
            window[inside] = STROMA
            window[inside & nuclei[rows, cols]] = NUCLEUS
    noise = np.tile(rng.integers(-4, 5, (256, 256, 3), dtype=np.int16), repeats)[:height, :width]
    level = np.clip(image + noise, 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as writer:
        downsample = 1
        while True:
            pixels_per_cm = 1e4 / (mpp0 * downsample)
            writer.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if downsample == 1 else 1,
            )
            if max(level.shape[:2]) <= 512:
                break
            rows, cols = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            quads = (
                level[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2, 3).sum(axis=(1, 3), dtype=np.uint16)
            )
            level = ((quads + 2) // 4).astype(np.uint8)
            downsample *= 2
    return SyntheticSlide(path, mpp0, width, height, blobs, strokes)


def _bounding_slices(shape: Ellipse | Stroke, mpp0: float, width: int, height: int) -> tuple[slice, slice]:
    if isinstance(shape, Ellipse):
        x0, x1 = shape.centre_x_um - shape.radius_x_um, shape.centre_x_um + shape.radius_x_um
        y0, y1 = shape.centre_y_um - shape.radius_y_um, shape.centre_y_um + shape.radius_y_um
    else:
        x0 = min(shape.x0_um, shape.x1_um) - shape.half_width_um
        x1 = max(shape.x0_um, shape.x1_um) + shape.half_width_um
        y0 = min(shape.y0_um, shape.y1_um) - shape.half_width_um
        y1 = max(shape.y0_um, shape.y1_um) + shape.half_width_um
    columns = slice(max(0, int(x0 / mpp0) - 1), min(width, int(x1 / mpp0) + 2))
    rows = slice(max(0, int(y0 / mpp0) - 1), min(height, int(y1 / mpp0) + 2))
    return rows, columns


BLOBS = (Ellipse(600, 550, 330, 250), Ellipse(1450, 900, 300, 380))
PEN = (Stroke(150, 1300, 1500, 1150, 60),)  # starts on glass, ends inside the second blob


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    path = tmp_path_factory.mktemp("slides") / "blobs_pen_0.5.tiff"
    return write_synthetic_slide(path, width_um=2000, height_um=1500, mpp0=0.5, blobs=BLOBS, strokes=PEN)


@pytest.fixture(scope="module")
def quarter_mpp_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    path = tmp_path_factory.mktemp("slides") / "blob_edge_0.25.tiff"
    # The blob runs off the right edge so that edge tiles hold tissue.
    blobs = (Ellipse(450, 350, 250, 200), Ellipse(1000, 350, 180, 250))
    return write_synthetic_slide(path, width_um=1000, height_um=700, mpp0=0.25, blobs=blobs)


@pytest.fixture(scope="module")
def blank_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    path = tmp_path_factory.mktemp("slides") / "glass.tiff"
    return write_synthetic_slide(path, width_um=1500, height_um=1000, mpp0=0.5)


def mask_pixel_centres_um(mask: TissueMask) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    rows, cols = mask.mask.shape
    x_um = (np.arange(cols)[None, :] + 0.5) * mask.downsample[0] * mask.mpp0
    y_um = (np.arange(rows)[:, None] + 0.5) * mask.downsample[1] * mask.mpp0
    return x_um, y_um


def ring_area(ring: list[list[float]]) -> float:
    points = np.asarray(ring[:-1])
    x, y = points[:, 0], points[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2.0


def test_tissue_mask_matches_the_blobs_and_leaves_out_pen(tissue_slide: SyntheticSlide) -> None:
    with openslide.OpenSlide(tissue_slide.path) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        tissue = segment_tissue(slide, mpp0=tissue_slide.mpp0)
    assert 3.5 <= tissue.mask_mpp[0] <= 16 and 3.5 <= tissue.mask_mpp[1] <= 16
    x_um, y_um = mask_pixel_centres_um(tissue)
    truth = tissue_slide.truth(x_um, y_um)
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.85, f"IoU {iou:.3f}"
    core_of_pen = dataclasses.replace(PEN[0], half_width_um=PEN[0].half_width_um * 0.6)
    assert not tissue.mask[core_of_pen.contains(x_um, y_um)].any()
    assert tissue.ink_fraction > 0.01
    expected_mm2 = truth.sum() * (tissue.downsample[0] * tissue.downsample[1]) * 0.25 / 1e6
    assert tissue.area_mm2 == pytest.approx(expected_mm2, rel=0.15)


def test_tissue_polygons_are_valid_geojson_in_level0_pixels(tissue_slide: SyntheticSlide) -> None:
    with openslide.OpenSlide(tissue_slide.path) as slide:
        tissue = segment_tissue(slide, mpp0=tissue_slide.mpp0)
    collection = tissue.polygons
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == len(BLOBS)
    total_area = 0.0
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tissue"
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        outer, *holes = geometry["coordinates"]
        for ring in geometry["coordinates"]:
            assert len(ring) >= 4
            assert ring[0] == ring[-1]
            points = np.asarray(ring)
            assert points[:, 0].min() >= 0 and points[:, 0].max() <= tissue_slide.width
            assert points[:, 1].min() >= 0 and points[:, 1].max() <= tissue_slide.height
        assert ring_area(outer) > 0  # counter-clockwise in the numbers, as RFC 7946 asks
        assert all(ring_area(hole) < 0 for hole in holes)
        total_area += sum(ring_area(ring) for ring in geometry["coordinates"])
    mask_area_level0 = tissue.mask.sum() * tissue.downsample[0] * tissue.downsample[1]
    assert total_area == pytest.approx(mask_area_level0, rel=0.02)


def test_traced_polygon_of_a_ring_shape_has_its_hole() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 5:35] = True
    mask[12:28, 12:28] = False  # a hole too large to be filled
    collection = mask_to_geojson(mask, (10.0, 10.0))
    (feature,) = collection["features"]
    outer, hole = feature["geometry"]["coordinates"]
    assert ring_area(outer) == pytest.approx(300 * 300)
    assert ring_area(hole) == pytest.approx(-160 * 160)
    assert sorted(map(tuple, outer[:-1])) == [(50.0, 50.0), (50.0, 350.0), (350.0, 50.0), (350.0, 350.0)]


def test_blank_slide_has_no_tissue_and_no_tiles(blank_slide: SyntheticSlide) -> None:
    with openslide.OpenSlide(blank_slide.path) as slide:
        tissue = segment_tissue(slide, mpp0=blank_slide.mpp0)
        downsamples = list(slide.level_downsamples)
    assert tissue.is_empty
    assert tissue.area_mm2 == 0.0
    assert tissue.polygons == {"type": "FeatureCollection", "features": []}
    grid = plan_tiles(
        blank_slide.width,
        blank_slide.height,
        blank_slide.mpp0,
        tissue,
        target_mpp=0.5,
        tile_size=224,
        min_tissue_fraction=0.0,
        level_downsamples=downsamples,
    )
    assert len(grid) == 0
    assert grid.coords.shape == (0, 2)


def test_otsu_is_guarded_on_pure_noise() -> None:
    rng = np.random.default_rng(3)
    glass = np.clip(rng.normal(240, 4, (200, 300, 3)), 0, 255).astype(np.uint8)
    mask, threshold, _ = tissue_mask_from_rgb(glass, pixel_area_mm2=64e-6)
    assert not mask.any()
    # Faintly tinted glass (saturation ~0.04) with a fleck of real tissue: still only the tissue.
    tinted = glass.copy()
    tinted[..., 2] = np.clip(tinted[..., 2].astype(int) - 10, 0, 255).astype(np.uint8)
    tinted[80:140, 100:200] = STROMA
    mask, threshold, _ = tissue_mask_from_rgb(tinted, pixel_area_mm2=64e-6)
    assert threshold >= 0.05
    assert mask.sum() == pytest.approx(60 * 100, rel=0.05)


def test_plan_at_half_mpp_on_a_quarter_mpp_slide(quarter_mpp_slide: SyntheticSlide) -> None:
    with openslide.OpenSlide(quarter_mpp_slide.path) as slide:
        downsamples = list(slide.level_downsamples)
        assert downsamples[:2] == [1.0, 2.0]
        tissue = segment_tissue(slide, mpp0=quarter_mpp_slide.mpp0)
        grid = plan_tiles(
            quarter_mpp_slide.width,
            quarter_mpp_slide.height,
            quarter_mpp_slide.mpp0,
            tissue,
            target_mpp=0.5,
            tile_size=128,
            min_tissue_fraction=0.3,
            level_downsamples=downsamples,
        )
        assert downsamples[grid.level] <= 2.0
        assert grid.level == 1
        assert grid.tile_size_level0 == 2 * 128
        assert grid.read_size == 128
        assert len(grid) > 10
        assert np.all(grid.coords % 256 == 0)  # level-0 coordinates of a 256-level-0-px grid
        assert np.all(grid.tissue_fraction >= 0.3)
        order = grid.grid_positions[:, 1] * grid.grid_shape[1] + grid.grid_positions[:, 0]
        assert np.all(np.diff(order) > 0)  # row-major
        # Kept tiles lie on the tissue: their centres are inside a blob (or within a tile of one).
        centres_um = (grid.coords + 128) * quarter_mpp_slide.mpp0
        near = quarter_mpp_slide.truth(centres_um[:, 0], centres_um[:, 1])
        assert near.mean() > 0.8
        # Tiles past the right edge are planned when the tissue runs into it.
        edge_index = int(np.argmax(grid.coords[:, 0]))
        edge_x, edge_y = (int(value) for value in grid.coords[edge_index])
        assert edge_x + grid.tile_size_level0 > quarter_mpp_slide.width
        edge_tile = read_tile(slide, grid, edge_x, edge_y)
        assert edge_tile.shape == (128, 128, 3) and edge_tile.dtype == np.uint8
        outside_columns = round((quarter_mpp_slide.width - edge_x) / 2) + 2
        assert edge_tile[:, outside_columns:].min() >= 250  # OpenSlide's transparency becomes white
        # A tile at the blob centre is the stroma colour, read from level 1 and no resize.
        centre = read_tile(slide, grid, 2000 - 128, 1400 - 128)
        assert np.abs(centre.reshape(-1, 3).mean(axis=0) - np.asarray(STROMA)).max() < 25
        # And it agrees with reading level 0 and halving it by hand.
        full = np.asarray(slide.read_region((2000 - 128, 1400 - 128), 0, (256, 256)))[..., :3].astype(float)
        halved = full.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
        assert np.abs(centre.astype(float) - halved).mean() < 6
        tiles = list(iter_tiles(slide, grid, [0, 2]))
        assert [index for index, _ in tiles] == [0, 2]
        assert all(tile.shape == (128, 128, 3) for _, tile in tiles)


def test_plan_on_a_half_mpp_slide_reads_level0_without_resizing(tissue_slide: SyntheticSlide) -> None:
    with openslide.OpenSlide(tissue_slide.path) as slide:
        tissue = segment_tissue(slide, mpp0=tissue_slide.mpp0)
        grid = plan_tiles(
            tissue_slide.width,
            tissue_slide.height,
            tissue_slide.mpp0,
            tissue,
            target_mpp=0.5,
            tile_size=224,
            min_tissue_fraction=0.5,
            level_downsamples=list(slide.level_downsamples),
        )
        assert (grid.level, grid.read_size, grid.tile_size_level0) == (0, 224, 224.0)
        x, y = (int(value) for value in grid.coords[len(grid) // 2])
        tile = read_tile(slide, grid, x, y)
        direct = np.asarray(slide.read_region((x, y), 0, (224, 224)))[..., :3]
        assert np.array_equal(tile, direct)
        # Coarser target on the same slide: 1.0 um/px is level 1 (downsample 2), tile 448 level-0 px.
        coarse = plan_tiles(
            tissue_slide.width,
            tissue_slide.height,
            tissue_slide.mpp0,
            tissue,
            target_mpp=1.0,
            tile_size=224,
            min_tissue_fraction=0.5,
            level_downsamples=list(slide.level_downsamples),
        )
        assert (coarse.level, coarse.read_size, coarse.tile_size_level0) == (1, 224, 448.0)
        assert len(coarse) < len(grid)


def test_level_choice_never_upsamples_and_resizes_to_tile_size() -> None:
    tissue = TissueMask(
        mask=np.ones((30, 40), dtype=bool),
        downsample=(100.0, 100.0),
        mpp0=0.25,
        area_mm2=7.5,
        polygons={"type": "FeatureCollection", "features": []},
        density_threshold=0.1,
        ink_fraction=0.0,
    )
    grid = plan_tiles(
        4000,
        3000,
        0.25,
        tissue,
        target_mpp=1.0,
        tile_size=224,
        min_tissue_fraction=0.5,
        level_downsamples=[1.0, 3.0, 9.0],
    )
    assert grid.level == 1  # downsample 3 <= 4 < 9
    assert grid.read_size == round(224 * 4 / 3)
    assert grid.grid_shape == (4, 5)  # ceil(3000 / 896), ceil(4000 / 896)
    # 4.016 is accepted for 4 (1% tolerance), 4.1 is not.
    assert (
        plan_tiles(
            4000,
            3000,
            0.25,
            tissue,
            target_mpp=1.0,
            tile_size=224,
            min_tissue_fraction=0.5,
            level_downsamples=[1.0, 2.0, 4.016],
        ).level
        == 2
    )
    assert (
        plan_tiles(
            4000,
            3000,
            0.25,
            tissue,
            target_mpp=1.0,
            tile_size=224,
            min_tissue_fraction=0.5,
            level_downsamples=[1.0, 2.0, 4.1],
        ).level
        == 1
    )


def test_tissue_fraction_is_exact_area_share() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True  # left half of a 1000 x 1000 slide
    tissue = TissueMask(mask, (100.0, 100.0), 0.5, 0.125, {}, 0.1, 0.0)
    grid = plan_tiles(
        1000,
        1000,
        0.5,
        tissue,
        target_mpp=0.5,
        tile_size=300,
        min_tissue_fraction=0.01,
        level_downsamples=[1.0],
    )
    fractions = dict(zip(map(tuple, grid.coords.tolist()), grid.tissue_fraction.tolist(), strict=True))
    assert fractions[(0, 0)] == pytest.approx(1.0)
    assert fractions[(300, 0)] == pytest.approx(2 / 3)  # columns 300-600: 200 of 300 px are tissue
    assert (600, 0) not in fractions  # no tissue at all
    assert fractions[(0, 900)] == pytest.approx(1 / 3)  # edge tile: 100 of its 300 rows are on the slide
    with_overlap = plan_tiles(
        1000,
        1000,
        0.5,
        tissue,
        target_mpp=0.5,
        tile_size=300,
        overlap=100,
        min_tissue_fraction=0.5,
        level_downsamples=[1.0],
    )
    assert sorted({int(x) for x in with_overlap.coords[:, 0]}) == [0, 200]


def test_slide_coarser_than_target_is_rejected() -> None:
    tissue = TissueMask(np.ones((10, 10), dtype=bool), (100.0, 100.0), 1.0, 1.0, {}, 0.1, 0.0)
    with pytest.raises(SlideRejected) as caught:
        plan_tiles(
            1000,
            1000,
            1.0,
            tissue,
            target_mpp=0.5,
            tile_size=224,
            min_tissue_fraction=0.5,
            level_downsamples=[1.0],
        )
    assert caught.value.code == "resolution-too-low"
    assert "target_mpp" in caught.value.reason
    # A scan a little coarser than the target (0.5034 vs 0.5) is fine, read at level 0: within the scale
    # tolerance as stored, else (tolerance 0) resampled from 222 px.
    close = TissueMask(np.ones((10, 10), dtype=bool), (100.0, 100.0), 0.5034, 1.0, {}, 0.1, 0.0)
    for tolerance, read_size in ((MPP_TOLERANCE, 224), (0.0, 222)):
        grid = plan_tiles(
            1000,
            1000,
            0.5034,
            close,
            target_mpp=0.5,
            tile_size=224,
            min_tissue_fraction=0.5,
            level_downsamples=[1.0],
            mpp_tolerance=tolerance,
        )
        assert grid.level == 0 and grid.read_size == read_size


def _plan_on(mpp0: float, level_downsamples: list[float], tile_size: int = 224) -> TileGrid:
    width, height = 4000, 3000
    tissue = TissueMask(np.ones((30, 40), dtype=bool), (100.0, 100.0), mpp0, 1.0, {}, 0.1, 0.0)
    return plan_tiles(
        width,
        height,
        mpp0,
        tissue,
        target_mpp=0.5,
        tile_size=tile_size,
        min_tissue_fraction=0.5,
        level_downsamples=level_downsamples,
    )


def test_real_scanner_scales_are_cut_as_stored_within_the_tolerance() -> None:
    # 0.499 um/px (CMU-1-Small-Region's calibration): level 0 as stored, 224 stored px per tile, and the
    # plan says the tiles are 0.499 um/px; the grid lands on level pixels, so on the stored JPEG tiles.
    grid = _plan_on(0.499, [1.0, 4.0])
    assert (grid.level, grid.read_size, grid.tile_size_level0, grid.exact_scale) == (0, 224, 224.0, 1)
    assert grid.tile_mpp == pytest.approx(0.499) and not grid.resampled
    assert grid.stride_level0 == 224.0 and np.all(grid.coords % 224 == 0)
    assert grid.mpp_tolerance == MPP_TOLERANCE == 0.02
    # 0.504 and 0.2457/0.2527 (40x, level 0 halved: DCT-domain 1/2 in the fast reader) are within 2%.
    assert _plan_on(0.504, [1.0]).exact_scale == 1
    for mpp0 in (0.2457, 0.2527):
        grid = _plan_on(mpp0, [1.0, 4.0, 16.0])
        assert (grid.level, grid.exact_scale, grid.read_size, grid.tile_size_level0) == (0, 2, 448, 448.0)
        assert grid.tile_mpp == pytest.approx(2 * mpp0)
    # A pyramid level within tolerance is used as stored, with its own (non-integer) downsample.
    grid = _plan_on(0.125, [1.0, 4.0004, 16.0])
    assert (grid.level, grid.exact_scale, grid.read_size) == (1, 1, 224)
    assert grid.tile_size_level0 == pytest.approx(224 * 4.0004)
    assert grid.tile_mpp == pytest.approx(0.125 * 4.0004)
    # Level coordinates of every tile are whole multiples of the tile: the readers round back exactly.
    level_xy = np.rint(grid.coords / grid.level_downsample)
    assert np.all(level_xy % 224 == 0)


def test_scales_outside_the_tolerance_are_resampled_as_before() -> None:
    grid = _plan_on(0.47, [1.0])  # 6% finer than the target: resampled to exactly 0.5 um/px
    assert grid.resampled and grid.exact_scale is None
    assert grid.read_size == round(224 * 0.5 / 0.47) and grid.tile_size_level0 == pytest.approx(
        224 * 0.5 / 0.47
    )
    assert grid.tile_mpp == 0.5
    # 0.2 um/px: half is 0.4, 20% off; read at level 0 and resized.
    grid = _plan_on(0.2, [1.0, 4.0])
    assert grid.resampled and (grid.level, grid.read_size) == (0, 560)
    # The tolerance never reaches for a finer level than resampling would read: 0.25 um/px with levels
    # 1, 3, 9 for a 1.0 um/px target reads level 1 and resizes, not level 0 at 1/4.
    tissue = TissueMask(np.ones((30, 40), dtype=bool), (100.0, 100.0), 0.25, 1.0, {}, 0.1, 0.0)
    coarse = plan_tiles(
        4000,
        3000,
        0.25,
        tissue,
        target_mpp=1.0,
        tile_size=224,
        min_tissue_fraction=0.5,
        level_downsamples=[1.0, 3.0, 9.0],
    )
    assert coarse.resampled and coarse.level == 1


def test_mask_of_another_slide_is_refused() -> None:
    tissue = TissueMask(np.ones((10, 10), dtype=bool), (100.0, 100.0), 0.5, 1.0, {}, 0.1, 0.0)
    with pytest.raises(ValueError, match="segment this slide"):
        plan_tiles(
            5000,
            1000,
            0.5,
            tissue,
            target_mpp=0.5,
            tile_size=224,
            min_tissue_fraction=0.5,
            level_downsamples=[1.0],
        )


def test_thumbnail_read_in_small_blocks_matches_one_read(tissue_slide: SyntheticSlide) -> None:
    with openslide.OpenSlide(tissue_slide.path) as slide:
        in_blocks, level = read_thumbnail(slide, width=250, height=188, chunk_px=64)
        at_once, same_level = read_thumbnail(slide, width=250, height=188, chunk_px=1 << 20)
        assert level == same_level == 3  # downsample 8 is the coarsest level finer than 16
        reference = np.asarray(slide.get_thumbnail((250, 188)).convert("RGB"))
    assert in_blocks.shape == at_once.shape == (188, 250, 3)
    assert np.abs(in_blocks.astype(int) - at_once.astype(int)).mean() < 1.0
    assert np.abs(in_blocks.astype(int) - reference.astype(int)).mean() < 4.0
