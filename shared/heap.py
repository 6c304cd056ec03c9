"""Keep a long-running process's resident memory at its working set without paying for it per array.

glibc's allocator, left alone, serves a freed block's size from its heap next time (the "dynamic mmap
threshold" rises to the largest block freed, up to 32 MiB) and gives memory back only from the top of
a heap, so a service that allocates and frees multi-megabyte arrays all day (decoded tile batches, JPEG
bytes of shards, features) keeps the high-water mark of its heaps, fragmented across its threads'
arenas. Its resident memory then follows the history of the process, not its bounded queues.

The first answer here was a low fixed mmap threshold (128 KiB, later 1 MiB): every block above it a
mapping of its own, returned on free. That bounds memory, but each such array is then zeroed by the
kernel and faulted in page by page on every use. In the pipeline on the 30,000 px slide quality-filter
took 2.6 M page faults and 3.9 s of system time for 4.5 s of its own work (its 16-tile batches are
2.4 MiB as RGB, several times that as float32), and the embedder 0.6 M faults and 2.1 s
(docs/throughput.md).

Now (``configure``, at a service's start):

* blocks up to 32 MiB (glibc's own ceiling for its dynamic threshold) come from the heap and are reused
  while a message is handled: no mapping, no fault, per array;
* the heap is not trimmed on every free (``M_TRIM_THRESHOLD`` high): a batch's arrays freed at the top
  of a heap stay for the next batch;
* after each handled batch of messages the runtime calls ``release_free_memory`` (``malloc_trim(0)``):
  the free pages of every arena go back to the OS, in the middle of a heap as well as at the top of the
  main one. The free top of a *thread's* arena is the exception, as measured (``tests/unit/test_heap.py``):
  it stays resident after ``malloc_trim`` (glibc shrinks a thread's heap on a free that leaves more than
  ``M_TRIM_THRESHOLD`` there), so each arena keeps about the largest working set it ever had on top;
* so the number of arenas is bounded (``M_ARENA_MAX``, ``arena_limit()``: the CPUs the process may use,
  at least 2, instead of glibc's 8 per core): threads share them, and what the arenas keep is about the
  peak of what the process's threads held at once, not the sum of each thread's own peak. Together with
  the runtime's single handler thread (``shared/bus/runtime.py: HandlerThread``) this took the
  embedder's peak on a 100,000 px slide from 342 to 318-321 MiB and quality-filter's from 166 to 142
  (docs/throughput.md). ``MALLOC_ARENA_MAX`` in the environment, where set, is left to decide.

Resident memory is then bounded by what the process's bounded queues and threads hold at once, not by
the slide's size or the process's age (the 100,000 px against 10,000 px check in docs/throughput.md);
the page faults are paid once per batch instead of once per array.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

from wsitk.shared.cpus import usable_cpus
from wsitk.shared.logging import get_logger

log = get_logger()

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: Blocks above this are mappings of their own (glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of a heap is kept up to this much between explicit trims.
TRIM_THRESHOLD = 512 * 1024 * 1024


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - musl and others have no mallopt
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def arena_limit() -> int:
    """Malloc arenas a service may have: the CPUs it may use (``shared/cpus.py``), at least 2. No more
    threads than that run at once, so sharing arenas among them costs little lock waiting."""
    return max(2, usable_cpus())


def configure(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD, arena_max: int | None = None
) -> bool:
    """Serve arrays up to ``mmap_threshold`` from the heap, keep its free top until the next
    ``release_free_memory``, and allow ``arena_max`` arenas (default ``arena_limit()``; 0: glibc's own
    limit; ``MALLOC_ARENA_MAX`` in the environment wins). Call it before the process starts threads.
    False (and nothing changed) off glibc."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    arenas = arena_limit() if arena_max is None else arena_max
    if arenas > 0 and not os.environ.get("MALLOC_ARENA_MAX"):
        ok = bool(libc.mallopt(_M_ARENA_MAX, arenas)) and ok
    if not ok:
        log.warning(
            "mallopt refused a setting",
            mmap_threshold=mmap_threshold,
            trim_threshold=trim_threshold,
            arena_max=arenas,
        )
    return ok


def release_free_memory() -> bool:
    """Give every arena's free pages back to the OS (``malloc_trim(0)``). False off glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
