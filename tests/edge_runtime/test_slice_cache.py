import hashlib

import pytest

from edge_runtime.slice_cache import SliceCache, UploadError


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
