"""Cut the model into per-device slice files, reading only each stage's tensors (the coordinator never holds
the model), and keep them in a cache that later runs and re-plans reuse; agents get the files in chunks."""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ringtune.manifest import sha256_file, toolchain_versions
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import cache_dir, load_config, load_tokenizer, model_identity, weight_source
from edge_runtime.models.slices import SLICE_FORMAT, cut_slice, materialize, skeleton
from edge_runtime.models.stage import StageModule
from edge_runtime.models.tokenizer import tokenizer_blob
from ringtune.plan import Plan
from ringtune.progress import PlainProgress, Progress

KEEP_SLICES_DAYS = 14
"""Cached slices unused for this long are deleted when new ones are cut."""


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
        path = _directory("blobs") / digest
        if not path.is_file():
            tmp = path.with_name(f"{digest}.tmp{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return Blob(path, digest, len(data))


@dataclass(frozen=True, slots=True)
class ModelShipment:
    config: dict
    """The model's config (agents build the skeleton from it)."""
    hidden_size: int
    """Width of the hidden states that cross the ring."""
    slices: dict[str, Blob]
    """Per device: base weights (at the plan's base dtype) and initial LoRA tensors of its stages."""
    tokenizer: Blob
    """For the owner."""


def cut_model(model: str, lora: LoraSpec, plan: Plan, progress: Progress | None = None,
              devices: list[str] | None = None) -> ModelShipment:
    """The slices of plan's devices (default: all), cut unless the cache has them."""
    progress = progress or PlainProgress()
    config = load_config(model)
    root = _directory("slices")
    keys = {device: slice_key(model, lora, plan, device) for device in (plan.devices() if devices is None else devices)}
    todo = [device for device, key in keys.items()
            if not ((root / f"{key}.safetensors").is_file() and (root / f"{key}.sha256").is_file())]
    if todo:
        _prune(root)
        _cut(model, lora, plan, todo, {d: root / f"{keys[d]}.safetensors" for d in todo}, progress)
    slices = {}
    for device, key in keys.items():
        path, digest = root / f"{key}.safetensors", root / f"{key}.sha256"
        for used in (path, digest):
            os.utime(used)  # recently used: kept by _prune
        slices[device] = Blob.of_file(path, digest.read_text())
    return ModelShipment(config.to_dict(), config.hidden_size, slices, tokenizer_blob_of(model))


def tokenizer_blob_of(model: str) -> Blob:
    """The model's tokenizer as a blob for the owner."""
    return Blob.of_bytes(tokenizer_blob(load_tokenizer(model)))


def owner_head(model: str, lora: LoraSpec, plan: Plan, progress: Progress | None = None) -> StageModule:
    """The owner's head stage (plan's first) as the owner will run it, from its slice (cut unless cached; the
    shipment reuses it): what a privacy preset is calibrated on."""
    owner_slice = cut_model(model, lora, plan, progress, [plan.owner]).slices[plan.owner]
    return materialize(owner_slice.path, load_config(model).to_dict(), lora, {0: plan.stages[0]})[0][0]


def _cut(model: str, lora: LoraSpec, plan: Plan, devices: list[str], paths: dict[str, Path], progress: Progress) -> None:
    source = weight_source(model)
    skel = skeleton(load_config(model), lora, plan.base_dtype, initial_lora=True)
    blocks = sum(plan.stages[i].num_layers for d in devices for i in plan.stage_indices(d))
    with progress.task(f"cutting {plan.base_dtype} slices for {', '.join(devices)}", blocks, "blocks") as task:
        for device in devices:
            specs = {i: plan.stages[i] for i in plan.stage_indices(device)}
            tmp = paths[device].with_name(f"{paths[device].name}.tmp{uuid.uuid4().hex}")
            digest = cut_slice(source, skel, specs, tmp, on_block=lambda: task.advance(1))
            paths[device].with_suffix(".sha256").write_text(digest)
            os.replace(tmp, paths[device])


def slice_key(model: str, lora: LoraSpec, plan: Plan, device: str) -> str:
    """Hash of everything a device's slice depends on."""
    stages = [[i, list(plan.stages[i].layers), plan.stages[i].role] for i in plan.stage_indices(device)]
    identity = {"model": model, "weights": model_identity(model), "lora": lora.to_dict(), "stages": stages,
                "base_dtype": plan.base_dtype, "format": SLICE_FORMAT,
                "versions": toolchain_versions("torch", "transformers", "peft")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _directory(name: str) -> Path:
    path = cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _prune(root: Path) -> None:
    """Delete slices not used for KEEP_SLICES_DAYS (and torn writes as old)."""
    cutoff = time.time() - KEEP_SLICES_DAYS * 86400
    for path in root.iterdir():
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            pass  # another coordinator pruned it
