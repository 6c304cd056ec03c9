"""The fast tile reader against OpenSlide on the same files: every JPEG variant, DCT scaling, edges."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openslide
import pytest
from wsitk.shared.slides.fastread import decode_jpeg_tile, open_fast_reader
from wsitk.shared.slides.synth import SynthSpec, generate_slide, render_region
from wsitk.shared.slides.tiling import plan_tiles, read_tile
from wsitk.shared.slides.tissue import TissueMask

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "openslide-python"

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
        with contextlib.suppress(Exception):  # a test may have closed it already (``with slide:``)
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
