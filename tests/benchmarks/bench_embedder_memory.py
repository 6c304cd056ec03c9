"""Peak resident memory of the embedder's engine as the number of shards grows (docs/throughput.md).

Each size runs in a fresh process: shards of 256 rendered tiles in a filesystem store, embedded by
``EmbeddingEngine`` with the shipped small CNN in runs of 32 shards (as the service batches them), with
the service's heap settings (``shared/heap.py``: ``configure`` at the start, ``release_free_memory`` after
each run of 32, as the runtime does after each batch) unless ``--default-malloc``. Prints one line per size
and the ratio of the largest to the smallest peak.

    .venv/bin/python -m tests.benchmarks.bench_embedder_memory --model-dir .wsi/models --shards 3 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _one(
    model_dir: Path, shards: int, fetch_ahead: int, default_malloc: bool, per_run: int
) -> dict[str, float]:
    from wsitk.services.embedder.engine import EmbeddingEngine
    from wsitk.shared.heap import configure, release_free_memory
    from wsitk.shared.models.runtime import open_backbone
    from wsitk.shared.objectstore import FilesystemObjectStore

    from tests.benchmarks import bench_embedder as be

    if not default_malloc:
        configure()
    with tempfile.TemporaryDirectory() as work:
        store = FilesystemObjectStore(Path(work))
        store.ensure_bucket(be.BUCKET)
        args = argparse.Namespace(
            input_size=224, distinct_tiles=48, shards=shards, slides=1, tiles_per_shard=256, accept=0.9
        )
        jobs, _ = be._write_shards(args, store)
        encoder = open_backbone(model_dir / "backbone-small-cnn.onnx", backend="onnxruntime", batch_size=64)
        with EmbeddingEngine(
            encoder, store, artifacts_bucket=be.BUCKET, fetch_ahead_shards=fetch_ahead
        ) as engine:
            for start in range(0, len(jobs), per_run):
                engine.run(jobs[start : start + per_run])
                if not default_malloc:
                    release_free_memory()
    return {"shards": shards, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench_embedder_memory", description=__doc__
    )
    parser.add_argument("--model-dir", type=Path, default=Path(".wsi/models"))
    parser.add_argument("--shards", type=int, nargs="+", default=[3, 64])
    parser.add_argument("--fetch-ahead", type=int, default=3)
    parser.add_argument(
        "--per-run", type=int, default=32, help="shards per engine run (WSI_EMBED_MESSAGES_PER_BATCH)"
    )
    parser.add_argument("--default-malloc", action="store_true", help="without shared/heap.py's setting")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child's own run
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(_one(args.model_dir, args.one, args.fetch_ahead, args.default_malloc, args.per_run)))
        return 0
    peaks = []
    for shards in args.shards:
        command = [sys.executable, "-m", "tests.benchmarks.bench_embedder_memory", "--one", str(shards)]
        command += ["--model-dir", str(args.model_dir), "--fetch-ahead", str(args.fetch_ahead)]
        command += ["--per-run", str(args.per_run)]
        command += ["--default-malloc"] if args.default_malloc else []
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])  # the last line: log lines may precede it
        peaks.append(result["peak_mib"])
        print(f"{shards:5d} shards: peak {result['peak_mib']:.0f} MiB")
    print(f"ratio largest/smallest: {max(peaks) / min(peaks):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
