"""Keep a long-running process's resident memory at its working set: large buffers go back to the OS.

glibc's allocator serves a freed block's size from its heap next time (the "dynamic mmap threshold"
rises to the largest block freed, up to 32 MiB), so a service that allocates and frees multi-megabyte
arrays all day (decoded tile chunks, JPEG bytes of shards, features) keeps the high-water mark of its
heaps, fragmented across threads' arenas. A fixed threshold makes every block above it a mapping of
its own, returned on free: resident memory follows the bounded working set instead of the history of
the process. Measured on the embedder (docs/throughput.md): peak 606 -> 519 MiB on 64 shards, and
within 1.2x of a 3-shard run with the fetch-ahead of 3 shards.

The threshold is 1 MiB, above the arrays of one tile (a 224 px RGB tile is 147 KiB, as float32 588 KiB)
and below a shard's bytes and a batch. At 128 KiB every tile-sized array was a fresh mapping, faulted in
page by page and unmapped on free: quality-filter's benchmark ran at 966-1,473 tiles/s against
2,530-3,057 without the setting (3.0 s of system time against 0.1 s, 2.0 M page faults against 48 k),
and every service in the pipeline paid it. At 1 MiB: 2,230-2,430 tiles/s, and the embedder's 64-shard
peak is the same as at 128 KiB (523-526 MiB; 588 MiB without the setting). The embedder keeps 128 KiB
(``SERVICE_MMAP_THRESHOLDS``).
"""

from __future__ import annotations

import ctypes
import ctypes.util

from wsitk.shared.logging import get_logger

log = get_logger()

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
DEFAULT_MMAP_THRESHOLD = 1024 * 1024
#: Services whose large arrays are whole batches rather than single tiles keep the lower threshold: the
#: embedder's CPU in the pipeline was the same at 128 KiB and 1 MiB, its 100,000 px slide peak a little
#: lower at 128 KiB (640 MiB against 651-652 the same day; docs/throughput.md).
SERVICE_MMAP_THRESHOLDS = {"embedder": 128 * 1024}


def service_threshold(service: str) -> int:
    """The mmap threshold ``wsi run SERVICE`` fixes."""
    return SERVICE_MMAP_THRESHOLDS.get(service, DEFAULT_MMAP_THRESHOLD)


def return_large_blocks(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes. False (and nothing changed) off glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.warning("mallopt refused the mmap threshold", threshold=threshold)
    return ok
