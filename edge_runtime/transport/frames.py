"""Data-plane frame contents: a small msgpack header and the raw tensor bytes.

Sealing (MAC or encryption, replay counter) is ``ringtune.security.FrameAuthenticator``'s job;
this module turns a header and a tensor into the two byte strings it seals, and back, refusing
anything that is not exactly a well-formed header with a payload matching its dtype and shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgpack
import torch

FrameKind = Literal["activation", "gradient"]
MAX_HEADER_BYTES = 4096
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class FrameError(ValueError):
    """A frame that is refused (never applied): why, in words, and a reason to count it under."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


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


def pack_frame(header: FrameHeader, tensor: torch.Tensor) -> tuple[bytes, bytes]:
    """(header bytes, payload bytes) for FrameAuthenticator.seal."""
    head = msgpack.packb([header.run, header.step, header.microbatch, header.kind, header.dtype,
                          list(header.shape), header.codec])
    return head, tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def unpack_frame(head: bytes, payload: bytes | memoryview) -> tuple[FrameHeader, torch.Tensor]:
    """Parse an opened frame; raise FrameError for anything not exactly right."""
    if len(head) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(head)} bytes is too long")
    header = _parse_header(head)
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
