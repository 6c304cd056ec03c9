"""The ``wsi model export-backbone`` and ``wsi export h5`` subcommands.

Argument definitions import nothing heavy (``wsi --help`` stays instant); torch, ``onnx`` and ``h5py`` are
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def add_export_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "architecture",
        help="a registered backbone (small-cnn, resnet50-trunc) or package.module:Factory returning a module",
    )
    parser.add_argument("out", type=Path, help="the ONNX file to write")
    parser.add_argument("--weights", type=Path, default=None, help="local state-dict file (never downloaded)")
    parser.add_argument("--input-size", type=int, default=224, help="tile size in pixels")
    parser.add_argument(
        "--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="default: ImageNet's"
    )
    parser.add_argument(
        "--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="default: ImageNet's"
    )
    parser.add_argument("--target-mpp", type=float, default=0.5, help="micrometres per pixel of the tiles")
    parser.add_argument("--fp16", action="store_true", help="compute in half precision (for GPUs)")
    parser.add_argument(
        "--uint8-input", action="store_true", help="take raw uint8 NHWC tiles, normalise inside the graph"
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed when there are no weights")


def cli_export_backbone(args: argparse.Namespace) -> int:
    """Export, validate against torch on tissue-like tiles, print what was written and how close it is."""
    from wsitk.shared.models.export import IMAGENET_MEAN, IMAGENET_STD, export_backbone

    info = export_backbone(
        args.architecture,
        args.out,
        weights=args.weights,
        input_size=args.input_size,
        mean=args.mean or IMAGENET_MEAN,
        std=args.std or IMAGENET_STD,
        target_mpp=args.target_mpp,
        fp16=args.fp16,
        input_format="uint8-nhwc" if args.uint8_input else "float32-nchw",
        seed=args.seed,
    )
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(info).items()}
    print(json.dumps(summary, indent=2))
    print(
        f"validated against torch on {info.validation_tiles} tissue-like tiles: max abs difference "
        f"{info.max_abs_diff:.3g}, max relative {info.max_rel_diff:.3g} (limit {info.tolerance:g})"
    )
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["h5"], help="h5: the CLAM / TRIDENT features file, one per slide")
    parser.add_argument("slides", nargs="+", help="slide ids")
    parser.add_argument("--out", type=Path, required=True, help="directory for the SLIDE_ID.h5 files")
    parser.add_argument("--tiling-run", default="", help="when a slide was tiled more than once")
    parser.add_argument("--backbone", default="", help="when a slide was embedded with several backbones")


def cli_export(args: argparse.Namespace) -> int:
    """Write SLIDE_ID.h5 for each slide from its embeddings in the artifacts bucket."""
    from wsitk.shared.config import load_settings
    from wsitk.shared.models.features_export import export_slide_h5
    from wsitk.shared.objectstore import open_store

    settings = load_settings()
    store = open_store(settings)
    for slide_id in args.slides:
        result = export_slide_h5(
            store,
            settings.artifacts_bucket,
            slide_id,
            args.out / f"{slide_id}.h5",
            tiling_run_id=args.tiling_run,
            backbone_id=args.backbone,
        )
        print(json.dumps({**asdict(result), "path": str(result.path)}))
    return 0
