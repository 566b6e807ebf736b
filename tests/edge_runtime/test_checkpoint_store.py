"""The checkpoint store: atomic files, manifests with hashes, the newest intact checkpoint on load."""
import json

import pytest

from edge_runtime.checkpoint_store import CheckpointStore, manifest_for, verify, write_atomic


def test_latest_is_the_newest_and_only_the_last_ones_are_kept(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (4, 8, 12):
        store.save(step, f"state {step}".encode())
    assert store.steps() == [8, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000008.json", "step-00000008.safetensors",
                                                          "step-00000012.json", "step-00000012.safetensors"]
    latest = store.latest()
    assert (latest.step, latest.state) == (12, b"state 12")


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete the data", "garble the manifest"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    store = CheckpointStore(tmp_path)
    store.save(4, b"older state" * 100)
    store.save(8, b"newer state" * 100)
    data, manifest = tmp_path / "step-00000008.safetensors", tmp_path / "step-00000008.json"
    if damage == "flip a byte":
        raw = bytearray(data.read_bytes())
        raw[500] ^= 1
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-7])
    elif damage == "delete the data":
        data.unlink()
    else:
        manifest.write_text("{not json")
    latest = store.latest()
    assert (latest.step, latest.state) == (4, b"older state" * 100)
    assert "step 8" in caplog.text and "trying the previous one" in caplog.text


def test_a_torn_write_without_manifest_is_ignored(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(4, b"complete")
    (tmp_path / "step-00000008.safetensors").write_bytes(b"half of a")  # crashed before the manifest
    assert store.latest().step == 4


def test_no_intact_checkpoint_is_none(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.latest() is None
    store.save(4, b"state")
    (tmp_path / "step-00000004.safetensors").write_bytes(b"other")
    assert store.latest() is None


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "file"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_manifest_verification():
    manifest = json.loads(json.dumps(manifest_for(3, "x", b"abc")))
    assert verify(manifest, b"abc") is None
    assert "torn" in verify(manifest, b"ab")
    assert "corrupted" in verify(manifest, b"abd")


def test_keeping_fewer_than_two_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        CheckpointStore(tmp_path, keep=1)
