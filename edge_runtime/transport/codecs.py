"""Encode a float32 tensor [..., d] into a frame's payload with a wire codec, and back (ringtune.wire).

Encoding happens after the owner privatizes (the privacy runner's output is what the edge sends),
and decoding gives float32 again, so the stages never see another dtype.
"""
from __future__ import annotations

import math

import torch

from ringtune.wire import CODECS, outliers_per_token, payload_bytes

INT8_MAX = 127
MAX_INT8_WIDTH = 2 ** 15 - 1
"""Widest vector whose outlier channels an int16 index can name."""


def encode(codec: str, tensor: torch.Tensor) -> bytes:
    """The payload of a float32 tensor [..., d]."""
    tensor = tensor.detach().to(torch.float32).contiguous().cpu()
    if codec == "fp32":
        return _raw(tensor)
    if codec == "bf16":
        return _raw(tensor.to(torch.bfloat16))
    if codec == "fp16":
        return _raw(tensor.to(torch.float16))
    if codec == "int8":
        if tensor.shape[-1] > MAX_INT8_WIDTH:
            raise ValueError(f"the int8 codec indexes channels with int16: hidden size {tensor.shape[-1]} is over "
                             f"{MAX_INT8_WIDTH}, use --wire bf16")
        rows = tensor.reshape(-1, tensor.shape[-1])  # [N, d]
        index = rows.abs().topk(outliers_per_token(rows.shape[1]), dim=1).indices  # [N, k]
        outliers = rows.gather(1, index).to(torch.bfloat16)  # [N, k]
        scale, values = _int8(rows.scatter(1, index, 0.0))
        return _raw(scale) + _raw(index.to(torch.int16)) + _raw(outliers) + _raw(values)
    raise ValueError(f"unknown wire codec {codec!r}: use one of {', '.join(CODECS)}")


def decode(codec: str, payload: bytes | bytearray | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of a payload (its length already checked against ``payload_bytes``)."""
    data = bytearray(payload)
    if codec == "fp32":
        return torch.frombuffer(data, dtype=torch.float32).reshape(shape)
    if codec in ("bf16", "fp16"):
        half = torch.bfloat16 if codec == "bf16" else torch.float16
        return torch.frombuffer(data, dtype=half).to(torch.float32).reshape(shape)
    if codec == "int8":
        rows, width = _rows(shape), shape[-1]
        k = outliers_per_token(width)
        scale = torch.frombuffer(data, dtype=torch.float32, count=rows).reshape(rows, 1)  # [N, 1]
        index = torch.frombuffer(data, dtype=torch.int16, offset=4 * rows, count=rows * k).reshape(rows, k)
        outliers = torch.frombuffer(data, dtype=torch.bfloat16, offset=(4 + 2 * k) * rows, count=rows * k)
        values = torch.frombuffer(data, dtype=torch.int8, offset=(4 + 4 * k) * rows).reshape(rows, width)  # [N, d]
        if rows * k and (int(index.min()) < 0 or int(index.max()) >= width):
            raise ValueError(f"int8 payload names a channel outside 0..{width - 1}")
        decoded = values.to(torch.float32) * scale
        decoded.scatter_(1, index.to(torch.int64), outliers.reshape(rows, k).to(torch.float32))
        return decoded.reshape(shape)
    raise ValueError(f"unknown wire codec {codec!r}: use one of {', '.join(CODECS)}")


def encoded_bytes(codec: str, shape: tuple[int, ...]) -> int:
    """Payload bytes of a tensor of this shape [..., d] (d: a token's width)."""
    return payload_bytes(codec, _rows(shape), shape[-1])


def _rows(shape: tuple[int, ...]) -> int:
    """Vectors in a tensor of this shape: every dimension but the last."""
    return math.prod(shape[:-1])


def _int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax scale [N, 1] and int8 values [N, d]; an all-zero row (a pad's gradient) stays zero."""
    scale = rows.abs().amax(dim=1, keepdim=True) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(rows / safe).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return scale, values


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()
