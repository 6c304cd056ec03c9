"""Content hashing: the one SHA-256 of bytes and of files that slide ids, object checks, model manifests and
training runs all use."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str, chunk: int = 8 * 1024 * 1024) -> str:
    """Hex SHA-256 of a file, read ``chunk`` bytes at a time (memory does not grow with the file)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
