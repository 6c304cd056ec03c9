"""Tiles per second of each registered encoder family at full size, on this machine's CPU.

Random weights (throughput does not depend on their values), the family's own input size, a fixed batch
size and thread count (both reported). For each family: the torch forward pass (the network the export is
traced from) and, with ``--onnx``, the exported ONNX file on ONNX Runtime's CPU provider (export and
validation time not counted). Not part of the test suite: it measures, it does not pass or fail.

    python -m tests.benchmarks.bench_encoders --families uni virchow2 --batch-size 4 --threads 2
    python -m tests.benchmarks.bench_encoders --onnx --families uni phikon-v2 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from wsitk.shared.models.encoders import ENCODERS, build_encoder


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--families", nargs="+", default=[n for n, s in ENCODERS.items() if s.vit is not None]
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2, help="timed batches after one warm-up batch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--onnx", action="store_true", help="also export and time ONNX Runtime (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    return parser.parse_args(argv)


def _time(run: Any, batch: np.ndarray, batches: int) -> float:
    run(batch)  # warm-up: allocations, kernel selection
    started = time.perf_counter()
    for _ in range(batches):
        run(batch)
    return len(batch) * batches / (time.perf_counter() - started)


def bench_family(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = ENCODERS[name]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = build_encoder(name, None, seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    batch = np.random.default_rng(0).standard_normal((args.batch_size, 3, spec.input_size, spec.input_size))
    batch = batch.astype(np.float32)

    def torch_run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    row: dict[str, Any] = {
        "family": name,
        "parameters_millions": round(parameters / 1e6, 1),
        "input_size": spec.input_size,
        "output_dim": spec.output_dim,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "build_s": round(time.perf_counter() - started, 1),
        "torch_tiles_per_s": round(_time(torch_run, batch, args.batches), 3),
    }
    if args.onnx:
        from wsitk.shared.models.export import export_backbone
        from wsitk.shared.models.runtime import create_session

        del model
        with tempfile.TemporaryDirectory(prefix="bench-encoder-") as directory:
            started = time.perf_counter()
            info = export_backbone(name, Path(directory) / f"{name}.onnx")
            row["export_s"] = round(time.perf_counter() - started, 1)
            row["onnx_max_rel_diff_vs_torch"] = info.max_rel_diff
            session = create_session(
                info.path, prefer=("CPUExecutionProvider",), intra_op_threads=args.threads
            )

            def onnx_run(x: np.ndarray) -> np.ndarray:
                return session.run(["features"], {"tiles": x})[0]

            row["onnx_tiles_per_s"] = round(_time(onnx_run, batch, args.batches), 3)
    return row


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    unknown = [n for n in args.families if n not in ENCODERS]
    if unknown:
        print(f"unknown families {unknown}; registered: {sorted(ENCODERS)}", file=sys.stderr)
        return 2
    rows = []
    for name in args.families:
        row = bench_family(name, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    width = max(len(r["family"]) for r in rows)
    print(f"\n{'family':<{width}}  params(M)  input  dim   torch tiles/s  onnx tiles/s")
    for r in rows:
        onnx = f"{r['onnx_tiles_per_s']:.2f}" if "onnx_tiles_per_s" in r else "-"
        print(
            f"{r['family']:<{width}}  {r['parameters_millions']:>9}  {r['input_size']:>5}  {r['output_dim']:>4}"
            f"  {r['torch_tiles_per_s']:>13.2f}  {onnx:>12}"
        )
    print(f"batch {args.batch_size}, {args.threads} threads, {args.batches} timed batches each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
