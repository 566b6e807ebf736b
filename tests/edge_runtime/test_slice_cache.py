import hashlib
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from edge_runtime.slice_cache import IN_USE_SECONDS, KEEP_DAYS, SliceCache, UploadError


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_chunks_become_a_blob_only_after_the_hash_checks(tmp_path):
    cache, blob = SliceCache(tmp_path), b"abcdefghij" * 100
    assert not cache.append(digest(blob), 0, len(blob), blob[:400])
    assert not cache.has(digest(blob))
    assert cache.append(digest(blob), 400, len(blob), blob[400:])
    assert cache.read(digest(blob)) == blob


def test_a_corrupted_upload_is_refused_and_discarded(tmp_path):
    cache, blob = SliceCache(tmp_path), b"x" * 64
    with pytest.raises(UploadError, match="upload it again"):
        cache.append(digest(blob), 0, len(blob), b"y" * 64)
    assert not cache.has(digest(blob)) and not list((tmp_path / "parts").iterdir())


def test_out_of_order_chunks_and_bad_names_are_refused(tmp_path):
    cache, blob = SliceCache(tmp_path), b"z" * 64
    with pytest.raises(UploadError, match="does not continue"):
        cache.append(digest(blob), 32, len(blob), blob[32:])
    with pytest.raises(UploadError, match="not a sha256"):
        cache.append("../../etc/passwd", 0, 4, b"evil")
    with pytest.raises(UploadError, match="over the limit"):
        SliceCache(tmp_path, max_blob_bytes=10).append(digest(blob), 0, len(blob), blob)
    with pytest.raises(UploadError, match="upload it first"):
        cache.read(digest(b"never sent"))


def upload(cache: SliceCache, blob: bytes) -> str:
    assert cache.append(digest(blob), 0, len(blob), blob)
    return digest(blob)


def last_used(cache: SliceCache, name: str, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(cache.path(name), (when, when))


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB filesystem (tmpfs), so the cache meets a full disk as on a Pi's SD card."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.root
def test_a_full_disk_evicts_the_least_recently_used_blobs_no_run_needs(small_disk):
    cache = SliceCache(small_disk, reserve_bytes=2 << 20)
    pinned, old, recent = (upload(cache, bytes([i]) * (6 << 20)) for i in range(3))  # 18 of 24 MB
    hour = IN_USE_SECONDS
    for name, seconds_ago in ((pinned, 5 * hour), (old, 4 * hour), (recent, hour / 2)):
        last_used(cache, name, seconds_ago)
    cache.pin([pinned])  # this agent's run needs it; `recent` may be another agent's (a shared state directory)
    new = upload(cache, b"n" * (6 << 20))  # 6 MB + the 2 MB reserve: one blob must go, the oldest unneeded
    assert [cache.has(name) for name in (pinned, old, recent, new)] == [True, False, True, True]


@pytest.mark.root
def test_a_blob_the_disk_cannot_hold_is_refused_saying_what_to_do_and_nothing_is_evicted(small_disk):
    cache = SliceCache(small_disk, reserve_bytes=2 << 20)
    pinned, kept = upload(cache, b"p" * (8 << 20)), upload(cache, b"k" * (4 << 20))
    for name in (pinned, kept):
        last_used(cache, name, 2 * IN_USE_SECONDS)
    cache.pin([pinned])
    big = b"b" * (16 << 20)  # fits only if the pinned blob went
    with pytest.raises(UploadError, match=r"free disk space on this device, or restart its agent with --state-dir"):
        cache.append(digest(big), 0, len(big), big[:1 << 20])
    assert cache.has(pinned) and cache.has(kept)
    cache.unpin_all()  # the next coordinator session does not need it
    for name in (pinned, kept):  # (has() marked them used just now)
        last_used(cache, name, 2 * IN_USE_SECONDS)
    assert upload(cache, big) and not cache.has(pinned)


def test_an_upload_in_progress_of_another_agent_sharing_the_directory_is_left_alone(tmp_path):
    ours, theirs = SliceCache(tmp_path), SliceCache(tmp_path)  # two agents, one state directory (--local)
    blob = b"t" * 64
    assert not theirs.append(digest(blob), 0, len(blob), blob[:32])
    upload(ours, b"another blob")
    assert theirs.append(digest(blob), 32, len(blob), blob[32:]) and ours.has(digest(blob))


def test_agents_sharing_the_directory_may_receive_the_same_blob_at_once(tmp_path):
    first, second = SliceCache(tmp_path), SliceCache(tmp_path)  # the ExecuTorch programs go to every agent
    blob = b"p" * 64
    assert not first.append(digest(blob), 0, len(blob), blob[:32])
    assert not second.append(digest(blob), 0, len(blob), blob[:32])
    assert first.append(digest(blob), 32, len(blob), blob[32:])
    assert second.append(digest(blob), 32, len(blob), blob[32:])
    assert first.read(digest(blob)) == second.read(digest(blob)) == blob
    assert not list((tmp_path / "parts").iterdir())


def test_blobs_unused_for_two_weeks_go_when_an_upload_starts_unless_the_run_needs_them(tmp_path):
    cache = SliceCache(tmp_path)
    stale, pinned = upload(cache, b"s" * 64), upload(cache, b"q" * 64)
    for name in (stale, pinned):
        last_used(cache, name, KEEP_DAYS * 86400 + 60)
    torn = tmp_path / "parts" / digest(b"torn")
    torn.write_bytes(b"an upload that never finished")
    os.utime(torn, (time.time() - 2 * IN_USE_SECONDS,) * 2)
    cache.pin([pinned])
    upload(cache, b"fresh")
    assert not cache.has(stale) and cache.has(pinned) and not list((tmp_path / "parts").iterdir())


def test_agents_sharing_the_directory_upload_at_once_while_the_other_publishes(tmp_path):
    """Starting an upload looks over the directory while the other agent renames its part files into blobs: a file
    gone between the listing and its stat is not an error (it failed a CI run as FileNotFoundError)."""
    def upload_many(name: str) -> None:
        cache = SliceCache(tmp_path)
        for index in range(250):
            upload(cache, f"{name} {index}".encode() * 64)

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(upload_many, name) for name in ("node1", "node2")]:
            done.result()  # raises what the upload raised
    assert len([p for p in tmp_path.iterdir() if p.is_file()]) == 500 and not list((tmp_path / "parts").iterdir())
