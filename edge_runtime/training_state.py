"""The training state of a run as one blob: every stage's LoRA tensors and AdamW state, and where
training stands (the step, which is also the owner's data cursor: the data order is a pure function
of the seed and the step index, and no other randomness is drawn while training).

Tensors are keyed ``KIND/NAME`` by their full peft name (StageRunner.training_state), so a state
taken under one split restores exactly under any other split of the same model.
"""
from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load, save


def pack_state(tensors: dict[str, torch.Tensor], step: int, losses: list[float]) -> bytes:
    """losses: the loss of each step done so far (the adapter's metadata needs all of them)."""
    if len(losses) != step:
        raise ValueError(f"a state at step {step} needs {step} losses, got {len(losses)}")
    return save(tensors, metadata={"step": str(step), "losses": json.dumps(losses)})


def unpack_state(blob: bytes) -> tuple[dict[str, torch.Tensor], int, list[float]]:
    """(tensors, step, losses) of a blob made by pack_state."""
    (header_bytes,) = struct.unpack("<Q", blob[:8])
    metadata = json.loads(blob[8:8 + header_bytes]).get("__metadata__", {})
    return load(blob), int(metadata["step"]), json.loads(metadata["losses"])
