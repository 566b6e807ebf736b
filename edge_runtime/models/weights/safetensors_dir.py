"""A Hugging Face model directory's safetensors weights, one file or sharded
(``model.safetensors.index.json``), read one tensor at a time through a memory map.

Each ``get`` maps the file holding the tensor and returns it converted to fp32 (a bf16 or fp16
checkpoint is widened here); the mapping goes away with the tensor, so pages read for one stage do
not pile up in the coordinator's memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsDir:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._files = _tensor_files(self.directory)

    def keys(self) -> set[str]:
        return set(self._files)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self._files[key]), "pt") as tensors:
            return tensors.get_tensor(key).to(torch.float32)

    def describe(self) -> str:
        return f"the weights in {self.directory}"


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Which file holds each tensor."""
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    if (directory / SINGLE).is_file():
        with safe_open(str(directory / SINGLE), "pt") as tensors:
            return {key: directory / SINGLE for key in tensors.keys()}
    raise FileNotFoundError(
        f"{directory} has no {SINGLE} or {INDEX}: ringtune reads safetensors weights; load the model once "
        f"with transformers and save it with save_pretrained(safe_serialization=True)")
