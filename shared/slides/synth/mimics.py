"""Mimic regions: benign tissue that looks like tumour to a shortcut, laid out and composited per pixel.

A slide with ``SynthSpec.mimics`` gets, besides tissue and tumour, one region per named mimic class
(lymphoid aggregates, reactive epithelium, necrosis, fat, mucin; appearance in ``spec.py``). Each region is
a thresholded smooth noise field from its own seeded stream, cut to the requested share of the tissue area,
outside the tumour and outside the mimics composited before it, so the masks are exclusive and their shares
are exact up to the grid. The renderer blends classes by membership like normal and tumour: the tumour lies
on top, then the mimics in ``MIMIC_CLASSES`` order, and normal tissue fills the rest, so the memberships of
a pixel always add up to one.

Fat is drawn with vacuoles: large stamps, placed and seeded like nuclei, whose coverage clears the stroma
(white holes between thin pink septa) instead of adding haematoxylin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from wsitk.shared.slides.synth.layout import (
    Layout,
    _bilinear,
    _interpolation_indices,
    _signed_distance,
    _smooth_noise,
)
from wsitk.shared.slides.synth.spec import (
    BORDER_ROUGHNESS_UM,
    FAT,
    MIMIC_CLASSES,
    MIMIC_EDGE_UM,
    BoolArray,
    FloatArray,
    IntArray,
    SynthSpec,
    TissueClass,
)

#: Region size: correlation length of the field a region is cut from, as a share of the slide's short side.
REGION_SIGMA = 0.035
#: Signed distance of an empty region (far outside everywhere).
_FAR_OUTSIDE = -1.0e4

#: Fat vacuoles, drawn with the nucleus machinery (class id 8: its own seeded cells and stamps).
FAT_VACUOLES = TissueClass(
    name="fat-vacuole",
    class_id=8,
    stroma_eosin=0.0,
    stroma_haematoxylin=0.0,
    nuclei_per_um2=FAT.vacuoles_per_um2,
    radius_um=FAT.vacuole_radius_um,
    aspect=(1.0, 1.3),
    irregularity=(0.02, 0.08),
    haematoxylin=(1.0, 1.0),
    stamp_supersample=2,
)


def mimic_sdfs(
    spec: SynthSpec, tissue: BoolArray, tumour: BoolArray, short_side: int
) -> dict[str, FloatArray]:
    """Signed distances (grid cells) of each requested mimic's region, in compositing order."""
    shares = dict(spec.mimics)
    tissue_cells = int(tissue.sum())
    taken = tumour.copy()
    result: dict[str, FloatArray] = {}
    for name, tissue_class in MIMIC_CLASSES.items():
        if name not in shares:
            continue
        rng = np.random.default_rng([spec.seed, 40, tissue_class.class_id])
        field = _smooth_noise(rng, tissue.shape, REGION_SIGMA * short_side)
        free = tissue & ~taken
        values = field[free]
        want = min(round(shares[name] * tissue_cells), values.size)
        if want <= 0:
            result[name] = np.full(tissue.shape, _FAR_OUTSIDE, np.float32)
            continue
        threshold = np.partition(values, values.size - want)[values.size - want]
        region = (field >= threshold) & free
        result[name] = _signed_distance(region)
        taken |= region
    return result


def compose(
    tumour: FloatArray | np.float32, mimics: Sequence[tuple[str, FloatArray]]
) -> list[tuple[str, FloatArray]]:
    """Share of each class (tumour, the mimics, normal) within the tissue; they add up to one."""
    rest = 1 - tumour
    shares: list[tuple[str, FloatArray]] = [("tumour", np.asarray(tumour, np.float32))]
    for name, membership in mimics:
        shares.append((name, np.asarray(rest * membership, np.float32)))
        rest = rest * (1 - membership)
    shares.append(("normal", np.asarray(rest, np.float32)))
    return shares


def window_mimic_memberships(
    layout: Layout,
    downsample: int,
    window: tuple[int, int, int, int],
    mpp_eff: float,
    coarse: FloatArray,
) -> list[tuple[str, FloatArray]]:
    """Each mimic's membership (0..1) over a window of the rendered level, borders roughened like tumour's."""
    x0, y0, width, height = window
    cells_per_px = downsample / layout.downsample
    rows = _interpolation_indices(y0, height, cells_per_px, layout.tissue_sdf.shape[0])
    cols = _interpolation_indices(x0, width, cells_per_px, layout.tissue_sdf.shape[1])
    scale = np.float32(layout.downsample / downsample)
    roughness = BORDER_ROUGHNESS_UM / mpp_eff
    edge = max(1.0, MIMIC_EDGE_UM / mpp_eff)
    memberships = []
    for name, sdf in layout.mimic_sdfs.items():
        distance = _bilinear(sdf, rows, cols) * scale
        memberships.append(
            (name, np.clip(0.5 + (distance + roughness * coarse) / edge, 0, 1).astype(np.float32))
        )
    return memberships


def point_class_weight(
    layout: Layout,
    name: str,
    downsample: int,
    xs: IntArray,
    ys: IntArray,
    mpp_eff: float,
    roughness_px: FloatArray,
) -> FloatArray:
    """Membership of class ``name`` (tissue x share) at pixel positions: which nuclei of that class to keep."""
    from scipy.ndimage import map_coordinates

    tissue, tumour = layout.point_memberships(downsample, xs, ys, mpp_eff, roughness_px)
    scale = layout.downsample / downsample
    coords = np.stack([(ys + 0.5) / scale - 0.5, (xs + 0.5) / scale - 0.5])
    edge = max(1.0, MIMIC_EDGE_UM / mpp_eff)
    mimics = []
    for mimic, sdf in layout.mimic_sdfs.items():
        distance = map_coordinates(sdf, coords, order=1, mode="nearest") * scale + roughness_px
        mimics.append((mimic, np.clip(0.5 + distance / edge, 0, 1).astype(np.float32)))
    for class_name, share in compose(tumour, mimics):
        if class_name == name:
            return np.asarray(tissue * share, np.float32)
    raise KeyError(f"class {name!r} is not on this slide")


def class_fractions(layout: Layout) -> dict[str, float]:
    """Share of the tissue area of every class on the slide (normal, tumour, each mimic), from the masks."""
    tissue = layout.tissue_mask
    cells = int(tissue.sum())
    if cells == 0:
        return {}
    tumour = layout.tumour_mask
    masks = layout.mimic_masks
    normal = tissue & ~tumour
    for mask in masks.values():
        normal &= ~mask
    fractions = {"normal": float(normal.sum() / cells), "tumour": float(tumour.sum() / cells)}
    fractions.update({name: float(mask.sum() / cells) for name, mask in masks.items()})
    return fractions
