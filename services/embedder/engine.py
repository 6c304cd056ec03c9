"""The embedder's core: tile shards in the object store -> per-shard float16 embeddings, model kept busy.

No Kafka and no database here: ``EmbeddingEngine.run(jobs)`` takes any number of shards (of any number of
slides) and an object store (S3 or the filesystem backend), so the same code runs in the service, in the
benchmark and on a machine with no servers at all. How it keeps the model busy:

- **Full batches across shards and slides.** The accepted tiles of consecutive shards are packed into
  model batches of exactly ``encoder.batch_size`` tiles (only the very last batch of a run is partial,
  padded to the next power of two: ``padded_batch_size``), and the features are split back per shard afterwards. A shard of 7 accepted tiles does not cost a
  model call of 7.
- **Decoding and preprocessing overlap inference.** Shards are fetched ahead on I/O threads; each batch
  is cut into chunks that CPU threads decode (libjpeg-turbo, which releases the GIL), stain-normalise,
  resize and normalise straight into the batch array, while the calling thread runs the model on the
  batch before. At most ``prefetch_batches`` batches are in preparation (the bounded queue), so memory
  is bounded whatever the number of shards.
- **Failures stay per shard.** A shard that cannot be fetched or decoded gets its exception back; the
  other shards of the same batch are embedded and written.

Outputs are written put-if-absent under ``embeddings/{slide}/{tiling run}/{backbone id}/{shard}.npz``:
``features`` float16 [N, D], ``coords`` int64 [N, 2] (level-0 top-left corners of the accepted tiles, in
shard order), and the tile geometry (``tile_size`` px at ``mpp`` um/px, the profile's target;
``tile_mpp``, the tiles' true scale, within the tiler's tolerance of it; ``tile_size_level0``) for
exports. The backbone id in the key is what keeps two backbones' embeddings of one slide apart.
"""

from __future__ import annotations

import importlib
import io
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from wsitk.shared.cpus import usable_cpus
from wsitk.shared.heap import release_free_memory
from wsitk.shared.keys import embedding_key
from wsitk.shared.objectstore import ObjectStore, StoredObject
from wsitk.shared.shards import Shard

StainNormalizer = Callable[[np.ndarray, Any], np.ndarray]  # (uint8 tile [H, W, 3], StainParams) -> uint8


@dataclass(frozen=True)
class ShardJob:
    """One shard to embed: where its tiles are, which of them passed QC, how to stain-normalise them."""

    slide_id: str
    tiling_run_id: str
    shard_id: str
    shard_bucket: str
    shard_key: str
    accepted: np.ndarray | None = None  # bool [tiles in shard]; None = every tile
    stain: Any = None  # a StainParams (``method`` "" or absent = none)


@dataclass(frozen=True)
class ShardEmbedded:
    """A shard's stored embeddings (``stored`` None when no tile was accepted)."""

    job: ShardJob
    stored: StoredObject | None
    tile_count: int


@dataclass
class EngineStats:
    """Where a run's time went, for the benchmark and the logs (seconds, summed over threads)."""

    tiles: int = 0
    batches: int = 0
    shards: int = 0
    wall_s: float = 0.0
    infer_s: float = 0.0  # the calling thread inside encoder.infer
    wait_s: float = 0.0  # the calling thread waiting for a batch to be prepared
    fetch_s: float = 0.0  # I/O threads fetching shards
    decode_s: float = 0.0  # CPU threads decoding JPEG (+ stain normalisation)
    prepare_s: float = 0.0  # CPU threads resizing and normalising
    write_s: float = 0.0  # I/O threads writing outputs
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float) -> None:
        """Add time from any thread (``+=`` on an attribute is not atomic across threads)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + seconds)

    def as_dict(self) -> dict[str, float | int]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(self).items() if k != "_lock"}


@dataclass
class _ShardState:
    index: int
    job: ShardJob
    shard: Shard | None = None
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    features: np.ndarray | None = None
    remaining: int = 0
    error: BaseException | None = None
    header: dict[str, Any] = field(default_factory=dict)  # kept for the write once the bytes are dropped
    coords: np.ndarray | None = None


@dataclass
class _Segment:
    """Rows ``[row, row + len(tiles))`` of a batch hold tiles ``tiles`` of shard ``state``."""

    state: _ShardState
    tiles: np.ndarray  # positions into state.keep
    row: int


@dataclass
class _Batch:
    segments: list[_Segment]
    size: int
    array: np.ndarray | None = None
    chunks: list[tuple[_Segment, Future[None]]] = field(default_factory=list)


def padded_batch_size(size: int, batch_size: int) -> int:
    """The rows a batch of ``size`` tiles is run with: a partial batch (the last of a run) is padded with
    zeros to the next power of two, at most ``batch_size``, so the model sees a handful of input shapes
    instead of every size from 1 to ``batch_size``. ONNX Runtime's memory arena grows for each new shape
    and keeps what it grew (the embedder's peak on a 100,000 px slide, whose runs end in partial batches
    of many sizes: docs/throughput.md, memory); the padding costs at most as many rows as the tail."""
    if size >= batch_size:
        return size
    return min(batch_size, 1 << max(size - 1, 0).bit_length())


def _default_workers() -> int:
    """CPUs this container may use (its CPU limit, not the host's cores), less the inference thread."""
    return max(1, usable_cpus() - 1)


class EmbeddingEngine:
    """Embeds shards with one encoder (``runtime.TileEncoder``) and writes the outputs to ``store``.

    ``decode_workers``: CPU threads for decoding and preprocessing (default: cores - 1, since inference
    has the calling thread and, on a CPU provider, its own thread pool). ``prefetch_batches``: batches
    prepared ahead of the one being inferred (the bounded queue). ``chunk_tiles``: tiles per decoding task.
    ``stain_normalizer``: applied to each decoded tile of a shard whose ``stain.method`` is set; by default
    ``wsitk.shared.slides.stain.normalize``, imported the first time a shard asks for it.
    """

    def __init__(
        self,
        encoder: Any,
        store: ObjectStore,
        *,
        artifacts_bucket: str,
        decode_workers: int = 0,
        prefetch_batches: int = 3,
        fetch_ahead_shards: int = 3,
        chunk_tiles: int = 16,
        stain_normalizer: StainNormalizer | None = None,
    ) -> None:
        if prefetch_batches < 1 or fetch_ahead_shards < 1 or chunk_tiles < 1:
            raise ValueError("prefetch_batches, fetch_ahead_shards and chunk_tiles must be positive")
        self.encoder = encoder
        self.store = store
        self.artifacts_bucket = artifacts_bucket
        self.decode_workers = decode_workers or _default_workers()
        self.prefetch_batches = prefetch_batches
        self.fetch_ahead_shards = fetch_ahead_shards
        self.chunk_tiles = chunk_tiles
        self._stain_normalizer = stain_normalizer
        self._cpu_pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="embed-decode")
        self._io_pool = ThreadPoolExecutor(4, thread_name_prefix="embed-io")
        self.last_stats = EngineStats()

    def close(self) -> None:
        self._cpu_pool.shutdown(wait=True, cancel_futures=True)
        self._io_pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> EmbeddingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def key_for(self, job: ShardJob) -> str:
        return embedding_key(job.slide_id, job.tiling_run_id, self.encoder.backbone_id, job.shard_id)

    # -- the run -------------------------------------------------------------------------------------
    def run(self, jobs: Sequence[ShardJob]) -> list[ShardEmbedded | BaseException]:
        """Embed and store every job; one result per job, in order (an exception for a failed shard)."""
        stats = EngineStats(shards=len(jobs))
        self.last_stats = stats
        started = time.perf_counter()
        states = [_ShardState(index, job) for index, job in enumerate(jobs)]
        pending: deque[_Batch] = deque()
        writes: dict[int, Future[StoredObject]] = {}
        for batch in self._plan(states, stats):
            self._submit(batch, stats)
            pending.append(batch)
            while len(pending) > self.prefetch_batches:
                self._infer(pending.popleft(), stats, writes)
        while pending:
            self._infer(pending.popleft(), stats, writes)
        results: list[ShardEmbedded | BaseException] = []
        for index, state in enumerate(states):
            if state.error is not None:
                results.append(state.error)
            elif index in writes:
                try:
                    results.append(ShardEmbedded(state.job, writes[index].result(), len(state.keep)))
                except Exception as exc:  # noqa: BLE001 - the shard's outcome; the handler classifies it
                    results.append(exc)
            else:
                results.append(ShardEmbedded(state.job, None, 0))
        stats.wall_s = time.perf_counter() - started
        return results

    def _fetch(self, state: _ShardState, stats: EngineStats) -> None:
        started = time.perf_counter()
        job = state.job
        shard = Shard(self.store.get_bytes(job.shard_bucket, job.shard_key))
        if job.accepted is None:
            keep = np.arange(len(shard), dtype=np.int64)
        else:
            if len(job.accepted) != len(shard):
                raise ValueError(
                    f"shard {job.shard_id} holds {len(shard)} tiles but its QC mask covers {len(job.accepted)}"
                )
            keep = np.flatnonzero(job.accepted).astype(np.int64)
        state.shard, state.keep, state.remaining = shard, keep, len(keep)
        stats.add("fetch_s", time.perf_counter() - started)

    def _plan(self, states: list[_ShardState], stats: EngineStats) -> Iterator[_Batch]:
        """Fetch shards ahead and pack their accepted tiles into batches of exactly ``batch_size``."""
        batch_size = int(self.encoder.batch_size)
        fetches: deque[tuple[_ShardState, Future[None]]] = deque()
        upcoming = iter(states)
        segments: list[_Segment] = []
        filled = 0

        def top_up() -> None:
            while len(fetches) < self.fetch_ahead_shards:
                state = next(upcoming, None)
                if state is None:
                    return
                if state.job.accepted is not None and not state.job.accepted.any():
                    continue  # nothing to embed: no need to fetch the shard at all
                fetches.append((state, self._io_pool.submit(self._fetch, state, stats)))

        top_up()
        while fetches:
            state, fetched = fetches.popleft()
            top_up()
            try:
                fetched.result()
            except Exception as exc:  # noqa: BLE001 - the shard's outcome; the handler classifies it
                state.error = exc
                continue
            if state.remaining == 0:
                continue
            state.features = np.empty((len(state.keep), self.encoder.output_dim), dtype=np.float16)
            position = 0
            while position < len(state.keep):
                take = min(batch_size - filled, len(state.keep) - position)
                segments.append(_Segment(state, np.arange(position, position + take), filled))
                position += take
                filled += take
                if filled == batch_size:
                    yield _Batch(segments, filled)
                    segments, filled = [], 0
        if filled:
            yield _Batch(segments, filled)

    def _submit(self, batch: _Batch, stats: EngineStats) -> None:
        batch.array = self.encoder.batch_array(padded_batch_size(batch.size, int(self.encoder.batch_size)))
        if len(batch.array) > batch.size:
            batch.array[batch.size :] = 0
        for segment in batch.segments:
            for start in range(0, len(segment.tiles), self.chunk_tiles):
                part = _Segment(
                    segment.state,
                    segment.tiles[start : start + self.chunk_tiles],
                    segment.row + start,
                )
                future = self._cpu_pool.submit(self._prepare_chunk, part, batch.array, stats)
                batch.chunks.append((part, future))

    def _stain_function(self) -> StainNormalizer:
        if self._stain_normalizer is None:
            # The stain module belongs to the slides package (fitted by the tiler); imported on first use.
            self._stain_normalizer = importlib.import_module("wsitk.shared.slides.stain").normalize
        return self._stain_normalizer

    def _prepare_chunk(self, part: _Segment, array: np.ndarray, stats: EngineStats) -> None:
        started = time.perf_counter()
        state = part.state
        assert state.shard is not None  # set by _fetch before any chunk is planned
        stain = state.job.stain
        method = "" if stain is None else str(getattr(stain, "method", ""))
        normalise = self._stain_function() if method else None
        decoded = [state.shard.decode(int(state.keep[i])) for i in part.tiles]
        if normalise is not None:
            decoded = [normalise(tile, stain) for tile in decoded]
        if len({tile.shape for tile in decoded}) != 1:
            raise ValueError(
                f"shard {state.job.shard_id} mixes tile sizes {sorted({t.shape for t in decoded})}"
            )
        tiles = np.stack(decoded)
        decoded_at = time.perf_counter()
        self.encoder.prepare(tiles, out=array[part.row : part.row + len(part.tiles)])
        done = time.perf_counter()
        stats.add("decode_s", decoded_at - started)
        stats.add("prepare_s", done - decoded_at)

    def _infer(self, batch: _Batch, stats: EngineStats, writes: dict[int, Future[StoredObject]]) -> None:
        waited = time.perf_counter()
        for part, future in batch.chunks:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - the shard's outcome; the handler classifies it
                part.state.error = part.state.error or exc
        started = time.perf_counter()
        stats.wait_s += started - waited
        try:
            features = self.encoder.infer(batch.array)[: batch.size]
        except Exception as exc:  # noqa: BLE001 - every shard of the batch fails with it, classified later
            for segment in batch.segments:
                segment.state.error = segment.state.error or exc
            return
        finally:
            batch.array = None
            stats.infer_s += time.perf_counter() - started
        stats.batches += 1
        stats.tiles += batch.size
        for segment in batch.segments:
            state = segment.state
            assert state.features is not None
            rows = features[segment.row : segment.row + len(segment.tiles)]
            state.features[segment.tiles] = rows.astype(np.float16)
            state.remaining -= len(segment.tiles)
            if state.remaining == 0 and state.error is None:
                # Every tile is decoded and embedded: the shard's JPEG bytes go now, not when its write
                # is done (writes can queue behind fetches on the I/O threads, and a run holds up to
                # WSI_EMBED_MESSAGES_PER_BATCH shards).
                assert state.shard is not None
                state.header, state.coords = state.shard.header, state.shard.coords[state.keep]
                state.shard = None
                writes[state.index] = self._io_pool.submit(self._write, state, stats)

    def _write(self, state: _ShardState, stats: EngineStats) -> StoredObject:
        started = time.perf_counter()
        assert state.coords is not None and state.features is not None
        header = state.header
        buffer = io.BytesIO()
        np.savez(
            buffer,
            features=state.features,
            coords=state.coords,
            tile_size=np.int64(header.get("tile_size", 0)),
            tile_size_level0=np.float64(header.get("tile_size_level0", 0.0)),
            mpp=np.float64(header.get("mpp", 0.0)),
            tile_mpp=np.float64(header.get("tile_mpp", header.get("mpp", 0.0))),  # older shards: resampled
        )
        stored = self.store.put_if_absent(self.artifacts_bucket, self.key_for(state.job), buffer.getvalue())
        state.coords, state.features = None, None  # release the shard's features early
        release_free_memory()  # a batch of messages holds up to 32 shards: return each one's pages as it goes
        stats.add("write_s", time.perf_counter() - started)
        return stored
