"""Event contracts: the generated ``wsi.v1`` messages and the one way to build, encode and decode them.

The Python classes are generated from ``proto/wsi/v1/events.proto`` by the build (setup.py); this
module adds what every producer needs: deterministic ids, the common ``EventMeta``, and encoding
by topic (protobuf binary on internal topics, canonical JSON with CloudEvents-style headers on
public ones).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from wsitk.shared.contracts._generated.wsi.v1 import events_pb2 as pb
from wsitk.shared.topics import topic

SCHEMA_VERSION = 1
# Namespace of every deterministic id of the pipeline (UUIDv5).
ID_NAMESPACE = uuid.UUID("6f1c0d52-8d0e-4c55-9a51-2f1f3c6f5a10")

MESSAGE_TYPES: dict[str, type[Message]] = {
    "SlideIngested": pb.SlideIngested,
    "SlideRejected": pb.SlideRejected,
    "SlideFailed": pb.SlideFailed,
    "TilePlan": pb.TilePlan,
    "TileShard": pb.TileShard,
    "QcResult": pb.QcResult,
    "ShardEmbedding": pb.ShardEmbedding,
    "Prediction": pb.Prediction,
    "DeadLetter": pb.DeadLetter,
    "InteropResult": pb.InteropResult,
}


class MalformedEvent(ValueError):
    """A message that cannot be decoded as its topic's contract. Deterministic: dead-lettered."""


def package_version() -> str:
    try:
        return version("wsi-toolkit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


def deterministic_id(*parts: str) -> str:
    """A UUIDv5 over the parts: the same inputs always name the same event, object or prediction."""
    return str(uuid.uuid5(ID_NAMESPACE, "/".join(parts)))


def profile_id(profile: pb.PipelineProfile) -> str:
    """Digest of every profile field except the id itself: a changed setting is a new profile."""
    fields = json_format.MessageToDict(profile, preserving_proto_field_name=True)
    fields.pop("profile_id", None)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return f"p-{digest[:12]}"


def tiling_run_id(slide_id: str, profile: pb.PipelineProfile) -> str:
    return f"{slide_id[:16]}-{profile.profile_id}"


def new_meta(
    *,
    service: str,
    slide_id: str,
    event_parts: Sequence[str],
    correlation_id: str = "",
) -> pb.EventMeta:
    """The common header. ``event_parts`` name the output (stage, shard, profile...) deterministically."""
    meta = pb.EventMeta(
        event_id=deterministic_id(service, slide_id, *event_parts),
        slide_id=slide_id,
        correlation_id=correlation_id or slide_id,
        producer=pb.Producer(service=service, version=package_version()),
        schema_version=SCHEMA_VERSION,
    )
    meta.produced_at.FromDatetime(datetime.now(UTC))
    return meta


def message_type(topic_name: str) -> type[Message]:
    name = topic(topic_name).message
    if name not in MESSAGE_TYPES:
        raise KeyError(f"topic {topic_name} carries {name}, which is not a wsi.v1 protobuf message")
    return MESSAGE_TYPES[name]


def encode(topic_name: str, message: Message) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Serialise for a topic: (value, headers). Public topics get JSON and CloudEvents headers."""
    spec = topic(topic_name)
    expected = message_type(topic_name)
    if not isinstance(message, expected):
        raise TypeError(f"{topic_name} carries {expected.__name__}, not {type(message).__name__}")
    meta = message.meta  # type: ignore[attr-defined]
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", meta.event_id.encode()),
        ("ce_type", f"wsi.v1.{spec.message}".encode()),
        ("ce_source", f"wsi-toolkit/{meta.producer.service}".encode()),
        ("ce_subject", meta.slide_id.encode()),
        ("ce_time", meta.produced_at.ToJsonString().encode()),
    ]
    if spec.encoding == "json":
        value = json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None).encode()
        headers.append(("content-type", b"application/json"))
    else:
        value = message.SerializeToString()
        headers.append(("content-type", b"application/protobuf"))
    return value, headers


def decode(topic_name: str, value: bytes | None) -> Message:
    """Parse a message from a topic; raise MalformedEvent (deterministic) when it is not one."""
    spec = topic(topic_name)
    cls = message_type(topic_name)
    if not value:
        raise MalformedEvent(f"empty message on {topic_name}")
    message = cls()
    try:
        if spec.encoding == "json":
            json_format.Parse(value.decode("utf-8"), message, ignore_unknown_fields=True)
        else:
            message.ParseFromString(value)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"not a wsi.v1.{spec.message} on {topic_name}: {exc}") from exc
    meta = getattr(message, "meta", None)
    if meta is None or not meta.event_id or not meta.slide_id:
        raise MalformedEvent(f"wsi.v1.{spec.message} on {topic_name} lacks meta.event_id or meta.slide_id")
    if meta.schema_version != SCHEMA_VERSION:
        raise MalformedEvent(
            f"wsi.v1.{spec.message} on {topic_name} has schema_version {meta.schema_version}; "
            f"this service reads version {SCHEMA_VERSION}"
        )
    return message


def to_json_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


__all__ = [
    "MESSAGE_TYPES",
    "MalformedEvent",
    "decode",
    "deterministic_id",
    "encode",
    "new_meta",
    "pb",
    "profile_id",
    "tiling_run_id",
    "to_json_dict",
]
