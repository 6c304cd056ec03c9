"""Tile shards, the slide cache and the filesystem object store: formats and safety."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from wsitk.shared.cache import SlideCache, safe_suffix
from wsitk.shared.errors import PermanentError
from wsitk.shared.objectstore import FilesystemObjectStore, check_key, sha256_bytes
from wsitk.shared.shards import (
    Shard,
    ShardFormatError,
    ShardTile,
    encode_jpeg,
    mask_from_bytes,
    mask_to_bytes,
    pack_shard,
)


def tiles(count: int) -> list[ShardTile]:
    rng = np.random.default_rng(0)
    return [
        ShardTile(x=i * 448, y=7, data=encode_jpeg(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
        for i in range(count)
    ]


def test_shards_round_trip_coordinates_and_pixels() -> None:
    packed = pack_shard({"slide_id": "s", "shard_id": "s00001", "tile_size": 64}, tiles(5))
    shard = Shard(packed)
    assert len(shard) == 5 and shard.header["shard_id"] == "s00001"
    assert shard.coords.tolist() == [[i * 448, 7] for i in range(5)]
    assert shard.decode(3).shape == (64, 64, 3) and shard.decode(3).dtype == np.uint8


@pytest.mark.parametrize("cut", [3, 20, -10])
def test_truncated_or_foreign_shards_are_refused(cut: int) -> None:
    packed = pack_shard({"slide_id": "s"}, tiles(3))
    with pytest.raises(ShardFormatError):
        Shard(packed[:cut])
    with pytest.raises(ShardFormatError):
        Shard(b"GIF89a" + packed[6:])


def test_accepted_masks_pack_to_bits() -> None:
    mask = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    data = mask_to_bytes(mask)
    assert len(data) == 2
    assert mask_from_bytes(data, len(mask)).tolist() == mask.tolist()


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/etc/passwd", "a//b", "", "a\x00b", "a\\b"])
def test_object_keys_that_could_escape_are_refused(key: str) -> None:
    with pytest.raises(PermanentError):
        check_key(key)


def test_filesystem_store_is_put_if_absent(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path)
    store.ensure_bucket("b")
    first = store.put_if_absent("b", "k/x.bin", b"first bytes")
    second = store.put_if_absent("b", "k/x.bin", b"other bytes")  # a redelivery on other hardware
    assert second.sha256 == first.sha256 == sha256_bytes(b"first bytes")
    assert store.get_bytes("b", "k/x.bin") == b"first bytes"
    assert [o.key for o in store.list_keys("b")] == ["k/x.bin"]


def test_cache_names_files_by_digest_never_by_key(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path / "store")
    store.ensure_bucket("up")
    evil = "x/../../../../tmp/evil.svs"
    target = tmp_path / "store" / "up" / "evil.svs"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"slide bytes")
    cache = SlideCache(tmp_path / "cache", max_bytes=1 << 20)
    path, digest = cache.fetch(store, "up", "evil.svs")
    assert path.parent == (tmp_path / "cache").resolve() and digest == sha256_bytes(b"slide bytes")
    assert (
        safe_suffix(evil) == ".svs"
        and safe_suffix("a.svs/../../x") == ".bin"
        and safe_suffix("a.s v s") == ".bin"
    )
    with pytest.raises(PermanentError):
        cache.path_for("../../etc", ".svs")


def test_cache_refuses_content_that_changed_since_ingest(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path / "store")
    store.ensure_bucket("up")
    store.put_if_absent("up", "a.svs", b"new content")
    cache = SlideCache(tmp_path / "cache", max_bytes=1 << 20)
    with pytest.raises(PermanentError) as caught:
        cache.fetch(store, "up", "a.svs", expected_sha256=sha256_bytes(b"old content"))
    assert caught.value.code == "source-changed" and "overwritten" in caught.value.reason


def test_cache_evicts_least_recently_used_beyond_its_bound(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path / "store")
    store.ensure_bucket("up")
    for name in "abc":
        store.put_if_absent("up", f"{name}.svs", name.encode() * 400)
    cache = SlideCache(tmp_path / "cache", max_bytes=900)
    for name in "abc":
        cache.fetch(store, "up", f"{name}.svs")
    kept = list((tmp_path / "cache").iterdir())
    assert sum(p.stat().st_size for p in kept) <= 900 and len(kept) == 2
