"""Write a safetensors file one tensor at a time (the header first, from shapes and dtypes known ahead).

``safetensors.torch.save_file`` wants every tensor in memory at once; a slice of a large model, or a
model converted from GGUF, is written here while at most one tensor is held. The file is the
standard format (``safe_open`` maps it); the sha256 of its bytes is computed as they are written.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
               torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


@dataclass(frozen=True, slots=True)
class TensorLayout:
    name: str
    """Key in the file."""
    shape: tuple[int, ...]
    """Shape of the tensor."""
    dtype: torch.dtype
    """Storage dtype."""

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, layout: Iterable[TensorLayout], produce: Callable[[TensorLayout], torch.Tensor],
                      metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[TensorLayout], None] = lambda entry: None) -> str:
    """Write the tensors of ``layout`` (in that order) to path, asking ``produce`` for one at a time;
    return the file's sha256. The file appears only when complete (written beside it, then renamed)."""
    layout = list(layout)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in layout:
        header[entry.name] = {"dtype": DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    digest = hashlib.sha256()
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as out:
        for chunk in (len(encoded).to_bytes(8, "little"), encoded):
            out.write(chunk)
            digest.update(chunk)
        for entry in layout:
            tensor = produce(entry)
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise ValueError(f"{entry.name}: got {tuple(tensor.shape)} {tensor.dtype}, the layout says "
                                 f"{entry.shape} {entry.dtype}")
            data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            out.write(data)
            digest.update(data)
            on_tensor(entry)
    os.replace(tmp, path)
    return digest.hexdigest()

