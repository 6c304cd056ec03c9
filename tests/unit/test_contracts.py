"""Event contracts: generated from proto/, round-trip on every topic, malformed input refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from wsitk.shared.contracts import (
    MESSAGE_TYPES,
    MalformedEvent,
    decode,
    deterministic_id,
    encode,
    new_meta,
    pb,
    profile_id,
)
from wsitk.shared.topics import topic_table

REPO = Path(__file__).resolve().parents[2]


def sample(message_name: str) -> Any:  # any of the generated wsi.v1 messages (each has .meta)
    cls = MESSAGE_TYPES[message_name]
    message = cls(meta=new_meta(service="test", slide_id="a" * 32, event_parts=[message_name]))
    if message_name == "Prediction":
        message.prediction_id = deterministic_id("p")
        message.scores["tumour"] = 0.9
        message.top_tiles.add(x=10, y=20, size=448, attention=0.5)
    if message_name == "QcResult":
        message.rejected_by_reason["blur"] = 3
        message.accepted_mask = b"\x0f"
    return message


@pytest.mark.parametrize("topic_name", [t.name for t in topic_table().values() if t.message in MESSAGE_TYPES])
def test_every_topic_round_trips_its_message(topic_name: str) -> None:
    spec = topic_table()[topic_name]
    message = sample(spec.message)
    value, headers = encode(topic_name, message)
    assert decode(topic_name, value) == message
    header_map = dict(headers)
    assert header_map["ce_type"] == f"wsi.v1.{spec.message}".encode()
    assert header_map["ce_id"] == message.meta.event_id.encode()
    if spec.public:  # public topics are readable by any Kafka client: canonical protobuf JSON
        body = json.loads(value)
        assert body["meta"]["slide_id"] == "a" * 32
        assert header_map["content-type"] == b"application/json"
    else:
        with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
            json.loads(value)


def test_encode_refuses_the_wrong_message_for_a_topic() -> None:
    with pytest.raises(TypeError, match="carries Prediction"):
        encode("wsi.predictions", sample("SlideFailed"))


@pytest.mark.parametrize(
    ("topic_name", "value", "match"),
    [
        ("wsi.tiles.shards", b"", "empty"),
        ("wsi.tiles.shards", b"\xff\xff\xff garbage", "not a wsi.v1.TileShard"),
        ("wsi.predictions", b"{not json", "not a wsi.v1.Prediction"),
        ("wsi.predictions", json.dumps({"label": "tumour"}).encode(), "lacks meta"),
    ],
)
def test_malformed_events_are_refused_with_a_reason(topic_name: str, value: bytes, match: str) -> None:
    with pytest.raises(MalformedEvent, match=match):
        decode(topic_name, value)


def test_a_future_schema_version_is_refused_not_misread() -> None:
    message = sample("TilePlan")
    message.meta.schema_version = 2
    with pytest.raises(MalformedEvent, match="schema_version 2"):
        decode("wsi.tiles.plans", message.SerializeToString())


def test_ids_are_deterministic_and_profiles_change_with_any_setting() -> None:
    assert deterministic_id("a", "b") == deterministic_id("a", "b") != deterministic_id("a", "c")
    first = pb.PipelineProfile(target_mpp=0.5, tile_size=224)
    second = pb.PipelineProfile(target_mpp=0.25, tile_size=224)
    assert profile_id(first) == profile_id(pb.PipelineProfile(target_mpp=0.5, tile_size=224))
    assert profile_id(first) != profile_id(second)


def test_generated_code_is_current_with_proto(tmp_path: Path) -> None:
    """The installed contracts are what protoc makes of proto/ now (never stale, never hand-written)."""
    out = tmp_path / "gen"
    out.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={out}",
            "wsi/v1/events.proto",
        ],
        check=True,
        cwd=REPO / "proto",
    )
    installed = REPO / "shared" / "contracts" / "_generated" / "wsi" / "v1" / "events_pb2.py"
    assert (out / "wsi" / "v1" / "events_pb2.py").read_text() == installed.read_text()
    tracked = subprocess.run(
        ["git", "ls-files", "shared/contracts/_generated"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert tracked.stdout.strip() == "", "generated code must not be committed"
