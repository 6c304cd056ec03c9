"""Rendering synthetic tissue: texture banks, nucleus stamps and the per-window renderer, at physical scale."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.slides.looks import ScannerLook, hue_rotated, stripe_od
from wsitk.shared.slides.synth.layout import Layout, build_layout
from wsitk.shared.slides.synth.spec import (
    BORDER_ROUGHNESS_UM,
    COARSE_SIGMA_UM,
    EOSIN_OD,
    FIBRE_SIGMA_UM,
    GLASS_OD,
    GLASS_OD_NOISE,
    GRAIN_SIGMA_UM,
    HAEMATOXYLIN_OD,
    MIMIC_CLASSES,
    NORMAL,
    NUCLEUS_CELL_PX,
    PATCH_KINDS,
    STAMP_MODE_MIN_RADIUS_PX,
    STAMPS_PER_CLASS,
    TEXTURE_PERIODS,
    TISSUE_EDGE_UM,
    TUMOUR,
    TUMOUR_EDGE_UM,
    TUMOUR_SUBTLE,
    FloatArray,
    IntArray,
    SynthSpec,
    TissueClass,
)

# ---------------------------------------------------------------------------------------------------------
# Texture: periodic noise banks and nucleus stamps at the physical scale of one rendered downsample
# ---------------------------------------------------------------------------------------------------------


def _periodic_noise(
    rng: np.random.Generator, period: int, sigma_px: tuple[float, float], angle: float
) -> FloatArray:
    """Gaussian-filtered white noise that tiles seamlessly with the given period, unit standard deviation."""
    from scipy import fft

    white = rng.standard_normal((period, period), dtype=np.float32)
    fy = np.fft.fftfreq(period).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(period).astype(np.float32)[None, :]
    along = fx * np.float32(math.cos(angle)) + fy * np.float32(math.sin(angle))
    across = fy * np.float32(math.cos(angle)) - fx * np.float32(math.sin(angle))
    scale = np.float32(-2 * math.pi**2)
    transfer = np.exp(scale * ((sigma_px[0] * along) ** 2 + (sigma_px[1] * across) ** 2))
    noise = fft.irfft2(fft.rfft2(white) * transfer, s=(period, period))
    noise -= noise.mean()
    noise /= noise.std() + 1e-12
    return np.asarray(noise, np.float32)


class TextureBank:
    """Noise channels (grain, fibre, coarse) for one pixel size, sampled by absolute pixel position.

    Each channel is the sum of two seamless periodic fields with different periods, so texture is continuous
    across tiles and never visibly repeats, and sampling it costs a slice.
    """

    CHANNELS = ("grain", "fibre", "coarse")

    def __init__(self, seed: int, mpp_eff: float, pad: int = NUCLEUS_CELL_PX) -> None:
        self.pad = pad
        self.banks: list[tuple[int, FloatArray]] = []
        self.amplitudes = np.ones(len(self.CHANNELS), np.float32)
        sigmas_um = [(GRAIN_SIGMA_UM, GRAIN_SIGMA_UM), FIBRE_SIGMA_UM, (COARSE_SIGMA_UM, COARSE_SIGMA_UM)]
        for bank_index, period in enumerate(TEXTURE_PERIODS):
            rng = np.random.default_rng([seed, 3, bank_index])
            channels = []
            for channel_index, sigma_um in enumerate(sigmas_um):
                sigma_px = (sigma_um[0] / mpp_eff, sigma_um[1] / mpp_eff)
                # Texture finer than a pixel averages out: clamp the filter, shrink the amplitude instead.
                shrink = min(1.0, math.sqrt(sigma_px[0] * sigma_px[1]) / 0.6)
                self.amplitudes[channel_index] = shrink
                clamped = (max(sigma_px[0], 0.6), max(sigma_px[1], 0.6))
                angle = rng.uniform(0, math.pi)
                channels.append(_periodic_noise(rng, period, clamped, angle))
            stacked = np.stack(channels)
            self.banks.append((period, np.pad(stacked, ((0, 0), (0, pad), (0, pad)), mode="wrap")))

    def sample(self, x0: int, y0: int, width: int, height: int) -> FloatArray:
        """(3, height, width) noise, unit variance at full resolution, scaled down where sub-pixel."""
        total = np.zeros((len(self.CHANNELS), height, width), np.float32)
        for period, bank in self.banks:
            oy, ox = y0 % period, x0 % period
            if width <= self.pad and height <= self.pad:
                total += bank[:, oy : oy + height, ox : ox + width]
            else:
                rows = (oy + np.arange(height)) % period
                cols = (ox + np.arange(width)) % period
                total += bank[:, rows[:, None], cols[None, :]]
        total *= (self.amplitudes / math.sqrt(len(self.banks)))[:, None, None]
        return total

    def sample_points(self, channel: int, xs: IntArray, ys: IntArray) -> FloatArray:
        """One channel at arbitrary pixel positions; equals ``sample`` at those pixels."""
        total = np.zeros(xs.shape, np.float32)
        for period, bank in self.banks:
            total += bank[channel, ys % period, xs % period]
        return total * np.float32(self.amplitudes[channel] / math.sqrt(len(self.banks)))


@dataclass
class StampSet:
    """Anti-aliased nucleus shapes for one tissue class at one pixel size, as sparse pixel lists.

    Row k holds stamp k's covered pixels (offsets from the centre, coverage), padded with zero coverage to a
    common length so that many nuclei are drawn with one gather and one bincount.
    """

    offsets_y: NDArray[np.int32]  # (STAMPS_PER_CLASS, pixels)
    offsets_x: NDArray[np.int32]
    coverage: NDArray[np.float32]
    reach: int  # max |offset|: nuclei farther than this from a window cannot touch it


def _make_stamps(tissue_class: TissueClass, mpp_eff: float, seed: int) -> StampSet | None:
    """Nucleus stamps, or None when nuclei are too small in pixels to draw (coverage-field mode)."""
    radius_px = tissue_class.radius_um[0] / mpp_eff
    if radius_px < STAMP_MODE_MIN_RADIUS_PX:
        return None
    rng = np.random.default_rng([seed, 4, tissue_class.class_id])
    max_extent = (
        tissue_class.radius_um[1] / mpp_eff * tissue_class.aspect[1] * (1 + tissue_class.irregularity[1])
    )
    reach = math.ceil(max_extent) + 1
    supersample = tissue_class.stamp_supersample
    side = 2 * reach + 1
    sub = (np.arange(side * supersample) + 0.5) / supersample - (reach + 0.5)
    sub_y, sub_x = np.meshgrid(sub, sub, indexing="ij")
    stamps: list[tuple[NDArray[np.int32], NDArray[np.int32], NDArray[np.float32]]] = []
    for _ in range(STAMPS_PER_CLASS):
        radius = rng.uniform(*tissue_class.radius_um) / mpp_eff
        aspect = rng.uniform(*tissue_class.aspect)
        angle = rng.uniform(0, math.pi)
        along = sub_x * math.cos(angle) + sub_y * math.sin(angle)
        across = -sub_x * math.sin(angle) + sub_y * math.cos(angle)
        theta = np.arctan2(across * aspect, along)
        perturbation = np.ones_like(theta)
        for harmonic in (2, 3, 5):
            amplitude = rng.uniform(*tissue_class.irregularity) / harmonic * 2
            perturbation = perturbation + amplitude * np.cos(harmonic * theta + rng.uniform(0, 2 * math.pi))
        distance = np.sqrt(
            (along / (radius * math.sqrt(aspect))) ** 2 + (across * math.sqrt(aspect) / radius) ** 2
        )
        inside = (distance <= perturbation).astype(np.float32)
        coverage = inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
        nonzero_y, nonzero_x = np.nonzero(coverage > 0.02)
        stamps.append(
            (
                (nonzero_y - reach).astype(np.int32),
                (nonzero_x - reach).astype(np.int32),
                coverage[nonzero_y, nonzero_x].astype(np.float32),
            )
        )
    length = max(len(stamp[2]) for stamp in stamps)
    result = StampSet(
        offsets_y=np.zeros((STAMPS_PER_CLASS, length), np.int32),
        offsets_x=np.zeros((STAMPS_PER_CLASS, length), np.int32),
        coverage=np.zeros((STAMPS_PER_CLASS, length), np.float32),
        reach=reach,
    )
    for index, (offsets_y, offsets_x, coverage) in enumerate(stamps):
        result.offsets_y[index, : len(coverage)] = offsets_y
        result.offsets_x[index, : len(coverage)] = offsets_x
        result.coverage[index, : len(coverage)] = coverage
    return result


@dataclass
class NucleusCell:
    """Nuclei of one tissue class whose centres fall in one grid cell (absolute rendered-level pixels)."""

    xs: IntArray
    ys: IntArray
    stamp: NDArray[np.uint8]
    haematoxylin: NDArray[np.float32]
    keep: NDArray[np.float32]  # uniform draw, compared with the class membership at the centre


# ---------------------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------------------


class Renderer:
    """Renders any window of a slide (or of uniform tissue) at an integer downsample of level 0.

    Pixels depend only on (seed, layout, downsample, absolute position), never on the window's size or on
    what was rendered before, so stored tiles, ``render_region`` and neighbouring tiles agree.
    """

    def __init__(
        self,
        layout: Layout,
        mpp: float,
        seed: int,
        stain_scale: tuple[float, float] = (1.0, 1.0),
        *,
        illumination_od: tuple[float, float, float] = (0.0, 0.0, 0.0),
        nucleus_scale: float = 1.0,
        look: ScannerLook | None = None,
        tumour_look: str = "classic",
    ):
        self.layout = layout
        self.mpp = mpp
        self.seed = seed
        self.look = look or ScannerLook()
        self.eosin_scale, self.haematoxylin_scale = stain_scale
        if self.look.stain_intensity != (1.0, 1.0):
            self.eosin_scale *= self.look.stain_intensity[0]
            self.haematoxylin_scale *= self.look.stain_intensity[1]
        # None when neutral, so that a neutral renderer does not even add zeros (bytes stay as they were).
        self.illumination_od = np.asarray(illumination_od, np.float32) if any(illumination_od) else None
        if self.look.white_rgb is not None:
            # The glass white point is the illumination: an OD offset that takes the reference glass
            # (GLASS_OD) to the look's white, added to glass and tissue alike.
            white_od = -np.log(np.asarray(self.look.white_rgb, np.float64) / 255.0) - GLASS_OD
            self.illumination_od = (np.asarray(illumination_od, np.float64) + white_od).astype(np.float32)
        self.eosin_od, self.haematoxylin_od = EOSIN_OD, HAEMATOXYLIN_OD
        if self.look.stain_hue_deg != (0.0, 0.0):
            self.eosin_od = hue_rotated(EOSIN_OD, self.look.stain_hue_deg[0])
            self.haematoxylin_od = hue_rotated(HAEMATOXYLIN_OD, self.look.stain_hue_deg[1])
        tumour_class = TUMOUR_SUBTLE if tumour_look == "subtle" else TUMOUR
        self.normal, self.tumour = NORMAL, tumour_class
        if nucleus_scale != 1.0:
            self.normal, self.tumour = (
                dataclasses.replace(
                    tissue_class,
                    radius_um=(
                        tissue_class.radius_um[0] * nucleus_scale,
                        tissue_class.radius_um[1] * nucleus_scale,
                    ),
                )
                for tissue_class in (NORMAL, tumour_class)
            )
        # Mimics or a subtle tumour: every class blended by membership (_render_classes). Otherwise the
        # original two-class path, whose bytes must not change.
        self.mimic_classes = {
            name: dataclasses.replace(
                MIMIC_CLASSES[name],
                radius_um=(
                    MIMIC_CLASSES[name].radius_um[0] * nucleus_scale,
                    MIMIC_CLASSES[name].radius_um[1] * nucleus_scale,
                ),
            )
            for name in layout.mimic_sdfs
        }
        self.by_classes = layout.constant is None and (bool(layout.mimic_sdfs) or tumour_class is not TUMOUR)
        self._banks: OrderedDict[int, TextureBank] = OrderedDict()
        self._stamps: dict[tuple[int, int], StampSet | None] = {}
        self._cells: OrderedDict[tuple[int, int, int, int], NucleusCell] = OrderedDict()
        self._cell_cache_size = 1024

    def cache_rows_of(self, level_width: int) -> None:
        """Keep the nuclei of about three rows of cells of a level this wide: enough for row-major tiling,
        without letting the cache of a very wide slide grow to hundreds of megabytes."""
        self._cell_cache_size = 2 * 3 * (math.ceil(level_width / NUCLEUS_CELL_PX) + 3)

    # -- cached building blocks ------------------------------------------------------------------------

    def _bank(self, downsample: int) -> TextureBank:
        if downsample not in self._banks:
            self._banks[downsample] = TextureBank(self.seed + 7919 * downsample, self.mpp * downsample)
            while len(self._banks) > 2:
                self._banks.popitem(last=False)
        self._banks.move_to_end(downsample)
        return self._banks[downsample]

    def _stamp_set(self, tissue_class: TissueClass, downsample: int) -> StampSet | None:
        key = (tissue_class.class_id, downsample)
        if key not in self._stamps:
            self._stamps[key] = _make_stamps(tissue_class, self.mpp * downsample, self.seed + downsample)
        return self._stamps[key]

    def _cell(self, tissue_class: TissueClass, downsample: int, cell_x: int, cell_y: int) -> NucleusCell:
        key = (tissue_class.class_id, downsample, cell_x, cell_y)
        cached = self._cells.get(key)
        if cached is not None:
            self._cells.move_to_end(key)
            return cached
        rng = np.random.default_rng(
            [self.seed, 5, tissue_class.class_id, downsample, cell_x % 2**32, cell_y % 2**32]
        )
        cell_um = NUCLEUS_CELL_PX * self.mpp * downsample
        count = int(rng.poisson(tissue_class.nuclei_per_um2 * cell_um * cell_um))
        cell = NucleusCell(
            xs=(cell_x * NUCLEUS_CELL_PX + rng.integers(0, NUCLEUS_CELL_PX, count)).astype(np.int32),
            ys=(cell_y * NUCLEUS_CELL_PX + rng.integers(0, NUCLEUS_CELL_PX, count)).astype(np.int32),
            stamp=rng.integers(0, STAMPS_PER_CLASS, count).astype(np.uint8),
            haematoxylin=rng.uniform(
                tissue_class.haematoxylin[0], tissue_class.haematoxylin[1], count
            ).astype(np.float32),
            keep=rng.random(count, dtype=np.float32),
        )
        self._cells[key] = cell
        while len(self._cells) > self._cell_cache_size:
            self._cells.popitem(last=False)
        return cell

    # -- nuclei ----------------------------------------------------------------------------------------

    def _draw_nuclei(
        self,
        tissue_class: TissueClass,
        stamps: StampSet,
        downsample: int,
        window: tuple[int, int, int, int],
        coverage_sum: NDArray[np.float64],
        haematoxylin_sum: NDArray[np.float64],
        class_weight: Callable[[IntArray, IntArray, FloatArray], FloatArray] | None = None,
    ) -> None:
        x0, y0, width, height = window
        reach = stamps.reach
        cells_x = range((x0 - reach) // NUCLEUS_CELL_PX, (x0 + width + reach) // NUCLEUS_CELL_PX + 1)
        cells_y = range((y0 - reach) // NUCLEUS_CELL_PX, (y0 + height + reach) // NUCLEUS_CELL_PX + 1)
        cells = [self._cell(tissue_class, downsample, cx, cy) for cy in cells_y for cx in cells_x]
        xs = np.concatenate([c.xs for c in cells])
        ys = np.concatenate([c.ys for c in cells])
        near = (
            (xs >= x0 - reach) & (xs < x0 + width + reach) & (ys >= y0 - reach) & (ys < y0 + height + reach)
        )
        if not near.any():
            return
        xs, ys = xs[near], ys[near]
        stamp = np.concatenate([c.stamp for c in cells])[near]
        haematoxylin = np.concatenate([c.haematoxylin for c in cells])[near]
        keep = np.concatenate([c.keep for c in cells])[near]
        mpp_eff = self.mpp * downsample
        roughness = self._bank(downsample).sample_points(2, xs, ys) * np.float32(
            BORDER_ROUGHNESS_UM / mpp_eff
        )
        if class_weight is None:
            tissue, tumour = self.layout.point_memberships(downsample, xs, ys, mpp_eff, roughness)
            membership = tissue * (tumour if tissue_class.class_id == TUMOUR.class_id else 1 - tumour)
        else:
            membership = class_weight(xs, ys, roughness)
        chosen = keep < membership
        if not chosen.any():
            return
        xs, ys, stamp, haematoxylin = xs[chosen] - x0, ys[chosen] - y0, stamp[chosen], haematoxylin[chosen]
        pixel_y = ys[:, None] + stamps.offsets_y[stamp]
        pixel_x = xs[:, None] + stamps.offsets_x[stamp]
        coverage = stamps.coverage[stamp]
        inside = (pixel_y >= 0) & (pixel_y < height) & (pixel_x >= 0) & (pixel_x < width) & (coverage > 0)
        flat = (pixel_y * width + pixel_x)[inside]
        weights = coverage[inside]
        coverage_sum += np.bincount(flat, weights, minlength=width * height)
        weighted_haematoxylin = (coverage * haematoxylin[:, None])[inside]
        haematoxylin_sum += np.bincount(flat, weighted_haematoxylin, minlength=width * height)

    @staticmethod
    def _coverage_field(
        tissue_class: TissueClass, mpp_eff: float, grain: FloatArray
    ) -> tuple[FloatArray, float]:
        """Expected nuclear coverage per pixel where nuclei are sub-pixel, with counting noise."""
        mean_coverage = 1 - math.exp(-tissue_class.nuclei_per_um2 * tissue_class.mean_nucleus_area_um2)
        pixel_area = mpp_eff * mpp_eff
        spread = math.sqrt(
            mean_coverage * (1 - mean_coverage) * min(1.0, tissue_class.mean_nucleus_area_um2 / pixel_area)
        )
        coverage = np.clip(mean_coverage + spread * grain, 0, 1).astype(np.float32)
        return coverage, float(np.mean(tissue_class.haematoxylin))

    # -- the window ------------------------------------------------------------------------------------

    def render(
        self,
        downsample: int,
        x0: int,
        y0: int,
        width: int,
        height: int,
        stain_scale: tuple[float, float] | None = None,
    ) -> NDArray[np.uint8]:
        """RGB uint8 (height, width, 3) of the window at pixel (x0, y0) of the level with this downsample.

        ``stain_scale`` (eosin, haematoxylin strength) overrides the renderer's per-slide staining.
        """
        eosin_scale, haematoxylin_scale = stain_scale or (self.eosin_scale, self.haematoxylin_scale)
        mpp_eff = self.mpp * downsample
        noise = self._bank(downsample).sample(x0, y0, width, height)
        grain, fibre, coarse = noise[0], noise[1], noise[2]
        optical_density = np.empty((height, width, 3), np.float32)
        glass = GLASS_OD + GLASS_OD_NOISE * grain
        optical_density[...] = glass[..., None]

        tissue, tumour = self._memberships(downsample, x0, y0, width, height, mpp_eff, coarse)
        if tissue is not None and not tissue.any():
            return self._to_rgb(optical_density, downsample, x0)
        tissue_weight = np.float32(1.0) if tissue is None else tissue
        tumour_weight = np.float32(0.0) if tumour is None else tumour
        if self.by_classes:
            return self._render_classes(
                downsample,
                (x0, y0, width, height),
                noise,
                optical_density,
                tissue_weight,
                tumour_weight,
                (eosin_scale, haematoxylin_scale),
            )

        stroma_eosin = NORMAL.stroma_eosin + (TUMOUR.stroma_eosin - NORMAL.stroma_eosin) * tumour_weight
        stroma_haem = (
            NORMAL.stroma_haematoxylin
            + (TUMOUR.stroma_haematoxylin - NORMAL.stroma_haematoxylin) * tumour_weight
        )
        eosin = stroma_eosin * (1 + 0.12 * coarse + 0.22 * fibre + 0.05 * grain)

        coverage_sum = np.zeros(width * height, np.float64)
        haematoxylin_sum = np.zeros(width * height, np.float64)
        for tissue_class, weight in (
            (self.normal, tissue_weight * (1 - tumour_weight)),
            (self.tumour, tissue_weight * tumour_weight),
        ):
            if not np.any(weight):
                continue
            stamps = self._stamp_set(tissue_class, downsample)
            if stamps is not None:
                self._draw_nuclei(
                    tissue_class, stamps, downsample, (x0, y0, width, height), coverage_sum, haematoxylin_sum
                )
            else:
                field_coverage, field_haem = self._coverage_field(tissue_class, mpp_eff, grain)
                weighted = (field_coverage * weight).ravel()
                coverage_sum += weighted
                haematoxylin_sum += weighted * field_haem
        nuclear_coverage = np.minimum(coverage_sum, 1.0).reshape(height, width).astype(np.float32)
        nuclear_haem = (haematoxylin_sum / np.maximum(coverage_sum, 1e-6)).reshape(height, width)
        nuclear_haem = nuclear_haem.astype(np.float32) * (1 + 0.18 * grain)

        eosin = eosin * (1 - 0.55 * nuclear_coverage) * (tissue_weight * eosin_scale)
        haematoxylin = stroma_haem * (1 + 0.3 * coarse) * tissue_weight + nuclear_coverage * nuclear_haem
        haematoxylin = np.maximum(haematoxylin, 0) * haematoxylin_scale
        optical_density += np.maximum(eosin, 0)[..., None] * self.eosin_od
        optical_density += haematoxylin[..., None] * self.haematoxylin_od
        return self._to_rgb(optical_density, downsample, x0)

    def _render_classes(
        self,
        downsample: int,
        window: tuple[int, int, int, int],
        noise: FloatArray,
        optical_density: FloatArray,
        tissue: FloatArray | np.float32,
        tumour: FloatArray | np.float32,
        stain_scale: tuple[float, float],
    ) -> NDArray[np.uint8]:
        """The window with every class (normal, tumour, mimics) blended by membership; fat clears stroma."""
        from wsitk.shared.slides.synth.mimics import (
            FAT_VACUOLES,
            compose,
            point_class_weight,
            window_mimic_memberships,
        )

        x0, _, width, height = window
        grain, fibre, coarse = noise[0], noise[1], noise[2]
        mpp_eff = self.mpp * downsample
        classes = {"normal": self.normal, "tumour": self.tumour, **self.mimic_classes}
        mimics = window_mimic_memberships(self.layout, downsample, window, mpp_eff, coarse)
        shares = compose(tumour, mimics)
        stroma_eosin = sum(share * classes[name].stroma_eosin for name, share in shares)
        stroma_haem = sum(share * classes[name].stroma_haematoxylin for name, share in shares)
        eosin = stroma_eosin * (1 + 0.12 * coarse + 0.22 * fibre + 0.05 * grain)

        def weight_of(name: str) -> Callable[[IntArray, IntArray, FloatArray], FloatArray]:
            def weight(xs: IntArray, ys: IntArray, roughness: FloatArray) -> FloatArray:
                return point_class_weight(self.layout, name, downsample, xs, ys, mpp_eff, roughness)

            return weight

        size = width * height
        coverage_sum, haematoxylin_sum = np.zeros(size, np.float64), np.zeros(size, np.float64)
        clear_sum, unused = np.zeros(size, np.float64), np.zeros(size, np.float64)
        drawn = [(name, classes[name], share, coverage_sum, haematoxylin_sum) for name, share in shares]
        if "fat" in classes:
            fat_share = next(share for name, share in shares if name == "fat")
            drawn.append(("fat", FAT_VACUOLES, fat_share, clear_sum, unused))
        for name, tissue_class, share, target, target_haem in drawn:
            weight = tissue * share
            if not np.any(weight):
                continue
            stamps = self._stamp_set(tissue_class, downsample)
            if stamps is not None:
                self._draw_nuclei(
                    tissue_class, stamps, downsample, window, target, target_haem, weight_of(name)
                )
            else:
                field_coverage, field_haem = self._coverage_field(tissue_class, mpp_eff, grain)
                weighted = (field_coverage * weight).ravel()
                np.add(target, weighted, out=target)
                np.add(target_haem, weighted * field_haem, out=target_haem)
        cleared = 1 - np.minimum(clear_sum, 1.0).reshape(height, width).astype(np.float32)
        nuclear_coverage = np.minimum(coverage_sum, 1.0).reshape(height, width).astype(np.float32)
        nuclear_haem = (haematoxylin_sum / np.maximum(coverage_sum, 1e-6)).reshape(height, width)
        nuclear_haem = nuclear_haem.astype(np.float32) * (1 + 0.18 * grain)

        eosin = eosin * cleared * (1 - 0.55 * nuclear_coverage) * (tissue * stain_scale[0])
        haematoxylin = stroma_haem * cleared * (1 + 0.3 * coarse) * tissue + nuclear_coverage * nuclear_haem
        haematoxylin = np.maximum(haematoxylin, 0) * stain_scale[1]
        optical_density += np.maximum(eosin, 0)[..., None] * self.eosin_od
        optical_density += haematoxylin[..., None] * self.haematoxylin_od
        return self._to_rgb(optical_density, downsample, x0)

    def _to_rgb(self, optical_density: FloatArray, downsample: int, x0: int) -> NDArray[np.uint8]:
        """RGB from optical density, after the scanner's colour cast and white point and its strip
        boundaries (they darken or tint glass and tissue alike)."""
        if self.illumination_od is not None:
            optical_density += self.illumination_od
        if self.look.stripe_period_um > 0:
            pixel_um = self.mpp * downsample
            x_um = (np.arange(x0, x0 + optical_density.shape[1], dtype=np.float64) + 0.5) * pixel_um
            bands = stripe_od(x_um, pixel_um, self.look.stripe_period_um, self.look.stripe_depth)
            optical_density += bands[None, :, None]
        return _to_rgb(optical_density)

    def _memberships(
        self, downsample: int, x0: int, y0: int, width: int, height: int, mpp_eff: float, coarse: FloatArray
    ) -> tuple[FloatArray | None, FloatArray | None]:
        """Per-pixel tissue and tumour membership (0..1), or None where the layout is uniform."""
        if self.layout.constant is not None:
            tissue_value, tumour_value = self.layout.constant
            tissue = np.full((height, width), tissue_value, np.float32)
            tumour = np.full((height, width), tumour_value, np.float32)
            return tissue, tumour
        tissue_px, tumour_px = self.layout.window_distances(downsample, x0, y0, width, height)
        roughness = BORDER_ROUGHNESS_UM / mpp_eff
        tissue = np.clip(0.5 + (tissue_px + roughness * coarse) / max(1.0, TISSUE_EDGE_UM / mpp_eff), 0, 1)
        if tumour_px is None:
            return tissue, None
        tumour = np.clip(0.5 + (tumour_px + roughness * coarse) / max(1.0, TUMOUR_EDGE_UM / mpp_eff), 0, 1)
        return tissue, tumour


def _to_rgb(optical_density: FloatArray) -> NDArray[np.uint8]:
    intensity = np.exp(-optical_density)
    intensity *= 255.0
    intensity += 0.5
    np.clip(intensity, 0, 255, out=intensity)
    return intensity.astype(np.uint8)


def _stain_scale(seed: int, jitter: float) -> tuple[float, float]:
    """Per-slide staining strength, as real batches vary: tests stain normalisation a little."""
    rng = np.random.default_rng([seed, 6])
    return float(1 + rng.uniform(-jitter, jitter)), float(1 + rng.uniform(-jitter, jitter))


def _slide_renderer(spec: SynthSpec, layout: Layout | None = None) -> Renderer:
    eosin, haematoxylin = _stain_scale(spec.seed, spec.stain_jitter)
    eosin_shift, haematoxylin_shift = spec.stain_shift
    return Renderer(
        layout or build_layout(spec),
        spec.mpp,
        spec.seed,
        (eosin * eosin_shift, haematoxylin * haematoxylin_shift),  # x 1.0 is exact: default bytes unchanged
        illumination_od=spec.illumination_od,
        nucleus_scale=spec.nucleus_scale,
        look=spec.look,
        tumour_look=spec.tumour_look,
    )


# ---------------------------------------------------------------------------------------------------------
# Public rendering helpers
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _patch_renderer(kind: str, mpp: float) -> Renderer:
    return Renderer(Layout.uniform(kind), mpp, seed=0x5EED)


def render_patch(kind: str, size_px: int, mpp: float, rng: np.random.Generator) -> NDArray[np.uint8]:
    """A standalone (size_px, size_px, 3) uint8 patch of "background", "normal" or "tumour" tissue.

    Same look as slide tiles at that MPP (same stains, same nuclei, same physical scale); the patch position
    in an endless texture and a mild staining variation are drawn from ``rng``, so a seeded generator gives
    reproducible training bags without writing whole slides.
    """
    if kind not in PATCH_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(PATCH_KINDS)}")
    if not 8 <= size_px <= 4096:
        raise ValueError(f"size_px {size_px} must be within 8..4096")
    if not 0.05 <= mpp <= 20:
        raise ValueError(f"mpp {mpp} must be within 0.05..20 um/px")
    renderer = _patch_renderer(kind, round(float(mpp), 6))
    x0, y0 = (int(v) for v in rng.integers(0, 2**24, 2))
    eosin_scale, haematoxylin_scale = (float(v) for v in 1 + rng.uniform(-0.06, 0.06, 2))
    return renderer.render(1, x0, y0, size_px, size_px, stain_scale=(eosin_scale, haematoxylin_scale))


def render_region(
    spec: SynthSpec, x0: int, y0: int, width: int, height: int, downsample: int = 1
) -> NDArray[np.uint8]:
    """Pixels of the slide ``spec`` describes, without writing it: (height, width, 3) uint8.

    Like OpenSlide's ``read_region``, (x0, y0) is in level-0 pixels and (width, height) in pixels of the
    output downsample. At a pyramid downsample (1, 4, 16...) and a position on that level's pixel grid the
    result equals the decoded stored tiles up to JPEG loss.
    """
    if downsample < 1 or width < 1 or height < 1:
        raise ValueError("downsample, width and height must be positive")
    return _slide_renderer(spec).render(downsample, x0 // downsample, y0 // downsample, width, height)
