"""``shared/heap.py``: batch-sized arrays are reused from the heap while work runs (no page fault per
array), and what was freed goes back to the OS when ``release_free_memory`` is called."""

from __future__ import annotations

import json
import subprocess
import sys

_SCENARIO = """
import json, resource, sys
import numpy as np
from wsitk.shared import heap
mode = sys.argv[1]
if mode == "configured":
    assert heap.configure()
elif mode == "low-threshold":  # the earlier setting: every block above 1 MiB a mapping of its own
    assert heap.configure(mmap_threshold=1024 * 1024, trim_threshold=1024 * 1024)
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# Work as quality-filter does it: a 16-tile batch (2.4 MiB as RGB) and its float32 copy, 200 times.
before = faults()
for _ in range(200):
    batch = np.ones((16, 224, 224, 3), np.uint8)
    as_float = batch.astype(np.float32)
    del batch, as_float
per_batch = (faults() - before) / 200
# A fragmented heap: 2 MiB buffers, each followed by a small long-lived one.
blocks, keepers = [], []
for _ in range(100):
    blocks.append(bytearray(2 * 1024 * 1024))
    keepers.append(bytearray(4096))  # from malloc, not Python's small-object pool
peak = rss_mib()
del blocks
kept = peak - rss_mib()
heap.release_free_memory()
returned = peak - rss_mib()
print(json.dumps({"faults_per_batch": per_batch, "freed_on_del_mib": kept, "returned_mib": returned}))
"""


def _run(mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _SCENARIO, mode], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_batch_arrays_are_reused_not_faulted_in_each_time() -> None:
    configured = _run("configured")
    low = _run("low-threshold")
    # 2.4 + 9.6 MiB touched per batch: 900-1,400 faults here when each array is a fresh mapping (fewer
    # where transparent huge pages are always on), about 4 when the heap reuses it
    assert configured["faults_per_batch"] < 50, configured
    assert low["faults_per_batch"] > 10 * max(configured["faults_per_batch"], 1.0), (low, configured)


def test_freed_buffers_go_back_to_the_os_when_released() -> None:
    configured = _run("configured")
    assert configured["freed_on_del_mib"] < 50, configured  # kept for reuse until the batch is done ...
    assert configured["returned_mib"] >= 150, configured  # ... then returned, holes in the heap included
    default = _run("default")
    assert default["returned_mib"] >= 150, default  # malloc_trim works without the settings too


_THREAD_SCENARIO = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from wsitk.shared import heap
from wsitk.shared.bus.runtime import _then_release
assert heap.configure()
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
def handle():  # a message's work on a pool thread (its own arena): fragmented, then freed
    blocks, keepers = [], []
    for _ in range(100):
        blocks.append(bytearray(2 * 1024 * 1024))
        keepers.append(bytearray(4096))
    peak = rss_mib()
    del blocks
    return peak, keepers
with ThreadPoolExecutor(1) as pool:
    if sys.argv[1] == "released":
        peak, keepers = pool.submit(_then_release, handle).result()
    else:
        peak, keepers = pool.submit(handle).result()
    print(json.dumps({"kept_mib": rss_mib() - (peak - 200)}))
"""


def test_the_runtime_returns_a_messages_memory_from_the_workers_arena() -> None:
    def kept(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _THREAD_SCENARIO, mode], capture_output=True, text=True, check=True
        )
        return int(json.loads(out.stdout.strip().splitlines()[-1])["kept_mib"])

    assert kept("kept") >= 150  # the worker thread's arena keeps the freed 2 MiB buffers ...
    assert kept("released") < 50  # ... unless the handler call releases them (shared/bus/runtime.py)
