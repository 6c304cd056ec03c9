"""``return_large_blocks``: freed multi-megabyte buffers leave the process instead of its heap."""

from __future__ import annotations

import subprocess
import sys

_SCENARIO = """
import sys
from wsitk.shared.heap import return_large_blocks
if sys.argv[1] == "fixed":
    assert return_large_blocks()
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
big = bytearray(8 * 1024 * 1024)
del big  # glibc raises its dynamic threshold to the largest mapping freed
blocks, keepers = [], []
for _ in range(100):  # 2 MiB buffers, each followed by a small long-lived one: a fragmented heap
    blocks.append(bytearray(2 * 1024 * 1024))
    keepers.append(bytearray(4096))  # from malloc, not Python's small-object pool
peak = rss_mib()
del blocks
print(peak - rss_mib())
"""


def _returned_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _SCENARIO, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_freed_megabyte_buffers_go_back_to_the_os_with_the_fixed_threshold() -> None:
    assert _returned_mib("fixed") >= 150
    assert _returned_mib("default") < 50  # what the embedder's resident memory did before


def test_tile_sized_arrays_stay_in_the_heap_except_in_the_embedder() -> None:
    from wsitk.shared.heap import service_threshold

    tile_float32 = 224 * 224 * 3 * 4  # one tile as float32, the largest per-tile array of QC and tiling
    for service in ("tiler", "quality-filter", "ingest"):
        assert service_threshold(service) > tile_float32  # no mapping and page faults per tile
    assert service_threshold("embedder") == 128 * 1024  # batches, not tiles: the lower peak
