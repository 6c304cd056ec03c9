"""The fast tile reader against OpenSlide on the same files: every JPEG variant, DCT scaling, edges."""

from __future__ import annotations

import contextlib
import ctypes
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
from google.protobuf import json_format
from PIL import Image
from wsitk.services.tiler.handler import tile_slide
from wsitk.shared.contracts import pb
from wsitk.shared.shards import Shard, ShardTile, pack_shard
from wsitk.shared.slides.fastread import _splice_tables, decode_jpeg_tile, open_fast_reader
from wsitk.shared.slides.synth import SynthSpec, generate_slide, render_region
from wsitk.shared.slides.tiling import TileGrid, plan_tiles, read_tile
from wsitk.shared.slides.tissue import TissueMask

from tests.conftest import REPO_ROOT

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "openslide-python"

VARIANTS = {
    "ycbcr-full-streams": {},
    "shared-tables": {"jpeg_tables": True},
    "rgb-coded-shared-tables": {"jpeg_tables": True, "rgb_coded_jpeg": True},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_slide(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, SynthSpec]:
    spec = SynthSpec(width=1800, height=1300, mpp=0.25, seed=5, tile_size=240, **VARIANTS[request.param])
    path = tmp_path_factory.mktemp("fast") / f"{request.param}.svs"
    generate_slide(path, spec)
    return path, spec


_OPENED: list[object] = []


@pytest.fixture(autouse=True)
def _close_what_tests_opened() -> Iterator[None]:
    """Readers and slides hold file descriptors; later tests check that none leak."""
    yield
    while _OPENED:
        opened = _OPENED.pop()
        # A test may have closed it already (``with slide:``): OpenSlide then refuses its NULL handle.
        with contextlib.suppress(ctypes.ArgumentError):
            opened.close()  # type: ignore[attr-defined]


def _open(path: Path) -> tuple[openslide.OpenSlide, object]:
    slide = openslide.OpenSlide(str(path))
    reader, why = open_fast_reader(path, slide.properties["openslide.vendor"], list(slide.level_dimensions))
    assert reader is not None, why
    _OPENED.extend([slide, reader])
    return slide, reader


def test_fast_region_is_bit_identical_to_openslide(variant_slide: tuple[Path, SynthSpec]) -> None:
    path, spec = variant_slide
    slide, reader = _open(path)
    with slide:
        # A box across stored-tile borders and past the right/bottom edge (white there, like OpenSlide).
        x, y, width, height = 1500, 1100, 400, 300
        expected = np.asarray(slide.read_region((x, y), 0, (width, height)))
        got = reader.read_region(0, x, y, width, height)  # type: ignore[attr-defined]
    inside = expected[..., 3] == 255
    assert np.array_equal(got[inside], expected[..., :3][inside])
    assert (got[~inside] == 255).all() and (~inside).any()
    truth = render_region(spec, 200, 200, 300, 300)
    assert np.abs(reader.read_region(0, 200, 200, 300, 300).astype(int) - truth).mean() < 4  # type: ignore[attr-defined]


def test_rgb_coded_tiles_need_the_colour_space(tmp_path: Path) -> None:
    spec = SynthSpec(
        width=512, height=512, mpp=0.5, seed=2, tile_size=256, jpeg_tables=True, rgb_coded_jpeg=True
    )
    generate_slide(tmp_path / "rgb.svs", spec)
    _, reader = _open(tmp_path / "rgb.svs")
    level = reader.levels[0]  # type: ignore[attr-defined]
    assert level.rgb_coded and level.tables
    errors = []
    for row, column in ((0, 0), (0, 1), (1, 0), (1, 1)):
        data = reader.stored_tile_bytes(0, column, row)  # type: ignore[attr-defined]
        right = decode_jpeg_tile(data, level.tables, rgb_coded=True)
        wrong = decode_jpeg_tile(data, level.tables, rgb_coded=False)
        truth = render_region(spec, column * 256, row * 256, 256, 256).astype(int)
        errors.append((np.abs(right.astype(int) - truth).mean(), np.abs(wrong.astype(int) - truth).mean()))
        half = decode_jpeg_tile(data, level.tables, rgb_coded=True, scale=2)
        boxed = right.astype(float).reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
        assert half.shape == (128, 128, 3) and np.abs(half - boxed).mean() < 2
        # The same DCT-domain decode as Pillow's draft mode (libjpeg-turbo's scale_denom), pixel for pixel.
        with Image.open(io.BytesIO(_splice_tables(data, level.tables, True))) as drafted:
            drafted.draft("RGB", (128, 128))
            assert np.array_equal(half, np.asarray(drafted.convert("RGB")))
    assert max(right for right, _ in errors) < 3
    assert max(wrong for _, wrong in errors) > 10, errors  # decoded as YCbCr, tissue turns green


def test_aperio_fixture_with_shared_tables_and_rgb_jpeg_matches_openslide() -> None:
    path = FIXTURES / "small.svs"
    slide, reader = _open(path)
    with slide:
        expected = np.asarray(slide.read_region((0, 0), 0, (16, 16)))[..., :3]
    assert reader.levels[0].rgb_coded and reader.levels[0].tables  # type: ignore[attr-defined]
    assert np.array_equal(reader.read_region(0, 0, 0, 16, 16), expected)  # type: ignore[attr-defined]


def test_non_jpeg_fixture_falls_back_to_openslide_with_a_reason() -> None:
    slide = openslide.OpenSlide(str(FIXTURES / "boxes.tiff"))
    _OPENED.append(slide)
    reader, why = open_fast_reader(FIXTURES / "boxes.tiff", "generic-tiff", list(slide.level_dimensions))
    assert reader is None and "compression 8" in why
    reader, why = open_fast_reader(FIXTURES / "small.svs", "hamamatsu", [(16, 16)])
    assert reader is None and "hamamatsu" in why


def test_scaled_tiles_match_the_openslide_path_at_half_mpp_from_40x(
    variant_slide: tuple[Path, SynthSpec],
) -> None:
    path, spec = variant_slide
    slide, reader = _open(path)
    with slide:
        # Every tile counts as tissue: this is about pixels, not segmentation (glass tiles included).
        tissue = TissueMask(np.ones((13, 18), bool), (100.0, 100.0), spec.mpp, 0.0, {}, 0.0, 0.0)
        grid = plan_tiles(
            spec.width,
            spec.height,
            spec.mpp,
            tissue,
            target_mpp=0.5,
            tile_size=128,
            min_tissue_fraction=0.1,
            level_downsamples=list(slide.level_downsamples),
        )
        assert grid.level == 0 and grid.read_size == 256 and len(grid) > 4
        assert reader.scale_for(grid) == 2  # type: ignore[attr-defined]
        differences = []
        for x, y in grid.coords:
            fast = reader.read_tile(grid, int(x), int(y))  # type: ignore[attr-defined]
            reference = read_tile(slide, grid, int(x), int(y))
            assert fast.shape == reference.shape == (128, 128, 3)
            differences.append(np.abs(fast.astype(int) - reference.astype(int)).mean())
    # DCT-domain scaling versus full decode + Lanczos: the same picture up to resampling noise.
    assert max(differences) < 6.0, differences
    assert reader.stored_tiles_decoded <= len(grid) * 4  # type: ignore[attr-defined]


def test_memory_stays_bounded_by_the_cache(tmp_path: Path) -> None:
    spec = SynthSpec(width=2400, height=1200, mpp=0.5, seed=1, tile_size=240, n_tissue_blobs=1)
    generate_slide(tmp_path / "wide.svs", spec)
    slide = openslide.OpenSlide(str(tmp_path / "wide.svs"))
    reader, _ = open_fast_reader(
        tmp_path / "wide.svs", "aperio", list(slide.level_dimensions), cache_bytes=400_000
    )
    assert reader is not None
    for x in range(0, 2400, 200):
        reader.read_region(0, x, 0, 256, 1200)
    assert reader._cached_bytes <= 400_000 + 240 * 240 * 3
    reader.close()


REAL_SCAN = REPO_ROOT.parent / "shared" / "fixtures" / "real" / "CMU-1-Small-Region.svs"


def _all_tissue(width: int, height: int, mpp: float) -> TissueMask:
    """Every tile counts as tissue: these tests are about pixels, not segmentation."""
    return TissueMask(np.ones((20, 20), bool), (width / 20, height / 20), mpp, 0.0, {}, 0.0, 0.0)


def _grid(slide: openslide.OpenSlide, target_mpp: float, tile_size: int) -> TileGrid:
    width, height = slide.dimensions
    mpp0 = float(slide.properties["openslide.mpp-x"])
    return plan_tiles(
        width,
        height,
        mpp0,
        _all_tissue(width, height, mpp0),
        target_mpp=target_mpp,
        tile_size=tile_size,
        min_tissue_fraction=0.01,
        level_downsamples=list(slide.level_downsamples),
    )


def _differences_from_openslide(slide: Any, reader: Any, grid: Any, coords: Any) -> list[float]:
    """Mean absolute difference of each tile at ``coords``: the fast reader against the OpenSlide path."""
    differences = []
    for x, y in coords:
        fast = reader.read_tile(grid, int(x), int(y))
        reference = read_tile(slide, grid, int(x), int(y))
        assert fast.shape == reference.shape == (grid.tile_size, grid.tile_size, 3)
        differences.append(float(np.abs(fast.astype(int) - reference.astype(int)).mean()))
    return differences


def test_real_scan_at_0499_gives_the_same_tiles_from_both_readers() -> None:
    """CMU-1-Small-Region (0.499 um/px) for 0.5 um/px: cut as stored, so no resize on either path."""
    slide, reader = _open(REAL_SCAN)
    with slide:
        grid = _grid(slide, 0.5, 256)
        assert (grid.exact_scale, grid.read_size, grid.tile_size_level0) == (1, 256, 256.0)
        assert grid.tile_mpp == pytest.approx(0.499)
        assert reader.scale_for(grid) == 1  # type: ignore[attr-defined]
        differences = _differences_from_openslide(
            slide, reader, grid, grid.coords[:: max(1, len(grid) // 12)]
        )
    assert max(differences) < 0.5, differences  # same box, same decoder: identical up to edge alpha


def test_scanner_40x_at_02527_is_decoded_at_half_size_without_resize(tmp_path: Path) -> None:
    spec = SynthSpec(width=1440, height=960, mpp=0.2527, seed=3, tile_size=240, jpeg_tables=True)
    generate_slide(tmp_path / "s40.svs", spec)
    slide, reader = _open(tmp_path / "s40.svs")
    with slide:
        grid = _grid(slide, 0.5, 128)
        assert (grid.level, grid.exact_scale, grid.read_size) == (0, 2, 256)
        assert grid.tile_mpp == pytest.approx(0.5054)
        assert reader.scale_for(grid) == 2  # type: ignore[attr-defined]
        # OpenSlide's side reads 256 px and halves them by Lanczos; the fast reader decodes at 1/2.
        differences = _differences_from_openslide(slide, reader, grid, grid.coords)
    assert max(differences) < 6.0, differences


def test_passthrough_bytes_decode_to_the_readers_pixels(variant_slide: tuple[Path, SynthSpec]) -> None:
    path, spec = variant_slide
    slide, reader = _open(path)
    with slide:
        grid = _grid(slide, spec.mpp, 240)  # the stored tiles' scale and size: every interior tile
        level = reader.levels[0]  # type: ignore[attr-defined]
        passed = 0
        for x, y in grid.coords:
            data = reader.passthrough_jpeg(grid, int(x), int(y))  # type: ignore[attr-defined]
            inside = x + 240 <= spec.width and y + 240 <= spec.height
            assert (data is not None) == inside, (x, y)
            if data is None:
                continue
            passed += 1
            stored = reader.stored_tile_bytes(0, int(x) // 240, int(y) // 240)  # type: ignore[attr-defined]
            assert data.endswith(stored[2:]) and data.startswith(b"\xff\xd8")  # the stored scan, untouched
            expected = reader.read_tile(grid, int(x), int(y))  # type: ignore[attr-defined]
            in_shard = Shard(pack_shard({}, [ShardTile(int(x), int(y), data)]))
            assert np.array_equal(in_shard.decode(0), expected)  # as every later stage decodes it
            with Image.open(io.BytesIO(data)) as opened:  # and a standalone JPEG for any decoder
                assert np.array_equal(np.asarray(opened.convert("RGB")), expected)
        assert passed == (spec.width // 240) * (spec.height // 240)
        assert (level.tables is not None) == bool(VARIANTS[path.stem].get("jpeg_tables"))
        # Any other geometry is decoded: another size, or off the stored origin.
        assert reader.passthrough_jpeg(_grid(slide, spec.mpp, 256), 0, 0) is None  # type: ignore[attr-defined]
        assert reader.passthrough_jpeg(_grid(slide, 0.5, 240), 0, 0) is None  # type: ignore[attr-defined]


def test_tiler_passes_stored_tiles_through_and_encodes_the_rest(tmp_path: Path) -> None:
    """The real RGB-coded Aperio scan at its own 240 px tiles: interior tiles are its bytes, edges re-encoded."""
    profile = pb.PipelineProfile(target_mpp=0.5, tile_size=240, tiles_per_shard=500, min_tissue_fraction=0.25)
    plan = tile_slide(str(REAL_SCAN), json_format.MessageToJson(profile), str(tmp_path), "cmu")
    assert isinstance(plan, dict), plan
    assert plan["reader"] == "libjpeg-turbo" and not plan["resampled"]
    assert plan["tile_mpp"] == pytest.approx(0.499) and plan["mpp_tolerance"] == 0.02
    assert 0 < plan["tiles_passed_through"] < plan["total_tiles"]  # edge tiles are painted and encoded
    shard = Shard((tmp_path / f"{plan['shards'][0]['shard_id']}.shard").read_bytes())
    assert shard.header["tile_mpp"] == pytest.approx(0.499) and shard.header["mpp"] == 0.5
    slide, reader = _open(REAL_SCAN)
    with slide:
        grid = _grid(slide, 0.5, 240)
        passed = 0
        for index, (x, y) in enumerate(shard.coords.tolist()):
            stored = reader.passthrough_jpeg(grid, x, y)  # type: ignore[attr-defined]
            if stored is None:
                continue
            passed += 1
            assert shard.tile_bytes(index) == stored
            assert np.array_equal(shard.decode(index), reader.read_tile(grid, x, y))  # type: ignore[attr-defined]
    assert passed == plan["tiles_passed_through"]
