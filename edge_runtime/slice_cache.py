"""Content-addressed store of shipped blobs (stage slices, tokenizers) on the agent.

Uploads arrive in ordered chunks into a part file, hashed as they arrive (so the last chunk costs
an fsync, not a pass over the whole blob); the blob becomes visible under its sha256 only after
the hash is verified, so a torn upload is never used. A second run with the same
slice finds it here and skips the transfer.

The cache never fills the device's disk (a Pi's SD card): before an upload it drops blobs unused for
KEEP_DAYS, then the least recently used blobs that no run needs, until the disk has room for the blob
and RESERVE_BYTES; if it still has not, the upload is refused saying so. A run needs the blobs its
coordinator named (pinned) and, since agents on one machine may share a state directory, any blob used
in the last IN_USE_SECONDS (another agent's run being set up).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path

DIGEST = re.compile(r"^[0-9a-f]{64}$")
KEEP_DAYS = 14  # as the coordinator keeps its cut slices
RESERVE_BYTES = 256 << 20  # left free for checkpoints, logs and the system
IN_USE_SECONDS = 3600  # a run's blobs are named (Have) before shipping starts and used at assign, within this


class UploadError(ValueError):
    """A chunk that does not continue its upload, or a blob whose hash does not match."""


class SliceCache:
    def __init__(self, root: Path, max_blob_bytes: int = 64 << 30, reserve_bytes: int = RESERVE_BYTES) -> None:
        self.root = root
        self.max_blob_bytes = max_blob_bytes
        self.reserve_bytes = reserve_bytes
        (root / "parts").mkdir(parents=True, exist_ok=True)
        self._hashing: dict[str, "hashlib._Hash"] = {}  # uploads in progress: the hash of their bytes so far
        self._pinned: set[str] = set()  # blobs the paired coordinator named for its run: never evicted
        # Agents sharing a state directory (--local) may receive the same blob at once (the ExecuTorch programs
        # every agent gets): each writes its own part file, and publishing it is one atomic rename of equal bytes.
        self._parts = f"{uuid.uuid4().hex[:12]}"

    def has(self, digest: str) -> bool:
        path = self._path(digest)
        if not path.is_file():
            return False
        os.utime(path)  # recently used: evicted last
        return True

    def pin(self, digests: list[str]) -> None:
        """Keep these blobs whatever else arrives (the coordinator's run needs them)."""
        self._pinned.update(digests)

    def unpin_all(self) -> None:
        """A new coordinator session: what the last one needed may go when room is needed."""
        self._pinned.clear()

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
        part = self.root / "parts" / f"{self._path(digest).name}.{self._parts}"  # _path validates the name
        if not 0 < total <= self.max_blob_bytes:
            raise UploadError(f"blob of {total} bytes is over the limit of {self.max_blob_bytes}")
        size = part.stat().st_size if part.exists() and digest in self._hashing else 0
        if offset == 0:
            size = 0
            self._hashing.pop(digest, None)
            self._make_room(total)
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

    def _make_room(self, total: int) -> None:
        """Evict until the disk holds total more bytes and the reserve, or refuse the upload saying why."""
        now = time.time()
        blobs = _stats(p for p in self.root.iterdir() if DIGEST.match(p.name))
        torn = [p for p, stat in _stats((self.root / "parts").iterdir()).items()
                if stat.st_mtime < now - IN_USE_SECONDS]
        stale = [p for p, stat in blobs.items()
                 if stat.st_mtime < now - KEEP_DAYS * 86400 and p.name not in self._pinned]
        for path in torn + stale:
            path.unlink(missing_ok=True)
        evictable = sorted((p for p, stat in blobs.items() if p not in stale and p.name not in self._pinned
                            and stat.st_mtime < now - IN_USE_SECONDS),
                           key=lambda p: blobs[p].st_mtime)  # least recently used first
        needed = total + self.reserve_bytes
        could_free = self._free() + sum(blobs[p].st_size for p in evictable)
        if could_free < needed:
            self._refuse(total, could_free)
        while evictable and self._free() < needed:
            evictable.pop(0).unlink(missing_ok=True)  # an agent sharing the directory may have evicted it first
        if self._free() < needed:
            self._refuse(total, self._free())

    def _refuse(self, total: int, could_free: int) -> None:
        raise UploadError(f"this device can free only {_size(could_free)} on {self.root} (dropping the cached blobs "
                          f"no run needs), and a blob of {_size(total)} needs {_size(total + self.reserve_bytes)} "
                          f"with {_size(self.reserve_bytes)} kept free: free disk space on this device, or restart its "
                          f"agent with --state-dir on a larger disk")

    def _free(self) -> int:
        return shutil.disk_usage(self.root).free

    def _path(self, digest: str) -> Path:
        if not DIGEST.match(digest):
            raise UploadError(f"{digest!r} is not a sha256 hex digest")
        return self.root / digest


def _stats(paths) -> dict[Path, os.stat_result]:
    """Each file's stat, leaving out the ones gone by the time they are looked at: agents sharing the directory
    publish (rename) their part files and evict blobs at any moment."""
    stats = {}
    for path in paths:
        try:
            stats[path] = path.stat()
        except FileNotFoundError:
            continue
    return stats


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"
