"""The one rule for which tiles of a slide a MIL model scores: the mil-scorer and ``wsi evaluate`` both use it.

A slide is scored on all its tiles up to a cap (``WSI_MAX_TILES_PER_SLIDE``, default 20,000: the scorer
holds a slide's tiles in memory and the attention model runs on all of them at once). Beyond the cap the
kept tiles are the ``cap`` tiles whose level-0 coordinates hash lowest (SplitMix64 of ``x`` and ``y``):

- deterministic from the tiles themselves, not from a random generator, the slide id or the order the
  shards arrived in, so a re-score, a rescore from stored embeddings and the evaluation keep the same tiles;
- spatially unbiased: the hash does not favour any region, so a focus keeps about ``cap / tiles`` of its
  tiles, as every other region does (a 200-tile focus on a 50,000-tile resection keeps about 80).

The evaluation applies the same rule with the same cap and reports how many slides exceeded it and how many
tiles were dropped, so what production does not see is visible in the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_MAX_TILES = 20_000
RULE = (
    "all tiles up to the cap; beyond it, the cap tiles whose level-0 coordinates hash lowest "
    "(SplitMix64 of x and y): deterministic, independent of shard order, spatially unbiased"
)


def coordinate_hash(coords: npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
    """SplitMix64 of ``x * 2^32 + y`` per tile (level-0 top-left coordinates, ``[N, 2]``)."""
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2).astype(np.uint64)
    z = (xy[:, 0] << np.uint64(32)) ^ (xy[:, 1] & np.uint64(0xFFFFFFFF))
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)


def tiles_to_score(coords: npt.NDArray[Any], cap: int = DEFAULT_MAX_TILES) -> npt.NDArray[np.int64]:
    """Sorted indices of the tiles scored: all of them up to ``cap``, else the ``cap`` lowest coordinate
    hashes (ties, i.e. duplicate coordinates, broken by position)."""
    if cap < 1:
        raise ValueError(f"the tile cap must be at least 1, got {cap}")
    count = len(coords)
    if count <= cap:
        return np.arange(count, dtype=np.int64)
    keep = np.argsort(coordinate_hash(coords), kind="stable")[:cap]
    return np.sort(keep).astype(np.int64)


@dataclass(frozen=True)
class DroppedTiles:
    """What the rule dropped over a set of slides."""

    cap: int
    slides: int
    slides_over_cap: int
    tiles: int
    tiles_dropped: int

    def describe(self) -> str:
        if not self.slides_over_cap:
            return f"all tiles of all {self.slides} slides were scored (none above the cap of {self.cap:,})"
        share = self.tiles_dropped / self.tiles if self.tiles else 0.0
        return (
            f"{self.slides_over_cap} of {self.slides} slides had more than {self.cap:,} tiles; "
            f"{self.tiles_dropped:,} of {self.tiles:,} tiles ({share:.1%}) were not scored, as in production"
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "cap": self.cap,
            "slides": self.slides,
            "slides_over_cap": self.slides_over_cap,
            "tiles": self.tiles,
            "tiles_dropped": self.tiles_dropped,
        }


def dropped_tiles(tile_counts: list[int], cap: int) -> DroppedTiles:
    return DroppedTiles(
        cap=cap,
        slides=len(tile_counts),
        slides_over_cap=sum(count > cap for count in tile_counts),
        tiles=sum(tile_counts),
        tiles_dropped=sum(max(0, count - cap) for count in tile_counts),
    )
