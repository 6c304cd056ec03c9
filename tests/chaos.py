"""Crash-safety harness: slides through the local stack while services are SIGKILLed mid-work.

Short form (in the test command): ``tests/e2e/test_chaos.py``. Long form (documented in
docs/reliability.md)::

    .venv/bin/python -m tests.chaos --slides 12 --kills 12

Starts its own stack and the six services and uploads the slides in waves (one per round of kills,
the first led by a large slide, ``--large``). Each round goes down the pipeline (ingest, tiler,
quality-filter, embedder, mil-scorer, recorder) and kills each service with SIGKILL only while it
holds work: either its own in-flight gauge (``wsi_in_flight_messages`` on its ``/metrics``) reads
above zero the moment before the kill, or, for about a third of the kills of the aiokafka services,
right between producing a batch's outputs and committing its offsets (the runtime's
``pause_before_commit`` hook, armed by a file). A service that holds no work within ``--kill-wait``
seconds is not killed, and the miss is reported. The killed service is restarted at once.

Then it waits for every slide's outcome and prints a table: slides in, predictions recorded,
duplicates, losses, kills that landed (by service and by moment), misses, redeliveries absorbed,
work left in flight at the end, and the peak memory of each service (its process tree).
Redeliveries are counted two ways. The services' ``wsi_redeliveries_total`` (summed over every
process a service ran as) counts inputs seen again whose earlier attempt had been recorded in the
durable ledger; a kill before that record is written, or after it is cleared (between produce and
commit), is redelivered without being counted there. The recorder's audit log counts events it
received more than once, which is where the outputs re-sent after those kills show up.

``--fault`` runs one of the faults of ``tests/faults.py`` instead of kills (long forms of
``tests/e2e/test_faults.py``)::

    .venv/bin/python -m tests.chaos --fault slow-s3 --slides 6 --latency 3 --fault-seconds 60
    .venv/bin/python -m tests.chaos --fault disk-full --slides 2
    .venv/bin/python -m tests.chaos --fault broker-cut --slides 4 --size 6000x5000
    .venv/bin/python -m tests.chaos --fault db-restart --slides 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults import IN_FLIGHT, REDELIVERIES, ServiceProbe

COMMIT_PAUSE_DIR = "WSI_TEST_COMMIT_PAUSE_DIR"  # shared/bus/runtime.py pause_before_commit

SERVICES = ("ingest", "tiler", "quality-filter", "embedder", "mil-scorer", "recorder")
TERMINAL = {"predicted", "rejected", "failed", "no_tissue"}


def _process_tree(pid: int) -> Iterator[int]:
    """``pid`` and every live descendant (the isolated decoders too); vanished processes are skipped."""
    stack = [pid]
    while stack:
        current = stack.pop()
        yield current
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack.extend(int(c) for c in handle.read().split())
        except (OSError, ValueError):
            continue


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the isolated decoders count too)."""
    total = 0
    for current in _process_tree(pid):
        try:
            with open(f"/proc/{current}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its live descendants, plus the children it has
    already reaped (an isolated decoder that exited counts through its parent's cutime/cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for current in _process_tree(pid):
        try:
            with open(f"/proc/{current}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Kill:
    """One attempt to kill ``service`` while it held work; ``landed`` False means no kill was sent."""

    service: str
    moment: str  # "in-flight" (its gauge above zero) or "before-commit" (outputs acked, offsets not)
    landed: bool
    in_flight: float = 0.0  # the gauge read just before the kill


@dataclass
class ChaosReport:
    slides_in: int
    predictions_recorded: int
    duplicates: int
    losses: int
    redeliveries_absorbed: int  # the recorder's audit log: events it saw more than once
    kills: Counter[str]
    peak_rss: dict[str, int]
    outcomes: Counter[str]
    seconds: float
    lost_keys: list[str] = field(default_factory=list)
    attempts: list[Kill] = field(default_factory=list)
    runtime_redeliveries: dict[str, int] = field(default_factory=dict)  # wsi_redeliveries_total, all pids
    left_in_flight: dict[str, float] = field(default_factory=dict)
    dead_letters: int = 0
    extra: list[tuple[str, str]] = field(default_factory=list)  # fault-specific figures

    @property
    def landed(self) -> list[Kill]:
        return [k for k in self.attempts if k.landed]

    @property
    def missed(self) -> list[Kill]:
        return [k for k in self.attempts if not k.landed]

    def table(self) -> str:
        def by_service(kills: list[Kill]) -> str:
            counts = Counter(k.service for k in kills)
            return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"

        moments = Counter(k.moment for k in self.landed)
        rows = [
            ("slides in", str(self.slides_in)),
            ("predictions recorded", str(self.predictions_recorded)),
            ("duplicates (extra rows or prediction ids)", str(self.duplicates)),
            ("losses (no outcome, or not predicted)", str(self.losses)),
            ("dead letters", str(self.dead_letters)),
        ]
        if self.attempts or self.kills:
            rows += [
                ("kills landed on in-flight work", f"{len(self.landed)}: {by_service(self.landed)}"),
                (
                    "  of which",
                    f"{moments['in-flight']} with the in-flight gauge > 0, "
                    f"{moments['before-commit']} between produce and commit",
                ),
                ("kills missed (not sent, not counted)", f"{len(self.missed)}: {by_service(self.missed)}"),
            ]
        rows += [
            (
                "redeliveries absorbed (services)",
                f"{sum(self.runtime_redeliveries.values())}: "
                + (
                    ", ".join(f"{k} {v}" for k, v in sorted(self.runtime_redeliveries.items()) if v) or "none"
                ),
            ),
            ("redeliveries absorbed (recorder audit)", str(self.redeliveries_absorbed)),
            ("left in flight at the end", f"{sum(self.left_in_flight.values()):.0f}"),
            ("outcomes", ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))),
            ("wall time", f"{self.seconds:.0f} s"),
            *self.extra,
        ]
        rows += [
            (f"max memory {name}", f"{rss / 2**20:.0f} MiB") for name, rss in sorted(self.peak_rss.items())
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)

    @property
    def clean(self) -> bool:
        """No loss, no duplicate, nothing dead-lettered, nothing left in flight, no missed kill."""
        return not (
            self.losses
            or self.duplicates
            or self.dead_letters
            or self.missed
            or any(self.left_in_flight.values())
        )


class MemorySampler(threading.Thread):
    def __init__(self, pipeline: Any) -> None:
        super().__init__(daemon=True)
        self.pipeline = pipeline
        self.peak: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pipeline.pids().items():
                if pid:
                    self.peak[name] = max(self.peak[name], tree_rss_bytes(pid))
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()


class RedeliveryTally:
    """``wsi_redeliveries_total`` per service, summed over every process it ran as (read before each
    kill, and at the end)."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, int], int] = {}

    def note(self, service: str, pid: int, metrics: dict[str, float] | None) -> None:
        if metrics is not None:
            self.last[(service, pid)] = int(metrics.get(REDELIVERIES, 0))

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (service, _pid), value in self.last.items():
            out[service] += value
        return dict(out)


def kill_in_flight(pipeline: Any, probe: ServiceProbe, tally: RedeliveryTally, wait_s: float) -> Kill:
    """SIGKILL ``probe.service`` the moment its in-flight gauge reads above zero; no kill on a miss."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        pid = probe.pid()
        metrics = probe.read(pid) if pid else None
        if pid and metrics is not None:
            tally.note(probe.service, pid, metrics)
            in_flight = metrics.get(IN_FLIGHT, 0.0)
            if in_flight > 0:
                os.kill(pid, signal.SIGKILL)
                return Kill(probe.service, "in-flight", True, in_flight)
        time.sleep(0.02 if metrics is not None else 0.3)
    return Kill(probe.service, "in-flight", False)


def kill_before_commit(pipeline: Any, probe: ServiceProbe, tally: RedeliveryTally, wait_s: float) -> Kill:
    """Arm the runtime's pause between produce and commit, and SIGKILL the service while it waits there."""
    folder = Path(pipeline.env[COMMIT_PAUSE_DIR])
    folder.mkdir(parents=True, exist_ok=True)
    arm, marker = folder / f"{probe.service}.arm", folder / f"{probe.service}.paused"
    marker.unlink(missing_ok=True)
    arm.touch()
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            pid = probe.pid()
            with contextlib.suppress(OSError, ValueError):
                if pid and int(marker.read_text() or 0) == pid:
                    tally.note(probe.service, pid, probe.read(pid))
                    os.kill(pid, signal.SIGKILL)
                    return Kill(probe.service, "before-commit", True, 1.0)
            time.sleep(0.05)
    finally:
        arm.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
    return Kill(probe.service, "before-commit", False)


def kill_plan(kills: int) -> list[list[tuple[str, str]]]:
    """Rounds down the pipeline; about a third of the aiokafka services' kills between produce and commit."""
    rounds: list[list[tuple[str, str]]] = []
    for index in range(kills):
        round_no, position = divmod(index, len(SERVICES))
        if position == 0:
            rounds.append([])
        service = SERVICES[position]
        moment = (
            "before-commit" if (position + round_no) % 3 == 2 and service != "mil-scorer" else "in-flight"
        )
        rounds[-1].append((service, moment))
    return rounds


def upload_all(pipeline: Any, slides: list[Path], prefix: str) -> list[str]:
    keys = []
    for path in slides:
        key = f"{prefix}/{path.name}"
        pipeline.upload(path, key)
        keys.append(key)
    return keys


def run_chaos(
    pipeline: Any,
    slides: list[Path],
    kills: int,
    *,
    seed: int = 0,
    timeout_s: float = 900,
    kill_wait_s: float = 120,
) -> ChaosReport:
    """Upload ``slides`` in one wave per round of kills; kill each service in turn while it holds work."""
    del seed  # the moments come from the services' own state now, not from a random clock
    started = time.monotonic()
    prefix = f"chaos-{int(time.time())}"
    plan = kill_plan(kills) or [[]]
    waves = [slides[i :: len(plan)] for i in range(len(plan))]
    sampler = MemorySampler(pipeline)
    sampler.start()
    tally = RedeliveryTally()
    probes = {name: ServiceProbe(pipeline, name) for name in SERVICES}
    attempts: list[Kill] = []
    keys: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        for wave, victims in zip(waves, plan, strict=True):
            keys += upload_all(pipeline, wave, prefix)
            for service, moment in victims:
                use_hook = moment == "before-commit" and COMMIT_PAUSE_DIR in pipeline.env
                kill = kill_before_commit if use_hook else kill_in_flight
                attempt = kill(pipeline, probes[service], tally, kill_wait_s)
                attempts.append(attempt)
                if attempt.landed:
                    time.sleep(0.3)
                    pipeline.start((service,))
        while not _all_terminal(pipeline, keys) and time.monotonic() < deadline:
            time.sleep(2)
        left = settled_in_flight(probes, tally)
    finally:
        sampler.stop()
    landed = Counter(k.service for k in attempts if k.landed)
    report = _report(pipeline, keys, landed, dict(sampler.peak), time.monotonic() - started)
    report.attempts = attempts
    report.runtime_redeliveries = tally.totals()
    report.left_in_flight = left
    return report


def settled_in_flight(
    probes: dict[str, ServiceProbe], tally: RedeliveryTally, wait_s: float = 20
) -> dict[str, float]:
    """Each service's in-flight gauge once the slides are done (given a few seconds to drain)."""
    deadline = time.monotonic() + wait_s
    while True:
        left: dict[str, float] = {}
        for name, probe in probes.items():
            pid = probe.pid()
            metrics = probe.read(pid) if pid else None
            if pid:
                tally.note(name, pid, metrics)
            left[name] = (metrics or {}).get(IN_FLIGHT, 0.0)
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _all_terminal(pipeline: Any, keys: list[str]) -> bool:
    statuses = pipeline.statuses(keys)
    return len(statuses) == len(keys) and set(statuses.values()) <= TERMINAL


def _report(
    pipeline: Any, keys: list[str], kills: Counter[str], peak: dict[str, int], seconds: float
) -> ChaosReport:
    from wsitk.shared.ops import read_public_events
    from wsitk.shared.topics import PREDICTIONS

    statuses = pipeline.statuses(keys)
    slide_ids = dict(
        pipeline.query("SELECT upload_key, slide_id FROM slide_sources WHERE upload_key = ANY(%s)", (keys,))
    )
    rows = dict(
        pipeline.query(
            "SELECT slide_id, count(*) FROM predictions WHERE slide_id = ANY(%s) GROUP BY slide_id",
            (list(slide_ids.values()),),
        )
    )

    async def prediction_ids() -> dict[str, set[str]]:
        ids: dict[str, set[str]] = defaultdict(set)
        async for _, _, body in read_public_events(pipeline.settings(), [PREDICTIONS], idle_timeout_s=3.0):
            if "meta" in body:  # other tests may leave undecodable records on the topic
                ids[body["meta"]["slide_id"]].add(body["prediction_id"])
        return ids

    topic_ids = asyncio.run(prediction_ids())
    duplicates = sum(max(n - 1, 0) for n in rows.values()) + sum(
        max(len(topic_ids.get(sid, set())) - 1, 0) for sid in slide_ids.values()
    )
    lost = [k for k in keys if statuses.get(k) != "predicted" or rows.get(slide_ids.get(k, ""), 0) == 0]
    absorbed = pipeline.query(
        "SELECT coalesce(sum(deliveries - 1), 0) FROM audit_log WHERE slide_id = ANY(%s)",
        (list(slide_ids.values()),),
    )[0][0]
    dead = pipeline.query(
        "SELECT count(*) FROM dead_letters WHERE slide_id = ANY(%s)", (list(slide_ids.values()),)
    )[0][0]
    return ChaosReport(
        slides_in=len(keys),
        predictions_recorded=sum(rows.values()),
        duplicates=duplicates,
        losses=len(lost),
        redeliveries_absorbed=int(absorbed),
        kills=kills,
        peak_rss=peak,
        outcomes=Counter(statuses.values()),
        seconds=seconds,
        lost_keys=lost,
        dead_letters=int(dead),
    )


def make_chaos_slides(
    folder: Path, count: int, seed: int, size: tuple[int, int] = (2400, 2000)
) -> list[Path]:
    from wsitk.shared.slides.synth import SynthSpec, generate_slide

    paths = []
    for index in range(count):
        path = folder / f"chaos-{seed}-{index:03d}.{'svs' if index % 2 else 'tiff'}"
        spec = SynthSpec(
            width=size[0],
            height=size[1],
            mpp=0.5,
            fmt="svs" if index % 2 else "tiff",
            seed=seed * 1000 + index,
            tumour_fraction=0.3 if index % 2 else 0.0,
        )
        generate_slide(path, spec)
        paths.append(path)
    return paths


FAULTS = ("slow-s3", "disk-full", "broker-cut", "db-restart")


def run_fault(pipeline: Any, fault: str, slides: list[Path], args: argparse.Namespace) -> ChaosReport:
    from tests import faults

    if fault == "slow-s3":
        return faults.slow_object_store(
            pipeline, slides, latency_s=args.latency, seconds=args.fault_seconds, timeout_s=args.timeout
        )
    if fault == "disk-full":
        return faults.full_cache_disk(pipeline, slides, hold_s=args.fault_seconds, timeout_s=args.timeout)
    if fault == "broker-cut":
        return faults.broker_cut_mid_produce(pipeline, slides, cuts=args.cuts, timeout_s=args.timeout)
    return faults.database_restart_mid_transaction(pipeline, slides, timeout_s=args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="2400x2000")
    parser.add_argument("--large", default="8000x6000", help="one more, large slide first ('none': no)")
    parser.add_argument("--kill-wait", type=float, default=180, help="seconds to wait for work in flight")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--fault", choices=FAULTS, help="inject this fault instead of kills")
    parser.add_argument("--latency", type=float, default=3.0, help="slow-s3: seconds added per request")
    parser.add_argument("--fault-seconds", type=float, default=60, help="slow-s3, disk-full: how long")
    parser.add_argument("--cuts", type=int, default=6, help="broker-cut: connection cuts mid-produce")
    args = parser.parse_args(argv)
    from wsitk.shared.models.defaults import init_default_models
    from wsitk.shared.slides.synth import SynthSpec, generate_slide
    from wsitk.shared.stack import LocalStack

    from tests.conftest import Pipeline, pipeline_env
    from tests.tcpproxy import TcpProxy

    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="wsi-chaos-") as tmp:
        root = Path(tmp)
        print(f"building models and {args.slides} slides in {root}", flush=True)
        init_default_models(root / "models", progress=lambda _m: None)
        (root / "slides").mkdir()
        slides = make_chaos_slides(root / "slides", args.slides, args.seed, (width, height))
        if args.large != "none" and not args.fault:
            large = root / "slides" / "chaos-large.svs"
            lw, lh = (int(v) for v in args.large.split("x"))
            generate_slide(large, SynthSpec(width=lw, height=lh, mpp=0.5, fmt="svs", seed=args.seed))
            slides.insert(0, large)
        with LocalStack() as stack:
            host, port = stack.s3_endpoint.rsplit(":", 1)
            proxy = TcpProxy(host, int(port))
            home = root / "home"
            pipeline = Pipeline(
                stack=stack,
                home=home,
                env=pipeline_env(stack, root / "models", home, WSI_S3_ENDPOINT=proxy.endpoint),
                s3_proxy=proxy,
            )
            pipeline.start()
            try:
                if args.fault:
                    report = run_fault(pipeline, args.fault, slides, args)
                else:
                    report = run_chaos(
                        pipeline, slides, args.kills, timeout_s=args.timeout, kill_wait_s=args.kill_wait
                    )
            finally:
                pipeline.stop()
                proxy.close()
    print(report.table())
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
