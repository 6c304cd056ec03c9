"""Ingest's slide gate on real files: the openslide-python fixtures and hand-made bad inputs."""

from __future__ import annotations

import contextlib
import os
import resource
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from wsitk.shared.errors import PermanentError, is_transient
from wsitk.shared.slides.reader import SlideRejected, inspect_slide, kept_properties, mpp_for

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "openslide-python"
MAX_PIXELS = 200_000 * 200_000
IDENTIFYING_VALUES = ("CMU-1", "12/29/09", "09:59:15", "b414003d-95c6-48b0-9369-8010ed517ba7")


def rejection(path: Path, *, max_pixels: int = MAX_PIXELS, **options: Any) -> SlideRejected:
    with pytest.raises(SlideRejected) as caught:
        inspect_slide(path, max_pixels=max_pixels, **options)
    return caught.value


def open_descriptors_of(path: Path) -> int:
    target = str(path.resolve())
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                count += 1
        except OSError:
            continue
    return count


def write_tiff_claiming(path: Path, side: int, tile: int = 16384) -> None:
    """A tiled TIFF header claiming side x side RGB pixels, every tile pointing at the same 16 bytes.

    tifffile would write (and allocate) the pixels, so the IFD is written by hand.
    """
    tiles = (-(-side // tile)) ** 2
    entry_count = 11
    ifd_size = 2 + entry_count * 12 + 4
    bits_offset = 8 + ifd_size
    offsets_offset = bits_offset + 6
    counts_offset = offsets_offset + 4 * tiles
    data_offset = counts_offset + 4 * tiles

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        packed_value = struct.pack("<I", value) if kind == 4 or count > 2 else struct.pack("<HH", value, 0)
        return struct.pack("<HHI", tag, kind, count) + packed_value

    entries = [
        entry(256, 4, 1, side),  # ImageWidth
        entry(257, 4, 1, side),  # ImageLength
        entry(258, 3, 3, bits_offset),  # BitsPerSample 8,8,8
        entry(259, 3, 1, 8),  # Compression: deflate
        entry(262, 3, 1, 2),  # Photometric: RGB
        entry(277, 3, 1, 3),  # SamplesPerPixel
        entry(284, 3, 1, 1),  # PlanarConfiguration: contiguous
        entry(322, 4, 1, tile),  # TileWidth
        entry(323, 4, 1, tile),  # TileLength
        entry(324, 4, tiles, offsets_offset),  # TileOffsets
        entry(325, 4, tiles, counts_offset),  # TileByteCounts
    ]
    body = b"II*\x00" + struct.pack("<I", 8)
    body += struct.pack("<H", entry_count) + b"".join(entries) + struct.pack("<I", 0)
    body += struct.pack("<HHH", 8, 8, 8)
    body += struct.pack(f"<{tiles}I", *([data_offset] * tiles))
    body += struct.pack(f"<{tiles}I", *([16] * tiles))
    body += bytes(16)
    path.write_bytes(body)


def test_boxes_tiff_without_mpp_is_rejected_unless_overridden() -> None:
    path = FIXTURES / "boxes.tiff"
    refused = rejection(path)
    assert refused.code == "no-mpp"
    assert "boxes.tiff" in refused.reason
    assert "WSI_MPP_OVERRIDE" in refused.reason
    # OpenSlide turns the TIFF's 72 dpi default into 352.8 um/px; that must not pass as a measurement.
    assert "352.778" in refused.reason

    info = inspect_slide(path, max_pixels=MAX_PIXELS, mpp_override=0.5)
    assert (info.vendor, info.width, info.height) == ("generic-tiff", 300, 250)
    assert (info.mpp_x, info.mpp_y, info.mpp_source) == (0.5, 0.5, "override")
    assert info.objective_power is None
    assert info.has_icc_profile
    assert len(info.levels) == 4
    assert info.levels[1].downsample == 2.0
    assert (info.levels[0].tile_width, info.levels[0].tile_height) == (64, 64)
    assert info.associated_images == ()
    assert info.file_size == path.stat().st_size


def test_small_svs_metadata_is_read_and_deidentified() -> None:
    info = inspect_slide(FIXTURES / "small.svs", max_pixels=MAX_PIXELS)
    assert info.vendor == "aperio"
    assert (info.width, info.height) == (16, 16)
    # OpenSlide reports aperio.MPP as openslide.mpp-x, so the properties win over 10 / AppMag.
    assert (info.mpp_x, info.mpp_y, info.mpp_source) == (0.499, 0.499, "properties")
    assert info.objective_power == 20.0
    assert info.associated_images == ("thumbnail",)
    assert not info.has_icc_profile
    kept = info.properties_kept
    assert kept["openslide.vendor"] == "aperio"
    assert kept["openslide.mpp-x"] == "0.499"
    for key in ("aperio.Filename", "aperio.Date", "aperio.Time", "aperio.User", "tiff.ImageDescription"):
        assert key not in kept
    assert "openslide.comment" not in kept
    flattened = repr(kept)
    for value in IDENTIFYING_VALUES:
        assert value not in flattened


def test_allow_identifying_keeps_everything_and_metadata_size_is_bounded() -> None:
    path = FIXTURES / "small.svs"
    info = inspect_slide(path, max_pixels=MAX_PIXELS, allow_identifying=True)
    assert info.properties_kept["aperio.Filename"] == "CMU-1"
    refused = rejection(path, allow_identifying=True, max_property_bytes=500)
    assert refused.code == "metadata-too-large"
    assert "allow_identifying" in refused.reason
    # The de-identified set of the same slide fits easily.
    assert inspect_slide(path, max_pixels=MAX_PIXELS, max_property_bytes=2000).properties_kept


def test_unreadable_svs_is_rejected_at_the_first_pixel_read() -> None:
    refused = rejection(FIXTURES / "unreadable.svs")
    assert refused.code == "unreadable-pixels"
    assert "Bogus marker length" in refused.reason
    assert "unreadable.svs" in refused.reason


def test_unopenable_tiff_is_rejected_with_openslides_reason() -> None:
    refused = rejection(FIXTURES / "unopenable.tiff")
    assert refused.code == "unopenable"
    assert "Unsupported TIFF compression: 52479" in refused.reason
    assert "re-export" in refused.reason


def test_slide_handles_are_closed() -> None:
    for name in ("small.svs", "boxes.tiff", "unreadable.svs"):
        path = FIXTURES / name
        for _ in range(3):
            with contextlib.suppress(SlideRejected):
                inspect_slide(path, max_pixels=MAX_PIXELS, mpp_override=0.5)
        assert open_descriptors_of(path) == 0, f"{name} is still open"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "upload.svs"
    path.write_bytes(b"")
    refused = rejection(path)
    assert refused.code == "empty-file"
    assert "upload.svs" in refused.reason


def test_text_file_named_svs_is_not_a_slide(tmp_path: Path) -> None:
    path = tmp_path / "case 1234 Jane Doe.svs"
    path.write_text("Patient: Jane Doe\nthis is a note, not a scan\n")
    refused = rejection(path)
    assert refused.code == "not-a-slide"
    assert "text" in refused.reason
    assert "Patient" not in refused.reason  # the content is described, never quoted


def test_untiled_tiff_is_an_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, dtype=np.uint8))
    refused = rejection(path)
    assert refused.code == "unsupported-format"
    assert "TIFF" in refused.reason
    assert "--pyramid" in refused.reason


def test_absurd_dimensions_are_rejected_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "huge.tiff"
    write_tiff_claiming(path, 1_000_000)
    assert path.stat().st_size < 100_000
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    refused = rejection(path)
    assert refused.code == "absurd-dimensions"
    assert "1000000x1000000" in refused.reason
    assert time.monotonic() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib < 200 * 1024
    # The same header passes the dimension check when the limit allows it, and then fails on pixels.
    assert rejection(path, max_pixels=10**12).code == "unreadable-pixels"


def test_too_small(tmp_path: Path) -> None:
    refused = rejection(FIXTURES / "boxes.tiff", mpp_override=0.5, min_side_px=512)
    assert refused.code == "too-small"
    assert "300x250" in refused.reason


def test_rejections_are_permanent_errors() -> None:
    refused = rejection(FIXTURES / "unreadable.svs")
    assert isinstance(refused, PermanentError)
    assert not is_transient(refused)


def test_mpp_policy_order() -> None:
    measured = {"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2531", "openslide.objective-power": "20"}
    assert mpp_for(measured, 1.0) == mpp_for(measured)
    assert (mpp_for(measured).x, mpp_for(measured).y, mpp_for(measured).source) == (
        0.2527,
        0.2531,
        "properties",
    )
    by_power = mpp_for({"openslide.objective-power": "40"}, 0.3)
    assert (by_power.x, by_power.source) == (0.25, "objective-power")
    implausible = {"openslide.mpp-x": "352.77", "openslide.mpp-y": "352.77"}
    assert mpp_for(implausible, 0.3).source == "override"
    assert mpp_for({"openslide.objective-power": "0"}, 0.3).source == "override"
    with pytest.raises(SlideRejected) as caught:
        mpp_for({"openslide.mpp-x": "nan"}, 0.0, file_name="scan.tiff")
    assert caught.value.code == "no-mpp"
    assert "scan.tiff" in caught.value.reason


def test_kept_properties_is_an_allow_list() -> None:
    properties = {
        "openslide.vendor": "hamamatsu",
        "openslide.level[3].tile-width": "256",
        "hamamatsu.SourceLens": "40",
        "hamamatsu.Reference": "S-12345 patient",
        "tiff.DateTime": "2024:01:01 10:00:00",
        "tiff.Artist": "Dr. Who",
        "tiff.HostComputer": "scanner-7",
        "philips.PIM_DP_UFS_BARCODE": "AB12",
        "vendor.NewIdentifyingField": "x",
    }
    assert kept_properties(properties) == {
        "openslide.vendor": "hamamatsu",
        "openslide.level[3].tile-width": "256",
        "hamamatsu.SourceLens": "40",
    }


def write_tiff_with_huge_description(path: Path, size_bytes: int = 3 * 1024 * 1024) -> None:
    """A small, valid tiled JPEG TIFF whose ImageDescription is absurdly large."""
    import tifffile

    image = np.full((512, 512, 3), 200, np.uint8)
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            image,
            tile=(256, 256),
            compression="jpeg",
            description="x" * size_bytes,
            metadata=None,
            resolution=(20000, 20000),
            resolutionunit="CENTIMETER",
        )


def test_an_enormous_metadata_field_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "huge-description.tiff"
    write_tiff_with_huge_description(path)
    refused = rejection(path)
    assert refused.code == "metadata-too-large" and "3,145,728 bytes" in refused.reason
    small = tmp_path / "normal-description.tiff"
    write_tiff_with_huge_description(small, size_bytes=2000)
    assert inspect_slide(small, max_pixels=MAX_PIXELS).width == 512
