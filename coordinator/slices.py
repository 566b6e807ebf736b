"""Cut the model into per-device slice files (agents get slices, shipped in chunks from the files)."""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import cache_dir, load_model, load_tokenizer
from edge_runtime.models.slices import write_slice
from edge_runtime.models.stage import build_stage
from edge_runtime.models.tokenizer import tokenizer_blob
from exporters.manifest import sha256_file
from ringtune.plan import Plan


@dataclass(frozen=True, slots=True)
class Blob:
    path: Path
    """The file shipped (read in chunks, never whole)."""
    sha256: str
    """Content hash: the agent's cache key."""
    size: int
    """Bytes."""

    @staticmethod
    def of_file(path: Path, sha256: str | None = None) -> "Blob":
        path = Path(path)
        return Blob(path, sha256 or sha256_file(path), path.stat().st_size)

    @staticmethod
    def of_bytes(data: bytes) -> "Blob":
        """A small blob (tokenizer, manifest), kept in the coordinator's blob directory under its hash."""
        digest = hashlib.sha256(data).hexdigest()
        path = blob_dir() / digest
        if not path.is_file():
            tmp = path.with_name(f"{digest}.tmp{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return Blob(path, digest, len(data))


def blob_dir() -> Path:
    path = cache_dir() / "blobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True, slots=True)
class ModelShipment:
    config: dict
    """The model's config (agents build the skeleton from it)."""
    hidden_size: int
    """Width of the hidden states that cross the ring."""
    slices: dict[str, Blob]
    """Per device: base weights and initial LoRA tensors of its stages."""
    tokenizer: Blob
    """For the owner."""


def cut_model(model: str, lora: LoraSpec, plan: Plan) -> ModelShipment:
    peft_model = peft_model_for_run(model, lora)
    slices = {}
    for device in plan.devices():
        stages = {i: build_stage(peft_model, plan.stages[i].layers, plan.stages[i].role)[0]
                  for i in plan.stage_indices(device)}
        tmp = blob_dir() / f"slice-{uuid.uuid4().hex}.tmp"
        digest = write_slice(stages, tmp)
        path = blob_dir() / digest
        os.replace(tmp, path)
        slices[device] = Blob.of_file(path, digest)
    config = peft_model.get_base_model().config
    return ModelShipment(config.to_dict(), config.hidden_size, slices, Blob.of_bytes(tokenizer_blob(load_tokenizer(model))))


@lru_cache(maxsize=1)
def peft_model_for_run(model: str, lora: LoraSpec):
    """Kept for the run: re-planning after a device leaves cuts new slices without reloading the model.
    Nothing trains it here, so its LoRA tensors stay the initial ones."""
    return apply_lora(load_model(model), lora)
