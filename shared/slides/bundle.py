"""Multi-file slides as one object: a zip "bundle" of a DICOM series or a MIRAX slide.

A slide that is several files (a DICOM whole-slide series, MIRAX's ``.mrxs`` plus its data folder) travels
through the pipeline as one object so that everything downstream keeps its one-object contract: ingest
writes the group's files into a deterministic, uncompressed zip (``write_bundle``: members sorted by
name, fixed timestamps, so the same files give the same bytes and so the same content-derived slide id),
and a lab may upload such a zip itself. Whoever needs the files (ingest's checks, the tiler, the viewer)
unpacks it once beside the cached zip (``open_bundle``) and opens the file OpenSlide is meant to be
given: for a DICOM series any instance of the base level (OpenSlide 4 finds the other instances of the
series in the same directory), for MIRAX the ``.mrxs``.

Unpacking is defensive: members with absolute paths, ``..`` segments or links are refused, and the total
unpacked size and the member count are bounded (``BundleRejected`` says which rule a zip broke).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from wsitk.shared.errors import PermanentError

BUNDLE_SUFFIX = ".zip"
MAX_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 64 * 1024**3
_FIXED_TIME = (2000, 1, 1, 0, 0, 0)
_DICOM_MAGIC_OFFSET = 128


class BundleRejected(PermanentError):
    """A zip that cannot be a slide (unsafe member names, too large, no slide inside)."""


def write_bundle(members: Iterable[tuple[str, Path]], out: Path) -> None:
    """Write ``(name, file)`` pairs as an uncompressed, byte-for-byte deterministic zip at ``out``."""
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, path in sorted(members):
            info = zipfile.ZipInfo(_safe_member(name), date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.create_system = 3
            with path.open("rb") as src, archive.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 8 * 1024 * 1024)
    os.replace(tmp, out)


def _safe_member(name: str) -> str:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise BundleRejected(
            "unsafe-archive",
            f"the zip holds a member named {name!r} (absolute, or with '..'); zip the slide's files with "
            "relative names, e.g. `cd series && zip -r ../slide.zip .`",
        )
    return "/".join(parts)


def unpack_dir(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".d")


def open_bundle(bundle: Path) -> Path:
    """Unpack ``bundle`` (once) beside itself; returns the file to give OpenSlide."""
    target = unpack_dir(bundle)
    marker = target / ".complete"
    if not marker.is_file():
        shutil.rmtree(target, ignore_errors=True)
        tmp = target.with_name(target.name + f".{os.getpid()}.part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _unpack(bundle, tmp)
        (tmp / ".complete").touch()
        try:
            os.replace(tmp, target)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    return main_file(target, bundle.name)


def _unpack(bundle: Path, target: Path) -> None:
    try:
        archive = zipfile.ZipFile(bundle)
    except zipfile.BadZipFile as error:
        raise BundleRejected(
            "unsupported-format", f"{bundle.name} is not a readable zip ({error})"
        ) from error
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > MAX_MEMBERS:
            raise BundleRejected(
                "unsafe-archive", f"{bundle.name} holds {len(infos):,} files (limit {MAX_MEMBERS:,})"
            )
        total = sum(i.file_size for i in infos)
        if total > MAX_UNPACKED_BYTES:
            raise BundleRejected(
                "unsafe-archive", f"{bundle.name} unpacks to {total:,} bytes, beyond {MAX_UNPACKED_BYTES:,}"
            )
        for info in infos:
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise BundleRejected(
                    "unsafe-archive", f"{bundle.name} holds a symbolic link ({info.filename!r})"
                )
            dest = target / _safe_member(info.filename)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst, 8 * 1024 * 1024)


def is_dicom_file(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(_DICOM_MAGIC_OFFSET + 4)
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def main_file(directory: Path, name: str = "bundle") -> Path:
    """The file of an unpacked multi-file slide that OpenSlide opens (module docstring)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != ".complete")
    mirax = [p for p in files if p.suffix.lower() == ".mrxs"]
    if len(mirax) == 1:
        return mirax[0]
    dicom = [p for p in files if is_dicom_file(p)]
    if dicom:
        return _base_level_instance(dicom)
    if len(files) == 1:
        return files[0]
    raise BundleRejected(
        "unsupported-format",
        f"{name} holds {len(files)} files but neither one MIRAX .mrxs nor DICOM instances; a zip must hold "
        "exactly one slide: a DICOM whole-slide series, or a .mrxs with its data folder",
    )


def _base_level_instance(files: list[Path]) -> Path:
    """The DICOM instance with the largest total pixel matrix (OpenSlide groups the series from it)."""
    import pydicom

    best: tuple[int, str] | None = None
    chosen = files[0]
    for path in files:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["TotalPixelMatrixColumns", "TotalPixelMatrixRows", "ImageType"],
        )
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if len(image_type) > 2 and image_type[2] != "VOLUME":
            continue
        area = int(ds.get("TotalPixelMatrixColumns", 0) or 0) * int(ds.get("TotalPixelMatrixRows", 0) or 0)
        if best is None or (area, path.name) > best:
            best, chosen = (area, path.name), path
    return chosen


def openable(path: Path) -> Path:
    """The file to give OpenSlide for a cached slide: itself, or the main file of a bundle it unpacks."""
    return open_bundle(path) if path.suffix.lower() == BUNDLE_SUFFIX else path


def remove_unpacked(bundle: Path) -> None:
    shutil.rmtree(unpack_dir(bundle), ignore_errors=True)
