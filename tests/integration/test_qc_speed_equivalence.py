"""Quality-filter decides as it did before its speed work, tile by tile (``tests/data/qc_reference.json``).

The reference holds, per tile of the real scan, the labelled real tiles and synthetic tiles in every
scanner look (``tests/qc_reference.py`` says which, and rewrites the file with ``--write``), the measures,
accepted/rejected and the reason the float32 implementation gave. Decisions and reasons must be identical
on every tile. Metrics may differ by at most ``TOLERANCE`` (relative above 1): the sharpness ratio is now
computed with OpenCV's filters and float64 block sums instead of NumPy float32 variances, which can move
its fourth decimal; every share is still an exact pixel count and matches to the last digit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from wsitk.services.quality_filter import measures

from tests import qc_reference

TOLERANCE = 0.01


@pytest.fixture(scope="module")
def cases() -> list[qc_reference.Case]:
    if not qc_reference.CMU.is_file():
        pytest.fail(f"real fixture missing: {qc_reference.CMU} (../shared/fixtures/real beside the repo)")
    return qc_reference.all_cases()


def test_every_tile_gets_the_reference_decision_reason_and_measures(cases: list[qc_reference.Case]) -> None:
    reference = json.loads(qc_reference.REFERENCE.read_text())
    problems, largest = qc_reference.compare(reference, cases, TOLERANCE)
    print(f"{len(cases)} tiles; largest metric differences {largest}")
    assert not problems, "\n".join(problems[:20])
    reasons = {entry["reason"] for entry in reference["tiles"].values()}
    assert reasons == {"", "pen", "underexposed", "overexposed", "fat", "background", "blur"}


def test_colour_table_gives_the_codes_of_direct_classification(cases: list[qc_reference.Case]) -> None:
    """The per-slide colour table is ``colour_codes`` tabulated: same code for every pixel of every tile
    (the real scan's background and the yellow glass of a synthetic look: a table takes about a second)."""
    for prefix in ("cmu/", "synth/yellow-glass/"):
        chosen = [case for case in cases if case.key.startswith(prefix)]
        background, tiles = chosen[0].background, [case.tile for case in chosen]
        half = measures._halve_bytes(np.stack(tiles))
        tabulated = measures._codes_of(half, background, use_table=True)
        assert np.array_equal(tabulated, measures.colour_codes(half, background)), background
        with_table = measures.measure_batch(np.stack(tiles), background, 0.5, use_table=True)
        assert with_table == measures.measure_batch(np.stack(tiles), background, 0.5, use_table=False)


def test_colour_table_holds_the_code_of_every_colour(cases: list[qc_reference.Case]) -> None:
    """All 2^24 colours, on the real scan's background: the compact table (uniform cells in the coarse
    table, codes per colour only for mixed cells) answers exactly what ``colour_codes`` does."""
    background = next(case.background for case in cases if case.key.startswith("cmu/"))
    measures._TABLES.clear()
    table = measures.colour_table(background)
    assert table.nbytes < 4 * 2**20, table.nbytes  # the point of the layout: not 16 MiB
    assert 0 < len(table.mixed) < 32768
    levels = np.arange(256, dtype=np.uint32)
    for red in range(0, 256, 16):
        slab = np.empty((16, 256, 256, 3), dtype=np.uint8)
        slab[..., 0] = levels[red : red + 16, None, None]
        slab[..., 1] = levels[None, :, None]
        slab[..., 2] = levels[None, None, :]
        packed = (levels[red : red + 16, None, None] << 16) | (levels[None, :, None] << 8) | levels
        looked_up = table.lookup(packed.reshape(-1) | np.uint32(0xFF000000))  # alpha bits are ignored
        assert np.array_equal(looked_up, measures.colour_codes(slab, background).reshape(-1)), red


def test_halving_rounds_like_numpy() -> None:
    """2 x 2 means rounded half to even, ties included, for every sum of four 8-bit values."""
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, (3, 64, 66, 3)).astype(np.uint8)
    stack[0, :2, :2] = [[[0, 0, 0], [1, 2, 3]], [[1, 0, 255], [0, 2, 254]]]  # sums 2, 4, 510: ties
    exact = stack.reshape(3, 32, 2, 33, 2, 3).astype(np.float32).sum(axis=(2, 4)) * 0.25
    assert np.array_equal(measures._halve_bytes(stack), np.rint(exact).astype(np.uint8))
