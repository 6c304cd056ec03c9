"""Pipeline benchmark: slides through the six services on the local stack, against the same work in one process.

Run (not a timed test; numbers depend on the machine and on what else runs on it)::

    python -m tests.benchmarks.bench_pipeline --workdir bench-results/pipeline                 # one 30k x 30k 20x slide
    python -m tests.benchmarks.bench_pipeline --workdir bench-results/pipeline --slides 4 --size 15000x15000
    python -m tests.benchmarks.bench_pipeline --workdir bench-results/pipeline --replicas tiler=2,embedder=2
    python -m tests.benchmarks.bench_pipeline --quick                                         # a minute: smoke form

In one run, on the same generated slides (``wsi synth``: 20x, 0.5 um/px SVS, cached in the workdir) and
the same models (the default backbone and MIL model, ``wsi model init-defaults``):

1. **one process** (``inprocess``): the library code each service runs, called in order in this process
   with no Kafka, S3 or PostgreSQL: ingest's ``inspect_slide`` and content digest, the tiler's
   ``tile_slide`` (segmentation, reading, shard encoding; in this process rather than its memory-limited
   child), quality-filter's per-shard assessment, the embedder's ``EmbeddingEngine`` (over a filesystem
   object store) and the MIL model's score. Time per stage and in all.
2. **pipeline**: a fresh local stack (broker, PostgreSQL, S3) in a temporary directory, the six services
   as processes (``--replicas`` as for ``wsi services up``), every slide uploaded at once. Reported:
   upload-to-prediction wall time (slowest slide), when each stage finished its last shard (from the
   recorder's ``stage_progress``), each stage's busy time (the services' own
   ``wsi_handle_duration_seconds`` sums) and tiles/s over it, and peak memory of each service's process
   tree (the tiler's decoder child included).

``overhead`` is pipeline wall / one-process wall: what the queues, object store, database and process
boundaries cost on top of the work itself; ``overhead_after_upload`` starts the pipeline's clock when the
slide is in the bucket (the one-process run reads a local file). ``cpu_s`` gives the CPU seconds of each
service's and each local server's process tree over the pipeline run, beside the one-process run's own,
so that the overhead can be attributed. On a 2-core machine the stages compete for the same cores,
so the pipeline cannot overlap much; the figure is the price of the architecture, not its speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PIPELINE_SERVICES = ("ingest", "tiler", "quality-filter", "embedder", "mil-scorer", "recorder")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_pipeline", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("bench-results/pipeline"))
    parser.add_argument("--size", default="30000x30000", help="slide width x height in pixels (20x)")
    parser.add_argument("--slides", type=int, default=1, help="slides uploaded together")
    parser.add_argument("--replicas", default="", help="as `wsi services up --replicas`, e.g. tiler=2")
    parser.add_argument("--skip-inprocess", action="store_true", help="only the pipeline run")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the one-process run")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for predictions")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--models", type=Path, default=None, help="a model directory (default: build one)")
    parser.add_argument("--quick", action="store_true", help="two small slides (the smoke form)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.slides = "3000x2400", 2
    return args


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- inputs ---------------------------------------------------------------------------------------
def make_slides(folder: Path, count: int, size: str) -> list[Path]:
    from wsitk.shared.slides.synth import SynthSpec, generate_slide

    width, height = (int(v) for v in size.lower().split("x"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"bench-{width}x{height}-{index}.svs"
        if not path.is_file():
            _say(f"generating {path.name} ...")
            started = time.perf_counter()
            spec = SynthSpec(
                width=width, height=height, mpp=0.5, fmt="svs", seed=500 + index, tumour_fraction=0.2
            )
            generate_slide(path, spec)
            _say(f"  {path.stat().st_size / 2**20:.0f} MB in {time.perf_counter() - started:.0f} s")
        paths.append(path)
    return paths


def default_models(folder: Path) -> Path:
    from wsitk.shared.models.defaults import init_default_models

    # Always asked: it does nothing when the folder's models match the current recipe, and rebuilds them
    # when the recipe changed (a workdir kept from an older checkout would otherwise measure old models).
    init_default_models(
        folder, seed=0, progress=lambda msg: _say(msg) if "nothing to do" not in msg else None
    )
    return folder


def _profile(models: Path) -> Any:
    """The profile ingest would pin with default settings and the default models."""
    from wsitk.shared.config import Settings
    from wsitk.shared.contracts import pb, profile_id

    manifest = json.loads((models / "models.json").read_text())
    settings = Settings(model_dir=models)
    profile = pb.PipelineProfile(
        target_mpp=settings.target_mpp,
        tile_size=settings.tile_size,
        tiles_per_shard=settings.tiles_per_shard,
        encoder_id=manifest["backbone"]["backbone_id"],
        mil_model_version=manifest["mil"]["model_version"],
        min_tissue_fraction=settings.min_tissue_fraction,
    )
    profile.profile_id = profile_id(profile)
    return profile


# -- one process ----------------------------------------------------------------------------------
def _own_cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_inprocess(slides: list[Path], models: Path, workdir: Path) -> dict[str, Any]:
    """Every stage's library code on every slide, in order, in this process; seconds per stage."""
    import numpy as np
    from google.protobuf import json_format
    from wsitk.services.embedder.engine import EmbeddingEngine, ShardJob
    from wsitk.services.quality_filter.handler import assess_shard
    from wsitk.services.tiler.handler import tile_slide
    from wsitk.shared.config import Settings
    from wsitk.shared.models.runtime import MilRunner, open_backbone
    from wsitk.shared.objectstore import FilesystemObjectStore, sha256_file
    from wsitk.shared.shards import Shard
    from wsitk.shared.slides.reader import inspect_slide

    manifest = json.loads((models / "models.json").read_text())
    settings = Settings(model_dir=models)
    profile = _profile(models)
    scratch = Path(tempfile.mkdtemp(prefix="bench-inprocess-", dir=workdir))
    store = FilesystemObjectStore(scratch / "store")
    bucket = settings.artifacts_bucket
    store.ensure_bucket(bucket)
    encoder = open_backbone(models / manifest["backbone"]["path"], batch_size=settings.embed_batch_size)
    mil = MilRunner(models / manifest["mil"]["path"])
    seconds = dict.fromkeys(("ingest", "tiler", "quality-filter", "embedder", "mil-scorer"), 0.0)
    cpu = dict.fromkeys(seconds, 0.0)  # CPU seconds of this process (all its threads) per stage

    @contextlib.contextmanager
    def timed(stage: str) -> Iterator[None]:
        wall, used = time.perf_counter(), _own_cpu_seconds()
        yield
        seconds[stage] += time.perf_counter() - wall
        cpu[stage] += _own_cpu_seconds() - used

    tiles = {"planned": 0, "accepted": 0}
    cpu_start = _own_cpu_seconds()
    started_all = time.perf_counter()
    try:
        with EmbeddingEngine(encoder, store, artifacts_bucket=bucket) as engine:
            for slide in slides:
                with timed("ingest"):
                    slide_id = sha256_file(slide)[:32]
                    inspect_slide(slide, max_pixels=settings.max_slide_pixels)

                with timed("tiler"):
                    out = scratch / slide_id
                    out.mkdir()
                    plan = tile_slide(str(slide), json_format.MessageToJson(profile), str(out), slide_id)
                    assert isinstance(plan, dict), plan
                    shard_keys = []
                    for shard in plan["shards"]:
                        key = f"tiles/{slide_id}/bench/{shard['shard_id']}.shard"
                        store.put_file_if_absent(bucket, key, out / f"{shard['shard_id']}.shard")
                        shard_keys.append((shard["shard_id"], key))
                tiles["planned"] += plan["total_tiles"]

                with timed("quality-filter"):
                    jobs = []
                    for shard_id, key in shard_keys:
                        report = assess_shard(Shard(store.get_bytes(bucket, key)), profile)
                        accepted = np.array(report["accepted"], dtype=bool)
                        tiles["accepted"] += int(accepted.sum())
                        jobs.append(ShardJob(slide_id, "bench", shard_id, bucket, key, accepted))

                with timed("embedder"):
                    results = engine.run(jobs)

                with timed("mil-scorer"):
                    features = []
                    for result in results:
                        if isinstance(result, BaseException):
                            raise result
                        if result.stored is not None:
                            with np.load(io.BytesIO(store.get_bytes(bucket, result.stored.key))) as arrays:
                                features.append(arrays["features"].astype(np.float32))
                    if features:
                        mil.score(np.concatenate(features))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wall = time.perf_counter() - started_all
    cpu_used = _own_cpu_seconds() - cpu_start
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu_used, 1),
        "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "stage_cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "stage_tiles_per_s": {
            "tiler": round(tiles["planned"] / max(seconds["tiler"], 1e-9), 1),
            "quality-filter": round(tiles["planned"] / max(seconds["quality-filter"], 1e-9), 1),
            "embedder": round(tiles["accepted"] / max(seconds["embedder"], 1e-9), 1),
        },
        "tiles_planned": tiles["planned"],
        "tiles_accepted": tiles["accepted"],
    }


# -- pipeline -------------------------------------------------------------------------------------
def _metrics_ports(home: Path) -> dict[str, int]:
    ports = {}
    for log in (home / "logs").glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"service starting"' in line and "{" in line:
                ports[log.stem] = int(json.loads(line[line.index("{") :])["metrics_port"])
    return ports


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _sum_metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for label_text, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


class _MemorySampler(threading.Thread):
    """Peak resident memory of each running service: its process tree sampled five times a second (the
    tiler's decoder children count), or its main process's own high-water mark (``VmHWM``, which no
    sampling misses: a 10,000 px slide keeps the embedder busy for about a second), whichever is larger."""

    def __init__(self, home: Path) -> None:
        super().__init__(daemon=True)
        self.home = home
        self.peak: dict[str, int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        from wsitk.shared.ops import replica_status

        from tests.chaos import tree_rss_bytes

        os.environ["WSI_HOME"] = str(self.home)
        while not self._done.wait(0.2):
            for instance, pid in replica_status(PIPELINE_SERVICES).items():
                seen = max(tree_rss_bytes(pid), _high_water_bytes(pid))
                self.peak[instance] = max(self.peak.get(instance, 0), seen)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def _high_water_bytes(pid: int) -> int:
    """A process's peak resident memory so far (``VmHWM``), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_pipeline(
    slides: list[Path], models: Path, workdir: Path, replicas: dict[str, int], timeout_s: float
) -> dict[str, Any]:
    import psycopg
    from wsitk.shared.config import Settings
    from wsitk.shared.objectstore import S3ObjectStore
    from wsitk.shared.ops import services_down, services_up
    from wsitk.shared.stack import LocalStack

    from tests.conftest import pipeline_env

    home = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=workdir))
    keys = [f"bench/{path.name}" for path in slides]
    with LocalStack() as stack:
        # The tests' service environment, with the product's shard size (the tests use small shards).
        env = pipeline_env(stack, models, home, WSI_TILES_PER_SHARD=str(Settings().tiles_per_shard))
        os.environ["WSI_HOME"] = str(home)
        settings = Settings(**{k.removeprefix("WSI_").lower(): v for k, v in env.items() if k != "WSI_HOME"})
        services_up(PIPELINE_SERVICES, env=env, replicas=replicas)
        sampler = _MemorySampler(home)
        try:
            expected = sum(replicas.get(name, 1) for name in PIPELINE_SERVICES)
            deadline = time.monotonic() + 180
            while len(_metrics_ports(home)) < expected and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(5)  # consumer groups joined
            sampler.start()
            store = S3ObjectStore(settings)
            cpu_before = _cpu_by_process(home, stack.pids)
            uploaded = time.time()
            for path, key in zip(slides, keys, strict=True):
                store.client.fput_object(settings.uploads_bucket, key, str(path))
            landed = time.time()
            _say(f"uploaded {len(slides)} slide(s) in {landed - uploaded:.1f} s; waiting for predictions ...")
            rows = _wait_predicted(stack.database_url(), keys, timeout_s, psycopg)
            finished = max(row[1] for row in rows.values()).timestamp()
            cpu_after = _cpu_by_process(home, stack.pids)
            slide_ids = [row[0] for row in rows.values()]
            spans = _stage_spans(stack.database_url(), slide_ids, uploaded, psycopg)
            predictions = _predictions_per_slide(stack.database_url(), slide_ids, psycopg)
            ports = _metrics_ports(home)
            texts = {instance: _scrape(port) for instance, port in ports.items()}
        finally:
            sampler.stop()
            services_down(PIPELINE_SERVICES, timeout_s=30)
    shutil.rmtree(home, ignore_errors=True)
    busy: dict[str, float] = {}
    member_busy: dict[str, float] = {}
    tiles: dict[str, float] = {}
    for instance, text in texts.items():
        stage = re.sub(r"-\d+$", "", instance)
        member_busy[instance] = _sum_metric(text, "wsi_handle_duration_seconds_sum", service=stage)
        busy[stage] = busy.get(stage, 0.0) + member_busy[instance]
        counted = {
            "tiler": _sum_metric(text, "wsi_tiles_total", service="tiler", outcome="planned"),
            "quality-filter": _sum_metric(text, "wsi_tiles_total", service="quality-filter"),
            "embedder": _sum_metric(text, "wsi_tiles_total", service="embedder"),
        }.get(stage, 0.0)
        tiles[stage] = tiles.get(stage, 0.0) + counted
    cpu = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 1) for k in sorted(cpu_after)}
    return {
        "wall_s": round(finished - uploaded, 2),
        "upload_s": round(landed - uploaded, 2),
        "wall_after_upload_s": round(finished - landed, 2),
        # CPU seconds each process tree used from the start of the upload to the last prediction: the
        # services and the local stack's servers (broker, PostgreSQL, the S3 server) on the same cores
        "cpu_s": cpu,
        "cpu_s_total": round(sum(cpu.values()), 1),
        "stage_first_shard_s": {stage: first for stage, (first, _) in spans.items()},
        "stage_last_shard_s": {stage: last for stage, (_, last) in spans.items()},
        "stage_busy_s": {k: round(v, 2) for k, v in busy.items()},
        "member_busy_s": {k: round(v, 2) for k, v in sorted(member_busy.items())},
        "stage_tiles": {k: int(v) for k, v in tiles.items() if v},
        "predictions_per_slide": predictions,
        "stage_tiles_per_busy_s": {
            k: round(tiles[k] / busy[k], 1) for k in tiles if tiles[k] and busy.get(k)
        },
        "peak_rss_mib": {k: round(v / 2**20) for k, v in sorted(sampler.peak.items())},
        "replicas": replicas,
    }


def _cpu_by_process(home: Path, servers: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each service instance's process tree and of each local server's."""
    from wsitk.shared.ops import replica_status

    from tests.chaos import tree_cpu_seconds

    os.environ["WSI_HOME"] = str(home)
    pids = {**replica_status(PIPELINE_SERVICES), **{f"server:{k}": v for k, v in servers.items()}}
    return {name: tree_cpu_seconds(pid) for name, pid in pids.items()}


def _wait_predicted(dsn: str, keys: list[str], timeout_s: float, psycopg: Any) -> dict[str, tuple[Any, ...]]:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        with psycopg.connect(dsn, options="-c search_path=wsi,public") as conn:
            status = dict(
                conn.execute(
                    "SELECT src.upload_key, s.status FROM slide_sources src JOIN slides s USING (slide_id) "
                    "WHERE src.upload_key = ANY(%s)",
                    (keys,),
                ).fetchall()
            )
            rows = conn.execute(
                "SELECT src.upload_key, p.slide_id, min(p.recorded_at) FROM slide_sources src "
                "JOIN predictions p USING (slide_id) WHERE src.upload_key = ANY(%s) GROUP BY 1, 2",
                (keys,),
            ).fetchall()
        line = ", ".join(f"{k.rsplit('/', 1)[-1]}: {v}" for k, v in sorted(status.items()))
        if line != last:
            _say(f"  {time.strftime('%H:%M:%S')} {line}")
            last = line
        failed = {k: v for k, v in status.items() if v in {"rejected", "failed", "no_tissue"}}
        if failed:
            raise RuntimeError(f"slides did not get a prediction: {failed}")
        if len(rows) == len(keys):
            return {key: (slide_id, at) for key, slide_id, at in rows}
        time.sleep(1)
    raise TimeoutError(f"no prediction for every slide within {timeout_s:.0f} s")


def _stage_spans(
    dsn: str, slide_ids: list[str], uploaded: float, psycopg: Any
) -> dict[str, tuple[float, float]]:
    """Seconds from upload until each stage's first and last shard were recorded (over all slides)."""
    with psycopg.connect(dsn, options="-c search_path=wsi,public") as conn:
        rows = conn.execute(
            "SELECT stage, min(recorded_at), max(recorded_at) FROM stage_progress WHERE slide_id = ANY(%s) "
            "GROUP BY 1",
            (slide_ids,),
        ).fetchall()
    return {
        stage: (round(first.timestamp() - uploaded, 2), round(last.timestamp() - uploaded, 2))
        for stage, first, last in rows
    }


def _predictions_per_slide(dsn: str, slide_ids: list[str], psycopg: Any) -> dict[str, int]:
    """Prediction rows per slide (each slide must have exactly one)."""
    with psycopg.connect(dsn, options="-c search_path=wsi,public") as conn:
        rows = conn.execute(
            "SELECT slide_id, count(*) FROM predictions WHERE slide_id = ANY(%s) GROUP BY 1", (slide_ids,)
        ).fetchall()
    counts = dict.fromkeys(slide_ids, 0)
    counts.update({slide_id: int(count) for slide_id, count in rows})
    return counts


def prepare_inputs(args: argparse.Namespace) -> tuple[Path, list[Path], Path]:
    """From ``--workdir``, ``--slides``, ``--size`` and ``--models``: the work directory (created), the
    generated slides (cached in it) and the model directory (the default models, built when needed)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir.resolve()
    slides = make_slides(workdir / "slides", args.slides, args.size)
    models = args.models.resolve() if args.models else default_models(workdir / "models")
    return workdir, slides, models


def main(argv: list[str] | None = None) -> int:
    from wsitk.shared.ops import parse_replicas

    args = _parse(argv)
    workdir, slides, models = prepare_inputs(args)
    report: dict[str, Any] = {
        "slides": len(slides),
        "size": args.size,
        "slide_mb": round(sum(p.stat().st_size for p in slides) / 2**20, 1),
        "slide_sha256": [hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in slides],
        "cpus": os.cpu_count(),
    }
    if not args.skip_inprocess:
        _say("one process ...")
        report["inprocess"] = run_inprocess(slides, models, workdir)
        _say(json.dumps(report["inprocess"]))
    if not args.skip_pipeline:
        _say("pipeline ...")
        report["pipeline"] = run_pipeline(
            slides, models, workdir, parse_replicas(args.replicas), args.timeout
        )
    if "inprocess" in report and "pipeline" in report:
        report["overhead"] = round(report["pipeline"]["wall_s"] / report["inprocess"]["wall_s"], 3)
        # the one-process run reads a local file: from the moment the slide is in the bucket
        report["overhead_after_upload"] = round(
            report["pipeline"]["wall_after_upload_s"] / report["inprocess"]["wall_s"], 3
        )
        busy = report["pipeline"]["stage_busy_s"]
        embedder = busy.get("embedder", 0.0)
        report["stages_slower_than_embedder"] = sorted(
            name for name in ("ingest", "tiler", "quality-filter") if busy.get(name, 0.0) > embedder
        )
    emit_report(report, args.json_out)
    return 0


def emit_report(report: dict[str, Any], json_out: Path | None) -> None:
    """Print the report as JSON, and write it to ``json_out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_out:
        json_out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
