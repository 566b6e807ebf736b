"""Checkpoints on disk: atomic writes, a manifest with the hash, the newest intact one on load.

A checkpoint is one blob (the training state, see ``edge_runtime.training_state``) written as
``step-NNNNNNNN.safetensors`` and then its manifest ``step-NNNNNNNN.json`` (step, size, sha256).
Each file goes to a temporary name, is fsynced, renamed into place, and the directory is fsynced:
a crash leaves either the previous checkpoint or the new one, never half of one. The manifest is
written last, so a checkpoint without one was torn; one whose bytes do not match its manifest was
corrupted. Loading skips both (and says why) and takes the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
MANIFEST = re.compile(r"^step-(\d{8})\.json$")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    step: int
    """Optimizer steps done when it was taken: training continues at this step index."""
    state: bytes
    """The training state blob."""


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write data to path so that readers see the old file or the whole new one, even after a crash."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def manifest_for(step: int, data_name: str, state: bytes) -> dict:
    return {"step": step, "file": data_name, "bytes": len(state), "sha256": hashlib.sha256(state).hexdigest()}


def verify(manifest: dict, state: bytes) -> str | None:
    """None if the bytes are the ones the manifest describes, else what is wrong."""
    if len(state) != manifest["bytes"]:
        return f"{len(state)} bytes, the manifest says {manifest['bytes']} (torn write)"
    if hashlib.sha256(state).hexdigest() != manifest["sha256"]:
        return "its sha256 does not match the manifest (corrupted)"
    return None


class CheckpointStore:
    def __init__(self, root: Path, keep: int = 3) -> None:
        """keep: how many of the newest checkpoints stay on disk (older ones are deleted)."""
        if keep < 2:
            raise ValueError("keep at least 2 checkpoints, so a corrupt newest one has a predecessor")
        self.root = root
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, state: bytes) -> Path:
        data_path = self.root / f"step-{step:08d}.safetensors"
        write_atomic(data_path, state)
        manifest_path = self.root / f"step-{step:08d}.json"
        write_atomic(manifest_path, json.dumps(manifest_for(step, data_path.name, state)).encode())
        self._prune()
        return manifest_path

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; broken ones are logged and skipped."""
        for step in reversed(self.steps()):
            problem, checkpoint = self._load(step)
            if checkpoint is not None:
                return checkpoint
            log.warning("checkpoint at step %d in %s is unusable: %s; trying the previous one", step, self.root, problem)
        return None

    def steps(self) -> list[int]:
        return sorted(int(m.group(1)) for m in map(MANIFEST.match, os.listdir(self.root)) if m)

    def _load(self, step: int) -> tuple[str, Checkpoint | None]:
        try:
            manifest = json.loads((self.root / f"step-{step:08d}.json").read_text())
            state = (self.root / manifest["file"]).read_bytes()
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"cannot read it ({error})", None
        problem = verify(manifest, state)
        return (problem, None) if problem else ("", Checkpoint(step, state))

    def _prune(self) -> None:
        for step in self.steps()[:-self.keep]:
            for suffix in (".json", ".safetensors"):  # manifest first: never a manifest without data
                (self.root / f"step-{step:08d}{suffix}").unlink(missing_ok=True)
