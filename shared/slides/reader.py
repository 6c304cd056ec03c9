"""Open, validate and describe one slide file: the gate every slide passes at ingest.

Ingest must turn any uploaded file into either a trustworthy description of a slide or a rejection a
person can act on (DESIGN.md sections 2 and 6). ``inspect_slide`` runs its checks cheapest first and
stops at the first failure, raising ``SlideRejected`` with a short ``code`` and a ``reason``:

1. the file is non-empty (``empty-file``);
2. OpenSlide recognises its format (``OpenSlide.detect_format``); when it does not, the first bytes
   tell a file in an image container OpenSlide cannot use as a slide (a striped TIFF, a JPEG, a zip:
   ``unsupported-format``) from something that is no image at all (``not-a-slide``);
3. OpenSlide opens it (``unopenable``);
4. the claimed dimensions of every level fit ``max_pixels`` (``absurd-dimensions``), checked from the
   header alone, before a single pixel is allocated; and level 0 is at least ``min_side_px`` wide and
   high (``too-small``);
5. pixels decode: a small region of the lowest-resolution level and one stored tile of level 0 near the
   centre (``unreadable-pixels``, with OpenSlide's own error text, e.g. "Bogus marker length");
6. the physical resolution is known (``no-mpp``, policy below);
7. no metadata field exceeds ``max_field_bytes`` and the metadata that will travel in events fits
   ``max_property_bytes`` (``metadata-too-large``).

MPP policy (micrometres per level-0 pixel; tiling is physical, never "a pyramid level"):
``openslide.mpp-x/y`` when present and plausible (source ``"properties"``); otherwise the objective
power, ``mpp = 10 / power`` (source ``"objective-power"``: an approximation, 20x ~ 0.5 um/px and 40x ~
0.25 um/px hold for common scanners to within about 10%); otherwise the operator's explicit
``mpp_override`` (source ``"override"``, setting ``WSI_MPP_OVERRIDE``); otherwise rejection. A
per-slide override a lab registered (``slide_override``, ``wsi mpp set``; profile field
``slide_mpp_override``) comes before all of them (source ``"slide-override"``): it corrects a file
whose own MPP is wrong as well as one that has none. Values
outside ``PLAUSIBLE_MPP`` are ignored as not microscopic: a generic TIFF saved by an image editor
carries a 72 dpi default that OpenSlide turns into 352.8 um/px, which is not a measurement.

De-identification policy: ``SlideInfo.properties_kept`` holds only properties on an allow-list of
geometry and optics (vendor, MPP, objective power, level sizes and tiling, bounds, ICC size, TIFF
resolution tags, associated image sizes, OpenSlide's quickhash). Everything else is dropped, in
particular free text and identifiers: ``aperio.Filename``, ``aperio.Date``, ``aperio.Time``,
``aperio.User``, barcodes, ``tiff.ImageDescription``, ``openslide.comment`` (a copy of it),
``tiff.DateTime``, ``tiff.Artist``, ``tiff.HostComputer``, scanner serial numbers. An allow-list,
not a deny-list, because vendors add new identifying fields faster than anyone can list them. The
associated images (label, macro: often a photo of the handwritten label) are reported by name only and
never read here. ``allow_identifying=True`` keeps every property, for deployments that are allowed to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wsitk.shared.errors import PermanentError

if TYPE_CHECKING:
    import openslide

#: Level-0 resolutions (um/px) accepted as a real measurement: from beyond the optical limit of
#: any brightfield scanner to a 0.5x overview. Metadata outside is treated as absent.
PLAUSIBLE_MPP = (0.05, 20.0)
#: Objective powers accepted for the 10/power approximation.
PLAUSIBLE_OBJECTIVE_POWER = (1.0, 150.0)

#: Properties that may leave ingest: exact names and patterns of geometry/optics, nothing free-text.
KEPT_PROPERTY_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern)
    for pattern in (
        r"openslide\.vendor",
        r"openslide\.mpp-[xy]",
        r"openslide\.objective-power",
        r"openslide\.level-count",
        r"openslide\.level\[\d+\]\.(width|height|downsample|tile-width|tile-height)",
        r"openslide\.bounds-(x|y|width|height)",
        r"openslide\.icc-size",
        r"openslide\.quickhash-1",
        r"openslide\.associated\.[A-Za-z0-9_-]+\.(width|height)",
        r"tiff\.(ResolutionUnit|XResolution|YResolution)",
        r"aperio\.(AppMag|MPP)",
        r"hamamatsu\.(SourceLens|XResolution|YResolution|ResolutionUnit)",
        r"mirax\.GENERAL\.(OBJECTIVE_MAGNIFICATION|SLIDE_TYPE)",
        r"leica\.(objective|aperture)",
        r"philips\.DICOM_PIXEL_SPACING",
        r"ventana\.(Magnification|ScanRes)",
        r"dicom\.(PixelSpacing|ObjectiveLensPower)",
    )
)

_LOWEST_LEVEL_PROBE_PX = 64
_MAX_PROBE_TILE_PX = 1024
_DEFAULT_TILE_PX = 256
_HEADER_BYTES = 132


class SlideRejected(PermanentError):
    """A slide that can never be processed as it is.

    ``code`` is short kebab-case for machines and metrics (see the module docstring for the list);
    ``reason`` says in one or two sentences, for a person, what was wrong with which file and what to do.
    It is a ``PermanentError``: retrying the same bytes cannot succeed, so it goes straight to an
    explicit rejected outcome instead of being retried.
    """


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level as OpenSlide reports it; tile sizes are 0 when the format does not say."""

    width: int
    height: int
    downsample: float
    tile_width: int
    tile_height: int


@dataclass(frozen=True)
class Mpp:
    """Level-0 physical resolution in micrometres per pixel and where it came from."""

    x: float
    y: float
    source: str  # "properties" | "objective-power" | "override" | "slide-override"


@dataclass(frozen=True)
class SlideInfo:
    """What ingest knows about a slide that passed every check; safe to put in an event."""

    vendor: str
    width: int
    height: int
    levels: tuple[LevelInfo, ...]
    mpp_x: float
    mpp_y: float
    mpp_source: str
    objective_power: float | None
    has_icc_profile: bool
    associated_images: tuple[str, ...]
    file_size: int
    properties_kept: dict[str, str] = field(default_factory=dict)

    @property
    def level_downsamples(self) -> list[float]:
        return [level.downsample for level in self.levels]


def _parse_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _plausible(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def mpp_for(
    slide_props: Mapping[str, str],
    override: float = 0.0,
    *,
    file_name: str = "slide",
    slide_override: float = 0.0,
) -> Mpp:
    """Level-0 MPP by the documented policy (module docstring), or ``SlideRejected("no-mpp")``.

    ``override`` fills in a missing MPP (``WSI_MPP_OVERRIDE``); ``slide_override`` (the lab's value for
    this one slide) replaces whatever the file says. Shared by ingest and the tiler so that both always
    agree on the physical scale of a slide.
    """
    if slide_override > 0:
        return Mpp(slide_override, slide_override, "slide-override")
    mpp_x = _parse_float(slide_props.get("openslide.mpp-x"))
    mpp_y = _parse_float(slide_props.get("openslide.mpp-y"))
    if (
        mpp_x is not None
        and mpp_y is not None
        and _plausible(mpp_x, PLAUSIBLE_MPP)
        and _plausible(mpp_y, PLAUSIBLE_MPP)
    ):
        return Mpp(mpp_x, mpp_y, "properties")
    power = _parse_float(slide_props.get("openslide.objective-power"))
    if power is not None and _plausible(power, PLAUSIBLE_OBJECTIVE_POWER):
        return Mpp(10.0 / power, 10.0 / power, "objective-power")
    if override > 0:
        return Mpp(override, override, "override")
    if mpp_x is None:
        found = "no microns-per-pixel metadata (openslide.mpp-x)"
    else:
        found = (
            f"no usable microns-per-pixel metadata (openslide.mpp-x is {mpp_x:g} um/px, outside the "
            f"plausible {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g}: typically an image editor's default dpi)"
        )
    raise SlideRejected(
        "no-mpp",
        f"{file_name} has {found} and no objective power; register this slide's resolution with "
        "`wsi mpp set` (then `wsi reprocess` it), set WSI_MPP_OVERRIDE for every such slide, or re-export "
        "it from the scanner software with resolution metadata.",
    )


def kept_properties(properties: Mapping[str, str], *, allow_identifying: bool = False) -> dict[str, str]:
    """The de-identified subset of a slide's properties (allow-list policy, module docstring)."""
    if allow_identifying:
        return dict(properties)
    return {
        key: value
        for key, value in properties.items()
        if any(pattern.fullmatch(key) for pattern in KEPT_PROPERTY_PATTERNS)
    }


def sniff_container(head: bytes) -> str | None:
    """Name the file container from its first bytes, or None when it is no known image container."""
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return "BigTIFF"
    if head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"SQLite format 3\x00"):
        return "SQLite"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"ZISRAWFILE"):
        return "Zeiss CZI"
    return None


def _looks_like_text(head: bytes) -> bool:
    printable = sum(32 <= byte < 127 or byte in (9, 10, 13) for byte in head)
    return len(head) > 0 and printable / len(head) > 0.95


def _reject_unrecognised(path: Path, head: bytes) -> SlideRejected:
    container = sniff_container(head)
    if container is None:
        # Describe the bytes instead of quoting them: a text file may hold a name or a case number.
        looks_like = "text" if _looks_like_text(head) else "an unknown binary header"
        return SlideRejected(
            "not-a-slide",
            f"{path.name} is not a slide: it starts with {looks_like}, matching no format OpenSlide reads "
            "(SVS/TIFF, NDPI, MRXS, SCN, BIF, DICOM, ...); upload the file the scanner software exported.",
        )
    return SlideRejected(
        "unsupported-format",
        f"{path.name} is a {container} file, but not one OpenSlide 4 can read as a slide (a TIFF must be "
        "tiled and pyramidal); upload the scanner's original export, or convert it, e.g. "
        "`vips tiffsave in out.tiff --tile --pyramid --compression jpeg`.",
    )


def _levels(slide: openslide.OpenSlide) -> tuple[LevelInfo, ...]:
    props = slide.properties
    levels = []
    for index, ((width, height), downsample) in enumerate(
        zip(slide.level_dimensions, slide.level_downsamples, strict=True)
    ):
        tile_width = int(_parse_float(props.get(f"openslide.level[{index}].tile-width")) or 0)
        tile_height = int(_parse_float(props.get(f"openslide.level[{index}].tile-height")) or 0)
        levels.append(LevelInfo(int(width), int(height), float(downsample), tile_width, tile_height))
    return tuple(levels)


def _check_dimensions(path: Path, levels: tuple[LevelInfo, ...], max_pixels: int, min_side_px: int) -> None:
    for index, level in enumerate(levels):
        if level.width <= 0 or level.height <= 0 or level.width * level.height > max_pixels:
            raise SlideRejected(
                "absurd-dimensions",
                f"{path.name} claims {level.width}x{level.height} pixels at level {index}, beyond the "
                f"limit of {max_pixels:,} pixels; its header is corrupt, or the slide is bigger than this "
                "deployment accepts (raise WSI_MAX_SLIDE_PIXELS if it is genuine).",
            )
    base = levels[0]
    if base.width < min_side_px or base.height < min_side_px:
        raise SlideRejected(
            "too-small",
            f"{path.name} is only {base.width}x{base.height} pixels at full resolution, below the minimum "
            f"of {min_side_px} px per side; it is not a whole-slide scan. Upload the full-resolution export.",
        )


def _probe_pixels(path: Path, slide: openslide.OpenSlide, levels: tuple[LevelInfo, ...]) -> None:
    """Decode a little of the coarsest level and one stored tile of level 0, to prove the data is there.

    A header can be intact while the compressed tiles are truncated or corrupt; finding that out now
    gives a rejection at ingest instead of a failure deep in the tiler.
    """
    import openslide as openslide_module

    lowest = len(levels) - 1
    low = levels[lowest]
    probe_w = min(low.width, _LOWEST_LEVEL_PROBE_PX)
    probe_h = min(low.height, _LOWEST_LEVEL_PROBE_PX)
    low_x = int((low.width - probe_w) // 2 * low.downsample)
    low_y = int((low.height - probe_h) // 2 * low.downsample)
    base = levels[0]
    tile_w = min(base.tile_width or _DEFAULT_TILE_PX, _MAX_PROBE_TILE_PX, base.width)
    tile_h = min(base.tile_height or _DEFAULT_TILE_PX, _MAX_PROBE_TILE_PX, base.height)
    centre_x = min(base.width // 2 // tile_w * tile_w, base.width - tile_w)
    centre_y = min(base.height // 2 // tile_h * tile_h, base.height - tile_h)
    probes = [(lowest, (low_x, low_y), (probe_w, probe_h)), (0, (centre_x, centre_y), (tile_w, tile_h))]
    for level, location, size in probes:
        try:
            slide.read_region(location, level, size)
        except (openslide_module.OpenSlideError, OSError, ValueError, MemoryError) as error:
            raise SlideRejected(
                "unreadable-pixels",
                f"{path.name} opens, but its pixels cannot be decoded (level {level} at {location}: "
                f"{error}); the file is corrupt or truncated: upload it again or re-export it from the "
                "scanner software.",
            ) from error


def _has_icc_profile(slide: openslide.OpenSlide) -> bool:
    """Whether the slide embeds an ICC profile; a profile too broken to parse is not worth a rejection."""
    try:
        return slide.color_profile is not None
    except (OSError, ValueError):
        return "openslide.icc-size" in slide.properties


def _check_metadata_size(path: Path, kept: Mapping[str, str], max_property_bytes: int) -> None:
    size = sum(len(key.encode()) + len(value.encode()) for key, value in kept.items())
    if size > max_property_bytes:
        raise SlideRejected(
            "metadata-too-large",
            f"{path.name} carries {size:,} bytes of metadata to publish, more than the limit of "
            f"{max_property_bytes:,}; events must stay small. Turn off allow_identifying (it keeps every "
            "property) or strip the file's free-text metadata before uploading.",
        )


def _check_field_sizes(path: Path, properties: Mapping[str, str], max_field_bytes: int) -> None:
    """One metadata field beyond the limit is no scanner's output: a malformed or crafted file."""
    name, value = max(properties.items(), key=lambda item: len(item[1]), default=("", ""))
    if len(value.encode()) > max_field_bytes:
        raise SlideRejected(
            "metadata-too-large",
            f"{path.name} has a metadata field ({name}) of {len(value.encode()):,} bytes, beyond the limit of "
            f"{max_field_bytes:,}; no scanner writes that much: the file is malformed or crafted. Re-export "
            "the slide from the scanner software.",
        )


def inspect_slide(
    path: Path,
    *,
    max_pixels: int,
    mpp_override: float = 0.0,
    slide_mpp_override: float = 0.0,
    max_property_bytes: int = 1 << 20,
    allow_identifying: bool = False,
    max_field_bytes: int = 1 << 20,
    min_side_px: int = 1,
) -> SlideInfo:
    """Validate ``path`` as a slide and describe it, de-identified; raises ``SlideRejected``.

    The checks and the MPP and de-identification policies are in the module docstring. Decoding
    untrusted files can crash the process in native code: callers that must survive that (ingest)
    run this in a separate process. OSErrors from the local file itself (missing, unreadable) are not
    caught: they are a problem of this machine, not of the slide.
    """
    import openslide as openslide_module

    path = Path(path)
    file_size = path.stat().st_size
    if file_size == 0:
        raise SlideRejected(
            "empty-file",
            f"{path.name} is empty (0 bytes); the upload was probably interrupted: upload the slide again.",
        )
    with path.open("rb") as handle:
        head = handle.read(_HEADER_BYTES)
    vendor = openslide_module.OpenSlide.detect_format(str(path))
    if vendor is None:
        raise _reject_unrecognised(path, head)
    try:
        slide = openslide_module.OpenSlide(str(path))
    except openslide_module.OpenSlideError as error:
        raise SlideRejected(
            "unopenable",
            f"OpenSlide recognises {path.name} as {vendor} but cannot open it ({error}); the file is "
            "corrupt or uses a variant OpenSlide 4 does not support: re-export it from the scanner "
            "software in a standard format (e.g. SVS or tiled pyramidal TIFF).",
        ) from error
    with slide:
        levels = _levels(slide)
        _check_dimensions(path, levels, max_pixels, min_side_px)
        _probe_pixels(path, slide, levels)
        properties = dict(slide.properties)
        mpp = mpp_for(properties, mpp_override, file_name=path.name, slide_override=slide_mpp_override)
        _check_field_sizes(path, properties, max_field_bytes)
        kept = kept_properties(properties, allow_identifying=allow_identifying)
        _check_metadata_size(path, kept, max_property_bytes)
        power = _parse_float(properties.get("openslide.objective-power"))
        return SlideInfo(
            vendor=properties.get("openslide.vendor", vendor),
            width=levels[0].width,
            height=levels[0].height,
            levels=levels,
            mpp_x=mpp.x,
            mpp_y=mpp.y,
            mpp_source=mpp.source,
            objective_power=power,
            has_icc_profile=_has_icc_profile(slide),
            associated_images=tuple(sorted(slide.associated_images.keys())),
            file_size=file_size,
            properties_kept=kept,
        )
