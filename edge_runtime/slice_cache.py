"""Content-addressed store of shipped blobs (stage slices, tokenizers) on the agent.

Uploads arrive in ordered chunks into a part file, hashed as they arrive (so the last chunk costs
an fsync, not a pass over the whole blob); the blob becomes visible under its sha256 only after
the hash is verified, so a torn upload is never used. A second run with the same
slice finds it here and skips the transfer.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

DIGEST = re.compile(r"^[0-9a-f]{64}$")


class UploadError(ValueError):
    """A chunk that does not continue its upload, or a blob whose hash does not match."""


class SliceCache:
    def __init__(self, root: Path, max_blob_bytes: int = 64 << 30) -> None:
        self.root = root
        self.max_blob_bytes = max_blob_bytes
        (root / "parts").mkdir(parents=True, exist_ok=True)
        self._hashing: dict[str, "hashlib._Hash"] = {}  # uploads in progress: the hash of their bytes so far

    def has(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def path(self, digest: str) -> Path:
        """Where a complete blob lives (check ``has`` first)."""
        return self._path(digest)

    def read(self, digest: str) -> bytes:
        if not self.has(digest):
            raise UploadError(f"blob {digest[:12]} is not in the cache at {self.root}: upload it first")
        return self._path(digest).read_bytes()

    def discard(self, digest: str) -> None:
        """Drop a blob that was only passing through (a checkpoint on its way to the store)."""
        self._path(digest).unlink(missing_ok=True)

    def append(self, digest: str, offset: int, total: int, chunk: bytes) -> bool:
        """Add a chunk; True once the blob is complete and verified."""
        part = self.root / "parts" / self._path(digest).name  # _path validates the name
        if not 0 < total <= self.max_blob_bytes:
            raise UploadError(f"blob of {total} bytes is over the limit of {self.max_blob_bytes}")
        size = part.stat().st_size if part.exists() and digest in self._hashing else 0
        if offset == 0:
            size = 0
            self._hashing[digest] = hashlib.sha256()
        if offset != size or offset + len(chunk) > total:
            raise UploadError(f"chunk at {offset} does not continue the upload of {digest[:12]} (have {size} bytes): "
                              f"upload it again from the start")
        with part.open("r+b" if offset else "wb") as handle:
            handle.seek(offset)
            handle.write(chunk)
            handle.truncate()
        self._hashing[digest].update(chunk)
        if offset + len(chunk) < total:
            return False
        return self._publish(digest, part)

    def _publish(self, digest: str, part: Path) -> bool:
        actual = self._hashing.pop(digest).hexdigest()
        if actual != digest:
            part.unlink()
            raise UploadError(f"uploaded blob hashes to {actual[:12]}, expected {digest[:12]}: upload it again")
        with part.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(part, self._path(digest))
        return True

    def _path(self, digest: str) -> Path:
        if not DIGEST.match(digest):
            raise UploadError(f"{digest!r} is not a sha256 hex digest")
        return self.root / digest
