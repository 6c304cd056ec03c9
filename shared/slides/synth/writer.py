"""Writing synthetic slides: pyramidal, tiled, JPEG-compressed SVS/TIFF files, streamed tile by tile, with truth."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from wsitk.shared.slides.artefacts import (
    ARTEFACT_KINDS,
    PEN_COLOURS,
    Artefacts,
    artefact_truth,
    pen_colour_mask,
    plan_artefacts,
    plan_pen_strokes,
    render_with_artefacts,
)
from wsitk.shared.slides.looks import ScannerLook, random_look
from wsitk.shared.slides.synth.layout import Layout, build_layout
from wsitk.shared.slides.synth.render import Renderer, _slide_renderer
from wsitk.shared.slides.synth.spec import (
    GENERATOR_VERSION,
    NUCLEUS_CELL_PX,
    SlideFormat,
    SlideTruth,
    SynthSpec,
    mask_path,
    truth_json_path,
)

# ---------------------------------------------------------------------------------------------------------
# Writing slides
# ---------------------------------------------------------------------------------------------------------

_APERIO_HEADER = "Aperio Image Library v12.0.15"
_FIRST_NAMES = ("JANE", "JOHN", "MARIA", "WEI", "AMIR", "OLGA", "KOFI", "LENA")
_LAST_NAMES = ("DOE", "SMITH", "GARCIA", "MULLER", "TANAKA", "NOWAK", "OKAFOR", "ROSSI")


def identifying_fields(seed: int) -> dict[str, str]:
    """Person- and case-identifying fields of the kind scanners embed; material for de-identification tests."""
    rng = np.random.default_rng([seed, 8])
    first, last = (
        _FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))],
        _LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))],
    )
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    hour, minute, second = int(rng.integers(7, 19)), int(rng.integers(60)), int(rng.integers(60))
    return {
        "Filename": f"PATIENT-{last}-{first}-{100 + seed % 900}",
        "Date": f"{month:02d}/{day:02d}/26",
        "Time": f"{hour:02d}:{minute:02d}:{second:02d}",
        "Time Zone": "GMT+01:00",
        "User": f"{first.lower()}.{last.lower()}@example-hospital.org",
        "ScanScope ID": f"SS{1000 + seed % 9000}",
        "Barcode": f"S26-{10000 + seed % 90000}-A1",
    }


def _aperio_description(spec: SynthSpec, size_line: str) -> str:
    fields = {
        "AppMag": str(spec.objective_power),
        "StripeWidth": "2040",
        **identifying_fields(spec.seed),
        "MPP": f"{spec.mpp:.4f}",
        "Left": "25.0",
        "Top": "18.0",
        "LineCameraSkew": "0",
        "Focus Offset": "0.000000",
        "ImageID": str(100000 + spec.seed),
        "OriginalWidth": str(spec.width),
        "OriginalHeight": str(spec.height),
        "Exposure Time": "109",
        "Exposure Scale": "0.000001",
        "DisplayColor": "0",
        "ICC Profile": "ScanScope v1",
        "Generator": GENERATOR_VERSION,
    }
    return f"{_APERIO_HEADER} \r\n{size_line}|" + "|".join(
        f"{key} = {value}" for key, value in fields.items()
    )


def _tile_iterator(
    renderer: Renderer,
    downsample: int,
    level_size: tuple[int, int],
    tile_size: int,
    on_tile: Callable[[], None],
    artefacts: Artefacts | None = None,
) -> Iterator[NDArray[np.uint8]]:
    width, height = level_size
    renderer.cache_rows_of(width)

    def clean(x0: int, y0: int, window_w: int, window_h: int) -> NDArray[np.uint8]:
        return renderer.render(downsample, x0, y0, window_w, window_h)

    for tile_y in range(0, height, tile_size):
        for tile_x in range(0, width, tile_size):
            if artefacts is None or artefacts.is_empty:
                tile = clean(tile_x, tile_y, tile_size, tile_size)
            else:
                px_um = renderer.mpp * downsample
                tile = render_with_artefacts(
                    clean,
                    artefacts,
                    px_um,
                    tile_x,
                    tile_y,
                    tile_size,
                    tile_size,
                    white_rgb=renderer.look.white_rgb,
                )
            on_tile()
            yield tile


_DQT, _DHT, _SOS, _APP0, _APP14, _SOF0, _SOF1 = 0xDB, 0xC4, 0xDA, 0xE0, 0xEE, 0xC0, 0xC1


def _numbered_components(segment: bytes, first: int, stride: int) -> bytes:
    """A SOF or SOS segment with component ids 0, 1, 2, as Aperio writes them (libjpeg writes 'R', 'G', 'B' for RGB data,
    which would tell a decoder the colour space; Aperio's RGB-coded tiles do not)."""
    data = bytearray(segment)
    count = data[first - 1]
    for index in range(count):
        data[first + index * stride] = index
    return bytes(data)


def split_jpeg_tables(stream: bytes, *, drop_colour_markers: bool = False) -> tuple[bytes, bytes]:
    """(tables, abbreviated stream) of a baseline JPEG: DQT and DHT move into a tables-only stream
    (SOI, tables, EOI), as TIFF's JPEGTables tag holds them. ``drop_colour_markers`` also removes the
    JFIF and Adobe markers and numbers the components 0, 1, 2, so that only the TIFF photometric tag
    says how the data is coded."""
    if not stream.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG stream (no SOI marker)")
    tables, rest = [b"\xff\xd8"], [b"\xff\xd8"]
    position = 2
    while position < len(stream):
        if stream[position] != 0xFF:
            raise ValueError(f"corrupt JPEG stream: no marker at byte {position}")
        marker = stream[position + 1]
        if marker == _SOS:
            if drop_colour_markers:
                length = int.from_bytes(stream[position + 2 : position + 4], "big")
                rest.append(_numbered_components(stream[position : position + 2 + length], 5, 2))
                rest.append(stream[position + 2 + length :])
            else:
                rest.append(stream[position:])
            break
        length = int.from_bytes(stream[position + 2 : position + 4], "big")
        segment = stream[position : position + 2 + length]
        if marker in (_DQT, _DHT):
            tables.append(segment)
        elif drop_colour_markers and marker in (_SOF0, _SOF1):
            rest.append(_numbered_components(segment, 10, 3))
        elif not (drop_colour_markers and marker in (_APP0, _APP14)):
            rest.append(segment)
        position += 2 + length
    tables.append(b"\xff\xd9")
    return b"".join(tables), b"".join(rest)


class _TileEncoder:
    """Encodes tiles itself (instead of tifffile) for the Aperio variants: shared tables, RGB-coded."""

    def __init__(self, spec: SynthSpec) -> None:
        self.spec = spec
        self.tables: bytes | None = None

    def encode(self, tile: NDArray[np.uint8]) -> bytes:
        from imagecodecs import jpeg8_encode

        rgb_coded = self.spec.rgb_coded_jpeg
        stream = bytes(
            jpeg8_encode(
                tile,
                level=self.spec.jpeg_quality,
                colorspace="RGB",
                outcolorspace="RGB" if rgb_coded else "YCBCR",
                subsampling="444" if rgb_coded else "420",
            )
        )
        if not self.spec.jpeg_tables:
            return stream
        tables, abbreviated = split_jpeg_tables(stream, drop_colour_markers=rgb_coded)
        if self.tables is None:
            self.tables = tables
        elif tables != self.tables:
            raise ValueError("libjpeg produced different tables for two tiles; cannot share JPEGTables")
        return abbreviated

    def level_tables(self, first_tile: NDArray[np.uint8]) -> bytes | None:
        """The tables every tile of a level will use (encoded once from its first tile)."""
        if not self.spec.jpeg_tables:
            return None
        self.encode(first_tile)
        return self.tables


def _label_image(spec: SynthSpec) -> NDArray[np.uint8]:
    """A slide label: case number, a name and a barcode-like stripe pattern, as scanners photograph them."""
    from PIL import Image, ImageDraw

    fields = identifying_fields(spec.seed)
    image = Image.new("RGB", (400, 400), (250, 250, 246))
    draw = ImageDraw.Draw(image)
    draw.text((20, 20), fields["Barcode"], fill=(10, 10, 10))
    draw.text((20, 50), fields["Filename"], fill=(10, 10, 10))
    draw.text((20, 80), fields["Date"], fill=(10, 10, 10))
    rng = np.random.default_rng([spec.seed, 9])
    x = 20
    while x < 380:
        bar = int(rng.integers(2, 7))
        if rng.random() < 0.55:
            draw.rectangle((x, 140, x + bar - 1, 360), fill=(0, 0, 0))
        x += bar
    return np.asarray(image)


def _macro_image(spec: SynthSpec, renderer: Renderer) -> NDArray[np.uint8]:
    """Photograph of the whole glass: the label on the left, the tissue overview on the right."""
    from PIL import Image

    overview_height = 400
    overview_width = max(16, round(spec.width * overview_height / spec.height))
    overview = _render_overview(spec, renderer, (overview_width, overview_height))
    label = _label_image(spec)

    label_small = np.asarray(Image.fromarray(label).resize((overview_height, overview_height)))
    macro = np.concatenate([label_small, overview], axis=1)
    return np.ascontiguousarray(macro[:, : (macro.shape[1] // 16) * 16])


def _render_overview(spec: SynthSpec, renderer: Renderer, size: tuple[int, int]) -> NDArray[np.uint8]:
    """The whole slide at ``size`` (about 1024 px or less): rendered in strips at the nearest integer
    downsample, then resized, so that memory stays bounded whatever the slide size."""
    from PIL import Image

    downsample = max(1, math.floor(min(spec.width / size[0], spec.height / size[1])))
    width, height = math.ceil(spec.width / downsample), math.ceil(spec.height / downsample)
    overview = np.empty((height, width, 3), np.uint8)
    for strip_y in range(0, height, NUCLEUS_CELL_PX):
        strip_height = min(NUCLEUS_CELL_PX, height - strip_y)
        overview[strip_y : strip_y + strip_height] = renderer.render(
            downsample, 0, strip_y, width, strip_height
        )
    return np.asarray(Image.fromarray(overview).resize(size, Image.Resampling.BOX))


class _Progress:
    """Counts rendered tiles and reports the fraction done to a callback at most every ``interval_s``."""

    def __init__(self, total_tiles: int, callback: Callable[[float], None] | None, interval_s: float = 3.0):
        self.total = max(1, total_tiles)
        self.done = 0
        self.callback = callback
        self.interval_s = interval_s
        self.last_report = time.monotonic()

    def tick(self) -> None:
        self.done += 1
        if self.callback is not None and time.monotonic() - self.last_report >= self.interval_s:
            self.last_report = time.monotonic()
            self.callback(self.done / self.total)


def generate_slide(
    path: Path, spec: SynthSpec, *, progress: Callable[[float], None] | None = None
) -> SlideTruth:
    """Write the slide ``spec`` describes to ``path`` (streaming, bounded memory) plus its ground truth.

    Writes ``<path>.truth.json`` and ``<path>.mask.npz`` beside the slide. ``progress`` receives the fraction
    of tiles done every few seconds, for big slides. Existing files are overwritten. The slide is written
    under a temporary name and renamed when complete, so a watcher never picks up half a slide.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = build_layout(spec)
    renderer = _slide_renderer(spec, layout)
    artefacts = _artefacts_for(spec, layout)
    encoder = _TileEncoder(spec) if spec.jpeg_tables else None
    downsamples = spec.level_downsamples()
    level_sizes = spec.level_dimensions()
    tile = spec.tile_size
    total_tiles = sum(math.ceil(w / tile) * math.ceil(h / tile) for w, h in level_sizes)
    counter = _Progress(total_tiles, progress)
    common: dict[str, Any] = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": spec.jpeg_quality},
        "metadata": None,
        "maxworkers": 1,
    }
    if spec.fmt == "tiff" and spec.with_mpp:
        pixels_per_cm = 1e4 / spec.mpp
        common["resolution"] = (pixels_per_cm, pixels_per_cm)
        common["resolutionunit"] = "CENTIMETER"

    partial_path = path.with_name(f".{path.name}.partial")
    with tifffile.TiffWriter(partial_path, bigtiff=spec.width * spec.height > 2**31) as writer:
        for index, (downsample, (level_w, level_h)) in enumerate(zip(downsamples, level_sizes, strict=True)):
            if spec.fmt == "svs":
                size_line = (
                    f"{spec.width}x{spec.height} [0,100 {spec.width}x{spec.height}] ({tile}x{tile}) "
                    f"JPEG/RGB Q={spec.jpeg_quality}"
                    if index == 0
                    else f"{spec.width}x{spec.height} -> {level_w}x{level_h} - ({tile}x{tile}) "
                    f"JPEG/RGB Q={spec.jpeg_quality}"
                )
                description = _aperio_description(spec, size_line)
            else:
                description = f"WSI Toolkit synthetic slide ({GENERATOR_VERSION}) level {index}"
            tiles = _tile_iterator(renderer, downsample, (level_w, level_h), tile, counter.tick, artefacts)
            level_args = dict(common)
            if encoder is not None:  # pre-encoded tiles: tifffile writes the bytes and the tags as told
                first = next(tiles)
                level_args["jpegtables"] = encoder.level_tables(first)
                if spec.rgb_coded_jpeg:
                    level_args["compressionargs"] = {"outcolorspace": "RGB"}
                    level_args["subsampling"] = (1, 1)
                level_tiles: Iterator[Any] = (encoder.encode(t) for t in itertools.chain([first], tiles))
            else:
                level_tiles = tiles
            writer.write(
                level_tiles,
                shape=(level_h, level_w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                description=description,
                subfiletype=0 if index == 0 else 1 if spec.fmt == "tiff" else 0,
                **level_args,
            )
            if index == 0 and spec.fmt == "svs" and spec.with_associated_images:
                _write_thumbnail(writer, spec, renderer, common)
        if spec.fmt == "svs" and spec.with_associated_images:
            header = f"{_APERIO_HEADER}\r\n"
            label = _label_image(spec)
            writer.write(
                label,
                photometric="rgb",
                compression="lzw",
                subfiletype=1,
                metadata=None,
                description=f"{header}label {label.shape[1]}x{label.shape[0]}",
            )
            macro = _macro_image(spec, renderer)
            writer.write(
                macro,
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                rowsperstrip=16,
                subfiletype=9,
                metadata=None,
                description=f"{header}macro {macro.shape[1]}x{macro.shape[0]}",
            )
    partial_path.replace(path)
    truth = _truth_from_layout(path, spec, layout, artefacts)
    _write_truth(truth)
    if progress is not None:
        progress(1.0)
    return truth


def _write_thumbnail(writer: Any, spec: SynthSpec, renderer: Renderer, common: dict[str, Any]) -> None:
    """Aperio's second directory: a stripped overview of about 1024 px (OpenSlide's "thumbnail")."""
    downsample = max(1, math.ceil(max(spec.width, spec.height) / 1024))
    width, height = max(1, spec.width // downsample), max(1, spec.height // downsample)
    thumbnail = _render_overview(spec, renderer, (width, height))
    size_line = f"{spec.width}x{spec.height} -> {width}x{height} - "
    writer.write(
        thumbnail,
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
        rowsperstrip=16,
        metadata=None,
        description=_aperio_description(spec, size_line),
        maxworkers=common["maxworkers"],
    )


def _artefacts_for(spec: SynthSpec, layout: Layout) -> Artefacts | None:
    extra_pens = ("red",) if spec.look.red_ink else ()
    geometry = (
        spec.width * spec.mpp,
        spec.height * spec.mpp,
        layout.tissue_mask,
        layout.downsample * spec.mpp,
    )
    if spec.artefacts:
        return plan_artefacts(spec.seed, *geometry, extra_pen_colours=extra_pens)
    if extra_pens:  # a look's red ink on a slide without the other artefacts
        return Artefacts(pens=plan_pen_strokes(spec.seed, extra_pens, *geometry))
    return None


def _truth_from_layout(
    path: Path, spec: SynthSpec, layout: Layout, artefacts: Artefacts | None = None
) -> SlideTruth:
    from wsitk.shared.slides.synth.mimics import class_fractions

    tissue, tumour = layout.tissue_mask, layout.tumour_mask
    by_class = bool(spec.mimics) or spec.tumour_look != "classic"
    tissue_cells = int(tissue.sum())
    actual = float(tumour.sum() / tissue_cells) if tissue_cells else 0.0
    return SlideTruth(
        path=path,
        label="tumour" if spec.tumour_fraction > 0 and tumour.any() else "normal",
        tumour_fraction_requested=spec.tumour_fraction,
        tumour_fraction_actual=actual,
        tissue_fraction=float(tissue.mean()),
        mpp=spec.mpp,
        width=spec.width,
        height=spec.height,
        seed=spec.seed,
        fmt=spec.fmt,
        mask_downsample=int(layout.downsample),
        tissue_mask=tissue,
        tumour_mask=tumour,
        spec=spec,
        identifying_properties=(
            {f"aperio.{k}": v for k, v in identifying_fields(spec.seed).items()} if spec.fmt == "svs" else {}
        ),
        artefact_masks=(
            {} if artefacts is None else artefact_truth(artefacts, tissue.shape, layout.downsample * spec.mpp)
        ),
        pen_masks=(
            {}
            if artefacts is None
            else {
                colour: pen_colour_mask(artefacts, colour, tissue.shape, layout.downsample * spec.mpp)
                for colour in PEN_COLOURS
                if any(stroke.colour == colour for stroke in artefacts.pens)
            }
        ),
        class_fractions=class_fractions(layout) if by_class else {},
        class_masks=layout.mimic_masks,
    )


def _write_truth(truth: SlideTruth) -> None:
    summary = {
        "generator": GENERATOR_VERSION,
        "slide": truth.path.name,
        "label": truth.label,
        "tumour_fraction_requested": truth.tumour_fraction_requested,
        "tumour_fraction_actual": truth.tumour_fraction_actual,
        "tissue_fraction": truth.tissue_fraction,
        "mpp": truth.mpp,
        "width": truth.width,
        "height": truth.height,
        "seed": truth.seed,
        "fmt": truth.fmt,
        "mask_downsample": truth.mask_downsample,
        "level_dimensions": truth.spec.level_dimensions(),
        "identifying_properties": truth.identifying_properties,
        "spec": _spec_json(truth.spec),
    }
    if truth.class_fractions:  # only with mimics or a subtle tumour: other truth files stay as they were
        summary["class_fractions"] = truth.class_fractions
    truth.truth_json_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    with truth.mask_path.open("wb") as handle:
        arrays: dict[str, NDArray[Any]] = {
            "tissue": truth.tissue_mask,
            "tumour": truth.tumour_mask,
            "downsample": np.asarray(truth.mask_downsample),
            **{f"artefact_{kind}": mask for kind, mask in truth.artefact_masks.items()},
            **{f"pen_{colour}": mask for colour, mask in truth.pen_masks.items()},
            **{f"class_{name}": mask for name, mask in truth.class_masks.items()},
        }
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]


def _spec_json(spec: SynthSpec) -> dict[str, Any]:
    """The spec as JSON; without the look when it is the default, so truth files stay as they were."""
    summary = dataclasses.asdict(spec)
    if spec.look == ScannerLook():
        del summary["look"]
    if not spec.mimics:
        del summary["mimics"]
    if spec.tumour_look == "classic":
        del summary["tumour_look"]
    return summary


def load_truth(path: Path) -> SlideTruth:
    """Read back the ground truth written beside a generated slide (``<path>.truth.json`` and ``.mask.npz``)."""
    path = Path(path)
    json_path, npz_path = truth_json_path(path), mask_path(path)
    if not json_path.is_file() or not npz_path.is_file():
        raise FileNotFoundError(
            f"no ground truth for {path}: expected {json_path.name} and {npz_path.name} beside it "
            "(only slides written by generate_slide have one)"
        )
    summary = json.loads(json_path.read_text())
    with np.load(npz_path) as masks:
        tissue, tumour = masks["tissue"].astype(bool), masks["tumour"].astype(bool)
        artefact_masks = {
            kind: masks[f"artefact_{kind}"].astype(bool)
            for kind in ARTEFACT_KINDS
            if f"artefact_{kind}" in masks.files
        }
        pen_masks = {
            colour: masks[f"pen_{colour}"].astype(bool)
            for colour in PEN_COLOURS
            if f"pen_{colour}" in masks.files
        }
        class_masks = {
            name.removeprefix("class_"): masks[name].astype(bool)
            for name in masks.files
            if name.startswith("class_")
        }
    return SlideTruth(
        path=path,
        label=summary["label"],
        tumour_fraction_requested=summary["tumour_fraction_requested"],
        tumour_fraction_actual=summary["tumour_fraction_actual"],
        tissue_fraction=summary["tissue_fraction"],
        mpp=summary["mpp"],
        width=summary["width"],
        height=summary["height"],
        seed=summary["seed"],
        fmt=summary["fmt"],
        mask_downsample=summary["mask_downsample"],
        tissue_mask=tissue,
        tumour_mask=tumour,
        spec=SynthSpec(**summary["spec"]),
        identifying_properties=summary.get("identifying_properties", {}),
        artefact_masks=artefact_masks,
        pen_masks=pen_masks,
        class_fractions=summary.get("class_fractions", {}),
        class_masks=class_masks,
    )


def generate_cohort(
    out_dir: Path,
    n_slides: int,
    *,
    tumour_ratio: float = 0.5,
    seed: int = 0,
    size: tuple[int, int] = (8000, 6000),
    fmt: SlideFormat = "svs",
    mpp: float = 0.5,
    tumour_fraction: float = 0.2,
    with_mpp: bool = True,
    tile_size: int | None = None,
    artefacts: bool = False,
    jpeg_tables: bool = False,
    rgb_coded_jpeg: bool = False,
    looks: tuple[ScannerLook, ...] = (),
    random_looks: bool = False,
    progress: Callable[[Path, float], None] | None = None,
    on_slide: Callable[[SlideTruth], None] | None = None,
) -> list[SlideTruth]:
    """Write ``n_slides`` slides into ``out_dir`` with labels spread evenly (tumour, normal, ...).

    Slide i gets the seed ``seed * 1000 + i``, so cohorts with different seeds never share a slide. File
    names do not reveal the label (the pipeline must not be able to read the answer off the upload key).
    Slide i gets the scanner look ``looks[i % len(looks)]``, or with ``random_looks`` its own
    ``random_look(slide seed)``; neither: the reference look.
    """
    if n_slides < 0:
        raise ValueError(f"n_slides {n_slides} must be >= 0")
    if looks and random_looks:
        raise ValueError("give either looks or random_looks, not both")
    if not 0.0 <= tumour_ratio <= 1.0:
        raise ValueError(f"tumour_ratio {tumour_ratio} must be within 0..1")
    out_dir = Path(out_dir)
    truths = []
    extension = "svs" if fmt == "svs" else "tiff"
    for index in range(n_slides):
        is_tumour = math.ceil((index + 1) * tumour_ratio - 1e-9) > math.ceil(index * tumour_ratio - 1e-9)
        slide_seed = seed * 1000 + index
        spec = SynthSpec(
            width=size[0],
            height=size[1],
            mpp=mpp,
            fmt=fmt,
            tumour_fraction=tumour_fraction if is_tumour else 0.0,
            seed=slide_seed,
            tile_size=tile_size or (240 if fmt == "svs" else 256),
            with_mpp=with_mpp,
            artefacts=artefacts,
            jpeg_tables=jpeg_tables,
            rgb_coded_jpeg=rgb_coded_jpeg,
            look=(
                random_look(slide_seed)
                if random_looks
                else looks[index % len(looks)]
                if looks
                else ScannerLook()
            ),
        )
        slide_path = out_dir / f"synth-{slide_seed:06d}.{extension}"
        callback = None if progress is None else functools.partial(progress, slide_path)
        truth = generate_slide(slide_path, spec, progress=callback)
        truths.append(truth)
        if on_slide is not None:
            on_slide(truth)
    return truths
