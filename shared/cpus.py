"""How many CPUs this process may really use: the smallest of the host's cores, the CPU affinity
mask and the container's CPU limit (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``).

``os.cpu_count()`` reports the host's cores: a pod limited to 4 CPUs on a 64-core node that starts a
thread per core spends its quota in minutes of throttling. Thread pools (the embedder's decoders,
ONNX Runtime's intra-op pool) size themselves from :func:`usable_cpus` instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_limit(root: Path) -> float | None:
    """The CPU limit in CPUs (fractional), or None when unlimited / unknown."""
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """At least 1; the container's limit rounded up (a 2.5-CPU limit allows 3 busy threads)."""
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        count = min(count, len(os.sched_getaffinity(0)))
    limit = _cgroup_limit(cgroup_root)
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(1, count)
