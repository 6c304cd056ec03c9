"""The ``wsi model export-backbone`` and ``wsi export {h5,geojson,heatmap,mosaic}`` subcommands.

Argument definitions import nothing heavy (``wsi --help`` stays instant); torch, ``onnx``, ``h5py``,
numpy and pillow are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from wsitk.shared.models.explain import SlideAttention
    from wsitk.shared.objectstore import ObjectStore

#: A whole slide id (the first 32 hex digits of the file's SHA-256); anything else is looked up.
_FULL_SLIDE_ID = re.compile(r"[0-9a-f]{32}")


def add_export_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "architecture",
        nargs="?",
        help="a registered encoder (uni, uni2-h, virchow2, h-optimus-0, h-optimus-1, prov-gigapath, "
        "phikon-v2, conch-v1.5, resnet50-trunc, small-cnn; --list describes them) or package.module:Factory",
    )
    parser.add_argument(
        "out",
        type=Path,
        nargs="?",
        default=None,
        help="the ONNX file to write; without it the file goes to the model directory and becomes the "
        "pipeline's encoder (models.json)",
    )
    parser.add_argument("--weights", type=Path, default=None, help="local checkpoint file (never downloaded)")
    parser.add_argument(
        "--activate", action="store_true", help="with OUT: also make it the pipeline's encoder (models.json)"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="default: WSI_MODEL_DIR")
    parser.add_argument("--list", action="store_true", help="print the encoder registry and exit")
    parser.add_argument("--input-size", type=int, default=None, help="pixels (default: the registry's)")
    parser.add_argument(
        "--tile-size", type=int, default=None, help="pixels the tiler cuts (default: registry)"
    )
    parser.add_argument(
        "--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="default: the registry's"
    )
    parser.add_argument(
        "--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="default: the registry's"
    )
    parser.add_argument(
        "--target-mpp", type=float, default=None, help="micrometres per pixel (default: the registry's)"
    )
    parser.add_argument("--fp16", action="store_true", help="compute in half precision (for GPUs)")
    parser.add_argument(
        "--uint8-input", action="store_true", help="take raw uint8 NHWC tiles, normalise inside the graph"
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed when there are no weights")


def _print_registry() -> None:
    from wsitk.shared.models.encoders import ENCODERS

    for spec in ENCODERS.values():
        print(
            f"{spec.name}: {spec.title}\n  architecture: {spec.architecture}\n  file: {spec.files} "
            f"[{spec.layout} layout; licence: {spec.licence}]\n  tiles: {spec.tile_size} px at "
            f"{spec.target_mpp} um/px -> {spec.input_size} px; mean {spec.mean}, std {spec.std}\n"
            f"  output: {spec.pooling} ({spec.output_dim}-d)"
        )


def cli_export_backbone(args: argparse.Namespace) -> int:
    """Export, validate against torch on tissue-like tiles, print what was written and how close it is;
    without OUT (or with --activate) register the file as the pipeline's encoder in ``models.json``."""
    if args.list:
        _print_registry()
        return 0
    if not args.architecture:
        print("wsi model export-backbone: give an encoder name (see --list)", file=sys.stderr)
        return 2
    from wsitk.shared.models.encoders import ENCODERS, CheckpointError
    from wsitk.shared.models.export import export_backbone

    activate = args.out is None or args.activate
    model_dir = args.model_dir
    if activate and model_dir is None:
        from wsitk.shared.config import load_settings

        model_dir = Path(load_settings().model_dir)
    safe_name = args.architecture.replace(":", "-").replace("/", "-")
    out = args.out if args.out is not None else model_dir / f"backbone-{safe_name}.onnx"
    if args.architecture in ENCODERS and ENCODERS[args.architecture].vit is not None and args.weights is None:
        print(
            f"note: no --weights: exporting {args.architecture} with random weights (for testing only)",
            file=sys.stderr,
        )
    try:
        info = export_backbone(
            args.architecture,
            out,
            weights=args.weights,
            input_size=args.input_size,
            tile_size=args.tile_size,
            mean=args.mean,
            std=args.std,
            target_mpp=args.target_mpp,
            fp16=args.fp16,
            input_format="uint8-nhwc" if args.uint8_input else "float32-nchw",
            seed=args.seed,
        )
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"wsi model export-backbone: {exc}", file=sys.stderr)
        return 1
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(info).items()}
    print(json.dumps(summary, indent=2))
    print(
        f"validated against torch on {info.validation_tiles} tissue-like tiles: max abs difference "
        f"{info.max_abs_diff:.3g}, max relative {info.max_rel_diff:.3g} (limit {info.tolerance:g})"
    )
    if activate:
        from wsitk.shared.models.defaults import register_backbone

        manifest = register_backbone(model_dir, info)
        print(
            f"registered {info.backbone_id} as the pipeline's encoder in {model_dir / 'models.json'}: new "
            f"slides are tiled at {info.tile_size} px, {info.target_mpp} um/px and embedded to "
            f"{info.output_dim}-d features"
        )
        mil_backbone = manifest.get("mil", {}).get("backbone_id")
        if mil_backbone != info.backbone_id:
            print(
                f"the shipped MIL model was trained on {mil_backbone or 'another encoder'}'s embeddings and "
                "will not score these: embed a labelled cohort, then train and register a MIL model "
                "(wsi train, wsi model register --promote)"
            )
    return 0


EXPORT_FORMATS = {
    "h5": "the CLAM / TRIDENT features file (SLIDE_ID.h5)",
    "geojson": "attention per tile as QuPath objects (SLIDE_ID.geojson)",
    "heatmap": "attention heatmap image (SLIDE_ID.heatmap.png)",
    "mosaic": "the highest-attention tiles in a grid (SLIDE_ID.top-tiles.png)",
    "fhir": "the FHIR R4 Bundle of the prediction (SLIDE_ID.fhir-bundle.json; docs/interoperability.md)",
    "dicom": "the DICOM Structured Report and attention parametric map (SLIDE_ID.report-sr.dcm, .attention-pm.dcm)",
}


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "format",
        choices=list(EXPORT_FORMATS),
        help="; ".join(f"{name}: {what}" for name, what in EXPORT_FORMATS.items()),
    )
    parser.add_argument(
        "slides", nargs="+", help="slide ids as `wsi status` lists them, upload keys or file names"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the files, one per slide")
    parser.add_argument("--tiling-run", default="", help="when a slide was tiled more than once")
    parser.add_argument(
        "--backbone",
        default="",
        help="h5: when a slide was embedded with several backbones; mosaic: whose embeddings index the shards",
    )
    parser.add_argument(
        "--model", default="", help="geojson/heatmap/mosaic: MIL model version, when several scored the slide"
    )
    parser.add_argument(
        "--top-k", type=int, default=8, help="geojson: tiles classed 'Top attention'; mosaic: tiles shown"
    )
    parser.add_argument(
        "--thumbnail",
        type=Path,
        default=None,
        help="heatmap: an image of the whole slide to blend under the heat (one slide), or a directory "
        "holding SLIDE_ID.png/.jpg; without it untiled area is transparent",
    )
    parser.add_argument("--max-side", type=int, default=1024, help="heatmap: longest side in pixels")
    parser.add_argument("--columns", type=int, default=4, help="mosaic: tiles per row")
    parser.add_argument("--tile-px", type=int, default=224, help="mosaic: cell size in pixels")


def cli_export(args: argparse.Namespace) -> int:
    """Write one file per slide from the artifacts bucket; a slide that cannot be exported is reported
    (what is missing, which option picks among several) and the others still are."""
    from wsitk.shared.config import load_settings
    from wsitk.shared.errors import PermanentError
    from wsitk.shared.objectstore import open_store

    if args.backbone and args.format not in {"h5", "mosaic"}:
        print(f"wsi export {args.format}: --backbone applies to h5 and mosaic only", file=sys.stderr)
        return 2
    if args.model and args.format == "h5":
        print("wsi export h5: --model applies to geojson, heatmap and mosaic only", file=sys.stderr)
        return 2
    if args.thumbnail is not None and args.format != "heatmap":
        print(f"wsi export {args.format}: --thumbnail applies to heatmap only", file=sys.stderr)
        return 2
    if args.thumbnail is not None and args.thumbnail.is_file() and len(args.slides) > 1:
        print(
            "wsi export heatmap: one --thumbnail image fits one slide; pass a directory of SLIDE_ID.png/.jpg",
            file=sys.stderr,
        )
        return 2
    settings = load_settings()
    store = open_store(settings)
    exporter = {
        "h5": _export_h5,
        "geojson": _export_geojson,
        "heatmap": _export_heatmap,
        "mosaic": _export_mosaic,
        "fhir": _export_interop,
        "dicom": _export_interop,
    }
    failed = 0
    for reference in args.slides:
        try:
            slide_id = reference  # a full id needs no database; a short id, key or file name is looked up
            if not _FULL_SLIDE_ID.fullmatch(reference):
                slide_id = _full_slide_id(settings, reference) or reference
            summary = exporter[args.format](store, settings.artifacts_bucket, slide_id, args)
        except (LookupError, ValueError, PermanentError) as exc:
            print(f"wsi export {args.format}: slide {reference}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps(summary))
    return 1 if failed else 0


def _full_slide_id(settings: Any, reference: str) -> str | None:
    """The slide a person named with what ``wsi status`` prints (a short id), an id prefix of 8+ digits,
    an upload key or a file name, looked up in PostgreSQL; None when the database cannot be asked.

    Raises ``CorrectionError`` (a ValueError) saying why when no single slide matches.
    """
    from wsitk.shared.corrections import resolve_slide
    from wsitk.shared.db.connection import Database
    from wsitk.shared.errors import TransientError

    try:
        return resolve_slide(Database(settings.dsn()), reference)[0]
    except TransientError:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def _export_interop(
    store: ObjectStore, bucket: str, slide_id: str, args: argparse.Namespace
) -> dict[str, Any]:
    from wsitk.shared.interop.export import export_results

    run, model = args.tiling_run, args.model
    return export_results(
        store, bucket, slide_id, args.out, args.format, tiling_run_id=run, model_version=model
    )


def _export_h5(store: ObjectStore, bucket: str, slide_id: str, args: argparse.Namespace) -> dict[str, Any]:
    from wsitk.shared.models.features_export import export_slide_h5

    result = export_slide_h5(
        store,
        bucket,
        slide_id,
        args.out / f"{slide_id}.h5",
        tiling_run_id=args.tiling_run,
        backbone_id=args.backbone,
    )
    return {**asdict(result), "path": str(result.path)}


def _export_geojson(
    store: ObjectStore, bucket: str, slide_id: str, args: argparse.Namespace
) -> dict[str, Any]:
    from wsitk.shared.models.explain import stored_attention_geojson

    collection, attention = stored_attention_geojson(
        store,
        bucket,
        slide_id,
        tiling_run_id=args.tiling_run,
        model_version=args.model,
        top_k_highlight=args.top_k,
    )
    path = args.out / f"{slide_id}.geojson"
    _write_atomically(path, json.dumps(collection, separators=(",", ":"), allow_nan=False).encode())
    return _summary(path, attention, tiles=len(attention.coords))


def _export_heatmap(
    store: ObjectStore, bucket: str, slide_id: str, args: argparse.Namespace
) -> dict[str, Any]:
    from wsitk.shared.models.explain import attention_heatmap, load_attention, slide_dimensions

    attention = load_attention(
        store, bucket, slide_id, tiling_run_id=args.tiling_run, model_version=args.model
    )
    width, height = slide_dimensions(store, bucket, attention)
    png = attention_heatmap(
        attention.coords,
        attention.attention,
        attention.tile_size_level0,
        width,
        height,
        thumbnail=_thumbnail_for(args.thumbnail, slide_id)
        if args.thumbnail is not None
        else _stored_thumbnail(store, bucket, slide_id, attention.tiling_run_id),
        max_side=args.max_side,
    )
    path = args.out / f"{slide_id}.heatmap.png"
    _write_atomically(path, png)
    return _summary(path, attention, slide_width=width, slide_height=height)


def _export_mosaic(
    store: ObjectStore, bucket: str, slide_id: str, args: argparse.Namespace
) -> dict[str, Any]:
    from wsitk.shared.models.explain import (
        load_attention,
        load_top_tiles,
        slide_shard_sources,
        top_indices,
        top_tiles_mosaic,
    )

    attention = load_attention(
        store, bucket, slide_id, tiling_run_id=args.tiling_run, model_version=args.model
    )
    top = top_indices(attention.attention, args.top_k)
    if not len(top):
        raise LookupError("the attention map holds no tiles (nothing passed quality control?)")
    sources = slide_shard_sources(store, bucket, slide_id, attention.tiling_run_id, backbone_id=args.backbone)
    tiles = load_top_tiles(store, sources, attention.coords[top])
    png = top_tiles_mosaic(
        tiles, attention.attention[top].tolist(), columns=args.columns, tile_px=args.tile_px
    )
    path = args.out / f"{slide_id}.top-tiles.png"
    _write_atomically(path, png)
    return _summary(path, attention, tiles=len(tiles))


def _summary(path: Path, attention: SlideAttention, **extra: Any) -> dict[str, Any]:
    return {
        "path": str(path),
        "slide_id": attention.slide_id,
        "tiling_run_id": attention.tiling_run_id,
        "model_version": attention.model_version,
        **extra,
    }


def _stored_thumbnail(
    store: ObjectStore, bucket: str, slide_id: str, run_id: str
) -> NDArray[np.uint8] | None:
    """The thumbnail the tiler stored for this tiling run, if it did (runs tiled before it did have none)."""
    import io

    import numpy as np
    from PIL import Image

    key = f"tiles/{slide_id}/{run_id}/thumbnail.jpg"
    if store.stat(bucket, key) is None:
        return None
    with Image.open(io.BytesIO(store.get_bytes(bucket, key))) as image:
        return np.asarray(image.convert("RGB"))


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _thumbnail_for(thumbnail: Path | None, slide_id: str) -> NDArray[np.uint8] | None:
    """The thumbnail pixels for one slide: the file itself, or SLIDE_ID.<image suffix> in a directory."""
    import numpy as np
    from PIL import Image

    if thumbnail is None:
        return None
    path = thumbnail
    if thumbnail.is_dir():
        candidates = [thumbnail / f"{slide_id}{suffix}" for suffix in _IMAGE_SUFFIXES]
        path = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
        if not path.is_file():
            raise LookupError(f"no thumbnail {slide_id}{{{','.join(_IMAGE_SUFFIXES)}}} in {thumbnail}")
    elif not thumbnail.is_file():
        raise LookupError(f"thumbnail {thumbnail} does not exist")
    with Image.open(path) as image:
        pixels: NDArray[np.uint8] = np.asarray(image.convert("RGB"))
    return pixels
