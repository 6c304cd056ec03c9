"""Embedder benchmark: bare model throughput vs the embedder's end to end, same model, same batch size.

    python -m tests.benchmarks.bench_embedder --model resnet50-trunc --batch-size 32 --shards 6
    python -m tests.benchmarks.bench_embedder --model small-cnn --batch-size 64 --shards 20
    python -m tests.benchmarks.bench_embedder --model resnet50-trunc --fp16 --uint8-input \\
        --backend auto --batch-size 512 --shards 120 --workdir bench-results/embedder     # on a GPU machine
    python -m tests.benchmarks.bench_embedder --smoke                        # seconds; run by the tests

In one process it:

1. exports the backbone (random weights: throughput does not depend on their values) to ONNX, and
   checks it against torch (the max difference is printed);
2. writes tile shards of JPEG tiles (synthetic tissue from ``render_patch``, as the tiler packs them)
   into a filesystem object store, with a QC mask accepting ``--accept`` of the tiles;
3. **bare**: runs the encoder (``encoder.infer``) on one pre-decoded, pre-normalised batch, repeatedly,
   for as many tiles as the end-to-end run embeds;
4. **end to end**: ``EmbeddingEngine.run`` from the shard files to written ``.npz`` embeddings: fetch,
   JPEG decode, preprocessing, inference, float16 conversion, put-if-absent writes;
5. prints both throughputs, their ratio, where the time went (decode, preprocessing, inference, waiting)
   and, on an NVIDIA GPU, the GPU utilisation sampled during the end-to-end run.

Results go to stdout as JSON (and to ``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BUCKET = "wsi-artifacts"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_embedder", description=__doc__)
    parser.add_argument("--model", default="resnet50-trunc", help="registry name or package.module:Factory")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shards", type=int, default=6, help="number of tile shards")
    parser.add_argument("--tiles-per-shard", type=int, default=256)
    parser.add_argument("--slides", type=int, default=2, help="shards are spread over this many slides")
    parser.add_argument("--accept", type=float, default=0.9, help="share of tiles the QC mask accepts")
    parser.add_argument("--distinct-tiles", type=int, default=48, help="rendered tiles, reused round-robin")
    parser.add_argument("--fp16", action="store_true", help="export the backbone with fp16 compute")
    parser.add_argument("--uint8-input", action="store_true", help="normalisation inside the model graph")
    parser.add_argument("--backend", default="onnxruntime", choices=["auto", "onnxruntime", "torch"])
    parser.add_argument(
        "--provider",
        default="auto",
        choices=["auto", "tensorrt", "cuda", "cpu"],
        help="ONNX Runtime provider to start the preference list at (auto: TensorRT, CUDA, CPU)",
    )
    parser.add_argument("--decode-workers", type=int, default=0, help="0: cores - 1")
    parser.add_argument("--prefetch-batches", type=int, default=3)
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="ONNX Runtime CPU threads (0: default)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and shards here (reused)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny run (small CNN, 64 px) for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.input_size, args.batch_size = "small-cnn", 64, 8
        args.shards, args.tiles_per_shard, args.distinct_tiles, args.slides = 3, 12, 6, 2
    return args


def _providers(choice: str) -> tuple[str, ...]:
    order = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    start = {"auto": 0, "tensorrt": 0, "cuda": 1, "cpu": 2}[choice]
    return order[start:]


def _export(args: argparse.Namespace, model_dir: Path) -> tuple[Path, dict[str, Any]]:
    from wsitk.shared.models.export import export_backbone

    name = args.model.replace(":", "-").replace(".", "-")
    variant = f"{name}-{args.input_size}{'-fp16' if args.fp16 else ''}{'-u8' if args.uint8_input else ''}"
    path = model_dir / f"{variant}.onnx"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return path, dict(json.loads(info_path.read_text()))
    started = time.perf_counter()
    info = export_backbone(
        args.model,
        path,
        input_size=args.input_size,
        fp16=args.fp16,
        input_format="uint8-nhwc" if args.uint8_input else "float32-nchw",
    )
    summary = {
        "backbone_id": info.backbone_id,
        "max_abs_diff_vs_torch": info.max_abs_diff,
        "max_rel_diff_vs_torch": info.max_rel_diff,
        "tolerance": info.tolerance,
        "export_s": round(time.perf_counter() - started, 1),
    }
    info_path.write_text(json.dumps(summary))
    return path, summary


def _write_shards(args: argparse.Namespace, store: Any) -> tuple[list[Any], list[np.ndarray]]:
    """Shard files in the store plus the ShardJobs for them; returns (jobs, the distinct decoded tiles)."""
    from wsitk.services.embedder.engine import ShardJob
    from wsitk.shared.shards import Shard, ShardTile, encode_jpeg, pack_shard
    from wsitk.shared.slides.synth import render_patch

    rng = np.random.default_rng(0)
    kinds = ("normal", "tumour", "normal", "background")
    rendered = [
        render_patch(kinds[i % len(kinds)], args.input_size, 0.5, rng) for i in range(args.distinct_tiles)
    ]
    encoded = [encode_jpeg(tile) for tile in rendered]
    decoded = [Shard(pack_shard({}, [ShardTile(0, 0, data)])).decode(0) for data in encoded]
    jobs = []
    for index in range(args.shards):
        slide_id = f"bench-slide-{index % args.slides}"
        shard_id = f"s{index:05d}"
        key = f"tiles/{slide_id}/run0/{shard_id}.shard"
        tiles = [
            ShardTile(
                x=(t % 64) * args.input_size * 2,
                y=(index * args.tiles_per_shard + t) // 64 * args.input_size * 2,
                data=encoded[(index * args.tiles_per_shard + t) % len(encoded)],
            )
            for t in range(args.tiles_per_shard)
        ]
        header = {"slide_id": slide_id, "shard_id": shard_id, "tile_size": args.input_size, "mpp": 0.5}
        header["tile_size_level0"] = float(args.input_size * 2)
        store.put_if_absent(BUCKET, key, pack_shard(header, tiles))
        accepted = rng.random(args.tiles_per_shard) < args.accept
        jobs.append(ShardJob(slide_id, "run0", shard_id, BUCKET, key, accepted=accepted))
    return jobs, decoded


class _GpuSampler:
    """GPU utilisation sampled every 50 ms (NVML through ``pynvml``), when an NVIDIA GPU is present."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml: Any = pynvml
        except Exception:  # noqa: BLE001 - no NVIDIA driver or library: the sampler reports nothing
            self._nvml = None

    def __enter__(self) -> _GpuSampler:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        values = np.asarray(self.samples, dtype=np.float64)
        return {"mean_pct": round(float(values.mean()), 1), "p10_pct": float(np.percentile(values, 10))}


def _bare_throughput(encoder: Any, decoded: list[np.ndarray], total_tiles: int) -> dict[str, float]:
    """encoder.infer on one prepared full batch, repeated for ``total_tiles`` tiles (after one warm-up)."""
    batch_size = int(encoder.batch_size)
    tiles = np.stack([decoded[i % len(decoded)] for i in range(batch_size)])
    batch = encoder.prepare(tiles, out=encoder.batch_array(batch_size))
    encoder.infer(batch)  # warm-up: kernels chosen, memory allocated
    calls = max(1, round(total_tiles / batch_size))
    started = time.perf_counter()
    for _ in range(calls):
        encoder.infer(batch)
    elapsed = time.perf_counter() - started
    return {
        "tiles": calls * batch_size,
        "seconds": round(elapsed, 3),
        "tiles_per_s": calls * batch_size / elapsed,
    }


def _decode_cost(decoded_bytes: list[bytes]) -> float:
    """Single-thread milliseconds per JPEG decode of one tile (libjpeg-turbo)."""
    from imagecodecs import jpeg8_decode

    started = time.perf_counter()
    rounds = max(1, 200 // len(decoded_bytes))
    for _ in range(rounds):
        for data in decoded_bytes:
            jpeg8_decode(data)
    return (time.perf_counter() - started) / (rounds * len(decoded_bytes)) * 1e3


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from wsitk.services.embedder.engine import EmbeddingEngine
    from wsitk.shared.models.runtime import open_backbone
    from wsitk.shared.objectstore import FilesystemObjectStore
    from wsitk.shared.shards import Shard

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wsi-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_path, export_summary = _export(args, workdir / "models")
    store_root = workdir / "store"
    shutil.rmtree(store_root, ignore_errors=True)
    store = FilesystemObjectStore(store_root)
    store.ensure_bucket(BUCKET)
    jobs, decoded = _write_shards(args, store)
    encoder = open_backbone(
        model_path,
        backend=args.backend,
        batch_size=args.batch_size,
        prefer=_providers(args.provider),
        intra_op_threads=args.intra_op_threads or None,
    )
    accepted = int(sum(int(job.accepted.sum()) for job in jobs))
    bare = _bare_throughput(encoder, decoded, accepted)
    with EmbeddingEngine(
        encoder,
        store,
        artifacts_bucket=BUCKET,
        decode_workers=args.decode_workers,
        prefetch_batches=args.prefetch_batches,
    ) as engine:
        with _GpuSampler() as gpu:
            started = time.perf_counter()
            results = engine.run(jobs)
            elapsed = time.perf_counter() - started
        stats = engine.last_stats.as_dict()
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    if failures:
        raise RuntimeError(f"{len(failures)} shards failed: {failures[:3]}")
    written = sum(r.tile_count for r in results if not isinstance(r, BaseException))
    if written != accepted:
        raise RuntimeError(f"wrote embeddings for {written} tiles, expected {accepted}")
    first = jobs[0]
    shard = Shard(store.get_bytes(BUCKET, first.shard_key))
    decode_ms = _decode_cost([shard.tile_bytes(i) for i in range(min(len(shard), 32))])
    end_to_end = accepted / elapsed
    report = {
        "model": args.model,
        "backbone_id": encoder.backbone_id,
        "export": export_summary,
        "providers": encoder.providers,
        "fp16": args.fp16,
        "input_format": "uint8-nhwc" if args.uint8_input else "float32-nchw",
        "batch_size": args.batch_size,
        "shards": len(jobs),
        "tiles_embedded": accepted,
        "cpu_count": os.cpu_count(),
        "decode_workers": engine.decode_workers,
        "bare_tiles_per_s": round(bare["tiles_per_s"], 1),
        "end_to_end_tiles_per_s": round(end_to_end, 1),
        "end_to_end_share_of_bare": round(end_to_end / bare["tiles_per_s"], 3),
        "decode_ms_per_tile_single_thread": round(decode_ms, 3),
        "engine": stats,
        "gpu_utilisation": gpu.summary(),
    }
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    report = run_benchmark(_parse(argv))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
