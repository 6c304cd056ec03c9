"""quality-filter's tile metrics and the scorer's deterministic tile cap."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from wsitk.services.quality_filter.handler import assess
from wsitk.shared.contracts import pb
from wsitk.shared.models.tile_rule import tiles_to_score
from wsitk.shared.slides.synth import render_patch

PROFILE = pb.PipelineProfile(qc_min_tissue_fraction=0.5)


def test_sharp_tissue_passes_blurred_tissue_and_background_do_not() -> None:
    rng = np.random.default_rng(1)
    tissue = render_patch("normal", 224, 0.5, rng)
    blurred = ndimage.gaussian_filter(tissue.astype(np.float32), sigma=(3, 3, 0)).astype(np.uint8)
    background = render_patch("background", 224, 0.5, rng)
    assert assess(tissue, PROFILE)[0]
    ok, reason, metrics = assess(blurred, PROFILE)
    assert (ok, reason) == (False, "blur") and metrics["sharpness"] < assess(tissue, PROFILE)[2]["sharpness"]
    ok, reason, background_metrics = assess(background, PROFILE)
    assert (ok, reason) == (False, "background")
    assert background_metrics["tissue_fraction"] < 0.2
    assert assess(tissue, PROFILE)[2]["tissue_fraction"] > 0.8


def test_tile_cap_keeps_everything_below_it_and_a_stable_sample_above() -> None:
    grid = np.stack(np.meshgrid(np.arange(40) * 224, np.arange(25) * 224, indexing="ij"), -1).reshape(-1, 2)
    assert tiles_to_score(grid[:10], 20).tolist() == list(range(10))
    first, again = tiles_to_score(grid, 100), tiles_to_score(grid, 100)
    assert len(first) == 100 and len(set(first.tolist())) == 100
    assert first.tolist() == again.tolist()
    # chosen by coordinates, not by position: shards arriving in another order keep the same tiles
    order = np.random.default_rng(0).permutation(len(grid))
    shuffled = tiles_to_score(grid[order], 100)
    assert {tuple(xy) for xy in grid[order][shuffled]} == {tuple(xy) for xy in grid[first]}


def _mucin(base_od: tuple[float, float, float], wisps: float, size: int = 224) -> np.ndarray:
    """Mucin-like tile: pale, smoothly varying blue-grey, with or without faint fibrillar wisps."""
    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.standard_normal((size, size)), 16)
    smooth /= smooth.std()
    base = np.asarray(base_od)
    od = base[None, None, :] * (1 + 0.2 * smooth[..., None])
    strands = np.zeros((size, size))
    t = np.linspace(0, 1, 400)
    for _ in range(25):
        x0, y0 = rng.uniform(0, size, 2)
        angle, bend = rng.uniform(0, 2 * np.pi), rng.uniform(-3, 3)
        xs = (x0 + np.cos(angle) * t * 120 + bend * np.sin(t * 6) * 5).astype(int)
        ys = (y0 + np.sin(angle) * t * 120 + bend * np.cos(t * 6) * 5).astype(int)
        inside = (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
        strands[ys[inside], xs[inside]] = 1
    strands = ndimage.gaussian_filter(strands, 0.7)
    od = od + wisps * (strands / strands.max())[..., None] * base / base.max()
    image = 243 * 10 ** (-od) + rng.normal(0, 1.5, od.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def test_smooth_mucin_and_pale_stroma_are_not_blur_but_defocus_is() -> None:
    from wsitk.services.quality_filter.measures import QcThresholds
    from wsitk.shared.slides.optical import Background

    glass = Background((243.0, 243.0, 243.0), 0.005)
    limits = QcThresholds()
    for base in ((0.1, 0.08, 0.04), (0.2, 0.16, 0.08), (0.3, 0.25, 0.12)):
        assert assess(_mucin(base, wisps=0.05), limits, glass, 0.5)[:2] == (True, ""), base
    # Pale and textureless: nothing to judge, so not blur either.
    assert assess(_mucin((0.1, 0.08, 0.04), wisps=0.0), limits, glass, 0.5)[:2] == (True, "")
    # The same dense region with every detail gone reads as defocus (documented limit of the rule).
    assert assess(_mucin((0.3, 0.25, 0.12), wisps=0.0), limits, glass, 0.5)[1] == "blur"
    tissue = render_patch("tumour", 224, 0.5, np.random.default_rng(3))
    for sigma in (1.0, 2.0, 4.0, 8.0):
        defocused = ndimage.gaussian_filter(tissue.astype(np.float32), sigma=(sigma, sigma, 0))
        assert assess(np.clip(defocused, 0, 255).astype(np.uint8), limits, glass, 0.5)[1] == "blur", sigma


def test_tiles_measured_together_get_the_measures_they_get_alone() -> None:
    """No morphology, region or reduction crosses from one tile of a batch to the next."""
    from wsitk.services.quality_filter.measures import measure, measure_batch
    from wsitk.shared.slides.optical import Background

    rng = np.random.default_rng(5)
    glass = Background((240.0, 240.0, 240.0), 0.005)
    tiles = [render_patch(kind, 224, 0.5, rng) for kind in ("normal", "tumour", "background", "tumour")]
    inked = tiles[1].copy()
    inked[:, :60] = (35, 65, 175)  # ink touching the right edge of the tile before it in the stack
    tiles.insert(2, inked)
    tiles.append(np.full((224, 224, 3), 240, np.uint8))  # bare glass: one large empty region
    batch = measure_batch(np.stack(tiles), glass, 0.5)
    assert batch == [measure(tile, glass, 0.5) for tile in tiles]
    assert batch[2]["pen_fraction"] > 0.2 and batch[1].get("pen_fraction") == 0.0
