"""The viewer's deep-zoom pyramid against OpenSlide's own ``DeepZoomGenerator`` on a real Aperio scan:
same levels, same tile grid, same tile sizes and the same pixels; colour through the slide's ICC
profile where it has one; and its LRU caches stay bounded."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from wsitk.services.viewer.deepzoom import LruCache, OpenSlideTiles, TileOutOfRange, TileServer

from tests.conftest import REPO_ROOT

CMU = REPO_ROOT.parent / "shared" / "fixtures" / "real" / "CMU-1-Small-Region.svs"


def _rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)


def _jpeg(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)  # type: ignore[attr-defined]
    return buffer.getvalue()


def test_pyramid_and_tiles_match_openslides_deepzoom_generator() -> None:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    if not CMU.is_file():
        pytest.fail(f"real fixture missing: {CMU} (../shared/fixtures/real beside the repo)")
    ours = OpenSlideTiles(CMU)
    assert not ours.has_icc_profile
    with openslide.OpenSlide(str(CMU)) as slide:
        theirs = DeepZoomGenerator(slide, tile_size=254, overlap=1, limit_bounds=False)
        assert ours.pyramid.max_level + 1 == theirs.level_count
        for level in range(theirs.level_count):
            assert ours.pyramid.grid(level) == theirs.level_tiles[level]
            assert ours.pyramid.level_size(level) == theirs.level_dimensions[level]
        # (levels at least a tile wide: on levels a few pixels wide DeepZoomGenerator's `thumbnail` keeps
        # the aspect ratio and returns a tile narrower than the grid says; the viewer fills the grid)
        top = theirs.level_count - 1
        for level in (top, top - 1, top - 2, top - 3, top - 4):
            cols, rows = theirs.level_tiles[level]
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                mine = _rgb(ours.tile(level, col, row))
                expected = _rgb(_jpeg(theirs.get_tile(level, (col, row))))
                assert mine.shape == expected.shape, (level, col, row)
                assert np.abs(mine - expected).mean() < 1.0, (level, col, row)
    with pytest.raises(TileOutOfRange, match=r"outside 0\.\."):
        ours.tile(ours.pyramid.max_level + 1, 0, 0)
    with pytest.raises(TileOutOfRange, match="outside the"):
        ours.tile(ours.pyramid.max_level, 99, 0)


def test_tiles_are_converted_to_srgb_through_the_slides_icc_profile(fixtures_dir: Path) -> None:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator
    from PIL import ImageCms

    path = fixtures_dir / "boxes.tiff"  # carries an ICC profile
    ours = OpenSlideTiles(path)
    assert ours.has_icc_profile
    with openslide.OpenSlide(str(path)) as slide:
        raw = DeepZoomGenerator(slide, tile_size=254, overlap=1, limit_bounds=False)
        assert slide.color_profile is not None
        transform = ImageCms.buildTransform(
            slide.color_profile, ImageCms.createProfile("sRGB"), "RGB", "RGB", ImageCms.Intent.PERCEPTUAL
        )
        level = raw.level_count - 1
        untransformed = raw.get_tile(level, (0, 0))
        managed = ImageCms.applyTransform(untransformed, transform)
    mine = _rgb(ours.tile(level, 0, 0))
    assert np.abs(mine - _rgb(_jpeg(managed))).mean() < 1.0


def test_tile_server_caches_are_bounded() -> None:
    opened: list[str] = []
    hits: list[bool] = []

    def slide_path(slide_id: str) -> Path:
        opened.append(slide_id)
        return CMU

    server = TileServer(slide_path, open_slides=1, cached_tiles=2, on_cache=hits.append)
    level = server.slide("a" * 32).pyramid.max_level
    for col in (0, 1, 0):
        server.tile("a" * 32, level, col, 0)
    assert hits == [False, False, True]
    server.tile("a" * 32, level, 2, 0)  # a third tile evicts the least recently used one (1_0)
    server.tile("a" * 32, level, 1, 0)
    assert hits[-1] is False
    server.slide("b" * 32)  # a second slide closes the first (one open at most)
    server.slide("a" * 32)
    assert opened == ["a" * 32, "b" * 32, "a" * 32]

    cache = LruCache(2)
    for key in "abc":
        cache.put(key, key)
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") == "c"
