"""Operator commands behind ``wsi``: migrate, run the services, submit slides, read outcomes, redrive.

Each ``cli_*`` function takes the parsed arguments and returns an exit code; the logic underneath
(``services_up``, ``submit_files``, ``read_public_events``...) is callable from tests and the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from wsitk.shared.config import Settings, load_settings, wsi_home

SERVICE_NAMES = ("ingest", "tiler", "quality-filter", "embedder", "mil-scorer", "recorder", "viewer")


# -- database -------------------------------------------------------------------------------------
def cli_db(args: argparse.Namespace) -> int:
    from wsitk.shared.db.migrate import AppRoleMissing, migrate, wait_for_schema

    settings = load_settings()
    if args.action == "wait":
        # The services' init containers: under the services' own role, until every migration this
        # version ships is recorded (an older schema keeps the new version from starting).
        timeout = getattr(args, "timeout", None)
        return 0 if wait_for_schema(settings.dsn(), timeout_s=timeout) else 1
    if not settings.has_admin_url():
        print(
            "WSI_DATABASE_ADMIN_URL is not set: migrations run under the owner role, not the services' role",
            file=sys.stderr,
        )
        return 2
    try:
        applied = migrate(settings.dsn(admin=True), app_user=_app_user(settings))
    except AppRoleMissing as exc:
        print(f"migration incomplete: {exc}", file=sys.stderr)
        return 3
    _grant_viewer(settings)
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def _grant_viewer(settings: Settings) -> None:
    """The viewer's login role (from WSI_VIEWER_DATABASE_URL, when set) joins the read-only group."""
    if settings.viewer_database_url is None and not os.environ.get("WSI_VIEWER_DATABASE_URL_FILE"):
        return
    from psycopg.conninfo import conninfo_to_dict
    from wsitk.shared.db.viewer_role import grant_viewer_role

    parts = conninfo_to_dict(settings.viewer_dsn())
    password = str(parts["password"]) if parts.get("password") else None
    grant_viewer_role(settings.dsn(admin=True), str(parts.get("user", "wsi_viewer")), password)


def _app_user(settings: Settings) -> str:
    from psycopg.conninfo import conninfo_to_dict

    return str(conninfo_to_dict(settings.dsn()).get("user", "wsi_app"))


# -- services as background processes ----------------------------------------------------------------
def _run_dir() -> Path:
    return wsi_home() / "run"


def _log_dir() -> Path:
    return wsi_home() / "logs"


def instance_names(name: str, replicas: int) -> list[str]:
    """Process names of a stage run as ``replicas`` members of its consumer group: tiler, tiler-2, ..."""
    return [name if index == 1 else f"{name}-{index}" for index in range(1, replicas + 1)]


def _running_instances(name: str) -> dict[str, int]:
    """Every running process of one stage (the first member and its replicas), by instance name."""
    from wsitk.shared.stack.procs import running_pid

    found = {}
    paths = [_run_dir() / f"service-{name}.pid", *sorted(_run_dir().glob(f"service-{name}-[0-9]*.pid"))]
    for path in paths:
        instance = path.name.removeprefix("service-").removesuffix(".pid")
        if pid := running_pid(path, "wsi"):
            found[instance] = pid
    return found


def parse_replicas(text: str) -> dict[str, int]:
    """``tiler=2,quality-filter=2`` -> {"tiler": 2, "quality-filter": 2}; a readable ValueError otherwise."""
    counts: dict[str, int] = {}
    for part in filter(None, (item.strip() for item in text.split(","))):
        name, _, value = part.partition("=")
        if name not in SERVICE_NAMES:
            raise ValueError(f"--replicas: unknown service {name!r} (one of {', '.join(SERVICE_NAMES)})")
        if name == "viewer":  # not a consumer: more of it would only compete for its port
            raise ValueError("--replicas: the viewer runs as one process locally")
        if not value.isdigit() or not 1 <= int(value) <= 16:
            raise ValueError(f"--replicas: {part!r} needs a count from 1 to 16 (e.g. {name}=2)")
        counts[name] = int(value)
    return counts


def services_up(
    names: Sequence[str] = SERVICE_NAMES,
    env: dict[str, str] | None = None,
    replicas: dict[str, int] | None = None,
) -> dict[str, int]:
    """Start each service as its own detached process (``wsi run NAME``); returns pids by instance name.

    ``replicas`` runs a stage as that many members of its consumer group (they share its partitions),
    each with its own log (``logs/tiler-2.log``), pid file and metrics port (a free one, logged);
    members above the count that are running are stopped, so the same call scales up and down.
    """
    from wsitk.shared.stack.procs import running_pid, spawn_detached

    base_env = {**os.environ, **(env or {})}
    pids = {}
    for name in names:
        count = (replicas or {}).get(name, 1)
        for index, instance in enumerate(instance_names(name, count), start=1):
            pid_path = _run_dir() / f"service-{instance}.pid"
            existing = running_pid(pid_path, "wsi")
            if existing:
                pids[instance] = existing
                continue
            member_env = dict(base_env)
            if index > 1:
                member_env["WSI_REPLICA"] = instance
                member_env["WSI_METRICS_PORT"] = "0"  # a free port each; the first keeps the configured one
            command = [sys.executable, "-m", "wsitk.shared.cli", "run", name]
            pids[instance] = spawn_detached(
                command, log_path=_log_dir() / f"{instance}.log", pid_path=pid_path, env=member_env
            )
        if replicas is not None and name in replicas:
            extra = [i for i in _running_instances(name) if i not in instance_names(name, count)]
            _stop_instances(extra)
    return pids


def _stop_instances(instances: Sequence[str], timeout_s: float = 30.0) -> list[str]:
    from wsitk.shared.stack.procs import running_pid, terminate

    stopped = []
    for instance in instances:
        pid_path = _run_dir() / f"service-{instance}.pid"
        pid = running_pid(pid_path, "wsi")
        if pid:
            terminate(pid, timeout_s=timeout_s)
            stopped.append(instance)
        pid_path.unlink(missing_ok=True)
    return stopped


def services_down(names: Sequence[str] = SERVICE_NAMES, timeout_s: float = 30.0) -> list[str]:
    """Stop each named service, every replica of it included; returns the instances stopped."""
    instances: list[str] = []
    for name in names:
        instances += [name, *(i for i in _running_instances(name) if i != name)]
    return _stop_instances(instances, timeout_s)


def services_status(names: Sequence[str] = SERVICE_NAMES) -> dict[str, int | None]:
    """Pid of each named service's first member (None when stopped)."""
    from wsitk.shared.stack.procs import running_pid

    return {name: running_pid(_run_dir() / f"service-{name}.pid", "wsi") for name in names}


def replica_status(names: Sequence[str] = SERVICE_NAMES) -> dict[str, int]:
    """Pids of every running member of the named services, replicas included, by instance name."""
    found: dict[str, int] = {}
    for name in names:
        found.update(_running_instances(name))
    return found


def viewer_url(timeout_s: float = 15.0) -> str:
    """The address the running viewer logged when it started ("" when it has not, within the timeout)."""
    log_path = _log_dir() / "viewer.log"
    deadline = time.monotonic() + timeout_s
    while True:
        url = ""
        lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
        for line in lines:
            if '"service starting"' in line and "{" in line:
                with contextlib.suppress(ValueError):
                    url = str(json.loads(line[line.index("{") :]).get("url", ""))
        if url or time.monotonic() >= deadline or not services_status(["viewer"])["viewer"]:
            return url
        time.sleep(0.5)


def cli_services(args: argparse.Namespace) -> int:
    names = args.only or list(SERVICE_NAMES)
    try:
        replicas = parse_replicas(args.replicas) if getattr(args, "replicas", "") else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if replicas and args.action not in {"up", "restart"}:
        print("--replicas goes with `up` or `restart`", file=sys.stderr)
        return 2
    if replicas and args.only:  # --only tiler --replicas embedder=2 acts on both
        names = list(dict.fromkeys([*names, *replicas]))
    if args.action in {"down", "restart"}:
        print("stopped:", ", ".join(services_down(names)) or "none running")
    if args.action in {"up", "restart"}:
        for instance, pid in services_up(names, replicas=replicas).items():
            print(f"{instance:15s} pid {pid:>7d}  log {_log_dir() / (instance + '.log')}")
        if "viewer" in names and (url := viewer_url()):
            print(f"viewer at {url}")
    if args.action == "status":
        status = services_status(names)
        members = replica_status(names)
        for name, running in status.items():
            extra = sorted(i for i in members if i != name and i.rsplit("-", 1)[0] == name)
            state = "running pid " + str(running) if running else "stopped"
            if extra:
                state += f" (+ replicas {', '.join(f'{i} pid {members[i]}' for i in extra)})"
            print(f"{name:15s} {state}")
        return 0 if all(status.values()) else 1
    return 0


# -- submit ---------------------------------------------------------------------------------------
def submit_files(settings: Settings, files: Iterable[Path], prefix: str = "") -> list[str]:
    """Upload files into the uploads bucket; the poller (or MinIO's notification) does the rest."""
    from wsitk.shared.objectstore import S3ObjectStore

    store = S3ObjectStore(settings)
    keys = []
    for path in files:
        key = f"{prefix.strip('/')}/{path.name}" if prefix else path.name
        store.client.fput_object(settings.uploads_bucket, key, str(path))
        keys.append(key)
    return keys


def cli_submit(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"not a file: {', '.join(missing)}", file=sys.stderr)
        return 2
    for key in submit_files(load_settings(), args.files, args.prefix):
        print(f"uploaded s3://{load_settings().uploads_bucket}/{key}")
    return 0


# -- slide references ---------------------------------------------------------------------------
def resolve_slide_ids(settings: Settings, references: Sequence[str]) -> list[str]:
    """The full slide id of each reference a person typed: the short id ``wsi status`` prints (any
    unique prefix of 8+ hex digits), a full id, an upload key or a file name.

    Raises ``CorrectionError`` naming every reference that is unknown or ambiguous (with the slides an
    ambiguous one matches), so a command acts on all the slides given or on none.
    """
    from wsitk.shared.corrections import CorrectionError, resolve_slide
    from wsitk.shared.db.connection import Database

    db = Database(settings.dsn())
    try:
        found: list[str] = []
        problems: list[str] = []
        for reference in references:
            try:
                found.append(resolve_slide(db, reference)[0])
            except CorrectionError as exc:
                problems.append(str(exc))
    finally:
        db.close()
    if problems:
        raise CorrectionError("\n".join(problems))
    return found


# -- status ---------------------------------------------------------------------------------------
def slide_table(settings: Settings, limit: int = 50) -> list[dict[str, Any]]:
    from wsitk.shared.db.connection import Database

    db = Database(settings.dsn())
    try:
        rows = db.execute(
            """
            SELECT s.slide_id, s.status, array_to_string(s.upload_keys, ', '), p.label, p.probability,
                   p.model_version, s.total_tiles, s.reason_code, s.status_reason, s.runs, s.mpp, s.mpp_source,
                   p.out_of_distribution, p.ood_score, p.ood_limit
            FROM v_slide_status s
            LEFT JOIN LATERAL (SELECT * FROM v_predictions vp WHERE vp.slide_id = s.slide_id
                               ORDER BY vp.tiling_run_id = s.tiling_run_id DESC, vp.recorded_at DESC
                               LIMIT 1) p ON true
            ORDER BY s.first_seen_at DESC LIMIT %s
            """,
            (limit,),
        )
    finally:
        db.close()
    columns = [
        "slide_id",
        "status",
        "upload_keys",
        "label",
        "probability",
        "model_version",
        "tiles",
        "reason_code",
        "reason",
        "runs",
        "mpp",
        "mpp_source",
        "out_of_distribution",
        "ood_score",
        "ood_limit",
    ]
    return [dict(zip(columns, row, strict=True)) for row in rows]


def slide_runs(settings: Settings, slide_id: str) -> list[dict[str, Any]]:
    """Every run of one slide, oldest first, with its profile changes and its predictions."""
    from wsitk.shared.db.connection import Database

    db = Database(settings.dsn())
    try:
        rows = db.execute(
            """
            SELECT r.tiling_run_id, r.profile_id, r.origin, r.reason, r.started_at,
                   r.tiling_run_id = s.tiling_run_id AS current, s.status,
                   (SELECT count(*) FROM stage_progress g WHERE g.slide_id = r.slide_id
                      AND g.tiling_run_id = r.tiling_run_id AND g.stage = 'embedder') AS shards_embedded,
                   coalesce((SELECT json_agg(json_build_object('model_version', p.model_version, 'label', p.label,
                                    'probability', p.probability, 'origin', p.origin,
                                    'out_of_distribution', p.out_of_distribution, 'ood_score', p.ood_score,
                                    'ood_limit', p.ood_limit) ORDER BY p.recorded_at)
                             FROM predictions p WHERE p.slide_id = r.slide_id AND p.tiling_run_id = r.tiling_run_id),
                            '[]'::json)
            FROM slide_runs r JOIN slides s ON s.slide_id = r.slide_id
            WHERE r.slide_id = %s OR (length(%s) >= 8 AND left(r.slide_id, length(%s)) = %s)
            ORDER BY r.slide_id, r.started_at
            """,
            (slide_id, slide_id, slide_id, slide_id),
        )
    finally:
        db.close()
    columns = [
        "tiling_run_id",
        "profile_id",
        "origin",
        "reason",
        "started_at",
        "current",
        "status",
        "shards_embedded",
        "predictions",
    ]
    return [dict(zip(columns, row, strict=True)) for row in rows]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'upload (file name)':36s} {'slide id':12s} {'status':10s} {'label':7s} {'P(tumour)':>9s} {'tiles':>6s}  detail"
    ]
    for row in rows:
        probability = f"{row['probability']:.3f}" if row["probability"] is not None else ""
        detail = row["reason"] or (row["model_version"] or "")
        if row.get("mpp_source") == "slide-override":
            detail = f"{detail}  [slide MPP {row['mpp']:g}]".strip()
        if (row.get("runs") or 0) > 1:
            detail = f"{detail}  [run {row['runs']}]".strip()
        if row.get("out_of_distribution"):
            detail = (
                f"OUT OF DISTRIBUTION (score {row['ood_score']:.1f} > limit {row['ood_limit']:.1f}: unlike the "
                f"model's training slides, do not trust the label)  {detail}"
            )
        lines.append(
            f"{_file_names(row['upload_keys'])[-36:]:36s} {row['slide_id'][:12]:12s} {row['status']:10s} {row['label'] or '':7s} "
            f"{probability:>9s} {row['tiles'] or 0:>6d}  {detail[:120]}"
        )
    return "\n".join(lines)


def _ood_note(prediction: dict[str, Any]) -> str:
    """The out-of-distribution verdict of one prediction, as `wsi status --slide` prints it."""
    if prediction.get("out_of_distribution") is None:
        return ""
    verdict = "OUT OF DISTRIBUTION" if prediction["out_of_distribution"] else "in distribution"
    return f"  {verdict} (score {prediction['ood_score']:.2f}, limit {prediction['ood_limit']:.2f})"


def _file_names(keys: str | None) -> str:
    return ", ".join(key.rsplit("/", 1)[-1] for key in (keys or "").split(", "))


def cli_status(args: argparse.Namespace) -> int:
    if args.slide:
        settings = load_settings()
        runs = slide_runs(settings, resolve_slide_ids(settings, [args.slide])[0])
        if not runs:
            print(f"wsi status: no recorded run of slide {args.slide!r}", file=sys.stderr)
            return 2
        for run in runs:
            mark = f"current, {run['status']}" if run["current"] else "earlier"
            print(
                f"{run['tiling_run_id']}  {run['origin']:9s} {mark:20s} started {run['started_at']:%Y-%m-%d %H:%M:%S}"
                f"  shards embedded {run['shards_embedded']}"
            )
            if run["reason"]:
                print(f"    {run['reason']}")
            for p in run["predictions"]:
                print(
                    f"    {p['label']:7s} P(tumour) {p['probability']:.3f}  model {p['model_version']} ({p['origin']})"
                    + _ood_note(p)
                )
        return 0
    print(format_table(slide_table(load_settings(), args.limit)))
    return 0


# -- public events --------------------------------------------------------------------------------
async def read_public_events(
    settings: Settings, topics: Sequence[str], *, follow: bool = False, idle_timeout_s: float = 5.0
) -> Any:
    """Yield (topic, headers, json) for every event on the topics, from the beginning, without a group."""
    from aiokafka import TopicPartition
    from wsitk.shared.bus.kafka import make_consumer
    from wsitk.shared.contracts import MalformedEvent, decode, to_json_dict

    consumer = make_consumer(settings, [], None)
    try:
        await consumer.start()
        partitions = []
        for name in topics:
            for partition in consumer.partitions_for_topic(name) or await _partitions(consumer, name):
                partitions.append(TopicPartition(name, partition))
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        idle_since = time.monotonic()
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            records = [r for rs in batch.values() for r in rs]
            if records:
                idle_since = time.monotonic()
            for record in records:
                try:
                    body = to_json_dict(decode(record.topic, record.value))
                except MalformedEvent as exc:  # someone else's bytes on a public topic: say so, don't stop
                    body = {"undecodable": str(exc)[:300]}
                headers = {k: v.decode("utf-8", "replace") for k, v in (record.headers or [])}
                yield record.topic, headers, body
            if not follow and time.monotonic() - idle_since > idle_timeout_s:
                return
    finally:
        await consumer.stop()


async def _partitions(consumer: Any, name: str) -> set[int]:
    await consumer._client.force_metadata_update()  # topic metadata for assign() without a group
    return consumer.partitions_for_topic(name) or set()


def cli_events(args: argparse.Namespace) -> int:
    from wsitk.shared.topics import topic_table

    settings = load_settings()
    topics = args.topic or [t.name for t in topic_table().values() if t.public]

    async def tail() -> None:
        async for name, headers, body in read_public_events(
            settings, topics, follow=args.follow, idle_timeout_s=args.idle_timeout
        ):
            print(json.dumps({"topic": name, "type": headers.get("ce_type"), "event": body}), flush=True)

    asyncio.run(tail())
    return 0


# -- redrive and reconcile ----------------------------------------------------------------------------
async def redrive(
    settings: Settings, *, service: str | None = None, slide: str | None = None, dry_run: bool = False
) -> int:
    """Replay dead letters (once each, by event id) to their source topics; mark them redriven."""
    from aiokafka import TopicPartition
    from wsitk.shared.bus.kafka import make_consumer, make_producer
    from wsitk.shared.contracts import MalformedEvent, decode, pb
    from wsitk.shared.db.connection import Database
    from wsitk.shared.topics import DEADLETTER

    db = Database(settings.dsn())
    done = {row[0] for row in db.execute("SELECT event_id FROM dead_letters WHERE redriven_at IS NOT NULL")}
    consumer = make_consumer(settings, [], None)
    producer = make_producer(settings)
    replayed = 0
    try:
        await consumer.start()
        await producer.start()
        parts = consumer.partitions_for_topic(DEADLETTER) or await _partitions(consumer, DEADLETTER)
        partitions = [TopicPartition(DEADLETTER, p) for p in parts]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 5.0:
            batch = await consumer.getmany(timeout_ms=500)
            for record in (r for rs in batch.values() for r in rs):
                idle_since = time.monotonic()
                try:
                    letter = decode(DEADLETTER, record.value)
                except MalformedEvent as exc:
                    print(
                        f"skipping an undecodable record at {DEADLETTER}@{record.offset}: {exc}",
                        file=sys.stderr,
                    )
                    continue
                assert isinstance(letter, pb.DeadLetter)
                if letter.meta.event_id in done or (service and letter.service != service):
                    continue
                if slide and letter.meta.slide_id != slide:
                    continue
                done.add(letter.meta.event_id)
                print(
                    f"redrive {letter.source_topic}@{letter.source_offset} slide {letter.meta.slide_id}: {letter.error[:100]}"
                )
                if not dry_run:
                    await producer.send_and_wait(
                        letter.source_topic, letter.original_value, key=letter.original_key or None
                    )
                    db.execute(
                        "UPDATE dead_letters SET redriven_at = now() WHERE event_id = %s",
                        (letter.meta.event_id,),
                    )
                    db.execute(
                        'DELETE FROM delivery_attempts WHERE topic = %s AND partition = %s AND "offset" = %s',
                        (letter.source_topic, letter.source_partition, letter.source_offset),
                    )
                replayed += 1
    finally:
        await consumer.stop()
        await producer.stop()
        db.close()
    return replayed


def cli_redrive(args: argparse.Namespace) -> int:
    settings = load_settings()
    slide = resolve_slide_ids(settings, [args.slide])[0] if args.slide else None
    count = asyncio.run(redrive(settings, service=args.service, slide=slide, dry_run=args.dry_run))
    print(f"{'would replay' if args.dry_run else 'replayed'} {count} dead letter(s)")
    return 0


# -- models ---------------------------------------------------------------------------------------
def cli_model(args: argparse.Namespace) -> int:
    from wsitk.shared.models.defaults import init_default_models

    settings = load_settings()
    model_dir = args.model_dir or settings.model_dir
    summary = init_default_models(Path(model_dir), seed=args.seed, encoder=args.encoder)
    print(json.dumps(summary, indent=2, default=str))
    return 0
