"""Correcting a slide: a per-slide MPP (``wsi mpp``) and re-running stored slides with another profile
(``wsi reprocess``), without uploading anything again.

**Per-slide MPP overrides.** A lab registers "this slide's true level-0 resolution is X um/px", one
slide at a time or as a CSV (columns ``slide``, ``mpp``, optional ``reason``). ``slide`` names the slide
by its content slide id, a slide id prefix (8 or more hex digits), its upload key, or the upload's file
name. Rows live in PostgreSQL (``slide_mpp_overrides``). Ingest looks every new slide up
(``lookup_override``: exact slide id first, then the longest matching prefix, then the upload key, then
the file name) and pins the value in the profile as ``slide_mpp_override``: it wins over the file's own
MPP and objective power, and it lets a slide without any MPP through. A slide processed before its
override was registered keeps its result until ``wsi reprocess`` runs it again.

**Reprocess.** ``plan_reprocess`` builds a new profile from the one pinned on the slide: the current
per-slide MPP (``--mpp``, else the registered override, else the pinned one) and the tissue/QC settings
given (``--set qc_min_tissue_fraction=0.3``), and a ``SlideIngested`` for the recorded upload carrying
it (``origin="reprocess"``), built by ``shared/announce.py: build_slide_ingested`` as ingest builds it. A new profile id is a new
tiling run: new shards, embeddings and a new prediction beside the old ones (the recorder keeps every
run, ``slide_runs``, and the newest drives the slide's status). A slide rejected at ingest has no
profile yet: reprocess announces its upload to ingest again, which inspects it with the override now
registered.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsitk.shared.slides.reader import PLAUSIBLE_MPP

if TYPE_CHECKING:
    from wsitk.shared.bus.kafka import Outgoing
    from wsitk.shared.context import ServiceContext
    from wsitk.shared.contracts import pb
    from wsitk.shared.db.connection import Database

#: Accepted per-slide MPP values (um/px): the same bounds ingest applies to a file's own metadata.
MPP_RANGE = PLAUSIBLE_MPP
#: A slide id prefix must be at least this many hex digits (fewer would match unrelated slides).
MIN_PREFIX = 8
MAX_REF_BYTES = 1024
_HEX = re.compile(r"[0-9a-fA-F]+")

#: Profile fields ``wsi reprocess --set`` may change, with their accepted range (booleans: 0 or 1).
#: Only those the installed contract has are offered (``tunable``).
TUNABLE: dict[str, tuple[float, float]] = {
    "min_tissue_fraction": (0.0, 1.0),
    "qc_min_tissue_fraction": (0.0, 1.0),
    "qc_min_sharpness": (0.0, 10.0),
    "qc_keep_fat": (0.0, 1.0),
    "qc_max_pen_fraction": (0.0, 1.0),
    "qc_max_dark_fraction": (0.0, 1.0),
    "qc_max_bright_fraction": (0.0, 1.0),
}


def tunable() -> dict[str, tuple[float, float]]:
    """The settings reprocess may change, as the installed contract has them."""
    from wsitk.shared.contracts import pb

    fields = pb.PipelineProfile.DESCRIPTOR.fields_by_name
    return {name: bounds for name, bounds in TUNABLE.items() if name in fields}


class CorrectionError(ValueError):
    """Input a person got wrong (unknown slide, bad value, bad CSV line): said in words, exit code 2."""


@dataclass(frozen=True)
class MppOverride:
    slide_ref: str
    mpp: float
    reason: str = ""
    set_by: str = ""
    set_at: datetime | None = None
    line: int = 0  # CSV line it came from (0 = command line)


# -- validation ---------------------------------------------------------------------------------------
def normalise_ref(ref: str, where: str) -> str:
    """A slide reference as stored: stripped; a hex slide id (prefix) in lower case."""
    ref = (ref or "").strip()
    if not ref:
        raise CorrectionError(
            f"{where}: the slide is empty (give a slide id, id prefix, upload key or file name)"
        )
    if len(ref.encode()) > MAX_REF_BYTES or any(ch in ref for ch in "\r\n\t"):
        raise CorrectionError(f"{where}: {ref[:60]!r} is not a slide id, upload key or file name")
    if _HEX.fullmatch(ref) and MIN_PREFIX <= len(ref) <= 64:
        return ref.lower()
    return ref


def validate_mpp(value: Any, where: str) -> float:
    text = str(value).strip()
    try:
        mpp = float(text)
    except ValueError:
        raise CorrectionError(
            f"{where}: mpp {text!r} is not a number (micrometres per pixel, e.g. 0.25)"
        ) from None
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise CorrectionError(
            f"{where}: mpp {text} is outside {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px (a 40x scan is about "
            "0.25, 20x about 0.5); give the level-0 resolution in micrometres per pixel"
        )
    return mpp


def parse_mpp_csv(path: Path) -> list[MppOverride]:
    """Read ``slide,mpp[,reason]`` rows; every bad line is reported (by line number), nothing is kept."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CorrectionError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorrectionError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    lines = text.splitlines()
    header_at = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), None)
    if header_at is None:
        raise CorrectionError(f"{path.name}: empty; expected a header line 'slide,mpp,reason'")
    reader = csv.reader(lines[header_at:])
    header = [h.strip().lower() for h in next(reader)]
    missing = [name for name in ("slide", "mpp") if name not in header]
    if missing:
        raise CorrectionError(
            f"{path.name} line {header_at + 1}: the header {','.join(header)!r} lacks {' and '.join(missing)}; "
            "expected columns slide, mpp and optionally reason"
        )
    col = {name: header.index(name) for name in ("slide", "mpp", "reason") if name in header}
    entries: list[MppOverride] = []
    errors: list[str] = []
    seen: dict[str, MppOverride] = {}
    for offset, row in enumerate(reader, start=header_at + 2):
        if not any(cell.strip() for cell in row) or row[0].startswith("#"):
            continue
        where = f"{path.name} line {offset}"
        try:
            if len(row) <= max(col["slide"], col["mpp"]):
                raise CorrectionError(f"{where}: {len(row)} column(s), expected at least slide and mpp")
            entry = MppOverride(
                slide_ref=normalise_ref(row[col["slide"]], where),
                mpp=validate_mpp(row[col["mpp"]], where),
                reason=row[col["reason"]].strip() if "reason" in col and col["reason"] < len(row) else "",
                line=offset,
            )
        except CorrectionError as exc:
            errors.append(str(exc))
            continue
        earlier = seen.get(entry.slide_ref)
        if earlier is not None and earlier.mpp != entry.mpp:
            errors.append(
                f"{where}: {entry.slide_ref!r} is already given {earlier.mpp:g} um/px on line {earlier.line}"
            )
            continue
        seen[entry.slide_ref] = entry
        entries.append(entry)
    if errors:
        raise CorrectionError("\n".join(errors))
    if not entries:
        raise CorrectionError(f"{path.name}: no rows under the header")
    return entries


# -- the override registry ----------------------------------------------------------------------------
def set_overrides(db: Database, entries: list[MppOverride], actor: str) -> None:
    """Register (or replace) overrides, all in one transaction."""
    with db.transaction() as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO slide_mpp_overrides (slide_ref, mpp, reason, set_by) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (slide_ref) DO UPDATE SET mpp = EXCLUDED.mpp, reason = EXCLUDED.reason, "
            "set_by = EXCLUDED.set_by, set_at = now()",
            [(e.slide_ref, e.mpp, e.reason, actor) for e in entries],
        )


def remove_overrides(db: Database, refs: list[str]) -> list[str]:
    rows = db.execute(
        "DELETE FROM slide_mpp_overrides WHERE slide_ref = ANY(%s) RETURNING slide_ref",
        ([normalise_ref(r, "remove") for r in refs],),
    )
    return [r[0] for r in rows]


def list_overrides(db: Database) -> list[MppOverride]:
    rows = db.execute(
        "SELECT slide_ref, mpp, reason, set_by, set_at FROM slide_mpp_overrides ORDER BY set_at"
    )
    return [MppOverride(r[0], float(r[1]), r[2], r[3], r[4]) for r in rows]


def lookup_override(db: Database, slide_id: str, upload_keys: list[str]) -> MppOverride | None:
    """The override that applies to a slide: exact id, longest id prefix, upload key, then file name."""
    names = [key.rsplit("/", 1)[-1] for key in upload_keys]
    rows = db.execute(
        "SELECT slide_ref, mpp, reason, set_by, set_at FROM slide_mpp_overrides "
        "WHERE slide_ref = ANY(%s) OR (slide_ref ~ '^[0-9a-f]{8,}$' AND left(%s, length(slide_ref)) = slide_ref)",
        ([slide_id, *upload_keys, *names], slide_id),
    )
    if not rows:
        return None

    def rank(ref: str) -> tuple[int, int]:
        if ref == slide_id:
            return (0, 0)
        if slide_id.startswith(ref):
            return (1, -len(ref))
        if ref in upload_keys:
            return (2, 0)
        return (3, 0)

    best = min(rows, key=lambda r: rank(r[0]))
    return MppOverride(best[0], float(best[1]), best[2], best[3], best[4])


def slides_matching(db: Database, ref: str) -> list[tuple[str, str]]:
    """Known slides a reference names: (slide id, status), for feedback and for choosing slides."""
    prefix = bool(_HEX.fullmatch(ref)) and len(ref) >= MIN_PREFIX
    rows = db.execute(
        """
        SELECT DISTINCT s.slide_id, s.status, s.first_seen_at FROM slides s
        LEFT JOIN slide_sources src ON src.slide_id = s.slide_id
        WHERE s.slide_id = %(ref)s
           OR (%(prefix)s AND left(s.slide_id, length(%(ref)s)) = %(ref)s)
           OR src.upload_key = %(ref)s
           OR regexp_replace(src.upload_key, '^.*/', '') = %(ref)s
        ORDER BY s.first_seen_at
        """,
        {"ref": ref, "prefix": prefix},
    )
    return [(r[0], r[1]) for r in rows]


def resolve_slide(db: Database, ref: str) -> tuple[str, str]:
    """Exactly one known slide for a reference, or a CorrectionError saying why not."""
    ref = normalise_ref(ref, "slide")
    if _HEX.fullmatch(ref) and len(ref) < MIN_PREFIX:
        raise CorrectionError(f"slide {ref!r}: give at least {MIN_PREFIX} hex digits of the slide id")
    found = slides_matching(db, ref)
    if not found:
        raise CorrectionError(
            f"slide {ref!r}: no such slide (give a slide id or its first {MIN_PREFIX}+ digits, an upload key "
            "or a file name, as `wsi status` lists them)"
        )
    if len(found) > 1:
        listing = ", ".join(f"{sid[:12]} ({status})" for sid, status in found[:5])
        raise CorrectionError(f"slide {ref!r} names {len(found)} slides ({listing}); give the slide id")
    return found[0]


# -- reprocess ----------------------------------------------------------------------------------------
def parse_settings(pairs: list[str]) -> dict[str, float]:
    """``key=value`` pairs of tunable profile fields, validated (booleans: true/false, 1/0)."""
    allowed = tunable()
    words = {"true": 1.0, "yes": 1.0, "false": 0.0, "no": 0.0}
    changes: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep:
            raise CorrectionError(f"--set {pair!r}: expected NAME=VALUE, e.g. qc_min_tissue_fraction=0.3")
        if key not in allowed:
            raise CorrectionError(
                f"--set {key}: not a setting reprocess changes; one of {', '.join(allowed)}"
            )
        low, high = allowed[key]
        text = value.strip().lower()
        try:
            number = words[text] if text in words else float(text)
        except ValueError:
            raise CorrectionError(f"--set {key}={value}: not a number") from None
        if not low <= number <= high:
            raise CorrectionError(f"--set {key}={value}: outside {low:g}-{high:g}")
        changes[key] = number
    return changes


@dataclass
class Reprocess:
    """What ``wsi reprocess`` will publish for one slide, and why."""

    slide_id: str
    status: str
    outputs: list[Outgoing]
    profile_id: str = ""
    previous_profile_id: str = ""
    changed: dict[str, tuple[float, float]] = field(default_factory=dict)
    note: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "status": self.status,
            "profile_id": self.profile_id,
            "previous_profile_id": self.previous_profile_id,
            "changed": {k: {"from": a, "to": b} for k, (a, b) in self.changed.items()},
            **({"note": self.note} if self.note else {}),
        }


def plan_reprocess(
    ctx: ServiceContext, ref: str, *, mpp: float | None, changes: dict[str, float], reason: str
) -> Reprocess:
    """The events that run one recorded slide again with a new profile (module docstring)."""
    from google.protobuf import json_format
    from wsitk.shared.announce import make_bucket_event
    from wsitk.shared.bus.kafka import Outgoing
    from wsitk.shared.contracts import pb, profile_id
    from wsitk.shared.topics import BUCKET_EVENTS

    slide_id, status = resolve_slide(ctx.db, ref)
    ((profile_json, metadata_json, file_size, sha256),) = ctx.db.execute(
        "SELECT profile, metadata, file_size, source_sha256 FROM slides WHERE slide_id = %s", (slide_id,)
    )
    sources = ctx.db.execute(
        "SELECT bucket, upload_key, etag, version_id FROM slide_sources WHERE slide_id = %s ORDER BY first_seen_at",
        (slide_id,),
    )
    upload_keys = [row[1] for row in sources]
    if not profile_json:  # rejected at ingest: no profile to change; ingest inspects the upload again
        if changes or mpp is not None:
            raise CorrectionError(
                f"slide {slide_id[:12]} was {status} at ingest and has no pipeline profile to change; register "
                f"its MPP with `wsi mpp set {slide_id[:12]} MPP` and run `wsi reprocess --slides {slide_id[:12]}` "
                "without --mpp/--set: ingest then inspects the upload again"
            )
        for bucket, key, _etag, _version in sources:
            stored = ctx.store.stat(bucket, key)
            if stored is not None:
                event = make_bucket_event(bucket, key, stored.size, stored.etag)
                override = lookup_override(ctx.db, slide_id, upload_keys)
                return Reprocess(
                    slide_id,
                    status,
                    [Outgoing(BUCKET_EVENTS, f"{bucket}/{key}", raw=event)],
                    note=f"upload {key} announced to ingest again"
                    + (
                        f" (slide MPP override {override.mpp:g} um/px)"
                        if override
                        else " (no MPP override registered)"
                    ),
                )
        raise CorrectionError(f"slide {slide_id[:12]}: its upload is gone from the bucket; upload it again")

    pinned = json_format.ParseDict(profile_json, pb.PipelineProfile(), ignore_unknown_fields=True)
    profile = pb.PipelineProfile()
    profile.CopyFrom(pinned)
    override = lookup_override(ctx.db, slide_id, upload_keys)
    if mpp is not None:
        profile.slide_mpp_override = mpp
    elif override is not None:
        profile.slide_mpp_override = override.mpp
    for key, value in changes.items():
        setattr(profile, key, type(getattr(profile, key))(value))
    profile.profile_id = ""
    profile.profile_id = profile_id(profile)
    fields = ["slide_mpp_override", *tunable()]
    changed = {
        f: (float(getattr(pinned, f)), float(getattr(profile, f)))
        for f in fields
        if getattr(pinned, f) != getattr(profile, f)
    }
    if profile.profile_id == pinned.profile_id:
        raise CorrectionError(
            f"slide {slide_id[:12]} already runs with these settings (profile {pinned.profile_id}); give --mpp, "
            "--set NAME=VALUE, or register an MPP with `wsi mpp set` first"
        )
    metadata = json_format.ParseDict(metadata_json or {}, pb.SlideMetadata(), ignore_unknown_fields=True)
    if profile.slide_mpp_override > 0:
        metadata.mpp_x = metadata.mpp_y = profile.slide_mpp_override
        metadata.mpp_source = "slide-override"
    why = "; ".join(
        part for part in (reason, ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changed.items())) if part
    )
    source = _readable_source(ctx, slide_id, sources, int(file_size or 0), str(sha256 or ""))
    outgoing = _announce(slide_id, source, metadata, profile, len(sources) > 1, why)
    return Reprocess(slide_id, status, [outgoing], profile.profile_id, pinned.profile_id, changed)


def _announce(
    slide_id: str,
    source: pb.ObjectRef,
    metadata: pb.SlideMetadata,
    profile: pb.PipelineProfile,
    additional_source: bool,
    reason: str,
) -> Outgoing:
    from wsitk.shared.announce import build_slide_ingested

    return build_slide_ingested(
        slide_id=slide_id,
        source=source,
        upload_key=source.key,
        metadata=metadata,
        profile=profile,
        event_parts=["reprocess", source.bucket, source.key, source.etag, profile.profile_id],
        additional_source=additional_source,
        origin="reprocess",
        reason=reason,
    )


def reannounce_reprocessed(ctx: ServiceContext, slide_id: str) -> Outgoing | None:
    """The same ``SlideIngested`` again for a slide whose current run came from ``wsi reprocess``.

    For the reconciler: re-announcing such a slide's upload would re-ingest it under the upload's
    profile (an earlier run), not the reprocessed one. None when the slide has no such run or its
    bytes are gone.
    """
    from google.protobuf import json_format
    from wsitk.shared.contracts import pb

    rows = ctx.db.execute(
        "SELECT r.profile, r.reason, s.metadata, s.file_size, s.source_sha256 FROM slides s "
        "JOIN slide_runs r ON r.slide_id = s.slide_id AND r.tiling_run_id = s.tiling_run_id "
        "WHERE s.slide_id = %s AND r.origin = 'reprocess' AND r.profile IS NOT NULL",
        (slide_id,),
    )
    if not rows:
        return None
    profile_json, reason, metadata_json, file_size, sha256 = rows[0]
    sources = ctx.db.execute(
        "SELECT bucket, upload_key, etag, version_id FROM slide_sources WHERE slide_id = %s ORDER BY first_seen_at",
        (slide_id,),
    )
    try:
        source = _readable_source(ctx, slide_id, sources, int(file_size or 0), str(sha256 or ""))
    except CorrectionError:
        return None
    profile = json_format.ParseDict(profile_json, pb.PipelineProfile(), ignore_unknown_fields=True)
    metadata = json_format.ParseDict(metadata_json or {}, pb.SlideMetadata(), ignore_unknown_fields=True)
    return _announce(slide_id, source, metadata, profile, len(sources) > 1, str(reason or ""))


def _readable_source(
    ctx: ServiceContext, slide_id: str, sources: list[tuple[Any, ...]], size: int, sha256: str
) -> pb.ObjectRef:
    """The first recorded upload that still holds the slide's bytes (pinned version, or the same ETag)."""
    from wsitk.shared.contracts import pb

    for bucket, key, etag, version_id in sources:
        stored = ctx.store.stat(bucket, key)
        if version_id or (stored is not None and stored.etag == etag):
            return pb.ObjectRef(
                bucket=bucket, key=key, size=size, sha256=sha256, version_id=version_id, etag=etag
            )
    keys = ", ".join(str(s[1]) for s in sources) or "none recorded"
    raise CorrectionError(
        f"slide {slide_id[:12]}: no upload still holds its bytes (uploads: {keys}); upload the slide again"
    )


# -- command line -------------------------------------------------------------------------------------
def add_mpp_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    setter = sub.add_parser("set", help="register a slide's true MPP: SLIDE MPP, or --csv FILE")
    setter.add_argument("slide", nargs="?", help="slide id, id prefix (8+ hex), upload key or file name")
    setter.add_argument("mpp", nargs="?", help=f"level-0 um/px ({MPP_RANGE[0]:g}-{MPP_RANGE[1]:g})")
    setter.add_argument("--csv", type=Path, help="CSV with columns slide, mpp[, reason]")
    setter.add_argument("--reason", default="", help="why (kept with the override)")
    setter.add_argument("--actor", default=None, help="who sets it (default user@host)")
    listing = sub.add_parser("list", help="registered per-slide MPP overrides")
    listing.add_argument("--json", action="store_true")
    remove = sub.add_parser("remove", help="remove overrides (processed slides keep their results)")
    remove.add_argument("slides", nargs="+")


def add_reprocess_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--slides", nargs="+", required=True, help="slide ids (or prefixes, upload keys, file names)"
    )
    parser.add_argument(
        "--mpp", default=None, help="this slide's level-0 um/px (default: the registered override)"
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a tissue/QC setting for the new profile (min_tissue_fraction, qc_min_tissue_fraction, "
        "qc_min_sharpness, qc_keep_fat, qc_max_pen_fraction, qc_max_dark_fraction, qc_max_bright_fraction); "
        "repeatable",
    )
    parser.add_argument("--reason", default="", help="why (carried on the event, kept by the recorder)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be published")


def _fail(command: str, error: Exception) -> int:
    for line in str(error).splitlines():
        print(f"wsi {command}: {line}", file=sys.stderr)
    return 2


def cli_mpp(args: argparse.Namespace) -> int:
    from wsitk.shared.config import load_settings
    from wsitk.shared.db.connection import Database

    db = Database(load_settings().dsn())
    try:
        action = {"list": _mpp_list, "remove": _mpp_remove, "set": _mpp_set}[args.action]
        return action(db, args)
    except CorrectionError as error:
        return _fail(f"mpp {args.action}", error)
    finally:
        db.close()


def _mpp_list(db: Database, args: argparse.Namespace) -> int:
    overrides = list_overrides(db)
    if args.json:
        for o in overrides:
            at = o.set_at.isoformat() if o.set_at else None
            row = {"slide": o.slide_ref, "mpp": o.mpp, "reason": o.reason, "set_by": o.set_by, "set_at": at}
            print(json.dumps(row))
        return 0
    print(f"{'slide':40s} {'mpp':>8s}  {'set by':24s} reason")
    for o in overrides:
        print(f"{o.slide_ref[-40:]:40s} {o.mpp:8.4g}  {o.set_by[:24]:24s} {o.reason}")
    return 0


def _mpp_remove(db: Database, args: argparse.Namespace) -> int:
    removed = remove_overrides(db, list(args.slides))
    for ref in removed:
        print(f"removed {ref}")
    missing = {normalise_ref(r, "remove") for r in args.slides} - set(removed)
    if missing:
        raise CorrectionError(f"no override registered for {', '.join(sorted(missing))}")
    return 0


def _mpp_set(db: Database, args: argparse.Namespace) -> int:
    from wsitk.shared.models.registry import default_actor

    if args.csv is not None:
        if args.slide or args.mpp:
            raise CorrectionError("give either --csv FILE or SLIDE MPP, not both")
        entries = parse_mpp_csv(args.csv)
    else:
        if not args.slide or not args.mpp:
            raise CorrectionError("give SLIDE MPP (e.g. `wsi mpp set case-12/s1.svs 0.5`) or --csv FILE")
        entries = [
            MppOverride(normalise_ref(args.slide, "slide"), validate_mpp(args.mpp, "mpp"), args.reason)
        ]
    set_overrides(db, entries, args.actor or default_actor())
    for entry in entries:
        known = slides_matching(db, entry.slide_ref)
        if not known:
            then = "no slide known by this name yet: applies when it is uploaded"
        else:
            ids = " ".join(sid[:12] for sid, _ in known)
            listing = ", ".join(f"{sid[:12]} {status}" for sid, status in known)
            then = (
                f"matches {len(known)} recorded slide(s) ({listing}): "
                f"run `wsi reprocess --slides {ids}` to process them at this MPP"
            )
        print(f"{entry.slide_ref}: {entry.mpp:g} um/px; {then}")
    return 0


def cli_reprocess(args: argparse.Namespace) -> int:
    from wsitk.shared.bus.kafka import make_producer, produce_all
    from wsitk.shared.config import load_settings
    from wsitk.shared.context import ServiceContext

    settings = load_settings()
    ctx = ServiceContext(settings, "reprocess")
    try:
        mpp = validate_mpp(args.mpp, "--mpp") if args.mpp is not None else None
        changes = parse_settings(list(args.settings))
        plans: list[Reprocess] = []
        errors: list[str] = []
        for ref in args.slides:
            try:
                plans.append(plan_reprocess(ctx, ref, mpp=mpp, changes=changes, reason=args.reason))
            except CorrectionError as error:
                errors.append(str(error))
        if errors:  # nothing is published unless every slide can be
            raise CorrectionError("\n".join(errors))
    except CorrectionError as error:
        return _fail("reprocess", error)
    finally:
        ctx.db.close()
    if not args.dry_run:

        async def publish() -> None:
            producer = make_producer(settings)
            await producer.start()
            try:
                await produce_all(producer, [out for plan in plans for out in plan.outputs])
            finally:
                await producer.stop()

        asyncio.run(publish())
    for plan in plans:
        print(json.dumps(plan.summary()))
    print(
        f"{'would announce' if args.dry_run else 'announced'} {len(plans)} slide(s) again; "
        "follow them with `wsi status`",
        file=sys.stderr,
    )
    return 0
