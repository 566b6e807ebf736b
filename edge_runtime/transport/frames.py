"""Data-plane frames: a small msgpack header, the raw tensor bytes, and an HMAC-SHA256 tag.

Layout: ``u32 header length | msgpack header | payload | 32-byte MAC`` where the MAC covers
everything before it, keyed with the run's session key. Receivers check the size limit and the
MAC before parsing anything, then the header, then that the payload matches dtype and shape.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Literal

import msgpack
import torch

FrameKind = Literal["activation", "gradient"]
MAC_BYTES = 32
_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 4096
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class FrameError(ValueError):
    """A frame that is refused (never applied): why, in words."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    run: str
    """Run id: frames of another run are refused."""
    step: int
    """Optimizer step the frame belongs to."""
    microbatch: int
    """Micro-batch index within the step."""
    kind: FrameKind
    """activation (forward) or gradient (backward)."""
    dtype: str
    """Tensor dtype name, e.g. float32."""
    shape: tuple[int, ...]
    """Tensor shape."""
    codec: str = "raw"
    """Payload encoding: raw tensor bytes (privacy/compression codecs plug in here)."""


def encode_frame(header: FrameHeader, tensor: torch.Tensor, key: bytes) -> bytes:
    head = msgpack.packb([header.run, header.step, header.microbatch, header.kind, header.dtype,
                          list(header.shape), header.codec])
    payload = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    body = _LENGTH.pack(len(head)) + head + payload
    return body + hmac.digest(key, body, hashlib.sha256)


def decode_frame(data: bytes, key: bytes, max_bytes: int) -> tuple[FrameHeader, torch.Tensor]:
    """Verify and parse a frame; raise FrameError for anything not exactly right."""
    if len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _LENGTH.size + MAC_BYTES:
        raise FrameError(f"frame of {len(data)} bytes is too short")
    body, tag = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if not hmac.compare_digest(hmac.digest(key, body, hashlib.sha256), tag):
        raise FrameError("bad MAC (wrong session key or tampered frame)")
    (head_len,) = _LENGTH.unpack_from(body)
    if head_len > MAX_HEADER_BYTES or _LENGTH.size + head_len > len(body):
        raise FrameError(f"header length {head_len} is out of range")
    header = _parse_header(body[_LENGTH.size:_LENGTH.size + head_len])
    payload = body[_LENGTH.size + head_len:]
    dtype = DTYPES[header.dtype]
    expected = _numel(header.shape) * dtype.itemsize
    if len(payload) != expected:
        raise FrameError(f"payload has {len(payload)} bytes, header says {expected}")
    tensor = torch.frombuffer(bytearray(payload), dtype=dtype).reshape(header.shape)
    return header, tensor


def _parse_header(raw: bytes) -> FrameHeader:
    try:
        fields = msgpack.unpackb(raw)
        run, step, microbatch, kind, dtype, shape, codec = fields
        header = FrameHeader(str(run), int(step), int(microbatch), kind, str(dtype),
                             tuple(int(n) for n in shape), str(codec))
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise FrameError(f"malformed header: {error}") from None
    if header.kind not in ("activation", "gradient") or header.dtype not in DTYPES:
        raise FrameError(f"unknown kind {header.kind!r} or dtype {header.dtype!r}")
    if header.codec != "raw" or any(n < 0 for n in header.shape) or len(header.shape) > 8:
        raise FrameError(f"unsupported codec {header.codec!r} or shape {header.shape}")
    return header


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count
